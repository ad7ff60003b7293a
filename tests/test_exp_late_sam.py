"""Right-answer tests of experiments/late_sam.py and experiments/same_valley.py.

* same_valley's default (authors') protocol: at λ = 0 and λ = 1 the loss equals the
  eval-mode loss of each endpoint model with its *own* BN running statistics, and at
  an interior grid point the loss of the model whose parameters AND running mean/var
  are the linear interpolation — computed here independently, on the 1,000 random
  train images chosen by the documented rule (a BN model, so the old batch-mode
  evaluation fails this test).
* late_sam: the Fig. 1a curves (branch = SGD prefix + own epochs), the verdict text
  (each boolean with its thresholds), the figure (y shared per row, reference lines
  at full SGD / full SAM, error bars = 95 % t-interval), the paper preset's
  provenance tags, and at tiny scale through ``main``: per-epoch test accuracy is
  logged and does not change training (bit-equal to a run that evaluates only at the
  end).
"""

import json
import math

import numpy as np
import pytest

from experiments import common, late_sam, same_valley

# ----------------------------------------------------------------- same_valley (BN)

BN_STUDY = late_sam.StudyConfig(dataset="digits", model="cnn6",
                                model_kwargs={"width": 2, "use_bn": True}, total_epochs=4,
                                sgd_to_sam_epochs=(1,), sam_to_sgd_epochs=(1,), rho=0.05,
                                seeds=(0,))


def _bn_variables(model, key_seed, stats_seed):
    """Random parameters and random, non-trivial BN running statistics."""
    import jax

    variables = model.init(jax.random.PRNGKey(key_seed), np.zeros((2, 8, 8, 1), np.float32),
                           train=False)
    rng = np.random.default_rng(stats_seed)
    stats = jax.tree.map(lambda a: a, variables["batch_stats"])
    stats = {layer: {"mean": rng.normal(0, 0.5, np.shape(v["mean"])).astype(np.float32),
                     "var": rng.uniform(0.2, 3.0, np.shape(v["var"])).astype(np.float32)}
             for layer, v in stats.items()}
    return {"params": variables["params"], "batch_stats": stats}


def _eval_loss(model, variables, x, y):
    """Mean cross entropy in eval mode (BN running statistics), computed directly."""
    import jax

    logits = np.asarray(model.apply(variables, x, train=False), np.float64)
    logits = logits - logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(y)), y]))


@pytest.fixture(scope="module")
def bn_pair():
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model

    train_ds = get_dataset("digits", "train")
    model = get_model("cnn6", train_ds.num_classes, width=2, use_bn=True)
    late = _bn_variables(model, 1, 11)
    sgd = _bn_variables(model, 2, 22)
    result = same_valley.interpolation_study(BN_STUDY, sgd, late)
    # The documented selection: 1,000 random train images, seed EXAMPLE_SEED = 0.
    index = np.sort(np.random.default_rng(0).choice(train_ds.num_examples, 1000,
                                                    replace=False))
    arrays = train_ds.arrays()
    return {"model": model, "late": late, "sgd": sgd, "result": result,
            "x": arrays["x"][index], "y": arrays["y"][index], "train_ds": train_ds}


@pytest.mark.slow  # the BN pair's fixture compiles cnn6 (56 s at load 24)
def test_same_valley_default_endpoints_are_eval_mode_losses_of_each_model(bn_pair):
    model, res = bn_pair["model"], bn_pair["result"]
    assert res["protocol"] == "authors" and res["examples"] == 1000
    assert bn_pair["train_ds"].num_examples > 1000  # a real random choice, not all
    expected_late = _eval_loss(model, bn_pair["late"], bn_pair["x"], bn_pair["y"])
    expected_sgd = _eval_loss(model, bn_pair["sgd"], bn_pair["x"], bn_pair["y"])
    assert abs(expected_late - expected_sgd) > 1e-3  # the two endpoints differ
    assert res["loss_sgd_to_sam"] == pytest.approx(expected_late, rel=1e-5)
    assert res["loss_sgd"] == pytest.approx(expected_sgd, rel=1e-5)


@pytest.mark.slow  # the BN pair's fixture compiles cnn6 (56 s at load 24)
def test_same_valley_interpolates_bn_running_statistics_with_the_parameters(bn_pair):
    import jax

    model, res = bn_pair["model"], bn_pair["result"]
    lambdas = np.asarray(res["lambdas"])
    assert len(lambdas) == 40 and lambdas[0] == pytest.approx(-0.2)
    for i in (5, 20, 38):  # inside [0, 1] and beyond λ = 1
        lam = float(lambdas[i])
        point = jax.tree.map(lambda a, b: (1 - lam) * np.asarray(a) + lam * np.asarray(b),
                             bn_pair["late"], bn_pair["sgd"])
        expected = _eval_loss(model, point, bn_pair["x"], bn_pair["y"])
        assert res["losses"][i] == pytest.approx(expected, rel=1e-4), lam


@pytest.mark.slow  # the BN pair's fixture compiles cnn6 (56 s at load 24)
def test_same_valley_batch_bn_option_is_the_old_protocol(bn_pair):
    # BN batch statistics of the first N examples: not the endpoints' eval-mode losses.
    from sam_jax import curvature

    res = same_valley.interpolation_study(BN_STUDY, bn_pair["sgd"], bn_pair["late"],
                                          examples=1000, protocol="batch_bn")
    assert res["protocol"] == "batch_bn" and res["bn_mode"] == "batch"
    arrays = bn_pair["train_ds"].subset(1000).arrays()
    loss_fn = curvature.flax_loss_fn(bn_pair["model"], bn_pair["late"], bn_mode="batch")
    total, count = loss_fn(bn_pair["late"]["params"], {"x": arrays["x"], "y": arrays["y"]})
    assert res["loss_sgd_to_sam"] == pytest.approx(float(total / count), rel=1e-5)
    expected_eval = _eval_loss(bn_pair["model"], bn_pair["late"], bn_pair["x"], bn_pair["y"])
    assert res["loss_sgd_to_sam"] != pytest.approx(expected_eval, rel=1e-3)
    with pytest.raises(ValueError, match="protocol"):
        same_valley.interpolation_study(BN_STUDY, bn_pair["sgd"], bn_pair["late"],
                                        protocol="nope")


def test_same_valley_verdict_criteria_on_known_numbers():
    runs = {0: {"barrier": 0.04, "loss_sgd": 1.0, "loss_sgd_to_sam": 0.5,
                "lpp_increasing": True, "lpp_spearman_on_0_1": 0.3},
            1: {"barrier": 0.06, "loss_sgd": 1.0, "loss_sgd_to_sam": 0.9,
                "lpp_increasing": True, "lpp_spearman_on_0_1": -0.1}}
    claim = same_valley.claim_verdict(runs)
    assert claim["no_barrier_all_seeds"] is False  # 0.06 > 5 % of 1.0
    assert claim["lpp_larger_at_sgd_all_seeds"] is True
    assert claim["lpp_rank_increasing_all_seeds"] is False
    assert claim["max_barrier"] == pytest.approx(0.06)
    text = same_valley.format_verdict(claim).splitlines()
    assert text[0].startswith("same valley, no barrier (") and "≤ 5 %" in text[0]
    assert text[0].split("): ")[1].startswith("no")


# ------------------------------------------------------------------- late_sam logic

def _record(lam, acc, direction, k, curve_epochs=(), curve_acc=()):
    return {"direction": direction, "sam_epochs": k, "test_acc": acc, "train_acc": 1.0,
            "gen_gap": 1.0 - acc, "lambda_max": lam, "lambda_2": lam / 2,
            "grad_evals": 100.0 + k * 10, "own_grad_evals": 10.0,
            "curve_epochs": list(curve_epochs), "curve_test_acc": list(curve_acc)}


SMALL = late_sam.StudyConfig(dataset="mnist1d", model="cnn1d", total_epochs=4,
                             sgd_to_sam_epochs=(1,), sam_to_sgd_epochs=(1,), rho=0.05,
                             seeds=(0, 1))


@pytest.fixture(scope="module")
def fake_study():
    per_seed = {}
    for seed, d in ((0, 0.0), (1, 0.01)):
        per_seed[seed] = {
            "sgd": _record(10.0 + 2 * d, 0.90 + d, "baseline", 0, [1, 2, 3, 4],
                           [0.5, 0.7, 0.8 + d, 0.90 + d]),
            "sam": _record(4.0, 0.93 + d, "baseline", 4, [1, 2, 3, 4],
                           [0.4, 0.7, 0.85, 0.93 + d]),
            "sgd_to_sam_1": _record(4.6, 0.929 + d, "sgd_to_sam", 1, [4], [0.929 + d]),
            "sam_to_sgd_1": _record(9.4, 0.905 + d, "sam_to_sgd", 1, [2, 3, 4],
                                    [0.6, 0.8, 0.905 + d]),
        }
    rows = late_sam.aggregate(SMALL, per_seed)
    return per_seed, rows, late_sam.claim_verdict(SMALL, rows, per_seed)


def test_fig1a_curve_is_the_sgd_prefix_then_the_branch(fake_study):
    per_seed = fake_study[0]
    curves = late_sam.test_error_curves(SMALL, per_seed)
    np.testing.assert_allclose(curves["sgd"][1], 1 - np.array([0.5, 0.7, 0.81, 0.91]))
    # Branched at t = 3: epochs 1-3 are the SGD run's, epoch 4 its own.
    np.testing.assert_allclose(curves["sgd_to_sam"][0], 1 - np.array([0.5, 0.7, 0.8, 0.929]))
    np.testing.assert_allclose(curves["sgd_to_sam"][1], 1 - np.array([0.5, 0.7, 0.81, 0.939]))
    assert curves["sam"].shape == (2, 4)
    assert SMALL.fig1_run() == 1
    assert late_sam.SCALE_PRESETS["paper"].fig1_run() == 25  # t = 175 of 200
    assert late_sam.SCALE_PRESETS["cpu"].fig1_run() == 6


def test_verdict_prints_each_boolean_with_its_thresholds(fake_study):
    per_seed, rows, claim = fake_study
    # tolerance = max(0.5 %, 2 × std(0.93, 0.94)) = 2 × 0.0070711 = 1.414 %
    assert claim["test_acc_tolerance"] == pytest.approx(2 * np.std([0.93, 0.94], ddof=1))
    share = (10.01 - 4.6) / (10.01 - 4.0)
    assert claim["per_proportion"][0]["sharpness_reduction_recovered"] == pytest.approx(share)
    lines = late_sam.format_verdict(claim).splitlines()
    late = next(line for line in lines if line.startswith("late SAM"))
    assert "≤ 0.25 SAM proportion" in late and "≥ 50 %" in late and "≤ 1.41 %" in late
    assert late.split("): ")[1].startswith("yes")
    early = next(line for line in lines if line.startswith("early SAM"))
    assert "< 50 %" in early and early.split("): ")[1].startswith("yes")
    resolvable = next(line for line in lines if line.startswith("SAM's test-acc gain"))
    # paired SAM − SGD = +3.00 points in both seeds (std 0): resolvable
    assert "+3.00 [+3.00, +3.00]" in resolvable
    table = late_sam.format_proportions(claim)
    assert "| SGD → SAM" in table and "90 %" in table


def test_study_figure_shares_y_per_row_and_marks_full_sgd_and_sam(fake_study):
    rows = fake_study[1]
    fig = late_sam.study_figure(rows, "title")
    axes = np.array(fig.axes).reshape(3, 2)
    sgd = next(r for r in rows if r["run"] == "sgd")
    sam = next(r for r in rows if r["run"] == "sam")
    for row, (key, scale) in enumerate((("test_acc_minus_full_sam", 100), ("gen_gap", 100),
                                        ("lambda_max", 1))):
        left, right = axes[row]
        assert left.get_shared_y_axes().joined(left, right)
        assert left.get_ylim() == right.get_ylim()
        for ax in (left, right):
            levels = sorted(line.get_ydata()[0] for line in ax.lines
                            if len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2)
            assert levels == pytest.approx(sorted([sgd[key]["mean"] * scale,
                                                   sam[key]["mean"] * scale]))
    # Error bars: 95 % t-interval, two seeds: t_{0.975, 1} = 12.7062 × sd / √2.
    # Only full SGD's λ_max varies over the seeds (10.00, 10.02).
    sd = np.std(sgd["lambda_max"]["values"], ddof=1)
    assert sd > 0
    half = 12.7062047 * sd / math.sqrt(2)
    container = axes[2][0].containers[0]
    segments = container.lines[2][0].get_segments()
    heights = [(seg[1][1] - seg[0][1]) / 2 for seg in segments]
    assert heights == pytest.approx([half, 0.0, 0.0], abs=1e-9)
    common.pyplot().close(fig)


def test_paper_preset_states_the_provenance_of_every_hyper_parameter():
    study = late_sam.SCALE_PRESETS["paper"]
    prov = late_sam.PROVENANCE["paper"]
    fields = ["dataset", "dataset_kwargs", "model", "total_epochs", "sgd_to_sam_epochs",
              "sam_to_sgd_epochs", "rho", "seeds", "lambda_examples", "lambda_iters",
              "lambda_bn_mode", "lambda_chunk", "fig1_sam_epochs", *study.train]
    for name in fields:
        assert name in prov, name
        assert any(tag in prov[name] for tag in ("[code]", "[text]", "[recalled]",
                                                 "chosen by us")), name
    for name in ("rho", "lr", "weight_decay"):
        assert prov[name].startswith("[recalled]"), name
    assert "chosen by us" in prov["sgd_to_sam_epochs"] and "[text]" in prov["sgd_to_sam_epochs"]
    assert "chosen by us" in prov["sam_to_sgd_epochs"]
    assert study.lambda_chunk == 128 and study.fig1_sam_epochs == 25
    cpu = late_sam.SCALE_PRESETS["cpu"]
    for name in ["rho", "sgd_to_sam_epochs", "sam_to_sgd_epochs", *cpu.train]:
        assert name in late_sam.PROVENANCE["cpu"], name


# ------------------------------------------------------------ tiny end-to-end (main)

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    import contextlib
    import io

    workdir = tmp_path_factory.mktemp("late_sam_tiny")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        late_sam.main(["--scale", "tiny", "--workdir", str(workdir)])
    return workdir, out.getvalue()


@pytest.mark.slow
def test_tiny_main_logs_test_acc_every_epoch_and_prints_a_smoke_test(tiny_run):
    workdir, stdout = tiny_run
    data = json.loads((workdir / common.RESULTS_FILE).read_text())
    assert data["figures"] == ["late_sam.png", "fig1a_test_error.png"]
    for figure in data["figures"]:
        assert (workdir / figure).stat().st_size > 1000
    runs = data["results"]["per_seed"]["0"]
    assert runs["sgd"]["curve_epochs"] == [1, 2, 3, 4]
    assert runs["sam_to_sgd_1"]["curve_epochs"] == [2, 3, 4]   # branched after epoch 1
    assert runs["sgd_to_sam_2"]["curve_epochs"] == [3, 4]
    for run in runs.values():
        assert run["curve_test_acc"][-1] == run["test_acc"]
    assert data["config"]["provenance"] == {}  # tiny: a smoke test, no provenance
    assert stdout.startswith(common.SMOKE_NOTICE)
    assert "late_sam [5/5]" in stdout
    assert "late SAM gets most of full SAM's flatness (an SGD→SAM run" in stdout
    assert stdout.rstrip().splitlines()[-2] == common.SMOKE_NOTICE


@pytest.mark.slow
def test_per_epoch_evaluation_does_not_change_training(tiny_run, tmp_path):
    import dataclasses

    import jax

    from sam_jax.train import load_variables, run

    workdir, _ = tiny_run
    study = late_sam.SCALE_PRESETS["tiny"]
    config = late_sam.make_train_config(study, tmp_path / "sgd", "sgd:4", 0)
    assert config.eval_every == 1
    end_only = run(dataclasses.replace(config, eval_every=4))
    assert [h["epoch"] for h in end_only.history if "test_acc" in h] == [3]
    saved = load_variables(str(workdir / "seed0" / "sgd"))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(end_only.variables)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    data = json.loads((workdir / common.RESULTS_FILE).read_text())
    sgd = data["results"]["per_seed"]["0"]["sgd"]
    assert end_only.history[-1]["test_acc"] == sgd["test_acc"]
    assert end_only.history[-1]["lambda_max"] == sgd["lambda_max"]


def test_paper_preset_uses_the_authors_network_and_cutout_probability():
    """The paper preset trains davda54's WRN-16-8 (3 units per group, 17,158,106
    parameters; counted in tests/test_models_wrn.py) with Cutout at probability 0.5."""
    from experiments import late_sam
    from sam_jax.models import get_model

    paper = late_sam.SCALE_PRESETS["paper"]
    assert paper.model == "wrn16_8_davda54"
    assert paper.dataset_kwargs["cutout"] == 16 and paper.dataset_kwargs["cutout_prob"] == 0.5
    get_model(paper.model, 10)  # the name resolves
