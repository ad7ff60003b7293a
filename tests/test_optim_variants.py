"""USAM, ASAM, Reverse-SAM, EGR and Eigen-SAM against their formulas on a quadratic.

L(w) = 0.5 w^T A w - b^T w with A = Q diag(EIGENVALUES) Q^T known, so gradients,
Hessian-vector products and the top eigenvector are known in closed form (numpy
float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import sam_jax
from sam_jax.optim import EigenSAMState, perturbation_stats, power_iteration

EIGENVALUES = np.array([5.0, 2.0, 1.0, 0.5, -0.25])
_rng = np.random.default_rng(0)
Q, _ = np.linalg.qr(_rng.normal(size=(5, 5)))
A = Q @ np.diag(EIGENVALUES) @ Q.T
B = _rng.normal(size=5)
TOP = Q[:, 0]
PARAMS = {"kernel": jnp.asarray(_rng.normal(size=(1, 3)), jnp.float32),
          "bias": jnp.asarray(_rng.normal(size=(2,)), jnp.float32)}
W0, UNRAVEL = ravel_pytree(PARAMS)
W0 = np.asarray(W0, np.float64)


def quad_grad(params):
    w, _ = ravel_pytree(params)
    return UNRAVEL(jnp.asarray(A, jnp.float32) @ w - jnp.asarray(B, jnp.float32))


def np_grad(w):
    return A @ w - B


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def run_steps(tx, num_steps, params=PARAMS, **extra):
    """Updates of ``num_steps`` calls at the same params (isolates the transform)."""
    state = tx.init(params)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=quad_grad, **extra))
    outputs = []
    for _ in range(num_steps):
        updates, state = step(quad_grad(params), state, params)
        outputs.append(flat(updates))
    return outputs, state


def close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def test_usam():
    rho = 0.1
    (out,), state = run_steps(sam_jax.usam(rho), 1)
    g = np_grad(W0)
    close(out, np_grad(W0 + rho * g))
    close(state.perturbation_norm, rho * np.linalg.norm(g))


@pytest.mark.parametrize("eta", [0.01, 0.0])
def test_asam(eta):
    rho = 0.5
    (out,), state = run_steps(sam_jax.asam(rho, eta), 1)
    g = np_grad(W0)
    t = np.abs(W0) + eta
    eps = rho * t**2 * g / (np.linalg.norm(t * g) + 1e-12)
    close(out, np_grad(W0 + eps))
    close(state.perturbation_norm, np.linalg.norm(eps))
    close(np.linalg.norm(eps / t), rho)  # the adaptive-norm ball


def test_reverse_sam():
    rho = 0.2
    (out,), _ = run_steps(sam_jax.reverse_sam(rho), 1)
    g = np_grad(W0)
    close(out, np_grad(W0 - rho * g / np.linalg.norm(g)))


def test_egr_hvp_mode_is_exact():
    rho = 0.3
    (out,), _ = run_steps(sam_jax.egr(rho, mode="hvp"), 1)
    g = np_grad(W0)
    close(out, g + rho * A @ (g / np.linalg.norm(g)))


def test_egr_finite_difference_mode():
    rho, r = 0.3, 0.05
    (out,), state = run_steps(sam_jax.egr(rho, fd_step=r), 1)
    g = np_grad(W0)
    g_hat = g / np.linalg.norm(g)
    # On a quadratic the finite difference is exact: (grad(w + r g_hat) - g) / r = A g_hat
    close(out, g + rho * (np_grad(W0 + r * g_hat) - g) / r, rtol=1e-4, atol=1e-4)
    close(out, g + rho * A @ g_hat, rtol=1e-4, atol=1e-4)
    close(state.perturbation_norm, r)


def test_power_iteration_finds_top_eigenvector():
    start = UNRAVEL(jnp.ones(5, jnp.float32) / np.sqrt(5))
    v, eigenvalue = jax.jit(power_iteration, static_argnums=(0, 3))(quad_grad, PARAMS, start, 60)
    v = flat(v)
    assert abs(abs(v @ TOP) - 1.0) < 1e-4
    close(eigenvalue, EIGENVALUES[0], rtol=1e-4)
    close(np.linalg.norm(v), 1.0, rtol=1e-5)


def expected_eigen_sam_eps(g, v, rho, alpha):
    g_hat = g / (np.linalg.norm(g) + 1e-12)
    v_perp = v - (g_hat @ v) * g_hat
    return rho * (g_hat + alpha * np.sign(g @ v) * v_perp)


def test_eigen_sam_refresh_schedule_and_formula():
    rho, alpha, every, iters = 0.1, 0.5, 3, 4
    tx = sam_jax.eigen_sam(rho, alpha, every, iters, seed=3)
    v0 = flat(tx.init(PARAMS).eigenvector)
    close(np.linalg.norm(v0), 1.0)
    outputs, state = run_steps(tx, 5)
    g = np_grad(W0)
    # steps 0, 1, 2: no estimate yet -> unnormalized rho * g (released code)
    for out in outputs[:3]:
        close(out, np_grad(W0 + rho * g))
    # step 3: count == 3 == refresh_every -> 4 power iterations from v0, then the formula
    v = v0
    for _ in range(iters):
        hv = A @ v
        lam = v @ hv
        v = hv / np.sqrt(hv @ hv + 1e-12)
    eps = expected_eigen_sam_eps(g, v, rho, alpha)
    close(outputs[3], np_grad(W0 + eps))
    close(outputs[4], outputs[3])  # step 4: no refresh, same v
    assert isinstance(state, EigenSAMState) and bool(state.has_eigenvector)
    close(flat(state.eigenvector), v, rtol=1e-4)
    close(state.eigenvalue, lam, rtol=1e-4)
    close(state.perturbation_norm, np.linalg.norm(eps))
    close(state.eigen_cosine, abs(eps @ v) / np.linalg.norm(eps))
    stats = perturbation_stats(state)
    assert set(stats) >= {"eigenvalue", "eigen_cosine", "grad_norm", "perturbation_norm"}


def test_eigen_sam_warm_start_converges_to_top_eigenvector():
    tx = sam_jax.eigen_sam(0.05, 0.2, refresh_every=1, power_iters=3)
    _, state = run_steps(tx, 30)  # refreshes at counts 1..29: 87 warm-started iterations
    assert abs(abs(flat(state.eigenvector) @ TOP) - 1.0) < 1e-4
    close(state.eigenvalue, EIGENVALUES[0], rtol=1e-4)


def test_eigen_sam_pre_estimate_sam_mode_and_hvp_grad_fn():
    rho = 0.1
    (out,), _ = run_steps(sam_jax.eigen_sam(rho, pre_estimate="sam"), 1)
    g = np_grad(W0)
    close(out, np_grad(W0 + rho * g / np.linalg.norm(g)))
    # hvp_grad_fn is the function whose Hessian is estimated: a diagonal quadratic
    diag = np.array([0.1, 0.2, 7.0, 0.3, 0.4])
    other = lambda p: UNRAVEL(jnp.asarray(diag, jnp.float32) * ravel_pytree(p)[0])  # noqa: E731
    tx = sam_jax.eigen_sam(rho, refresh_every=1, power_iters=40)
    _, state = run_steps(tx, 2, hvp_grad_fn=other)
    close(abs(flat(state.eigenvector)[2]), 1.0, rtol=1e-4)
    close(state.eigenvalue, 7.0, rtol=1e-4)


def test_eigen_sam_refresh_is_a_cond():
    """Non-refresh steps must not pay for HVPs: the power iteration sits in a cond."""
    tx = sam_jax.eigen_sam(0.1)
    state = tx.init(PARAMS)
    jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p, grad_fn=quad_grad))(
        quad_grad(PARAMS), state, PARAMS)
    assert "cond" in str(jaxpr)


@pytest.mark.parametrize("name", ["usam", "asam", "reverse_sam", "eigen_sam", "egr"])
def test_zero_gradient_finite_and_rho_zero_identity(name):
    w_star = np.linalg.solve(A, B)
    at_min = UNRAVEL(jnp.asarray(w_star, jnp.float32))
    zero = lambda p: jax.tree.map(jnp.zeros_like, p)  # noqa: E731
    tx = sam_jax.make_perturbation(name, 0.1, **({"refresh_every": 1} if name == "eigen_sam" else {}))
    state = tx.init(at_min)
    for _ in range(2):
        updates, state = tx.update(zero(at_min), state, at_min, grad_fn=zero)
        assert np.all(np.isfinite(flat(updates)))
        assert np.all(np.isfinite(np.asarray(state.perturbation_norm)))
    # rho = 0: the incoming gradient, bit for bit, under jit, static or injected rho
    for tx in (sam_jax.make_perturbation(name, 0.0),
               optax.inject_hyperparams(sam_jax.optim.PERTURBATIONS[name])(rho=0.0)):
        (out,), _ = run_steps(tx, 1)
        assert np.array_equal(out, flat(quad_grad(PARAMS)))


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="pre_estimate"):
        sam_jax.eigen_sam(pre_estimate="normalized")
    with pytest.raises(ValueError, match="refresh_every"):
        sam_jax.eigen_sam(refresh_every=0)
    with pytest.raises(ValueError, match="mode"):
        sam_jax.egr(mode="exact")
    with pytest.raises(ValueError, match="eta"):
        sam_jax.asam(eta=-1.0)


def test_eigen_sam_refresh_decided_by_caller():
    """eigen_refresh=True/False (static) replaces the schedule and leaves no cond."""
    rho, alpha = 0.1, 0.5
    tx = sam_jax.eigen_sam(rho, alpha, refresh_every=1000, power_iters=50)
    state = tx.init(PARAMS)
    g = quad_grad(PARAMS)
    step = jax.jit(lambda g, s, p, r: tx.update(g, s, p, grad_fn=quad_grad, eigen_refresh=r),
                   static_argnums=3)
    assert "cond" not in str(jax.make_jaxpr(
        lambda g, s, p: tx.update(g, s, p, grad_fn=quad_grad, eigen_refresh=False))(g, state, PARAMS))
    out, state = step(g, state, PARAMS, False)  # count 0, no estimate: rho * g
    close(flat(out), np_grad(W0 + rho * np_grad(W0)))
    out, state = step(g, state, PARAMS, True)  # count 1 (not a multiple of 1000): refresh anyway
    assert bool(state.has_eigenvector)
    assert abs(abs(flat(state.eigenvector) @ TOP) - 1.0) < 1e-4
    close(flat(out), np_grad(W0 + expected_eigen_sam_eps(np_grad(W0), flat(state.eigenvector), rho, alpha)))
