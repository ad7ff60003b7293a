"""experiments.noise_memorization: the hooks against hand computations, and the tiny CLI."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import common
from experiments import noise_memorization as nm
from sam_jax.train.grid import GridSpec, make_cells


def test_step_hook_counts_units_switched_off_at_the_sam_point():
    spec = GridSpec(width=2, dim_max=3, n_max=2, batch_size=2)
    cell = make_cells(n=2, dim=3, signal_norm=1.0, tau=1.0)
    cell = type(cell)(*(jnp.asarray(v[0]) for v in cell))
    # filters (2 classes, 2 units, d = 3); gradient along -e1 for class 1, zero for class 0
    params = {"filters": jnp.array([[[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]],
                                    [[0.5, 0.0, 0.0], [2.0, 0.0, 0.0]]])}
    grads = {"filters": jnp.zeros((2, 2, 3)).at[1, :, 0].set(-1.0)}
    # ||g|| = sqrt(2): epsilon moves class-1 filters by -1/sqrt(2) = -0.707 along e1
    batch = {"y": jnp.array([1, 0]), "flipped": jnp.array([True, False]), "position": jnp.array([0, 0]),
             "noise": jnp.array([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]]),
             "x": jnp.array([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]])}
    out = nm.step_hook(spec, cell, params, grads, batch)
    # example 0 (y = 1, noise e1): units <.,e1> = 0.5, 2.0 both active; at W_hat: -0.207 (off), 1.29 (on)
    # example 1 (y = 0, noise e2): unit 0 active (1.0), unit 1 not; class 0 does not move
    assert float(out["noise_active"]) == 3 and float(out["noise_deactivated"]) == 1
    assert float(out["noise_active_flipped"]) == 2 and float(out["noise_deactivated_flipped"]) == 1
    # signal patch e3 is orthogonal to every filter: no active signal unit
    assert float(out["signal_active"]) == 0 and float(out["signal_deactivated"]) == 0


def test_eval_hook_averages_over_real_and_flipped_examples():
    spec = GridSpec(width=1, dim_max=2, n_max=3, batch_size=1)
    cell = make_cells(n=2, dim=2, signal_norm=1.0)
    params = {"filters": jnp.array([[[1.0, 0.0]], [[0.0, 2.0]]])}
    data = {"signal": jnp.array([1.0, 0.0]), "y": jnp.array([1, 0, 1]),
            "noise": jnp.array([[[0.0, 1.0]], [[3.0, 0.0]], [[9.0, 9.0]]]),
            "mask": jnp.array([1.0, 1.0, 0.0]), "flipped": jnp.array([True, False, True])}
    out = nm.eval_hook(spec, cell, params, data)
    # signal learning: j=-1: <w,-mu> = -1; j=+1: <w,mu> = 0 -> mean -0.5
    assert float(out["signal_learning"]) == pytest.approx(-0.5)
    # noise memorization: example 0 (y=1): <(0,2),(0,1)> = 2; example 1 (y=0): <(1,0),(3,0)> = 3; example 2 padded
    assert float(out["noise_mem_all"]) == pytest.approx(2.5)
    assert float(out["noise_mem_flipped"]) == pytest.approx(2.0)
    assert float(out["noise_mem_clean"]) == pytest.approx(3.0)
    # no flipped example among the real ones: NaN (dropped from means over seeds), not 0
    out = nm.eval_hook(spec, cell, params, {**data, "flipped": jnp.array([False, False, True])})
    assert np.isnan(float(out["noise_mem_flipped"])) and float(out["noise_mem_clean"]) == pytest.approx(2.5)


def test_tau_is_the_recalled_scaling():
    cfg = nm.SCALE_PRESETS["cpu"]
    assert cfg.tau == pytest.approx(cfg.tau_const * 10 * np.sqrt(10) / (2 * np.sqrt(cfg.dim)))


@pytest.mark.slow
def test_noise_memorization_tiny_cli(tmp_path):
    nm.main(["--scale", "tiny", "--workdir", str(tmp_path)])
    data = json.loads((tmp_path / common.RESULTS_FILE).read_text())
    assert data["experiment"] == "noise_memorization" and data["figures"] == ["noise_memorization.png"]
    assert (tmp_path / "noise_memorization.pdf").exists()
    cfg = nm.SCALE_PRESETS["tiny"]
    res = data["results"]
    windows = cfg.steps // cfg.eval_every
    for o in ("sgd", "sam"):
        curves = res["curves"][o]
        assert curves["eval_steps"] == list(range(0, cfg.steps + 1, cfg.eval_every))
        assert np.asarray(curves["noise_mem_all"]).shape == (len(cfg.seeds), windows + 1)
        frac = np.asarray(curves["deactivated_noise"], float)
        assert frac.shape == (len(cfg.seeds), windows) and np.all((frac >= 0) & (frac <= 1))
        assert set(res["final"][o]["test_err"]) >= {"mean", "std", "n"}
    assert len(res["claims"]) == 6
    assert set(res["paired"]["test_err_sgd_minus_sam"]) >= {"mean", "ci_low", "ci_high"}
