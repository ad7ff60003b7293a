"""Gradient accumulation with the SAM family (`sam_jax.optim.accumulate`).

Two microbatches of a least-squares problem, ``L_j(w) = 0.5 mean_i (x_i.w - y_i)^2``
over microbatch ``j``; in float64 numpy: ``g_j = X_j^T (X_j w - y_j) / n``,
``eps_j = rho g_j / ||g_j||``, and the accumulated SAM step is
``w - lr * mean_j g_j(w + eps_j)``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sam_jax
from sam_jax.optim import accumulate

RHO, LR, K, N = 0.3, 0.1, 2, 4

rng = np.random.default_rng(0)
X = rng.normal(size=(K * N, 3)).astype(np.float32)
Y = rng.normal(size=(K * N,)).astype(np.float32)
W0 = rng.normal(size=3).astype(np.float32)


def loss(p, xs, ys):
    return 0.5 * jnp.mean((xs @ p["w"] - ys) ** 2)


def np_grad(w, j):
    xs, ys = X[N * j:N * j + N].astype(np.float64), Y[N * j:N * j + N].astype(np.float64)
    return xs.T @ (xs @ w - ys) / N


def np_sam_grad(w, j):
    g = np_grad(w, j)
    return np_grad(w + RHO * g / np.linalg.norm(g), j)


def microbatch_update(tx, params, state, j):
    xs, ys = X[N * j:N * j + N], Y[N * j:N * j + N]
    grad_fn = lambda p: jax.grad(loss)(p, xs, ys)  # noqa: E731
    return tx.update(grad_fn(params), state, params, grad_fn=grad_fn)


@pytest.mark.parametrize("factory", [sam_jax.sam, sam_jax.usam, sam_jax.asam, sam_jax.looksam,
                                     sam_jax.gsam, sam_jax.egr, sam_jax.eigen_sam])
def test_multisteps_around_a_family_member_is_refused(factory):
    params = {"w": jnp.asarray(W0)}
    tx = optax.MultiSteps(optax.chain(factory(RHO), optax.sgd(LR)), K)
    with pytest.raises(ValueError, match="inside optax.MultiSteps.*sam_jax.optim.accumulate"):
        tx.init(params)


def test_multisteps_with_one_mini_step_is_plain_sam():
    params = {"w": jnp.asarray(W0)}
    tx = optax.MultiSteps(optax.chain(sam_jax.sam(RHO), optax.sgd(LR)), 1)
    updates, _ = microbatch_update(tx, params, tx.init(params), 0)
    np.testing.assert_allclose(np.asarray(updates["w"]), -LR * np_sam_grad(W0, 0),
                               rtol=1e-5, atol=1e-6)


def test_accumulate_steps_from_the_mean_of_per_microbatch_sam_gradients():
    params = {"w": jnp.asarray(W0)}
    tx = accumulate(sam_jax.sam(RHO), optax.sgd(LR), K)
    state = tx.init(params)
    first, state = microbatch_update(tx, params, state, 0)
    np.testing.assert_array_equal(np.asarray(first["w"]), 0.0)  # params stay at w
    params = optax.apply_updates(params, first)
    second, state = microbatch_update(tx, params, state, 1)
    expected = -LR * (np_sam_grad(W0, 0) + np_sam_grad(W0, 1)) / K
    np.testing.assert_allclose(np.asarray(second["w"]), expected, rtol=1e-5, atol=1e-6)
    # ... which is neither the SAM step of the last microbatch nor full-batch SAM
    assert not np.allclose(expected, -LR * np_sam_grad(W0, 1), rtol=1e-3)
    g = (np_grad(W0, 0) + np_grad(W0, 1)) / 2
    eps = RHO * g / np.linalg.norm(g)
    full = -LR * (np_grad(W0 + eps, 0) + np_grad(W0 + eps, 1)) / 2
    assert not np.allclose(expected, full, rtol=1e-3)
    assert int(state[0].count) == K  # the perturbation ran once per microbatch


def test_accumulate_with_momentum_over_two_steps():
    # optax.sgd(momentum=m) sees one mean gradient per K microbatches: v1 = G1,
    # v2 = m v1 + G2 (G the mean of the per-microbatch SAM gradients at each w).
    m = 0.9
    params = {"w": jnp.asarray(W0)}
    tx = accumulate(sam_jax.sam(RHO), optax.sgd(LR, momentum=m), K)
    state = tx.init(params)
    w = W0.astype(np.float64)
    v = np.zeros(3)
    for _ in range(2):
        for j in range(K):
            updates, state = microbatch_update(tx, params, state, j)
            params = optax.apply_updates(params, updates)
        v = m * v + sum(np_sam_grad(w, j) for j in range(K)) / K
        w = w - LR * v
    np.testing.assert_allclose(np.asarray(params["w"]), w, rtol=1e-5, atol=1e-6)


def test_accumulate_rejects_a_bad_k():
    with pytest.raises(ValueError, match="positive integer"):
        accumulate(sam_jax.sam(RHO), optax.sgd(LR), 0)
