"""Tests of experiments/label_noise (SGD vs SAM vs late SAM under label noise).

* Memorization metrics on hand-made predictions (hand-counted fractions).
* Paired differences, the late-SAM share and the claim criteria on hand-made
  per-seed records (closed-form t-intervals).
* The SGD→SAM curve starts at the SGD run's value at the switch point.
* Config validation and checkpoint pruning.
* The tiny preset through ``main``: results.json structure; the memorization the
  module measured on checkpoints equals an independent evaluation of the final
  model on the flipped examples (``common.evaluate`` with noisy / clean labels);
  the final test accuracy equals ``common.evaluate`` on the test split; a rerun
  reuses every run and gives the same numbers; the pruned run directories keep only
  what resuming needs (the engine resumes a finished run at once).
"""

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import stats

from experiments import common, label_noise as ln


# ------------------------------------------------------------------ memorization

def test_memorization_metrics_hand_counted():
    clean = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    noisy = np.array([0, 1, 2, 3, 9, 9, 9, 9])      # the last four are flipped
    flipped = noisy != clean
    pred = np.array([0, 1, 2, 0, 9, 9, 6, 1])        # 2 flipped → noisy, 1 → clean, 1 other
    m = ln.memorization_metrics(pred, noisy, clean, flipped)
    assert m["num_flipped"] == 4
    assert m["memorized"] == pytest.approx(2 / 4)
    assert m["as_clean"] == pytest.approx(1 / 4)
    assert m["clean_fit"] == pytest.approx(3 / 4)    # unflipped: 0,1,2 right, 3 wrong
    assert m["train_acc"] == pytest.approx(5 / 8)


def test_memorization_metrics_without_noise_are_nan():
    y = np.array([0, 1, 2])
    m = ln.memorization_metrics(y, y, y, np.zeros(3, bool))
    assert math.isnan(m["memorized"]) and math.isnan(m["as_clean"])
    assert m["clean_fit"] == 1.0 and m["num_flipped"] == 0


# ------------------------------------------------------------ aggregation/claims

SETUP = ln.DatasetSetup(dataset="toy", model="mlp", total_epochs=6, late_sam_epochs=2,
                        rho=0.1, memorization_every=2)


def _record(final_acc, memorized, as_clean, kind="sgd", switch_value=None):
    """A per-run record with test acc over epochs ending at ``final_acc``."""
    first = 5 if kind == "sgd_to_sam" else 1     # a branch logs only epochs after t = 4
    epochs = [{"epoch": e, "test_acc": final_acc - 0.01 * (6 - e)} for e in range(first, 7)]
    memo_epochs = [6] if kind == "sgd_to_sam" else [2, 4, 6]
    memo = [{"epoch": e, "memorized": memorized * e / 6, "as_clean": as_clean}
            for e in memo_epochs]
    return {"epochs": epochs, "memorization": memo, "test_acc": final_acc,
            "best_test_acc": final_acc, "train_acc": 0.9, "memorized": memorized,
            "as_clean": as_clean, "clean_fit": 0.95}


def _cell(gains, late_gains, memo_diffs, base=0.80, noise=True):
    cell = {}
    for s, (g, lg, md) in enumerate(zip(gains, late_gains, memo_diffs)):
        m = 0.3 if noise else float("nan")
        c = 0.6 if noise else float("nan")
        cell[s] = {"sgd": _record(base + 0.01 * s, m, c),
                   "sam": _record(base + 0.01 * s + g, m + md if noise else m, c),
                   "sgd_to_sam": _record(base + 0.01 * s + lg, m, c, kind="sgd_to_sam")}
    return cell


def test_summarize_cell_paired_differences_match_closed_form():
    gains, late = [0.02, 0.03, 0.04], [0.01, 0.01, 0.01]
    summary = ln.summarize_cell(_cell(gains, late, [-0.1, -0.2, -0.3]))
    diff = summary["sam_minus_sgd"]["test_acc"]
    half = stats.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)       # std of gains = 0.01
    assert diff["mean"] == pytest.approx(0.03)
    assert diff["ci_low"] == pytest.approx(0.03 - half)
    assert diff["ci_high"] == pytest.approx(0.03 + half)
    assert summary["sam_minus_sgd"]["memorized"]["mean"] == pytest.approx(-0.2)
    assert summary["sgd_to_sam_minus_sgd"]["test_acc"]["mean"] == pytest.approx(0.01)
    assert summary["late_share_of_sam_gain"] == pytest.approx(0.01 / 0.03)
    assert summary["sgd"]["test_acc"]["mean"] == pytest.approx(0.81)


def test_late_share_only_where_sam_gain_is_resolved():
    summary = ln.summarize_cell(_cell([0.05, -0.04, 0.01], [0.01, 0.0, 0.01], [0, 0, 0]))
    assert summary["sam_minus_sgd"]["test_acc"]["ci_low"] < 0
    assert summary["late_share_of_sam_gain"] is None


def test_summary_without_noise_has_no_memorization():
    summary = ln.summarize_cell(_cell([0.0, 0.01, 0.0], [0, 0, 0], [0, 0, 0], noise=False))
    assert summary["sgd"]["memorized"] is None
    assert summary["sam_minus_sgd"]["memorized"] is None


def test_claim_verdict_criteria():
    per_cell = {"toy": {
        0.0: _cell([0.000, 0.001, -0.001], [0, 0, 0], [0, 0, 0], noise=False),
        0.2: _cell([0.02, 0.03, 0.025], [0.01, 0.012, 0.011], [-0.1, -0.12, -0.11]),
        0.4: _cell([0.05, 0.06, 0.055], [0.02, 0.025, 0.022], [-0.2, -0.25, -0.22]),
    }}
    summary = {"toy": {p: ln.summarize_cell(c) for p, c in per_cell["toy"].items()}}
    v = ln.claim_verdict(summary, per_cell)["toy"]
    assert v["sam_beats_sgd"] and v["gain_grows_with_noise"]
    assert v["sam_memorizes_less"] and v["late_sam_recovers_part"]
    assert v["gain_growth_max_minus_min_noise"]["mean"] == pytest.approx(0.055)
    assert v["late_sam_share_of_sam_gain"][0.4] == pytest.approx(0.067 / 3 / 0.055)
    assert v["late_sam_share_of_sam_gain"][0.0] is None     # no resolved gain at 0 %
    # A noise level where SAM's gain is not resolved fails the first claim; a gain that
    # does not grow fails the second; more memorization fails the third.
    per_cell["toy"][0.4] = _cell([0.05, -0.06, 0.0], [0.0, -0.01, 0.0], [0.1, 0.2, 0.15])
    summary = {"toy": {p: ln.summarize_cell(c) for p, c in per_cell["toy"].items()}}
    v = ln.claim_verdict(summary, per_cell)["toy"]
    assert v["sam_beats_sgd_per_noise"] == {0.2: True, 0.4: False}
    assert not v["sam_beats_sgd"] and not v["gain_grows_with_noise"]
    assert v["sam_memorizes_less_per_noise"] == {0.2: True, 0.4: False}
    assert not v["late_sam_recovers_part"]


def test_branch_curve_starts_at_the_sgd_value_at_the_switch():
    cell = _cell([0.02, 0.03], [0.01, 0.01], [-0.1, -0.1])
    x, y = ln.curves(SETUP, cell, "sgd_to_sam", "test_acc")
    assert list(x) == [4, 5, 6]
    sgd_x, sgd_y = ln.curves(SETUP, cell, "sgd", "test_acc")
    assert list(sgd_x) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(y[:, 0], sgd_y[:, 3])          # SGD at epoch 4 = switch
    np.testing.assert_allclose(y[:, -1], [0.81, 0.82])
    x, y = ln.curves(SETUP, cell, "sgd_to_sam", "memorized")
    assert list(x) == [4, 6]
    np.testing.assert_allclose(y[:, 0], 0.3 * 4 / 6)


# ------------------------------------------------------------------ config, pruning

def test_setup_validation():
    with pytest.raises(ValueError, match="divide"):
        dataclasses.replace(SETUP, memorization_every=4)     # 6 − 2 = 4 ok, 6 not
    with pytest.raises(ValueError, match="late_sam_epochs"):
        dataclasses.replace(SETUP, late_sam_epochs=6)
    for preset in ln.SCALE_PRESETS.values():                 # every preset is consistent
        assert len(preset.seeds) >= 2
    assert len(ln.SCALE_PRESETS["cpu"].seeds) >= 5
    assert ln.SCALE_PRESETS["cpu"].noise_levels == (0.0, 0.2, 0.4)


def test_train_configs_branch_from_the_sgd_run(tmp_path):
    setup = ln.SCALE_PRESETS["cpu"].setups[0]
    sgd = ln.make_train_config(setup, tmp_path / "sgd", "sgd", 0.2, 3, tmp_path)
    sam = ln.make_train_config(setup, tmp_path / "sam", "sam", 0.2, 3, tmp_path)
    late = ln.make_train_config(setup, tmp_path / "b", "sgd_to_sam", 0.2, 3, tmp_path)
    assert sgd.dataset_kwargs == {**setup.dataset_kwargs, "label_noise": 0.2,
                                  "label_noise_seed": 3}
    assert sgd.dataset_kwargs == sam.dataset_kwargs == late.dataset_kwargs
    assert sgd.seed == sam.seed == late.seed == 3 and sgd.eval_every == 1
    assert late.phases == f"sgd:{setup.switch_epoch},sam:{setup.late_sam_epochs}"
    assert late.init_from == str(tmp_path / "sgd") and late.init_step == setup.switch_epoch
    assert "label_noise" not in ln.make_train_config(
        setup, tmp_path / "c", "sgd", 0.0, 3, tmp_path).dataset_kwargs
    # Every preset's configs pass the engine's validation (paper: configured, not run).
    for preset in ln.SCALE_PRESETS.values():
        for s in preset.setups:
            for kind in ln.RUN_KINDS:
                ln.make_train_config(s, tmp_path / kind, kind, 0.4, 0, tmp_path).validate()


def test_prune_checkpoints_keeps_listed_epochs(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for name in ("3", "6", "9", "tmp_thing"):
        (ckpt / name).mkdir(parents=True)
    assert ln.prune_checkpoints(tmp_path, keep=[9, 6]) == [3]
    assert sorted(p.name for p in ckpt.iterdir()) == ["6", "9", "tmp_thing"]
    assert ln.prune_checkpoints(tmp_path / "absent", keep=[]) == []


# -------------------------------------------------------------------- tiny preset

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("label_noise")
    ln.main(["--scale", "tiny", "--workdir", str(workdir)])
    return workdir


def _load(workdir):
    return json.loads((workdir / common.RESULTS_FILE).read_text())


@pytest.mark.slow
def test_tiny_results_structure(tiny_run):
    data = _load(tiny_run)
    assert data["experiment"] == "label_noise" and data["scale"] == "tiny"
    assert data["figures"] == ["label_noise_test_acc.png", "label_noise_memorization.png"]
    for name in data["figures"]:
        assert (tiny_run / name).exists() and (tiny_run / name).with_suffix(".pdf").exists()
    res = data["results"]
    study = ln.SCALE_PRESETS["tiny"]
    assert res["runs_total"] == 2 * 2 * 3 and res["runs_reused"] == 0
    summary = res["summary"]["digits"]
    assert set(summary) == {"0.0", "0.4"}
    for key in ("test_acc", "memorized", "as_clean"):
        assert set(summary["0.4"]["sam_minus_sgd"][key]) >= {"mean", "ci_low", "ci_high", "n"}
    claim = res["claim"]["digits"]
    for key in ("sam_beats_sgd", "gain_grows_with_noise", "sam_memorizes_less",
                "late_sam_recovers_part", "criteria"):
        assert key in claim
    setup = study.setups[0]
    runs = res["per_run"]["digits"]["0.4"]["0"]
    assert [e["epoch"] for e in runs["sgd"]["epochs"]] == list(range(1, setup.total_epochs + 1))
    assert [e["epoch"] for e in runs["sgd_to_sam"]["epochs"]] == list(
        range(setup.switch_epoch + 1, setup.total_epochs + 1))
    assert [m["epoch"] for m in runs["sam"]["memorization"]] == [2, 4]
    # 40 % of digits' 1,437 train labels are flipped; SGD and SAM see the same ones.
    assert runs["sgd"]["num_flipped"] == runs["sam"]["num_flipped"] == round(0.4 * 1437)
    # Full SAM costs two gradients per step; the branch pays SGD's prefix once.
    steps = setup.train["steps_per_epoch"]
    assert runs["sam"]["grad_evals"] == pytest.approx(2 * runs["sgd"]["grad_evals"])
    assert runs["sgd_to_sam"]["grad_evals"] == pytest.approx(
        steps * (setup.switch_epoch + 2 * setup.late_sam_epochs))
    assert "| dataset" in res["table"]


@pytest.mark.slow
def test_tiny_memorization_equals_direct_evaluation(tiny_run):
    """The checkpoint-based measurement = accuracy of the final model on the flipped
    examples with their noisy labels (and with their clean labels), computed by the
    shared evaluator; the final test accuracy = the evaluator on the test split."""
    from sam_jax.data import get_dataset
    from sam_jax.models import get_model
    from sam_jax.train import load_variables

    setup = ln.SCALE_PRESETS["tiny"].setups[0]
    res = _load(tiny_run)["results"]["per_run"]["digits"]["0.4"]["1"]
    train = get_dataset("digits", "train", label_noise=0.4, label_noise_seed=1)
    test = get_dataset("digits", "test")
    flipped = np.flatnonzero(train.per_example["noisy"])
    subset = train.take(flipped)
    as_clean = dataclasses.replace(subset, y=subset.per_example["clean_y"])
    model = get_model(setup.model, 10, **setup.model_kwargs)
    for kind in ln.RUN_KINDS:
        variables = load_variables(str(tiny_run / "digits/noise40/seed1" / kind))
        assert res[kind]["memorized"] == pytest.approx(
            common.evaluate(model, variables, subset)["acc"], abs=1e-9)
        assert res[kind]["as_clean"] == pytest.approx(
            common.evaluate(model, variables, as_clean)["acc"], abs=1e-9)
        assert res[kind]["test_acc"] == pytest.approx(
            common.evaluate(model, variables, test)["acc"], abs=1e-6)


@pytest.mark.slow
def test_tiny_rerun_reuses_runs_and_resume_still_works(tiny_run, capsys):
    from sam_jax.train import checkpoint_epochs, run

    before = _load(tiny_run)["results"]
    capsys.readouterr()
    ln.main(["--scale", "tiny", "--workdir", str(tiny_run)])
    out = capsys.readouterr().out
    assert out.count("reused a finished run") == 12 and "reused 12 of 12" in out
    after = _load(tiny_run)["results"]
    assert after["runs_reused"] == 12
    assert after["summary"] == before["summary"] and after["claim"] == before["claim"]
    # Only the final checkpoint is left, and the engine treats the run as finished.
    setup = ln.SCALE_PRESETS["tiny"].setups[0]
    root = tiny_run / "digits/noise40/seed0"
    for kind in ln.RUN_KINDS:
        assert checkpoint_epochs(str(root / kind)) == [setup.total_epochs]
    config = ln.make_train_config(setup, root / "sgd", "sgd", 0.4, 0, root)
    result = run(config)
    assert result.resumed_from == setup.total_epochs
    assert result.history[-1]["test_acc"] == pytest.approx(
        before["per_run"]["digits"]["0.4"]["0"]["sgd"]["test_acc"])
