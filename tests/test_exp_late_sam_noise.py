"""Tests of experiments/late_sam_noise (late-phase SAM under label noise).

* The "smallest late-SAM proportion within one standard error of full SAM" rule and
  the gradient-evaluation cost on hand-made accuracies (hand-computed means, SEs).
* The pilot's choice rule on a hand-made summary.
* The tiny preset through ``main``: results.json structure; the engine's measured
  gradient evaluations equal the closed-form cost 1 + p; the label noise is drawn
  with each run's seed; a rerun reuses every run and gives the same numbers.
"""

import json
import math

import numpy as np
import pytest

from experiments import late_sam_noise as lsn


# ------------------------------------------------------------------- statistics

def test_gradient_cost_closed_form():
    assert lsn.gradient_cost_rel_sgd(0.0) == 1.0
    assert lsn.gradient_cost_rel_sgd(1.0) == 2.0
    assert lsn.gradient_cost_rel_sgd(0.2) == pytest.approx(1.2)
    assert lsn.gradient_cost_rel_sgd(0.5, sam_step_cost=3.0) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        lsn.gradient_cost_rel_sgd(1.5)


FULL_SAM = [0.90, 0.92, 0.94]
LATE = {  # proportion -> per-seed accuracies (same seed order as FULL_SAM)
    0.4: [0.90, 0.93, 0.945],     # d = [0, +.01, +.005]: above full SAM
    0.1: [0.85, 0.86, 0.87],      # d = [-.05, -.06, -.07]: mean -.06, SE .01/√3
    0.2: [0.89, 0.92, 0.944],     # d = [-.01, 0, +.004]: mean -.002, SE .0041633
}


def test_within_one_se_hand_computed():
    d = lsn.within_one_se(LATE[0.2], FULL_SAM)
    assert d["mean"] == pytest.approx(-0.002)
    # deviations -.008, .002, .006 -> var = 104e-6 / 2 -> std = √52e-6
    assert d["std"] == pytest.approx(math.sqrt(52e-6))
    assert d["se"] == pytest.approx(math.sqrt(52e-6) / math.sqrt(3))     # 0.0041633
    assert d["within"]                                                    # -.002 ≥ -.0042
    far = lsn.within_one_se(LATE[0.1], FULL_SAM)
    assert far["mean"] == pytest.approx(-0.06) and far["se"] == pytest.approx(0.01 / math.sqrt(3))
    assert not far["within"]
    # One seed: no standard error, never "within".
    assert not lsn.within_one_se([0.95], [0.90])["within"]


def test_smallest_matching_proportion_and_its_cost():
    props = list(LATE)                         # unsorted on purpose
    out = lsn.smallest_matching_proportion(props, [LATE[p] for p in props], FULL_SAM)
    assert [r["sam_proportion"] for r in out["per_proportion"]] == [0.1, 0.2, 0.4]
    assert [r["within"] for r in out["per_proportion"]] == [False, True, True]
    assert out["smallest"] == 0.2
    assert out["cost_rel_sgd"] == pytest.approx(1.2)
    assert out["all_larger_within"] is True
    # Nothing within: no proportion, no cost.
    none = lsn.smallest_matching_proportion([0.1], [LATE[0.1]], FULL_SAM)
    assert none["smallest"] is None and none["cost_rel_sgd"] is None
    # A non-monotone curve: the smallest hit is reported, and flagged.
    odd = lsn.smallest_matching_proportion([0.1, 0.2], [LATE[0.2], LATE[0.1]], FULL_SAM)
    assert odd["smallest"] == 0.1 and odd["all_larger_within"] is False


def test_choose_setting_uses_validation_only():
    ms = lambda m: {"mean": m, "std": 0.0, "n": 2, "values": [m, m]}
    summary = [
        {"noise": 0.2, "optimizer": "sgd", "rho": None, "val_acc_noisy_labels": ms(0.70),
         "val_gain_over_sgd": ms(0.0), "test_acc": ms(0.99)},
        {"noise": 0.2, "optimizer": "sam", "rho": 0.05, "val_acc_noisy_labels": ms(0.74),
         "val_gain_over_sgd": ms(0.04), "test_acc": ms(0.50)},
        {"noise": 0.2, "optimizer": "sam", "rho": 0.1, "val_acc_noisy_labels": ms(0.73),
         "val_gain_over_sgd": ms(0.03), "test_acc": ms(0.99)},   # best test: ignored
        {"noise": 0.4, "optimizer": "sgd", "rho": None, "val_acc_noisy_labels": ms(0.45),
         "val_gain_over_sgd": ms(0.0), "test_acc": ms(0.80)},
        {"noise": 0.4, "optimizer": "sam", "rho": 0.05, "val_acc_noisy_labels": ms(0.47),
         "val_gain_over_sgd": ms(0.02), "test_acc": ms(0.80)},
        {"noise": 0.4, "optimizer": "sam", "rho": 0.1, "val_acc_noisy_labels": ms(0.51),
         "val_gain_over_sgd": ms(0.06), "test_acc": ms(0.80)},
    ]
    choice = lsn.choose_setting(summary)
    assert choice["best_rho_per_noise"] == {"0.2": 0.05, "0.4": 0.1}
    assert (choice["noise"], choice["rho"]) == (0.4, 0.1)
    assert choice["val_gain_over_sgd"] == pytest.approx(0.06)


# ------------------------------------------------------------------ tiny preset

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("late_sam_noise")
    results = lsn.main(["--scale", "tiny", "--workdir", str(workdir)])
    return workdir, results


@pytest.mark.slow
def test_tiny_results_structure(tiny_run):
    workdir, _ = tiny_run
    saved = json.loads((workdir / "results.json").read_text())
    assert saved["experiment"] == "late_sam_noise" and saved["scale"] == "tiny"
    assert saved["figures"] == ["late_sam_noise.png"]
    assert (workdir / "late_sam_noise.png").exists() and (workdir / "late_sam_noise.pdf").exists()
    res = saved["results"]
    study = lsn.SCALE_PRESETS["tiny"]
    seeds = list(study.seeds)
    assert sorted(res["per_seed"]) == [str(s) for s in seeds]
    names = {"sgd", "sam", "sgd_to_sam_1", "sgd_to_sam_2", "sam_to_sgd_1"}
    for s in seeds:
        runs = res["per_seed"][str(s)]
        assert set(runs) == names
        for r in runs.values():
            assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["memorized"] <= 1.0
            assert r["label_noise_seed"] == s          # noise drawn with the run's seed
    claim = res["claim"]
    assert claim["n_seeds"] == len(seeds)
    assert {"sam_minus_sgd", "sam_beats_sgd_by_2se", "sgd_to_sam", "sam_to_sgd",
            "late_sam_reaches_full_sam"} <= set(claim)
    assert [p["sam_proportion"] for p in claim["sgd_to_sam"]["per_proportion"]] == [0.25, 0.5]
    # The paired SAM − SGD difference is the mean of the per-seed differences.
    diffs = [res["per_seed"][str(s)]["sam"]["test_acc"] - res["per_seed"][str(s)]["sgd"]["test_acc"]
             for s in seeds]
    assert claim["sam_minus_sgd"]["mean"] == pytest.approx(np.mean(diffs))
    assert claim["sam_minus_sgd"]["se"] == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(len(seeds)))
    assert "full SAM − full SGD > 2 SE (paired over 2 seeds)" in res["verdicts"][0]
    assert res["table"].count("\n") == 2 + 5 - 1   # header, rule, 5 rows


@pytest.mark.slow
def test_tiny_measured_cost_equals_closed_form(tiny_run):
    _, results = tiny_run
    for row in results["rows"]:
        assert row["grad_evals_rel_sgd"] == pytest.approx(row["grad_evals_rel_sgd_formula"])
    # Branching: each switched run computed only its own epochs.
    T = lsn.SCALE_PRESETS["tiny"].total_epochs
    for runs in results["per_seed"].values():
        sgd_evals = runs["sgd"]["grad_evals"]
        for k in (1, 2):
            own = runs[f"sgd_to_sam_{k}"]["own_grad_evals"]
            assert own == pytest.approx(sgd_evals * 2 * k / T)


@pytest.mark.slow
def test_tiny_rerun_reuses_every_run(tiny_run, capsys):
    workdir, first = tiny_run
    capsys.readouterr()
    again = lsn.main(["--scale", "tiny", "--workdir", str(workdir)])
    out = capsys.readouterr().out
    assert out.count("reused a finished run") == 10
    assert again["per_seed"] == first["per_seed"]
    assert "tiny scale: smoke test, numbers are not results" in out


# ------------------------------------------------- ablation: the lr schedule

def test_schedule_option_reaches_train_config(tmp_path):
    from sam_jax.train.schedules import make_schedule

    preset = lsn.SCALE_PRESETS["cpu"]
    assert lsn.with_schedule(preset, None) is preset            # default: the preset's
    assert preset.train["schedule"] == "wrn_step"
    constant = lsn.with_schedule(preset, "constant")
    assert preset.train["schedule"] == "wrn_step"               # the preset is not mutated
    assert {k: v for k, v in constant.train.items() if k != "schedule"} == \
        {k: v for k, v in preset.train.items() if k != "schedule"}
    T, spe = preset.total_epochs, 8000 // 64                    # 125 steps per epoch
    sums = {}
    for study in (preset, constant):
        # A late-SAM run (SAM in the last 6 of 30 epochs) branched from the SGD run.
        config = lsn.late_sam.make_train_config(study, tmp_path / "run", f"sgd:{T - 6},sam:6", 0,
                                                init_from=tmp_path / "sgd", init_step=T - 6)
        assert (config.schedule, config.lr, config.rho) == (study.train["schedule"], 0.05, 0.1)
        lr = make_schedule(config.schedule, config.lr, T * spe, spe)
        sums[config.schedule] = sum(lr(step) for step in range((T - 6) * spe, T * spe))
    # Σ lr·steps over the last 20 %: 6 × 125 steps at 0.05 × 0.04 (wrn_step) or 0.05.
    assert sums["wrn_step"] == pytest.approx(750 * 0.002)       # 1.5
    assert sums["constant"] == pytest.approx(750 * 0.05)        # 37.5
    with pytest.raises(ValueError):
        lsn.with_schedule(preset, "linear")


def test_schedule_flag_reaches_run_experiment(tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_run_experiment(scale, workdir, seeds=None, study=None, schedule=None):
        seen["study"] = lsn.with_schedule(study or lsn.SCALE_PRESETS[scale], schedule)
        raise Stop

    monkeypatch.setattr(lsn, "run_experiment", fake_run_experiment)
    for argv, expected in ((["--schedule", "constant"], "constant"), ([], "wrn_step")):
        with pytest.raises(Stop):
            lsn.main(["--scale", "tiny", "--workdir", str(tmp_path)] + argv)
        assert seen["study"].train["schedule"] == expected
    with pytest.raises(SystemExit):                             # argparse: not a schedule
        lsn.main(["--scale", "tiny", "--workdir", str(tmp_path), "--schedule", "linear"])
