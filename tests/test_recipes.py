"""Execute docs/recipes.md: every block after a ``<!-- test: NAME -->`` marker runs, in
order, in an empty directory, and each recipe's claims are checked.

Shell lines ``python -m sam_jax.train ARGS`` run through ``sam_jax.train.cli.main``
in this process with TINY_FLAGS appended (argparse: the last occurrence wins);
Python blocks run with ``sam_jax.train.run`` wrapped to apply the same two settings.
The page says so in its introduction.
"""
import contextlib
import io
import json
import pathlib
import re
import shlex
import sys

import jax
import numpy as np
import pytest

import sam_jax.train
from sam_jax.train import cli

RECIPES = pathlib.Path(__file__).resolve().parents[1] / "docs" / "recipes.md"
TINY_STEPS, TINY_WIDTH = 2, 4
TINY_FLAGS = ["--steps-per-epoch", str(TINY_STEPS), "--model-kwargs", json.dumps({"width": TINY_WIDTH}),
              "--no-progress"]
BLOCK = re.compile(r"<!-- test: (\w+) -->\s*\n```(\w+)\n(.*?)\n```", re.S)


def recipe_blocks() -> dict:
    blocks = {}
    for name, lang, code in BLOCK.findall(RECIPES.read_text()):
        blocks.setdefault(name, []).append((lang, code))
    return blocks


def train_cli(args: list[str]) -> tuple[int, str]:
    """``python -m sam_jax.train ARGS`` with the tiny flags; returns (exit status, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(args + TINY_FLAGS)
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return code, err.getvalue()


def shell_commands(code: str, substitutions: dict) -> list[list[str]]:
    commands = []
    for line in code.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for old, new in substitutions.items():
            line = line.replace(old, new)
        words = shlex.split(line)
        assert words[:3] == ["python", "-m", "sam_jax.train"], f"untestable shell line in recipes.md: {line}"
        commands.append(words[3:])
    return commands


def tiny_run(config):
    return _REAL_RUN(config.replace(steps_per_epoch=TINY_STEPS, model_kwargs={"width": TINY_WIDTH}, progress=False))


_REAL_RUN = sam_jax.train.run


def execute(name, tmp_path, monkeypatch, substitutions=None, expect_exit=0):
    """Run recipe ``name``'s blocks in ``tmp_path``; returns the Python namespace and stdout."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sam_jax.train, "run", tiny_run)
    namespace, out = {"__name__": f"recipe_{name}"}, io.StringIO()
    for lang, code in recipe_blocks()[name]:
        if lang == "bash":
            for args in shell_commands(code, substitutions or {}):
                status, stderr = train_cli(args)
                assert status == expect_exit, stderr[-3000:]
                namespace.setdefault("_stderr", []).append(stderr)
        else:
            assert lang == "python", lang
            with contextlib.redirect_stdout(out):
                exec(compile(code, f"docs/recipes.md:{name}", "exec"), namespace)
    return namespace, out.getvalue()


def test_every_marked_recipe_has_a_test():
    tested = {"lambda_max", "branching", "rho_sweep", "cifar10", "flax_linen", "flax_nnx"}
    assert set(recipe_blocks()) == tested


@pytest.mark.slow
def test_lambda_max_recipe_equals_the_logged_value(tmp_path, monkeypatch):
    ns, out = execute("lambda_max", tmp_path, monkeypatch)
    history = sam_jax.train.read_metrics("runs/switch")
    last = history[-1]
    assert ns["epoch"] == last["epoch"] + 1 == 25
    assert "lambda_max" in last
    assert float(ns["eig"].lambda_max) == pytest.approx(last["lambda_max"], rel=1e-4)
    assert float(ns["eig"].eigenvalues[1]) == pytest.approx(last["lambda_2"], rel=1e-4)
    assert out.startswith("epoch 25: lambda_max ")


@pytest.mark.slow
def test_branching_recipe(tmp_path, monkeypatch):
    ns, out = execute("branching", tmp_path, monkeypatch)
    from sam_jax.train import checkpoint_epochs, load_variables, read_metrics

    for trunk in ("runs/sgd", "runs/sgd_py"):
        assert checkpoint_epochs(trunk) == [5, 10, 15, 20, 24, 25]
    for t, branch in ns["branches"].items():
        assert branch.history[0]["epoch"] == t and {h["phase"] for h in branch.history} == {"sam"}
        assert branch.grad_evals == (t + 2 * (25 - t)) * TINY_STEPS
    cli_history = read_metrics("runs/sgd_sam_15")
    assert cli_history[0]["epoch"] == 15 and cli_history[-1]["grad_evals"] == (15 + 20) * TINY_STEPS
    # the CLI branch and the Python branch start from identical trunks: identical results
    for a, b in zip(jax.tree.leaves(load_variables("runs/sgd_sam_15")),
                    jax.tree.leaves(load_variables("runs/sgd_sam_py_15"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # a branch point that was not kept fails and names the problem
    status, stderr = train_cli(["--dataset", "mnist1d", "--model", "cnn1d", "--phases", "sgd:12,sam:13",
                                "--init-from", "runs/sgd", "--init-step", "12", "--workdir", "runs/bad"])
    assert status == 2 and "12" in stderr and "checkpoint" in stderr.lower(), stderr
    assert "SAM for the last 10 epochs" in out and "checkpoints: [5, 10, 15, 20, 24, 25]" in out


@pytest.mark.slow
def test_rho_sweep_recipe(tmp_path, monkeypatch):
    ns, out = execute("rho_sweep", tmp_path, monkeypatch)
    sweep = ns["sweep"]
    assert sorted(sweep) == [0.0, 0.02, 0.05, 0.1, 0.2]
    for rho, record in sweep.items():
        assert record["rho"] == rho and record["epoch"] == 24 and "lambda_max" in record
        assert record["perturbation_norm"] == pytest.approx(rho, rel=1e-5, abs=1e-9)
    sgd = tiny_run(ns["base"].replace(workdir="runs/sgd", phases="sgd:25", rho=0.0))
    sam0 = sam_jax.train.load_variables("runs/rho_0.0")
    for a, b in zip(jax.tree.leaves(sgd.variables), jax.tree.leaves(sam0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert len(out.strip().splitlines()) == 5


def test_cifar10_recipe_reaches_data_loading_without_tfds(tmp_path, monkeypatch):
    """Every flag of the command is valid: it stops only at data loading (TFDS hidden)."""
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    empty = tmp_path / "tfds"
    empty.mkdir()
    ns, _ = execute("cifar10", tmp_path, monkeypatch, {"~/tensorflow_datasets": str(empty)}, expect_exit=2)
    assert "pip install 'sam-jax[tfds]'" in ns["_stderr"][0]


@pytest.mark.tfds
@pytest.mark.slow
def test_cifar10_recipe_trains_on_fake_tfds(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_datasets")
    from sam_jax.data.testing import prepare_fake_cifar10

    data_dir = tmp_path / "tfds"
    prepare_fake_cifar10(str(data_dir), n_train=16, n_test=8, seed=0)
    # the data path is what this checks: a small CNN instead of WRN-16-8 (whose compilation
    # alone takes minutes on a loaded CPU), 2 epochs, no lambda_max
    extra = {"--phases sgd:175,sam:25:0.05": "--phases sgd:1,sam:1:0.05", "--batch-size 128": "--batch-size 8",
             "--model wrn16_8": "--model cnn6", "--lambda-max-every 25": "--lambda-max-every 0",
             "~/tensorflow_datasets": str(data_dir)}
    execute("cifar10", tmp_path, monkeypatch, extra)
    history = sam_jax.train.read_metrics("runs/cifar10_wrn16_8")
    assert [h["phase"] for h in history] == ["sgd", "sam"]


@pytest.mark.parametrize("name", [pytest.param("flax_linen", marks=pytest.mark.slow), "flax_nnx"])
def test_flax_loop_recipes(name, tmp_path, monkeypatch):
    ns, out = execute(name, tmp_path, monkeypatch)
    losses = [float(m) for m in re.findall(r"epoch \d: loss ([\d.]+)", out)]
    assert len(losses) == 2 and losses[1] < losses[0], out
    if name == "flax_linen":
        opt_state = ns["state"].opt_state
    else:
        from flax import nnx

        opt_state = nnx.as_pure(ns["optimizer"].opt_state)
    stats = sam_jax.perturbation_stats(opt_state)
    assert float(stats["perturbation_norm"]) == pytest.approx(0.05, rel=1e-5)
