"""GSAM against the formulas of Zhuang et al. (2022), written out here.

    eps = rho_t g / ||g||,  g_p = grad L(w + eps),
    g_perp = g - (<g, g_p> / ||g_p||^2) g_p,  update = g_p - alpha g_perp,
    rho_t = rho_min + (rho - rho_min) (lr - lr_min) / (lr_max - lr_min).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from sam_jax.optim import GSAMState, gradient_evals_per_step, perturbation_stats

A = jnp.array([2.0, 1.0])  # L(w) = 0.5 (2 w0^2 + w1^2), grad = A * w


def grad_fn(p):
    return {"w": A * p["w"]}


W = {"w": jnp.array([1.0, 1.0])}  # g = (2, 1), ||g|| = sqrt(5)


def test_update_matches_hand_computed_values():
    rho, alpha = 0.1 * np.sqrt(5.0), 0.5  # eps = 0.1 g = (0.2, 0.1)
    tx = sam_jax.gsam(rho, alpha, eps=0.0)
    out, state = tx.update(grad_fn(W), tx.init(W), W, grad_fn=grad_fn)
    # By hand: g_p = A (w + eps) = (2 * 1.2, 1.1) = (2.4, 1.1);
    # <g, g_p> = 4.8 + 1.1 = 5.9; ||g_p||^2 = 5.76 + 1.21 = 6.97.
    g, g_p = np.array([2.0, 1.0]), np.array([2.4, 1.1])
    g_perp = g - (5.9 / 6.97) * g_p
    assert abs(g_perp @ g_p) < 1e-12  # orthogonal to the perturbed gradient
    np.testing.assert_allclose(out["w"], g_p - alpha * g_perp, rtol=1e-6)
    np.testing.assert_allclose(out["w"], [2.4 + 0.5 * 0.0315638, 1.1 - 0.5 * 0.0688666],
                               rtol=1e-5)
    assert isinstance(state, GSAMState)
    assert float(state.perturbation_norm) == pytest.approx(rho, rel=1e-6)
    assert float(state.effective_rho) == pytest.approx(rho, rel=1e-6)


def test_alpha_zero_is_sam_exactly():
    params = {"w": jnp.array([0.3, -1.2]), "b": jnp.array([[0.7]])}

    def grad(p):  # a non-quadratic loss
        return jax.grad(lambda q: jnp.sum(jnp.sin(q["w"]) * q["w"] ** 2) + jnp.sum(q["b"] ** 4))(p)

    def run(perturbation):
        tx = optax.chain(perturbation, optax.sgd(0.1, momentum=0.9))
        state, p = tx.init(params), params
        step = jax.jit(lambda p, s: tx.update(grad(p), s, p, grad_fn=grad))
        for _ in range(4):
            updates, state = step(p, state)
            p = optax.apply_updates(p, updates)
        return p

    got, want = run(sam_jax.gsam(0.2, alpha=0.0)), run(sam_jax.sam(0.2))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_rho_tied_to_the_learning_rate():
    rho, rho_min, lr_max, lr_min = 0.2, 0.05, 0.1, 0.02
    tx = sam_jax.gsam(rho, 0.3, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min, eps=0.0)
    state = tx.init(W)
    for lr in (0.1, 0.06, 0.02):
        _, new = tx.update(grad_fn(W), state, W, grad_fn=grad_fn, learning_rate=lr)
        want = rho_min + (rho - rho_min) * (lr - lr_min) / (lr_max - lr_min)
        assert float(new.effective_rho) == pytest.approx(want, rel=1e-6)
        assert float(new.perturbation_norm) == pytest.approx(want, rel=1e-6)
        assert float(perturbation_stats(new)["effective_rho"]) == pytest.approx(want, rel=1e-6)
    # The same from a schedule of the count (count 0 -> lr 0.06).
    sched = sam_jax.gsam(rho, 0.3, rho_min=rho_min, lr_max=lr_max, lr_min=lr_min,
                         learning_rate=lambda count: 0.06 - 0.0 * count, eps=0.0)
    _, new = sched.update(grad_fn(W), sched.init(W), W, grad_fn=grad_fn)
    assert float(new.effective_rho) == pytest.approx(0.05 + 0.15 * 0.5, rel=1e-6)
    with pytest.raises(ValueError, match="learning_rate"):
        tx.update(grad_fn(W), state, W, grad_fn=grad_fn)
    with pytest.raises(ValueError, match="lr_max"):
        sam_jax.gsam(rho, rho_min=0.01)


def test_declared_cost_and_rho_zero():
    assert gradient_evals_per_step("gsam") == 2.0
    tx = sam_jax.gsam(0.0, 0.5)
    out, _ = tx.update(grad_fn(W), tx.init(W), W, grad_fn=grad_fn)
    np.testing.assert_array_equal(out["w"], grad_fn(W)["w"])


@pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 devices")
def test_per_device_mode_averages_each_devices_gsam_gradient(shards):
    """As big_vision: per-worker epsilon and decomposition, then the mean over workers."""
    x, y, params, np_grad, step = shards
    rho, alpha = 0.3, 0.4
    tx = sam_jax.gsam(rho, alpha, eps=0.0, axis_name="data", sync_perturbation=False)
    out, _ = step(tx)(params, tx.init(params), x, y)
    w = np.asarray(params["w"], np.float64)
    want = []
    for s in range(4):
        g = np_grad(w, s)
        g_p = np_grad(w + rho * g / np.linalg.norm(g), s)
        want.append(g_p - alpha * (g - (g @ g_p) / (g_p @ g_p) * g_p))
    np.testing.assert_allclose(out["w"], np.mean(want, axis=0), rtol=1e-5, atol=1e-6)
