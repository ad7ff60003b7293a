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
    (phase,) = parse_phases(et.phases(cfg, setting, "eigen_sam", 0.05, 58))
    assert phase.name == "eigen_sam" and phase.rho == cfg.rho and phase.epochs == setting.epochs
    assert dict(phase.kwargs) == {"alpha": 0.05, "refresh_every": 58, "power_iters": 5,
                                  "refresh_counter": "epoch"}
    (phase,) = parse_phases(et.phases(cfg, setting, "sam", None, 58))
    assert (phase.name, phase.rho) == ("sam", cfg.rho)
    assert et.dataset_kwargs(cfg, cfg.settings[2]) == {
        "label_noise": 0.2, "validation_fraction": 0.1, "validation_seed": 0}


def test_cpu_preset_covers_three_settings_two_models_five_seeds():
    cfg = et.SCALE_PRESETS["cpu"]
    assert [s.name for s in cfg.settings] == ["mnist1d", "digits", "mnist1d_noise20"]
    assert all(len(s.models) == 2 for s in cfg.settings) and len(cfg.seeds) >= 5
    assert cfg.alphas == (0.05, 0.1, 0.2)
    paper = et.SCALE_PRESETS["paper"]
    assert {s.dataset for s in paper.settings} == {"cifar10", "cifar100", "fashion_mnist", "svhn"}
    assert all([m for m, _ in s.models] == ["resnet18", "resnet50", "wrn28_10"]
               for s in paper.settings)
    assert {s.name: et.train_fields(paper, s)["lr"] for s in paper.settings}["svhn"] == 0.01
    assert et.train_fields(paper, paper.settings[0])["batch_size"] == 256


def _per_model(val, test, alphas=(0.05, 0.1, 0.2)):
    """Records: val/test accuracy per run name and seed."""
    out = {}
    for name in ["sgd", "sam"] + [et.run_name("eigen_sam", a) for a in alphas]:
        out[name] = {s: {"val_acc": val[name][s], "test_acc": test[name][s], "test_loss": 0.1,
                         "grad_evals": 300.0 if name == "sgd" else
                         (600.0 if name == "sam" else 630.0),
                         "median_epoch_time_s": 1.0 if name == "sgd" else
                         (2.0 if name == "sam" else 2.2)}
                     for s in range(len(val[name]))}
    return out


def test_alpha_is_selected_on_validation_and_reported_on_test():
    cfg = et.TableConfig(settings=(et.Setting("toy", "mnist1d", (("mlp", {}),), epochs=1),),
                         rho=0.1, seeds=(0, 1, 2))
    base = np.array([0.80, 0.82, 0.81])
    val = {"sgd": base, "sam": base + 0.01, "eigen_sam_alpha0.05": base + 0.02,
           "eigen_sam_alpha0.1": base + 0.05, "eigen_sam_alpha0.2": base + 0.03}
    # Test accuracy would favour α = 0.2: it must not matter.
    test = {"sgd": base, "sam": base + np.array([0.01, 0.012, 0.008]),
            "eigen_sam_alpha0.05": base, "eigen_sam_alpha0.1": base + np.array([0.02, 0.03, 0.022]),
            "eigen_sam_alpha0.2": base + 0.09}
    runs = {"toy": {"mlp": _per_model(val, test)}}
    (row,) = et.summarize(cfg, runs, [0, 1, 2])
    assert row["alpha"] == 0.1
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
    assert claim["eigen_beats_sam_majority"] and claim["eigen_cost_within_10pct"]
    # Ties go to the smaller α.
    val["eigen_sam_alpha0.2"] = val["eigen_sam_alpha0.1"]
    alpha, _ = et.select_alpha(cfg, _per_model(val, test), [0, 1, 2])
    assert alpha == 0.1


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
        # α* is the validation argmax (ties: smaller α), recomputed here.
        means = {a: np.mean([per_model[et.run_name("eigen_sam", a)][str(s)]["val_acc"]
                             for s in cfg.seeds]) for a in cfg.alphas}
        assert row["alpha"] == max(sorted(cfg.alphas), key=lambda a: (means[a], -a))
        for seed in cfg.seeds:
            sam = per_model["sam"][str(seed)]
            assert per_model["sgd"][str(seed)]["grad_evals"] == steps * epochs
            assert sam["grad_evals"] == 2 * steps * epochs
            for a in cfg.alphas:  # + 1 refresh × 5 power iterations × 2 per epoch
                eig = per_model[et.run_name("eigen_sam", a)][str(seed)]
                assert eig["grad_evals"] == 2 * steps * epochs + 2 * cfg.power_iters * epochs
            noisy = row["setting"].endswith("noise20")
            assert ("val_acc_clean_labels" in sam) == noisy
        assert row["eigen_minus_sam"]["n"] == len(cfg.seeds)
    assert "α*" in res["table"] and res["paper_runtime_estimate"]["total_gpu_hours_estimate"] > 0
