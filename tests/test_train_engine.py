"""The training engine's contracts: one compiled step for every ρ > 0 of a phase
(traced ρ), the logged norms ‖θ‖ and ‖Δθ‖, config.json's versions, the run
identity, donation of the train state, λ_max's chunk size, the console table, and
`PhaseOptimizer` finding the chain's pieces by type.

Tiny runs: MNIST-1D, an MLP of width 8, 2 steps per epoch.
"""
import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from sam_jax.train import (CompileCache, PhaseOptimizer, RunIdentity, TrainConfig,
                           load_variables, loop, run)
from sam_jax.train.logging import Progress, summarize, table_header

BASE = dict(dataset="mnist1d", model="mlp", model_kwargs={"width": 8, "depth": 1},
            batch_size=32, steps_per_epoch=2, eval_batch_size=500, progress=False, lr=0.05)


def _config(workdir, **changes):
    return TrainConfig(workdir=str(workdir), **{**BASE, **changes})


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _norm(tree) -> float:
    return float(np.sqrt(sum(np.sum(np.square(x.astype(np.float64))) for x in _leaves(tree))))


# ------------------------------------------------------------------- traced ρ
def test_two_sam_phases_with_different_rho_compile_one_step(tmp_path):
    traced, static = CompileCache(rho="traced"), CompileCache(rho="static")
    phases = "sam:1:0.05,sam:1:0.1"
    a = run(_config(tmp_path / "traced", phases=phases), cache=traced)
    b = run(_config(tmp_path / "static", phases=phases), cache=static)
    assert traced.train_step_compilations == 1   # one program for both radii
    assert static.train_step_compilations == 2   # a constant ρ compiles one per radius
    assert [r["rho"] for r in a.history] == [0.05, 0.1]
    # the traced radius is the radius: same training as with constants
    for x, y in zip(_leaves(a.variables), _leaves(b.variables)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    # a ρ sweep over runs reuses that step too, and ρ = 0 compiles its own
    run(_config(tmp_path / "sweep", phases="sam:1:0.2"), cache=traced)
    assert traced.train_step_compilations == 1
    run(_config(tmp_path / "zero", phases="sam:1:0.0"), cache=traced)
    assert traced.train_step_compilations == 2


def test_auto_rho_mode_is_static_on_cpu_without_the_optim_hint():
    # A traced ρ puts SAM's second gradient inside lax.cond (the ρ = 0 pass-through),
    # which XLA:CPU runs far slower for convolutions: 'auto' traces ρ on CPU only
    # when sam_jax.optim._core can be told that ρ != 0.
    cache = CompileCache()
    hint = getattr(sam_jax.optim._core, "assume_nonzero_rho", None)
    expected = jax.default_backend() != "cpu" or hint is not None
    assert cache.traced_rho is expected
    with pytest.raises(ValueError, match="rho must be one of"):
        CompileCache(rho="sometimes")


# ------------------------------------------------------------ logged norms
@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    config = _config(root / "run", phases="sgd:1,sam:1", keep_last=None)
    return run(config)


def test_param_norm_is_the_norm_of_the_saved_params(two_epochs):
    for record in two_epochs.history:
        saved = load_variables(two_epochs.workdir, record["epoch"] + 1)["params"]
        assert record["param_norm"] == pytest.approx(_norm(saved), rel=1e-6)


def test_update_norm_is_the_norm_of_one_steps_change(tmp_path):
    config = _config(tmp_path / "one", phases="sam:1", steps_per_epoch=1)
    result = run(config)
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model

    train = get_dataset("mnist1d", "train")
    model = get_model("mlp", train.num_classes, width=8, depth=1)
    params, _ = loop._init_variables(model, config, train.input_shape, train.num_classes)
    change = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                          result.variables["params"], params)
    record = result.history[0]
    assert record["update_norm"] == pytest.approx(_norm(change), rel=1e-5)
    # the first step from zero momentum: Δθ = -lr·g_SAM, so ‖Δθ‖ = lr·‖g_SAM‖ > 0
    assert record["update_norm"] > 0


def test_metrics_jsonl_has_the_norms(two_epochs):
    with open(two_epochs.metrics_path) as f:
        lines = [json.loads(line) for line in f]
    for line in lines:
        for key in ("grad_norm", "perturbation_norm", "param_norm", "update_norm"):
            assert isinstance(line[key], float) and np.isfinite(line[key])
    assert lines[0]["perturbation_norm"] == 0.0  # SGD
    assert lines[1]["perturbation_norm"] == pytest.approx(0.05, rel=1e-3)  # SAM: ‖ε‖ = ρ


# ------------------------------------------------------------- config.json
def test_config_json_records_the_versions(two_epochs):
    from importlib import metadata

    with open(two_epochs.config_path) as f:
        record = json.load(f)
    versions = record["versions"]
    assert versions["jax"] == jax.__version__
    assert versions["optax"] == optax.__version__
    assert versions["flax"] == metadata.version("flax")
    assert versions["orbax-checkpoint"] == metadata.version("orbax-checkpoint")
    assert versions["sam_jax"] == record["sam_jax_version"] == sam_jax.__version__
    commit = record["sam_jax_git_commit"]
    assert commit == loop._git_commit()  # `git rev-parse HEAD`, asked once per process
    root = os.path.dirname(os.path.dirname(sam_jax.__file__))
    if commit is not None:  # a commit of this checkout (others may commit meanwhile)
        assert len(commit) == 40 and int(commit, 16) >= 0
        ancestor = subprocess.run(["git", "merge-base", "--is-ancestor", commit, "HEAD"],
                                  cwd=root, timeout=10)
        assert ancestor.returncode == 0


# ------------------------------------------------------------ run identity
def test_run_identity_is_one_comparison():
    a = TrainConfig(workdir="a", seed=3, model_kwargs={"width": 8})
    logistics = TrainConfig(workdir="b", seed=3, model_kwargs={"width": 8}, progress=False,
                            eval_every=5, keep_last=None, lambda_max_every=2,
                            eval_batch_size=250, host_step_kinds=False)
    assert a.run_identity() == logistics.run_identity()
    assert hash(a.run_identity()) == hash(logistics.run_identity())
    assert a.run_identity() != a.replace(lr=0.2).run_identity()
    assert a.run_identity() != a.replace(phases="sgd:20,sam:5:0.1").run_identity()
    assert a.run_identity() != a.replace(model_kwargs={"width": 9}).run_identity()
    # the lambda_max protocol defines what is logged: identity
    assert a.run_identity() != a.replace(lambda_max_chunk=64).run_identity()
    # canonical: JSON round trip, a field an older version did not save is its default
    saved = json.loads(json.dumps(a.to_dict()))
    del saved["clip_norm"]
    assert RunIdentity.of(saved) == a.run_identity()
    assert RunIdentity.of(saved) != a.replace(clip_norm=1.0).run_identity()
    assert a.run_identity().as_dict()["seed"] == 3
    assert "workdir" not in a.run_identity().as_dict()


def test_every_old_keyword_still_works():
    config = TrainConfig(workdir="w", dataset="digits", model="mlp", phases="sgd:2",
                         rho=0.1, lambda_max_every=1, lambda_max_examples=64,
                         lambda_max_bn_mode="running", lambda_max_iters=5, eval_every=2)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert config.lambda_max_chunk == 128


# ---------------------------------------------------------------- donation
def test_the_compiled_step_donates_the_state():
    config = _config("unused", phases="sam:1")
    cache = CompileCache()
    setup = loop.prepare(config, cache)
    opt = setup.optimizers[0]
    params, stats = loop._init_variables(setup.model, config, setup.train_ds.input_shape,
                                         setup.num_classes, cache)
    state = jax.device_put(loop.TrainState(params, stats, opt.init(params)),
                           loop.parallel.replicated(setup.mesh))
    batch = next(iter(setup.train_ds.batches(32, seed=0, epoch=0)))
    step = setup.train_step(opt)
    new, _ = step(state, loop.parallel.put_batch(batch, setup.mesh), opt.hyperparams(0.05),
                  loop.dropout_key(0, 0))
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
    assert not any(x.is_deleted() for x in jax.tree.leaves(new))


def test_donation_does_not_break_resume(tmp_path):
    full = run(_config(tmp_path / "full", phases="sgd:1,sam:2", keep_last=None))
    # the same run interrupted after epoch 2: drop its last checkpoint and record
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "3")
    resumed = run(_config(tmp_path / "cut", phases="sgd:1,sam:2", keep_last=None))
    assert resumed.resumed_from == 2
    for x, y in zip(_leaves(full.variables), _leaves(resumed.variables)):
        np.testing.assert_array_equal(x, y)
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]


# --------------------------------------------------------- PhaseOptimizer
def test_phase_optimizer_carries_momentum_and_counts_by_type():
    config = TrainConfig(phases="sgd:1,sam:1:0.1", momentum_at_switch="carry")
    sgd, sam = (PhaseOptimizer(config, p, 10) for p in config.phase_list)
    params = {"w": jnp.ones(3)}
    old = sgd.init(params)
    old = jax.tree.map(lambda n: n._replace(trace={"w": jnp.full(3, 7.0)})
                       if isinstance(n, optax.TraceState) else n, old,
                       is_leaf=lambda n: isinstance(n, optax.TraceState))
    new = sam.switch_from(old, params)
    traces = [n for n in jax.tree.leaves(new, is_leaf=lambda n: isinstance(n, optax.TraceState))
              if isinstance(n, optax.TraceState)]
    np.testing.assert_array_equal(traces[0].trace["w"], 7.0)
    assert PhaseOptimizer.count(new) == 0 and sam.rho == 0.1 and sgd.rho == 0.0
    reset = PhaseOptimizer(config.replace(momentum_at_switch="reset"), config.phase_list[1], 10)
    assert _norm(reset.switch_from(old, params)) == 0.0
    assert sam.grad_evals_per_step == 2.0 and sgd.grad_evals_per_step == 1.0
    assert sam.step_kinds == (None,)


# ------------------------------------------------------------------ λ_max
def test_lambda_max_chunks_are_what_the_operator_receives(tmp_path, monkeypatch):
    from sam_jax import curvature

    seen = []
    original = curvature.HessianOperator

    def recording(loss_fn, params, batches, *args, **kwargs):
        seen.append([int(b["x"].shape[0]) for b in batches])
        return original(loss_fn, params, batches, *args, **kwargs)

    monkeypatch.setattr(curvature, "HessianOperator", recording)
    result = run(_config(tmp_path / "lam", phases="sgd:1", lambda_max_every=1,
                         lambda_max_examples=300, lambda_max_iters=4, lambda_max_chunk=128))
    assert seen == [[128, 128, 44]]
    assert np.isfinite(result.history[0]["lambda_max"])
    assert TrainConfig().lambda_max_chunk == 128  # late-phase SAM authors' code


# ----------------------------------------------------------------- console
def test_summarize_is_an_aligned_labelled_table(two_epochs):
    text = summarize(two_epochs.history)
    lines = text.splitlines()
    assert lines[0] == table_header()
    for label in ("epoch", "phase", "lr", "train loss", "test acc", "grad norm", "ε norm",
                  "‖θ‖", "λ_max", "epoch s"):
        assert label in lines[0]
    assert len(lines) == 1 + len(two_epochs.history)
    assert len({len(line) for line in lines}) == 1  # aligned columns
    start = lines[0].index("λ_max")
    assert lines[1][start:start + 5].strip() == ""  # not measured: blank
    assert f"{two_epochs.history[1]['train_loss']:.4f}" in lines[2]


def test_progress_prints_rows_without_a_bar_when_not_a_terminal(tmp_path, capsys):
    result = run(_config(tmp_path / "p", phases="sgd:2", progress=True))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0] == table_header() and len(lines) == 3
    assert "step/s" not in err and "it/s" not in err  # no tqdm bar in a non-terminal
    run(_config(tmp_path / "p", phases="sgd:2", progress=True))
    out, _ = capsys.readouterr()
    assert "already complete" in out and "final epoch 1" in out
    assert result.metrics_path in out


def test_progress_bar_follows_the_terminal():
    import io

    assert Progress(10, enabled=True, stream=io.StringIO())._bar.disable  # pytest: no TTY
    assert not Progress(10, enabled=True, bar=True, stream=io.StringIO())._bar.disable


def test_auto_mode_uses_the_optim_hint_when_it_exists(tmp_path, monkeypatch):
    # The hook for sam_jax.optim._core.assume_nonzero_rho (a context manager under
    # which a traced rho skips the rho == 0 lax.cond): 'auto' traces rho when it
    # exists and the engine traces every rho > 0 step inside it.
    import contextlib

    entered = []

    @contextlib.contextmanager
    def hint():
        entered.append(True)
        yield

    monkeypatch.setattr(sam_jax.optim._core, "assume_nonzero_rho", hint, raising=False)
    cache = CompileCache()
    assert cache.traced_rho
    run(_config(tmp_path / "hinted", phases="sgd:1,sam:1:0.05"), cache=cache)
    assert len(entered) == 1  # the SAM step, traced once; SGD needs no hint
    assert cache.train_step_compilations == 2


def test_keep_epochs_saves_and_keeps_exactly_those_epochs(tmp_path):
    """The switch points other runs branch from are saved and kept even with
    keep_last=1 and no checkpoint cadence; nothing else but the boundaries/last."""
    from sam_jax.train import checkpoint_epochs

    config = _config(tmp_path / "run", phases="sgd:6", keep_last=1, checkpoint_every=6,
                     keep_epochs=[4, 2])  # a JSON list is accepted and sorted
    assert config.keep_epochs == (2, 4)
    run(config)
    assert checkpoint_epochs(str(tmp_path / "run")) == [2, 4, 6]
    with pytest.raises(ValueError, match="keep_epochs"):
        _config(tmp_path / "bad", keep_epochs=(0,)).validate()
