"""Tests of experiments/ (paper reproductions): common, two-phase toy math, late_sam.

* The two-phase toy (Example 4.1): closed forms of the stability edges and escape
  rates, and — for every seed tested — a positive fitted escape rate that matches
  the exact one, and a final minimum flatter than SGD's in every trial.
* late_sam and same_valley run at ``tiny`` scale (the other modules' tiny runs are
  in their own ``tests/test_exp_*.py``) through its ``main(argv)`` and
  writes a ``results.json`` with the expected structure (module-scoped fixtures, so
  each runs once).
* The late-SAM aggregation and verdict logic on hand-made per-seed records.
"""

import json
import math

import numpy as np
import pytest

from experiments import common, late_sam, same_valley, two_phase


# ------------------------------------------------------------------------- common

def test_mean_std_matches_numpy():
    values = [0.91, 0.93, 0.94]
    stats = common.mean_std(values)
    assert stats["mean"] == pytest.approx(np.mean(values))
    assert stats["std"] == pytest.approx(np.std(values, ddof=1))
    assert common.mean_std([0.5])["std"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        common.mean_std([])


def test_write_json_is_strict(tmp_path):
    path = common.write_json(tmp_path / "a.json",
                             {"nan": float("nan"), "arr": np.arange(3), "f": np.float32(1.5)})
    loaded = json.loads(path.read_text())
    assert loaded == {"nan": None, "arr": [0, 1, 2], "f": 1.5}


def test_prepare_workdir_rejects_a_file(tmp_path):
    file = tmp_path / "f"
    file.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        common.prepare_workdir(file)


# --------------------------------------------------------------- two-phase toy math

TOY = two_phase.ToyConfig()


def test_edges_match_closed_form_without_noise():
    # One component, full batch: SGD is stable iff η h < 2, USAM iff η h (1 + ρ h) < 2.
    cfg = two_phase.ToyConfig(num_components=1, batch_size=1, curvature_spread=0.0)
    assert two_phase.stability_edge(cfg, 0.0) == pytest.approx(2 / cfg.lr, rel=1e-8)
    rho, lr = cfg.rho, cfg.lr
    usam_edge = (-1 + math.sqrt(1 + 8 * rho / lr)) / (2 * rho)  # ρh² + h − 2/η = 0
    assert two_phase.stability_edge(cfg, rho) == pytest.approx(usam_edge, rel=1e-8)
    h = 19.0
    expected = 2 * math.log(abs(1 - lr * h * (1 + rho * h)))
    assert two_phase.log_loss_rate(h, cfg, rho)[0] == pytest.approx(expected)


def test_usam_edge_is_flatter_than_sgd_edge():
    assert two_phase.stability_edge(TOY, TOY.rho) < two_phase.stability_edge(TOY, 0.0) - 3


@pytest.fixture(scope="module")
def toy_runs():
    return {seed: two_phase.simulate_toy(TOY, seed) for seed in (0, 1, 2, 3, 4)}


def test_toy_escape_rate_positive_and_matches_exact_rate(toy_runs):
    for seed, run in toy_runs.items():
        summary = two_phase.toy_summary(TOY, run)
        assert summary["escape_rate_fit"] > 0.5, seed           # loss grows like C^t, C > 1
        assert summary["escape_C_fit"] > 1.5, seed
        # The fit on the simulated mean log-loss agrees with E_B 2 log|1 − ηa_B h(1+ρa_B h)|.
        assert summary["escape_rate_fit"] == pytest.approx(summary["escape_rate_exact"],
                                                           rel=0.05), seed
        assert summary["fraction_escaped"] == 1.0, seed


def test_toy_final_minimum_flatter_in_every_trial(toy_runs):
    usam_edge = two_phase.stability_edge(TOY, TOY.rho)
    sgd_edge = two_phase.stability_edge(TOY, 0.0)
    for seed, run in toy_runs.items():
        assert np.all(run["h_final"] < run["h_sgd"]), seed
        # USAM can only come to rest where it is stable, SGD where it is.
        assert np.all(run["h_final"] <= usam_edge + 1e-6), seed
        assert np.all(run["h_sgd"] <= sgd_edge + 1e-6), seed
        # ... and both converged onto M = {v = 0}.
        assert np.all(run["loss_after_switch"][:, -1] < 1e-12), seed


def test_fit_escape_rate_recovers_a_known_exponential():
    t = np.arange(60)
    log_loss = np.where(t < 20, -20 + 0.7 * t, -6 - 0.1 * (t - 20))
    fit = two_phase.fit_escape_rate(log_loss)
    assert fit["rate"] == pytest.approx(0.7)
    assert fit["C"] == pytest.approx(math.exp(0.7))


def test_toy_config_rejects_bad_values():
    with pytest.raises(ValueError, match="batch_size"):
        two_phase.ToyConfig(batch_size=0)
    with pytest.raises(ValueError, match="lr"):
        two_phase.ToyConfig(lr=-1.0)


# ------------------------------------------------------------ late-SAM aggregation

def _fake_records(lam, acc, direction, k):
    return {"direction": direction, "sam_epochs": k, "test_acc": acc, "train_acc": 1.0,
            "gen_gap": 1.0 - acc, "lambda_max": lam, "lambda_2": lam / 2,
            "grad_evals": 100.0 + k * 10, "own_grad_evals": 10.0}


def test_late_sam_aggregate_and_verdict_on_known_records():
    study = late_sam.StudyConfig(dataset="mnist1d", model="cnn1d", total_epochs=10,
                                 sgd_to_sam_epochs=(2,), sam_to_sgd_epochs=(2,), rho=0.05,
                                 seeds=(0, 1))
    per_seed = {}
    for seed, noise in ((0, 0.0), (1, 0.002)):
        per_seed[seed] = {
            "sgd": _fake_records(10.0, 0.90 + noise, "baseline", 0),
            "sam": _fake_records(4.0, 0.93 + noise, "baseline", 10),
            "sgd_to_sam_2": _fake_records(4.6, 0.929 + noise, "sgd_to_sam", 2),
            "sam_to_sgd_2": _fake_records(9.4, 0.905 + noise, "sam_to_sgd", 2),
        }
    rows = late_sam.aggregate(study, per_seed)
    by_run = {(r["direction"], r["run"]): r for r in rows}
    late = by_run[("sgd_to_sam", "sgd_to_sam_2")]
    assert late["test_acc_minus_full_sam"]["mean"] == pytest.approx(-0.001)
    assert late["lambda_max"]["mean"] == pytest.approx(4.6)
    assert late["grad_evals_rel_sgd"] == pytest.approx(120.0 / 100.0)
    assert [r["sam_proportion"] for r in rows if r["direction"] == "sgd_to_sam"] == [0, 0.2, 1]
    verdict = late_sam.claim_verdict(study, rows, per_seed)
    shares = {p["direction"]: p["sharpness_reduction_recovered"]
              for p in verdict["per_proportion"]}
    assert shares["sgd_to_sam"] == pytest.approx((10 - 4.6) / 6)
    assert shares["sam_to_sgd"] == pytest.approx((10 - 9.4) / 6)
    assert verdict["late_sam_matches_full_sam"] is True
    assert verdict["early_sam_loses_flatness"] is True


def test_study_config_rejects_bad_switch_points():
    with pytest.raises(ValueError, match="sgd_to_sam_epochs"):
        late_sam.StudyConfig(dataset="mnist1d", model="cnn1d", total_epochs=10,
                             sgd_to_sam_epochs=(10,), sam_to_sgd_epochs=(2,), rho=0.05,
                             seeds=(0,))


# ------------------------------------------------------------- tiny end-to-end runs

def _load(workdir):
    data = json.loads((workdir / common.RESULTS_FILE).read_text())
    for key in ("experiment", "scale", "versions", "config", "results", "wall_time_s", "figures"):
        assert key in data, key
    assert data["scale"] == "tiny"
    assert data["versions"]["sam_jax"] != "not installed"
    for figure in data["figures"]:
        assert (workdir / figure).stat().st_size > 1000, figure
    return data


@pytest.fixture(scope="module")
def late_sam_tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("late_sam")
    late_sam.main(["--scale", "tiny", "--workdir", str(workdir)])
    return workdir


@pytest.mark.slow
def test_late_sam_tiny_cli(late_sam_tiny):
    data = _load(late_sam_tiny)
    results = data["results"]
    study = late_sam.SCALE_PRESETS["tiny"]
    expected_rows = 2 * 2 + len(study.sgd_to_sam_epochs) + len(study.sam_to_sgd_epochs)
    assert len(results["rows"]) == expected_rows
    for row in results["rows"]:
        for key in ("test_acc", "gen_gap", "lambda_max", "lambda_2", "test_acc_minus_full_sam"):
            assert set(row[key]) >= {"mean", "std", "n"}, key
        assert row["grad_evals_rel_sgd"] >= 1.0 - 1e-9
    runs = results["per_seed"]["0"]
    assert runs["sgd"]["lambda_bn_mode"] == "batch"
    # Full SAM costs two gradients per step; a branch pays only its own epochs.
    assert runs["sam"]["grad_evals"] == pytest.approx(2 * runs["sgd"]["grad_evals"])
    assert runs["sgd_to_sam_1"]["own_grad_evals"] == pytest.approx(
        2 * runs["sgd"]["grad_evals"] / study.total_epochs)
    assert results["compute"]["saved_by_branching"] > 0
    assert "late_sam_matches_full_sam" in results["claim"]
    assert set(results["claim"]["criteria"]) >= {"late_sam_matches_full_sam",
                                                 "early_sam_loses_flatness"}
    assert "| direction" in results["table"]
    assert data["figures"] == ["late_sam.png", "fig1a_test_error.png"]


@pytest.mark.slow
def test_same_valley_tiny_reuses_late_sam_runs(late_sam_tiny, tmp_path):
    same_valley.main(["--scale", "tiny", "--workdir", str(tmp_path),
                      "--from-late-sam", str(late_sam_tiny)])
    data = _load(tmp_path)
    res = data["results"]["per_seed"]["0"]
    assert len(res["lambdas"]) == 40 and len(res["second_derivative"]) == 40
    assert res["lambdas"][0] == pytest.approx(-0.2) and res["lambdas"][-1] == pytest.approx(1.2)
    # The authors' protocol by default: eval mode, on (here all) random train images.
    assert res["protocol"] == "authors" and res["bn_mode"] == "running, interpolated"
    # The endpoints are the two runs' models: λ = 1 is θ_SGD, whose loss late_sam measured
    # (eval mode, all train examples).
    late_runs = json.loads((late_sam_tiny / common.RESULTS_FILE).read_text())
    assert res["loss_sgd"] == pytest.approx(
        late_runs["results"]["per_seed"]["0"]["sgd"]["train_loss"], rel=1e-3)


# ----------------------------------------------------- shared statistics and progress

def test_paired_difference_matches_a_hand_computed_t_interval():
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 2.0, 3.0]
    diff = common.paired_difference(a, b)
    # differences 1, 0, 1, 1: mean 0.75, sd 0.5, t_{0.975, 3} = 3.182446
    assert diff["mean"] == pytest.approx(0.75)
    assert diff["std"] == pytest.approx(0.5)
    assert diff["ci_high"] - diff["mean"] == pytest.approx(3.182446 * 0.5 / 2, rel=1e-5)
    with pytest.raises(ValueError, match="equal"):
        common.paired_difference([1.0], [1.0, 2.0])


def test_run_progress_reports_count_eta_and_reuse():
    import io

    stream = io.StringIO()
    progress = common.RunProgress(3, "demo", stream=stream)
    progress.finished("first")
    progress.finished("second", reused=True)
    progress.finished("third")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("demo [1/3] first") and "ETA" in lines[0]
    assert "reused a finished run" in lines[1]
    assert lines[2].startswith("demo [3/3] third") and "ETA" not in lines[2]
