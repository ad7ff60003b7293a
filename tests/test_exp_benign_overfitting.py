"""experiments.benign_overfitting: the boundary fit, transitions, slopes, the analysis, and the tiny CLI."""
import dataclasses
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


def _check_cell_statistics(r, flip_prob):
    """The per-cell statistics of one grid's results, recomputed from its per-seed
    test errors: the mean SGD − SAM difference, its paired 95 % t-interval (scipy),
    the cells where SAM wins / is near p where SGD is not, and their fractions.
    Training runs in float32: values agree to float32 precision, and a cell whose
    mean lies within rounding of a threshold is not judged."""
    from scipy import stats

    tol = dict(rtol=1e-5, atol=1e-7)
    sgd = np.asarray(r["sgd_test_err"]["per_seed"], np.float64)
    sam = np.asarray(r["sam_test_err"]["per_seed"], np.float64)
    np.testing.assert_allclose(r["sgd_test_err"]["mean"], sgd.mean(-1), **tol)
    np.testing.assert_allclose(r["sam_test_err"]["mean"], sam.mean(-1), **tol)
    diff = sgd - sam
    k = diff.shape[-1]
    mean = diff.mean(-1)
    half = stats.t.ppf(0.975, k - 1) * diff.std(-1, ddof=1) / np.sqrt(k)
    np.testing.assert_allclose(r["diff_sgd_minus_sam"]["mean"], mean, **tol)
    np.testing.assert_allclose(r["diff_sgd_minus_sam"]["ci_half_width"], half, **tol)

    def clear(*margins):
        return np.all([np.abs(m) > 1e-6 for m in margins], axis=0)

    stored = np.asarray(r["sam_wins_by_5pts"], bool)
    judged = clear(mean - bo.WIN, mean - half)
    np.testing.assert_array_equal(stored[judged], ((mean > bo.WIN) & (mean - half > 0))[judged])
    assert r["fraction_sam_wins"] == pytest.approx(stored.mean())
    near = flip_prob + bo.NEAR
    stored = np.asarray(r["sam_near_p_sgd_not"], bool)
    judged = clear(sam.mean(-1) - near, sgd.mean(-1) - near)
    np.testing.assert_array_equal(stored[judged], ((sam.mean(-1) <= near) & (sgd.mean(-1) > near))[judged])
    assert r["fraction_sam_near_p_sgd_not"] == pytest.approx(stored.mean())


def test_analysis_of_hand_made_errors():
    """Known answers on a 2 x 2 grid, 3 seeds, SGD error 0.4 everywhere; SGD − SAM per
    seed: cell (0, 0) 0.30 / 0.31 / 0.29 (SAM near p = 0.1 and wins: mean 0.3, 95 %
    half-width t(0.975, 2) 0.01/√3 = 0.025 with t = 4.3027 from tables), (0, 1)
    0.1 / −0.1 / 0.3 (mean 0.1 > 0.05 but half-width 0.50: no win), (1, 0)
    0.02 / 0.03 / 0.01 (under 5 points), (1, 1) −0.2 x 3 (SAM loses)."""
    cfg = dataclasses.replace(bo.SCALE_PRESETS["tiny"], seeds=(0, 1, 2))
    diff = np.array([[[0.30, 0.31, 0.29], [0.1, -0.1, 0.3]],
                     [[0.02, 0.03, 0.01], [-0.2, -0.2, -0.2]]])
    sgd = np.full(diff.shape, 0.4)

    def errors(test_err):
        return {"test_err": test_err, "train_err": np.zeros(diff.shape),
                "train_loss": np.ones(diff.shape), "seconds": 0.0}

    runs = {kind: {"sgd": errors(sgd), "sam": errors(sgd - diff)} for kind in ("n", "d")}
    results = bo.analyse(cfg, runs)
    for kind in ("n", "d"):
        r = results[kind]
        np.testing.assert_allclose(r["diff_sgd_minus_sam"]["mean"], [[0.3, 0.1], [0.02, -0.2]])
        np.testing.assert_allclose(r["diff_sgd_minus_sam"]["ci_half_width"][0],
                                   4.302652729749464 * np.array([0.01, 0.2]) / np.sqrt(3))
        np.testing.assert_array_equal(r["sam_wins_by_5pts"], [[True, False], [False, False]])
        np.testing.assert_array_equal(r["sam_loses_by_5pts"], [[False, False], [False, True]])
        np.testing.assert_array_equal(r["sam_near_p_sgd_not"], [[True, False], [False, False]])
        assert r["fraction_sam_wins"] == r["fraction_sam_loses"] == 0.25
        assert r["fraction_sam_near_p_sgd_not"] == 0.25
        _check_cell_statistics(r, cfg.flip_prob)


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
        # test errors are counts of mistakes over the n_test test examples
        counts = np.asarray(r["sgd_test_err"]["per_seed"]) * cfg.n_test
        np.testing.assert_allclose(counts, np.round(counts), atol=1e-3)
        assert np.all((counts >= 0) & (counts <= cfg.n_test))
        _check_cell_statistics(r, cfg.flip_prob)
    # the stored agreement is that of the stored C on both grids' SGD cells
    s = np.concatenate([np.ravel(res[k]["theory_coordinate"]) for k in ("n", "d")])
    near = np.concatenate([np.ravel(res[k]["sgd_test_err"]["mean"]) for k in ("n", "d")]) <= cfg.flip_prob + bo.NEAR
    fit = res["boundary_fit"]
    assert fit["num_cells"] == s.size and fit["agreement"] == pytest.approx(np.mean((s >= fit["C"]) == near))
    assert len(res["claims"]) == 8 and all(set(c) == {"claim", "criterion", "holds"} for c in res["claims"])
    assert results["flip_prob"] == cfg.flip_prob
