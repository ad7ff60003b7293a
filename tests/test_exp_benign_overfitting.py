"""experiments.benign_overfitting: the boundary fit, transitions, slopes, and the tiny CLI."""
import json

import numpy as np
import pytest

from experiments import benign_overfitting as bo
from experiments import common


def test_theory_coordinate_and_tau_are_the_recalled_formulas():
    cfg = bo.SCALE_PRESETS["cpu"]
    # s = n ||mu||^4 / (d P^4 sigma_p^4): n = 32, ||mu|| = 2, d = 200, P = 2, sigma_p = 1 -> 32*16/(200*16)
    assert cfg.theory_coordinate(32, 200, 2.0) == pytest.approx(0.16)
    # tau = c m sqrt(B) / (P sigma_p sqrt(d)) = 1 * 10 * sqrt(10) / (2 * 1 * 10) at d = 100
    assert cfg.tau(100) == pytest.approx(np.sqrt(10) / 2)


def test_fit_boundary_recovers_a_clean_threshold():
    s = np.array([0.01, 0.1, 0.5, 2.0, 8.0, 30.0])
    near = s >= 1.0
    fit = bo.fit_boundary(s, near)
    assert fit["agreement"] == 1.0
    assert 0.5 < fit["C"] <= 2.0 and fit["C"] == pytest.approx(1.0)  # geometric midpoint of 0.5 and 2
    # one noisy cell cannot be separated: 5/6 agree
    near_noisy = near.copy()
    near_noisy[0] = True
    assert bo.fit_boundary(s, near_noisy)["agreement"] == pytest.approx(5 / 6)


def test_transition_norm_is_log_interpolated():
    norms = [1.0, 4.0, 16.0]
    errors = np.array([[0.4, 0.2, 0.1],    # crosses 0.15 halfway between 4 and 16 -> 8
                       [0.1, 0.1, 0.1],    # always below: NaN
                       [0.4, 0.4, 0.4]])   # never: NaN
    out = bo.transition_norms(errors, norms, 0.15)
    assert out[0] == pytest.approx(8.0)
    assert np.isnan(out[1]) and np.isnan(out[2])


def test_slope_fit_of_an_exact_power_law():
    x = np.array([10.0, 20.0, 40.0, 80.0])
    fit = bo.slope_fit(x, 3.0 * x ** -0.25)
    assert fit["slope"] == pytest.approx(-0.25) and fit["points"] == 4
    assert bo.slope_fit(x[:2], x[:2])["slope"] is None


@pytest.mark.slow
def test_benign_overfitting_tiny_cli(tmp_path):
    results = bo.main(["--scale", "tiny", "--workdir", str(tmp_path)])
    data = json.loads((tmp_path / common.RESULTS_FILE).read_text())
    assert data["experiment"] == "benign_overfitting" and data["scale"] == "tiny"
    assert data["figures"] == ["phase_n_vs_norm.png", "phase_d_vs_norm.png"]
    for name in data["figures"]:
        assert (tmp_path / name).exists() and (tmp_path / name).with_suffix(".pdf").exists()
    cfg = bo.SCALE_PRESETS["tiny"]
    res = data["results"]
    for kind, xs in (("n", cfg.n_values), ("d", cfg.dim_values)):
        r = res[kind]
        assert r["x_values"] == list(xs)
        shape = (len(xs), len(cfg.signal_norms))
        assert np.asarray(r["sgd_test_err"]["mean"]).shape == shape
        assert np.asarray(r["sam_test_err"]["per_seed"]).shape == shape + (len(cfg.seeds),)
        errors = np.asarray(r["sgd_test_err"]["per_seed"])
        assert np.all((errors >= 0) & (errors <= 1))
        # diff = SGD - SAM, cell by cell
        np.testing.assert_allclose(np.asarray(r["diff_sgd_minus_sam"]["mean"]),
                                   np.asarray(r["sgd_test_err"]["mean"]) - np.asarray(r["sam_test_err"]["mean"]),
                                   atol=1e-6)
        assert 0 <= r["fraction_sam_wins"] <= 1
    assert res["boundary_fit"]["C"] > 0
    assert len(res["claims"]) == 8 and all(set(c) == {"claim", "criterion", "holds"} for c in res["claims"])
    assert results["flip_prob"] == cfg.flip_prob
