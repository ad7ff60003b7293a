"""experiments/eigen_table: the refresh interval, α selection on validation (never
test), the paired table rows, the paper preset, and the tiny end-to-end run."""

import json

import numpy as np
import pytest

from experiments import common, eigen_table as et
from sam_jax.optim.eigen_sam import refreshes_per_epoch
from sam_jax.train.config import parse_phases


def test_refresh_every_gives_one_refresh_per_epoch_at_the_papers_position():
    cfg = et.SCALE_PRESETS["cpu"]
    assert et.refresh_every(cfg, 195) == 100            # the released code on CIFAR
    assert et.refresh_every(cfg, 112) == 58             # MNIST-1D 3600 / 32
    assert et.refresh_every(cfg, 40) == 21              # digits 1293 / 32
    for steps in range(3, 400):
        assert refreshes_per_epoch(et.refresh_every(cfg, steps), steps) == 1, steps
    assert et.refresh_every(et.SCALE_PRESETS["paper"], 195) == 100  # explicit in the preset


def test_phases_carry_alpha_rho_and_the_per_epoch_schedule():
    cfg = et.SCALE_PRESETS["cpu"]
    setting = cfg.settings[0]
    (phase,) = parse_phases(et.phases(cfg, setting, "eigen_sam", 0.02, 0.05, 58))
    assert phase.name == "eigen_sam" and phase.rho == 0.02 and phase.epochs == setting.epochs
    assert dict(phase.kwargs) == {"alpha": 0.05, "refresh_every": 58, "power_iters": 5,
                                  "refresh_counter": "epoch"}
    (phase,) = parse_phases(et.phases(cfg, setting, "sam", 0.05, None, 58))
    assert (phase.name, phase.rho) == ("sam", 0.05)
    assert et.run_name("eigen_sam", 0.05, 0.1) == "eigen_sam_rho0.05_alpha0.1"
    assert et.run_name("sam", 0.02) == "sam_rho0.02" and et.run_name("sgd") == "sgd"
    assert et.dataset_kwargs(cfg, cfg.settings[2]) == {
        "label_noise": 0.2, "validation_fraction": 0.1, "validation_seed": 0}


def test_cpu_preset_covers_three_settings_two_models_five_seeds():
    cfg = et.SCALE_PRESETS["cpu"]
    assert [s.name for s in cfg.settings] == ["mnist1d", "digits", "mnist1d_noise20"]
    assert all(len(s.models) == 2 for s in cfg.settings) and len(cfg.seeds) >= 5
    assert cfg.alphas == (0.05, 0.1, 0.2) and len(cfg.rhos) == 3
    paper = et.SCALE_PRESETS["paper"]
    assert {s.dataset for s in paper.settings} == {"cifar10", "cifar100", "fashion_mnist", "svhn"}
    assert all([m for m, _ in s.models] == ["resnet18", "resnet50", "wrn28_10"]
               for s in paper.settings)
    assert {s.name: et.train_fields(paper, s)["lr"] for s in paper.settings}["svhn"] == 0.01
    assert et.train_fields(paper, paper.settings[0])["batch_size"] == 256


def _per_model(val, test):
    """Records: val/test accuracy per run name and seed."""
    out = {}
    for name in val:
        out[name] = {s: {"val_acc": val[name][s], "test_acc": test[name][s], "test_loss": 0.1,
                         "grad_evals": 300.0 if name == "sgd" else
                         (600.0 if name.startswith("sam") else 630.0),
                         "median_epoch_time_s": 1.0 if name == "sgd" else
                         (2.0 if name.startswith("sam") else 2.2),
                         "at_chance": bool(test[name][s] < 0.2)}
                     for s in range(len(val[name]))}
    return out


def test_rho_then_alpha_are_selected_on_validation_and_reported_on_test():
    cfg = et.TableConfig(settings=(et.Setting("toy", "mnist1d", (("mlp", {}),), epochs=1),),
                         rhos=(0.02, 0.05), seeds=(0, 1, 2))
    base = np.array([0.80, 0.82, 0.81])
    # SAM: ρ = 0.05 wins on validation (test would prefer 0.02: must not matter).
    val = {"sgd": base, "sam_rho0.02": base, "sam_rho0.05": base + 0.01,
           "eigen_sam_rho0.05_alpha0.05": base + 0.02, "eigen_sam_rho0.05_alpha0.1": base + 0.05,
           "eigen_sam_rho0.05_alpha0.2": base + 0.03}
    test = {"sgd": base, "sam_rho0.02": base + 0.2, "sam_rho0.05": base + np.array([0.01, 0.012, 0.008]),
            "eigen_sam_rho0.05_alpha0.05": base,
            "eigen_sam_rho0.05_alpha0.1": base + np.array([0.02, 0.03, 0.022]),
            "eigen_sam_rho0.05_alpha0.2": base + 0.09}
    runs = {"toy": {"mlp": _per_model(val, test)}}
    schedule = {"toy": {"steps_per_epoch": 100, "refreshes_per_epoch": 1, "power_iters": 5}}
    (row,) = et.summarize(cfg, runs, [0, 1, 2], schedule)
    assert (row["rho"], row["alpha"]) == (0.05, 0.1)
    assert row["sam"]["test_acc"]["mean"] == pytest.approx(np.mean(base) + 0.01)
    assert row["eigen_sam"]["test_acc"]["mean"] == pytest.approx(np.mean(base) + 0.024)
    diff = row["eigen_minus_sam"]            # paired: [0.01, 0.018, 0.014]
    assert diff["mean"] == pytest.approx(0.014)
    assert diff["std"] == pytest.approx(0.004)
    half = common.ci_half_width([0.01, 0.018, 0.014])
    assert diff["ci_low"] == pytest.approx(0.014 - half)
    assert row["cost"]["grad_evals_ratio_eigen_to_sam"] == pytest.approx(1.05)
    assert row["cost"]["epoch_time_ratio_eigen_to_sam"] == pytest.approx(1.1)
    assert row["cost"]["epoch_time_ratio_sam_to_sgd"] == pytest.approx(2.0)
    claim = et.claims([row])
    assert claim["per_row"][0]["eigen_vs_sam"] == "better"   # CI [0.004, 0.024] > 0
    assert claim["eigen_beats_sam_majority"]
    # 1 refresh × 5 HVPs (10 gradients) per 100 steps of SAM (200 gradients): 1.05.
    assert row["cost"]["grad_evals_ratio_predicted"] == pytest.approx(1.05)
    assert claim["grad_evals_ratio_matches_schedule"]
    assert claim["grad_evals_ratio_at_paper_schedule"] == pytest.approx(1 + 5 / 195)
    assert claim["eigen_collapsed_runs"] == 0 and row["eigen_sam"]["at_chance"] == 0
    # A collapsed Eigen-SAM seed stays in the table and is left out of the supplement.
    test["eigen_sam_rho0.05_alpha0.1"] = base + np.array([-0.72, 0.03, 0.022])
    (row,) = et.summarize(cfg, {"toy": {"mlp": _per_model(val, test)}}, [0, 1, 2], schedule)
    assert row["eigen_sam"]["at_chance"] == 1
    assert row["eigen_minus_sam"]["n"] == 3
    without = row["eigen_minus_sam_without_collapsed"]
    assert without["n"] == 2 and without["mean"] == pytest.approx((0.018 + 0.014) / 2)
    assert "(1/3 at chance)" in et.format_table([row])
    # Ties go to the smaller value.
    assert et.select([0.1, 0.2], lambda a: [0.5, 0.7])[0] == 0.1
    assert et.select([0.2, 0.05], lambda a: [0.5 + a])[0] == 0.2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eigen_table")
    et.main(["--scale", "tiny", "--workdir", str(workdir)])
    return workdir


@pytest.mark.slow
def test_tiny_cli_results_structure(tiny):
    data = json.loads((tiny / common.RESULTS_FILE).read_text())
    cfg = et.SCALE_PRESETS["tiny"]
    assert data["experiment"] == "eigen_table" and data["scale"] == "tiny"
    assert data["figures"] == ["eigen_table.png", "eigen_table_alpha.png"]
    for name in data["figures"]:
        assert (tiny / name).exists() and (tiny / name).with_suffix(".pdf").exists()
    res = data["results"]
    assert [(r["setting"], r["model"]) for r in res["rows"]] == [
        (s.name, m) for s in cfg.settings for m, _ in s.models]
    steps, epochs = cfg.train["steps_per_epoch"], cfg.settings[0].epochs
    for setting in cfg.settings:
        sched = res["schedule"][setting.name]
        assert sched == {"steps_per_epoch": steps, "refresh_every": 3, "refreshes_per_epoch": 1,
                         "power_iters": cfg.power_iters}
    for row in res["rows"]:
        per_model = res["per_run"][row["setting"]][row["model"]]
        # ρ* then α* are validation argmaxes (ties: smaller), recomputed here.
        mean_val = lambda name: np.mean([per_model[name][str(s)]["val_acc"] for s in cfg.seeds])
        rho = max(sorted(cfg.rhos), key=lambda r: (mean_val(et.run_name("sam", r)), -r))
        alpha = max(sorted(cfg.alphas),
                    key=lambda a: (mean_val(et.run_name("eigen_sam", rho, a)), -a))
        assert (row["rho"], row["alpha"]) == (rho, alpha)
        # Eigen-SAM ran at ρ* only.
        assert sorted(n for n in per_model if n.startswith("eigen")) == sorted(
            et.run_name("eigen_sam", rho, a) for a in cfg.alphas)
        for seed in cfg.seeds:
            sam = per_model[et.run_name("sam", rho)][str(seed)]
            assert per_model["sgd"][str(seed)]["grad_evals"] == steps * epochs
            assert sam["grad_evals"] == 2 * steps * epochs
            for a in cfg.alphas:  # + 1 refresh × 5 power iterations × 2 per epoch
                eig = per_model[et.run_name("eigen_sam", rho, a)][str(seed)]
                assert eig["grad_evals"] == 2 * steps * epochs + 2 * cfg.power_iters * epochs
            noisy = row["setting"].endswith("noise20")
            assert ("val_acc_clean_labels" in sam) == noisy
        assert row["eigen_minus_sam"]["n"] == len(cfg.seeds)
    assert "α*" in res["table"] and res["paper_runtime_estimate"]["total_gpu_hours_estimate"] > 0
