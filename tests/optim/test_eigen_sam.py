"""Eigen-SAM (Luo et al.): ε = ρ(ĝ + α sign(g·v) v⊥) with v the warm-started top
Hessian eigenvector, refreshed every ``refresh_every`` steps; on the shared quadratic,
where the top eigenpair is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import sam_jax
from sam_jax.optim import EigenSAMState, gradient_evals_per_step, perturbation_stats, power_iteration


def test_power_iteration_finds_top_eigenvector(quadratic, assert_close):
    q = quadratic
    start = q.unravel(jnp.ones(5, jnp.float32) / np.sqrt(5))
    v, eigenvalue = jax.jit(power_iteration, static_argnums=(0, 3))(q.grad, q.params, start, 60)
    v = q.flat(v)
    assert abs(abs(v @ q.top) - 1.0) < 1e-4
    assert_close(eigenvalue, q.eigenvalues[0], rtol=1e-4)
    assert_close(np.linalg.norm(v), 1.0, rtol=1e-5)


def expected_eigen_sam_eps(g, v, rho, alpha):
    g_hat = g / (np.linalg.norm(g) + 1e-12)
    v_perp = v - (g_hat @ v) * g_hat
    return rho * (g_hat + alpha * np.sign(g @ v) * v_perp)


def test_eigen_sam_refresh_schedule_and_formula(quadratic, assert_close):
    q = quadratic
    rho, alpha, every, iters = 0.1, 0.5, 3, 4
    tx = sam_jax.eigen_sam(rho, alpha, every, iters, seed=3)
    v0 = q.flat(tx.init(q.params).eigenvector)
    assert_close(np.linalg.norm(v0), 1.0)
    outputs, state = q.run_steps(tx, 5)
    g = q.np_grad(q.w0)
    # steps 0, 1, 2: no estimate yet -> unnormalized rho * g (released code)
    for out in outputs[:3]:
        assert_close(out, q.np_grad(q.w0 + rho * g))
    # step 3: count == 3 == refresh_every -> 4 power iterations from v0, then the formula
    v = v0
    for _ in range(iters):
        hv = q.A @ v
        lam = v @ hv
        v = hv / np.sqrt(hv @ hv + 1e-12)
    eps = expected_eigen_sam_eps(g, v, rho, alpha)
    assert_close(outputs[3], q.np_grad(q.w0 + eps))
    assert_close(outputs[4], outputs[3])  # step 4: no refresh, same v
    assert isinstance(state, EigenSAMState) and bool(state.has_eigenvector)
    assert_close(q.flat(state.eigenvector), v, rtol=1e-4)
    assert_close(state.eigenvalue, lam, rtol=1e-4)
    assert_close(state.perturbation_norm, np.linalg.norm(eps))
    assert_close(state.eigen_cosine, abs(eps @ v) / np.linalg.norm(eps))
    stats = perturbation_stats(state)
    assert set(stats) >= {"eigenvalue", "eigen_cosine", "grad_norm", "perturbation_norm"}


def test_eigen_sam_warm_start_converges_to_top_eigenvector(quadratic, assert_close):
    q = quadratic
    tx = sam_jax.eigen_sam(0.05, 0.2, refresh_every=1, power_iters=3)
    _, state = q.run_steps(tx, 30)  # refreshes at counts 1..29: 87 warm-started iterations
    assert abs(abs(q.flat(state.eigenvector) @ q.top) - 1.0) < 1e-4
    assert_close(state.eigenvalue, q.eigenvalues[0], rtol=1e-4)


def test_eigen_sam_pre_estimate_sam_mode_and_hvp_grad_fn(quadratic, assert_close):
    q = quadratic
    rho = 0.1
    (out,), _ = q.run_steps(sam_jax.eigen_sam(rho, pre_estimate="sam"), 1)
    g = q.np_grad(q.w0)
    assert_close(out, q.np_grad(q.w0 + rho * g / np.linalg.norm(g)))
    # hvp_grad_fn is the function whose Hessian is estimated: a diagonal quadratic
    diag = np.array([0.1, 0.2, 7.0, 0.3, 0.4])
    other = lambda p: q.unravel(jnp.asarray(diag, jnp.float32) * ravel_pytree(p)[0])  # noqa: E731
    tx = sam_jax.eigen_sam(rho, refresh_every=1, power_iters=40)
    _, state = q.run_steps(tx, 2, hvp_grad_fn=other)
    assert_close(abs(q.flat(state.eigenvector)[2]), 1.0, rtol=1e-4)
    assert_close(state.eigenvalue, 7.0, rtol=1e-4)


def test_eigen_sam_refresh_is_a_cond(quadratic, assert_close):
    """Non-refresh steps must not pay for HVPs: the power iteration sits in a cond."""
    q = quadratic
    tx = sam_jax.eigen_sam(0.1)
    state = tx.init(q.params)
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, grad_fn=q.grad))(
        q.grad(q.params), state, q.params)
    assert "cond" in str(jaxpr)


def test_eigen_sam_refresh_decided_by_caller(quadratic, assert_close):
    """eigen_refresh=True/False (static) replaces the schedule and leaves no cond."""
    q = quadratic
    rho, alpha = 0.1, 0.5
    tx = sam_jax.eigen_sam(rho, alpha, refresh_every=1000, power_iters=50)
    state = tx.init(q.params)
    g = q.grad(q.params)
    step = jax.jit(lambda g, s, p, r: tx.update(g, s, p, grad_fn=q.grad, eigen_refresh=r),
                   static_argnums=3)
    assert "cond" not in str(jax.make_jaxpr(
        lambda g, s, p: tx.update(g, s, p, grad_fn=q.grad, eigen_refresh=False))(g, state, q.params))
    out, state = step(g, state, q.params, False)  # count 0, no estimate: rho * g
    assert_close(q.flat(out), q.np_grad(q.w0 + rho * q.np_grad(q.w0)))
    out, state = step(g, state, q.params, True)  # count 1 (not a multiple of 1000): refresh anyway
    assert bool(state.has_eigenvector)
    assert abs(abs(q.flat(state.eigenvector) @ q.top) - 1.0) < 1e-4
    eps = expected_eigen_sam_eps(q.np_grad(q.w0), q.flat(state.eigenvector), rho, alpha)
    assert_close(q.flat(out), q.np_grad(q.w0 + eps))


def test_eigen_sam_bad_options_and_cost():
    with pytest.raises(ValueError, match="pre_estimate"):
        sam_jax.eigen_sam(pre_estimate="normalized")
    with pytest.raises(ValueError, match="refresh_every"):
        sam_jax.eigen_sam(refresh_every=0)
    # 2 gradients + power_iters HVPs (2 each) every refresh_every steps
    assert gradient_evals_per_step("eigen_sam") == pytest.approx(2 + 2 * 5 / 100)
    assert gradient_evals_per_step("eigen_sam", power_iters=10, refresh_every=10) == 4
