"""Tests of experiments/sam_sde.py and sam_jax/curvature/third_order.py.

Known answers:
* the third-order term ∇³L[v, v] of a cubic equals its closed form, and the
  3rd-order expansion of ∇L(w + ρv) is exact for a cubic (∇L is quadratic);
* on a tiny tanh MLP, ∇³L[v, v] equals a central finite difference of HVPs in
  float64 (``jax.enable_x64`` context, so other tests keep float32);
* the 2nd-order drift ∇L + ρ H ĝ equals ∇(L + ρ‖∇L‖) (quadratic and MLP);
* with the noise off, one Euler–Maruyama step is exactly w − η·drift;
* the noise sampler's covariance is Σ_B = Σ (n − B)/(B (n − 1)), which equals the
  exact covariance of minibatch gradients (enumerating every minibatch), and the
  empirical covariance of many samples matches it;
* the in-jit Lanczos λ_max equals the dense Hessian's top eigenvalue;
* the Welch interval matches scipy; the verdict logic on hand-made numbers;
* the module runs at tiny scale through ``main`` and writes the expected JSON: every
  trajectory starts at the same point, and the comparison and claim equal a
  recomputation from the saved trajectories (scipy's Welch and paired intervals).
"""

import itertools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sam_sde
from sam_jax.curvature.third_order import (
    hvp_and_third,
    normalized,
    taylor_perturbed_gradient,
    third_order_directional,
)

# ------------------------------------------------------------------ third order

A = jnp.array([0.3, -1.2, 0.7, 2.0])
Q = jnp.array([[2.0, 0.5, 0.0, 0.1], [0.5, 1.0, -0.3, 0.0],
               [0.0, -0.3, 3.0, 0.2], [0.1, 0.0, 0.2, 0.5]])


def cubic(w):
    return jnp.sum(A * w**3) + 0.5 * w @ Q @ w


def test_third_order_matches_cubic_closed_form():
    w = jnp.array([0.5, -1.0, 2.0, 0.3])
    v = jnp.array([1.0, 0.5, -2.0, 0.7])
    hv, third = jax.jit(lambda p: hvp_and_third(jax.grad(cubic), p, v))(w)
    np.testing.assert_allclose(third, 6 * A * v**2, rtol=1e-6)
    np.testing.assert_allclose(hv, 6 * A * w * v + Q @ v, rtol=1e-6)
    np.testing.assert_allclose(third_order_directional(cubic, w, v), 6 * A * v**2, rtol=1e-6)
    # ∇³L[v, v] = ∇_w (vᵀ H(w) v) with v held fixed
    curvature_along_v = lambda p: v @ jax.hessian(cubic)(p) @ v
    np.testing.assert_allclose(third, jax.jit(jax.grad(curvature_along_v))(w), rtol=1e-5)


def test_third_order_expansion_is_exact_for_a_cubic():
    w = jnp.array([0.5, -1.0, 2.0, 0.3])
    v = normalized(jnp.array([1.0, 0.5, -2.0, 0.7]))
    expand = jax.jit(lambda p, r, order: taylor_perturbed_gradient(jax.grad(cubic), p, v, r, order),
                     static_argnums=2)
    for rho in (0.1, 0.7):
        exact = jax.grad(cubic)(w + rho * v)
        np.testing.assert_allclose(expand(w, rho, 3), exact, rtol=1e-5, atol=1e-5)
        second = expand(w, rho, 2)
        np.testing.assert_allclose(exact - second, 0.5 * rho**2 * 6 * A * v**2, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="order"):
        taylor_perturbed_gradient(jax.grad(cubic), w, v, 0.1, 4)


def test_normalized_zero_vector_has_no_nan():
    out = normalized({"a": jnp.zeros(3)})
    assert np.all(np.asarray(out["a"]) == 0.0)


def _tiny_mlp_loss():
    key = jax.random.PRNGKey(3)
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (7, 3))
    y = jax.random.randint(k2, (7,), 0, 4)
    shapes = [(3, 5), (5,), (5, 4), (4,)]
    sizes = [math.prod(s) for s in shapes]

    def loss(w):
        parts, start = [], 0
        for shape, size in zip(shapes, sizes):
            parts.append(w[start:start + size].reshape(shape))
            start += size
        w1, b1, w2, b2 = parts
        logits = jnp.tanh(x @ w1 + b1) @ w2 + b2
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, y[:, None], 1)[:, 0])

    return loss, sum(sizes), k3


def test_third_order_matches_finite_difference_of_hvps_float64():
    loss, dim, key = _tiny_mlp_loss()
    with jax.enable_x64(True):
        w = jax.random.normal(key, (dim,), jnp.float64)
        v = jax.random.normal(jax.random.fold_in(key, 1), (dim,), jnp.float64)
        assert w.dtype == jnp.float64
        hvp = jax.jit(lambda p: jax.jvp(jax.grad(loss), (p,), (v,))[1])
        h = 1e-5  # truncation ~h² ≈ 1e-10, round-off ~1e-16/h ≈ 1e-11
        finite = (hvp(w + h * v) - hvp(w - h * v)) / (2 * h)
        _, third = jax.jit(lambda p: hvp_and_third(jax.grad(loss), p, v))(w)
        np.testing.assert_allclose(third, finite, rtol=1e-6, atol=1e-9)
    assert jnp.zeros(1).dtype == jnp.float32  # x64 did not leak out of the context


def test_second_order_drift_is_gradient_of_norm_penalty():
    # Quadratic: ∇‖∇L‖ = H ĝ exactly, so ∇L + ρ H ĝ = ∇(L + ρ‖∇L‖).
    quad = lambda w: 0.5 * w @ Q @ w - jnp.array([1.0, 0.0, 2.0, -1.0]) @ w
    loss_mlp, dim, key = _tiny_mlp_loss()
    w_mlp = jax.random.normal(key, (dim,))
    for loss, w in ((quad, jnp.array([0.5, -1.0, 2.0, 0.3])), (loss_mlp, w_mlp)):
        rho = 0.3

        @jax.jit
        def both(w):
            g = jax.grad(loss)(w)
            drift = taylor_perturbed_gradient(jax.grad(loss), w, g / jnp.linalg.norm(g), rho, 2)
            penalty = jax.grad(lambda p: loss(p) + rho * jnp.linalg.norm(jax.grad(loss)(p)))(w)
            return drift, penalty

        drift, penalty = both(w)
        np.testing.assert_allclose(drift, penalty, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------- the SDE simulators

TEST_CFG = sam_sde.SDEConfig(train_examples=10, width=4, depth=1, batch_size=3, lr=0.01,
                             rhos=(0.2,), figure_rho=0.2, steps=4, measure_every=2,
                             lanczos_steps=30, seeds=(0, 1))


@pytest.fixture(scope="module")
def problem():
    return sam_sde.Problem(TEST_CFG)


@pytest.fixture(scope="module")
def full_problem():
    return sam_sde.Problem(sam_jax_replace(TEST_CFG, drift="full"))


def sam_jax_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_zero_noise_euler_step_is_the_drift_step(problem, full_problem):
    key = jax.random.PRNGKey(5)
    w = problem.w0
    rho, lr = 0.2, TEST_CFG.lr
    full_grad = lambda p: jax.grad(problem.loss)(p, problem.x, problem.y)
    g = full_grad(w)
    g_hat = g / jnp.linalg.norm(g)
    # "full" drift: ĝ and the derivatives of the full-batch loss.
    full_step = jax.jit(full_problem.sde_step)
    expand = jax.jit(lambda order: taylor_perturbed_gradient(full_grad, w, g_hat, rho, order),
                     static_argnums=0)
    for third, order in ((0.0, 2), (1.0, 3)):
        step = full_step(w, key, rho, third, 0.0)
        expected = w - lr * expand(order)
        np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-7)
    # "minibatch" drift: ∇L + the expansion terms on SAM's minibatch of the same step key.
    idx = jax.random.choice(jax.random.fold_in(key, 0), problem.n, (TEST_CFG.batch_size,),
                            replace=False)
    batch_grad = lambda p: jax.grad(problem.loss)(p, problem.x[idx], problem.y[idx])
    gb = batch_grad(w)
    correction = jax.jit(lambda p: taylor_perturbed_gradient(
        batch_grad, p, gb / jnp.linalg.norm(gb), rho, 3) - gb)(w)
    step = jax.jit(problem.sde_step)(w, key, rho, 1.0, 0.0)
    np.testing.assert_allclose(step, w - lr * (g + correction), rtol=1e-5, atol=1e-7)


def test_sam_step_is_sgd_at_rho_zero_and_sam_otherwise(problem):
    key = jax.random.PRNGKey(2)
    w = problem.w0
    idx = jax.random.choice(jax.random.fold_in(key, 0), problem.n, (TEST_CFG.batch_size,),
                            replace=False)
    bg = lambda p: jax.grad(problem.loss)(p, problem.x[idx], problem.y[idx])
    step = jax.jit(problem.sam_step)
    np.testing.assert_allclose(step(w, key, 0.0), w - TEST_CFG.lr * bg(w), rtol=1e-6)
    g = bg(w)
    expected = w - TEST_CFG.lr * bg(w + 0.2 * g / jnp.linalg.norm(g))
    np.testing.assert_allclose(step(w, key, 0.2), expected, rtol=1e-6)


def _per_example_grads(problem, w):
    per_example = jax.vmap(lambda xi, yi: jax.grad(problem.loss)(w, xi[None], yi[None]))
    return jax.jit(per_example)(problem.x, problem.y)


def test_minibatch_covariance_factor_is_exact(problem):
    # Σ_B = Σ (n − B)/(B (n − 1)) is the exact covariance of minibatch gradients
    # without replacement: enumerate all C(10, 3) = 120 minibatches.
    w = problem.w0
    grads = np.asarray(_per_example_grads(problem, w), np.float64)
    n, B = problem.n, TEST_CFG.batch_size
    batch_means = np.array([grads[list(c)].mean(0) for c in itertools.combinations(range(n), B)])
    exact = np.cov(batch_means.T, bias=True)
    centred = grads - grads.mean(0)
    sigma = centred.T @ centred / n
    np.testing.assert_allclose(sigma * (n - B) / (B * (n - 1)), exact, atol=1e-9)
    assert problem.noise_scale**2 * n == pytest.approx((n - B) / (B * (n - 1)))


def test_noise_sampler_has_the_minibatch_covariance(problem):
    w = problem.w0
    n, B = problem.n, TEST_CFG.batch_size
    grads = np.asarray(_per_example_grads(problem, w), np.float64)
    centred = grads - grads.mean(0)
    target = centred.T @ centred / n * (n - B) / (B * (n - 1))
    mean_grad = jax.grad(problem.loss)(w, problem.x, problem.y)
    draw = jax.jit(jax.vmap(lambda k: problem.noisy_full_gradient(w, k, 1.0) - mean_grad))
    samples = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 40000)), np.float64)
    empirical = samples.T @ samples / samples.shape[0]
    assert np.abs(samples.mean(0)).max() < 5 * np.sqrt(np.diag(target).max() / 40000) + 1e-7
    rel = np.linalg.norm(empirical - target) / np.linalg.norm(target)
    assert rel < 0.03, rel
    # noise off: exactly the full gradient
    np.testing.assert_allclose(problem.noisy_full_gradient(w, jax.random.PRNGKey(1), 0.0),
                               mean_grad, rtol=1e-5, atol=1e-8)


def test_lanczos_lambda_max_matches_dense_hessian(problem):
    w = problem.w0 + 0.3 * jax.random.normal(jax.random.PRNGKey(4), problem.w0.shape)
    hessian = jax.jit(jax.hessian(lambda p: problem.loss(p, problem.x, problem.y)))(w)
    dense = np.linalg.eigvalsh(np.asarray(hessian, np.float64))
    lam, vec = jax.jit(lambda p: sam_sde.lanczos_top(lambda v: problem.hvp_full(p, v),
                                                     problem.lanczos_start, 30))(w)
    assert float(lam) == pytest.approx(dense[-1], rel=1e-3)
    np.testing.assert_allclose(np.asarray(hessian) @ np.asarray(vec), float(lam) * np.asarray(vec),
                               atol=2e-3 * dense[-1])


def test_measure_matches_direct_computation(problem):
    w = problem.w0
    m = jax.device_get(problem.measure(w[None], 0.2))
    loss = problem.loss(w, problem.x, problem.y)
    assert m["train_loss"][0] == pytest.approx(float(loss), rel=1e-5)
    assert m["param_norm"][0] == pytest.approx(float(jnp.linalg.norm(w)), rel=1e-5)
    g = jax.grad(problem.loss)(w, problem.x, problem.y)
    assert m["grad_norm"][0] == pytest.approx(float(jnp.linalg.norm(g)), rel=1e-4)
    logits = problem.model.apply({"params": problem.unravel(w)}, problem.x_test)
    acc = float(jnp.mean(jnp.argmax(logits, -1) == problem.y_test))
    assert m["test_acc"][0] == pytest.approx(acc)
    assert 0 <= m["taylor_err3"][0] <= m["taylor_err2"][0] + 1e-6  # smooth loss, small ρ


# ------------------------------------------------------------------ statistics

def test_welch_difference_matches_scipy():
    from scipy import stats

    a = np.array([1.0, 1.3, 0.8, 1.1, 1.4])
    b = np.array([0.2, 0.9, 0.4, 0.3, 0.6, 0.5, 0.1])
    ours = sam_sde.welch_difference(a, b)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert ours["mean"] == pytest.approx(a.mean() - b.mean())
    assert ours["ci_low"] == pytest.approx(ci.low)
    assert ours["ci_high"] == pytest.approx(ci.high)


def _fake_trajectories(sde2_offset, sde3_offset, seeds=6):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(seeds, 3))
    traj = {"sam": {}, "sde2": {}, "sde3": {}}
    for metric in sam_sde.METRICS:
        noise = rng.normal(scale=0.01, size=(seeds, 3))
        traj["sam"][metric] = 1.0 + 0.01 * base
        traj["sde2"][metric] = 1.0 + sde2_offset + noise
        traj["sde3"][metric] = 1.0 + sde3_offset + noise  # same noise: paired
    return traj


def test_verdict_logic_on_hand_made_gaps():
    good = sam_sde.compare(_fake_trajectories(0.5, 0.05))
    assert all(good[m]["closer"] for m in sam_sde.METRICS)
    assert good["lambda_max"]["sde3"]["abs_gap"] < good["lambda_max"]["sde2"]["abs_gap"]
    bad = sam_sde.compare(_fake_trajectories(0.05, 0.5))
    verdict = sam_sde.claim_verdict({0.1: good, 0.2: bad})
    assert verdict["0.1"]["verdict"] == "held"
    assert verdict["0.1"]["lambda_separated"] and verdict["0.1"]["metrics_closer"] == 6
    assert verdict["0.2"]["verdict"] == "did not hold"
    assert not verdict["0.2"]["lambda_closer"]


def test_config_validation():
    with pytest.raises(ValueError, match="figure_rho"):
        sam_sde.SDEConfig(rhos=(0.1,), figure_rho=0.2)
    with pytest.raises(ValueError, match="drift"):
        sam_sde.SDEConfig(drift="other")
    with pytest.raises(ValueError, match="activation"):
        sam_sde.SDEConfig(activation="sigmoid")


# ------------------------------------------------------------------ tiny run

def _check_comparison_and_claim(traj, comparison, claim):
    """One ρ's end-of-training comparison and claim, recomputed from its trajectories:
    gaps to SAM with scipy's Welch interval, the paired SDE3 − SDE2 t-interval, the
    path gaps, and the verdict by the rules of ``claim_verdict``'s docstring."""
    from scipy import stats

    def end(method, metric):
        return np.asarray(traj[method][metric], np.float64)[:, -1]

    closer, paired_ci = {}, {}
    for metric in sam_sde.METRICS:
        row, sam_end = comparison[metric], end("sam", metric)
        for order in ("sde2", "sde3"):
            sde_end = end(order, metric)
            mean = sde_end.mean() - sam_end.mean()
            if sde_end.var() + sam_end.var() == 0:  # no spread: the interval is the point
                low = high = mean
            else:
                low, high = stats.ttest_ind(sde_end, sam_end, equal_var=False).confidence_interval(0.95)
            gap = row[order]["gap"]
            np.testing.assert_allclose([gap["mean"], gap["ci_low"], gap["ci_high"]], [mean, low, high],
                                       rtol=1e-6, atol=1e-12, err_msg=f"{metric} {order}")
            curve = np.asarray(traj[order][metric]).mean(0) - np.asarray(traj["sam"][metric]).mean(0)
            assert row[order]["path_gap"] == pytest.approx(np.mean(np.abs(curve)))
        closer[metric] = abs(end("sde3", metric).mean() - sam_end.mean()) < abs(
            end("sde2", metric).mean() - sam_end.mean())
        assert row["closer"] == closer[metric], metric
        paired = end("sde3", metric) - end("sde2", metric)
        paired_ci[metric] = (stats.ttest_1samp(paired, 0.0).confidence_interval(0.95)
                             if paired.std() > 0 else (paired.mean(), paired.mean()))
        np.testing.assert_allclose([row["sde3_minus_sde2"]["ci_low"], row["sde3_minus_sde2"]["ci_high"]],
                                   paired_ci[metric], rtol=1e-6, atol=1e-12, err_msg=metric)
    low, high = paired_ci["lambda_max"]
    separated = low > 0 or high < 0
    count = sum(closer.values())
    assert claim["lambda_closer"] == closer["lambda_max"] and claim["lambda_separated"] == separated
    assert claim["metrics_closer"] == count
    if closer["lambda_max"] and separated and count >= 4:
        assert claim["verdict"] == "held"
    elif closer["lambda_max"] or count >= 4:
        assert claim["verdict"] == "partly"
    else:
        assert claim["verdict"] == "did not hold"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sam_sde")
    results = sam_sde.main(["--scale", "tiny", "--workdir", str(workdir)])
    return workdir, results


def test_tiny_run_writes_expected_json(tiny_run):
    workdir, _ = tiny_run
    data = json.loads((workdir / "results.json").read_text())
    assert data["experiment"] == "sam_sde" and data["scale"] == "tiny"
    res = data["results"]
    cfg = sam_sde.SCALE_PRESETS["tiny"]
    n_measure = cfg.steps // cfg.measure_every + 1
    assert res["steps"] == list(range(0, cfg.steps + 1, cfg.measure_every))
    for rho in cfg.rhos:
        traj = res["trajectories"][str(rho)]
        assert set(traj) == set(sam_sde.METHODS)
        for method in sam_sde.METHODS:
            for metric in sam_sde.METRICS + sam_sde.DIAGNOSTICS:
                arr = np.asarray(traj[method][metric], dtype=float)
                assert arr.shape == (len(cfg.seeds), n_measure)
                assert np.all(np.isfinite(arr))
        # One initialization: every trajectory of every method starts at the same
        # point, so every metric agrees at step 0; the noise seeds then separate them.
        for metric in sam_sde.METRICS + sam_sde.DIAGNOSTICS:
            start = np.array([np.asarray(traj[m][metric])[:, 0] for m in sam_sde.METHODS])
            np.testing.assert_allclose(start, start[0, 0], rtol=1e-6, err_msg=metric)
        assert np.ptp(np.asarray(traj["sam"]["param_norm"])[:, -1]) > 0
        _check_comparison_and_claim(traj, res["comparison"][str(rho)], res["claim"][str(rho)])
    assert all((workdir / f).exists() for f in data["figures"])
    assert (workdir / "sam_sde.pdf").exists()


def test_replot_redraws_from_json(tiny_run):
    workdir, _ = tiny_run
    (workdir / "sam_sde.png").unlink()
    out = sam_sde.main(["--workdir", str(workdir), "--replot"])
    assert "sam_sde.png" in out["figures"] and (workdir / "sam_sde.png").exists()
    data = json.loads((workdir / "results.json").read_text())
    assert data["figures"] == out["figures"]
    assert sam_sde.figure_name(sam_sde.SDEConfig(rhos=(0.05, 0.2), figure_rho=0.2), 0.05) \
        == "sam_sde_rho0p05"
