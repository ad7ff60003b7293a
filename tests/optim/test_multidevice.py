"""Synced vs per-device perturbations on 4 simulated CPU devices.

Known answer: linear regression, per-shard loss 0.5 mean((x w + b - y)^2), whose
per-shard gradients are computed by hand in numpy. Synced epsilon uses the mean
gradient; per-device epsilon (m-sharpness) each shard's own; both average the
perturbed gradients over devices (docs/ARCHITECTURE.md).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, PartitionSpec as P

import sam_jax
from sam_jax.optim import perturbation_stats

NUM_DEVICES, PER_SHARD, DIM = 4, 5, 3
_rng = np.random.default_rng(0)
X = _rng.normal(size=(NUM_DEVICES * PER_SHARD, DIM)).astype(np.float32)
Y = _rng.normal(size=(NUM_DEVICES * PER_SHARD,)).astype(np.float32)
PARAMS = {"w": jnp.asarray(_rng.normal(size=DIM), jnp.float32), "b": jnp.asarray(0.3, jnp.float32)}
RHO = 0.2

pytestmark = pytest.mark.skipif(len(jax.devices()) < NUM_DEVICES, reason="needs 4 devices")


def loss(params, x, y):
    return 0.5 * jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def np_shard_grad(theta, s):
    """Gradient of shard s's loss at theta = (w..., b) in float64."""
    x = X[s * PER_SHARD:(s + 1) * PER_SHARD].astype(np.float64)
    y = Y[s * PER_SHARD:(s + 1) * PER_SHARD].astype(np.float64)
    r = x @ theta[:DIM] + theta[DIM] - y
    return np.concatenate([x.T @ r, [r.sum()]]) / PER_SHARD


def theta0():
    return np.concatenate([np.asarray(PARAMS["w"], np.float64), [float(PARAMS["b"])]])


def as_theta(tree):
    return np.concatenate([np.asarray(tree["w"], np.float64), [float(tree["b"])]])


def expected(sync):
    theta = theta0()
    grads = [np_shard_grad(theta, s) for s in range(NUM_DEVICES)]
    if sync:
        g = np.mean(grads, axis=0)
        eps = [RHO * g / np.linalg.norm(g)] * NUM_DEVICES
    else:
        eps = [RHO * g / np.linalg.norm(g) for g in grads]
    out = np.mean([np_shard_grad(theta + eps[s], s) for s in range(NUM_DEVICES)], axis=0)
    return out, grads


def local_step(tx, params, state, x, y, axis_name=None):
    grad_fn = lambda p: jax.grad(loss)(p, x, y)  # noqa: E731
    # Inside shard_map the incoming gradient must be the device's own: differentiate at
    # params marked as varying, or JAX sums the gradient over devices.
    here = params if axis_name is None else jax.lax.pcast(params, axis_name, to="varying")
    return tx.update(grad_fn(here), state, params, grad_fn=grad_fn)


def shard_map_step(tx):
    mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("data",))
    fn = jax.shard_map(partial(local_step, tx, axis_name="data"), mesh=mesh,
                       in_specs=(P(), P(), P("data"), P("data")), out_specs=(P(), P()))
    return jax.jit(fn)


@pytest.mark.parametrize("sync", [True, False])
def test_shard_map_matches_hand_computed_shard_average(sync):
    tx = sam_jax.sam(RHO, axis_name="data", sync_perturbation=sync)
    updates, state = shard_map_step(tx)(PARAMS, tx.init(PARAMS), X, Y)
    want, grads = expected(sync)
    np.testing.assert_allclose(as_theta(updates), want, rtol=1e-5, atol=1e-6)
    norms = [np.linalg.norm(g) for g in grads]
    want_norm = np.linalg.norm(np.mean(grads, axis=0)) if sync else np.mean(norms)
    np.testing.assert_allclose(perturbation_stats(state)["grad_norm"], want_norm, rtol=1e-5)


def test_synced_and_per_device_differ_and_synced_equals_global_jit():
    synced, _ = expected(True)
    per_device, _ = expected(False)
    assert not np.allclose(synced, per_device, atol=1e-4)  # the test can tell them apart
    tx = sam_jax.sam(RHO)  # axis_name=None: global arrays under jit = synced epsilon
    updates, _ = jax.jit(partial(local_step, tx))(PARAMS, tx.init(PARAMS), X, Y)
    np.testing.assert_allclose(as_theta(updates), synced, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sync", [True, False])
def test_pmap_matches_hand_computed_shard_average(sync):
    tx = sam_jax.sam(RHO, axis_name="data", sync_perturbation=sync)
    replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * NUM_DEVICES), t)  # noqa: E731
    step = jax.pmap(partial(local_step, tx, axis_name="data"), axis_name="data", devices=jax.devices()[:NUM_DEVICES])
    updates, _ = step(replicate(PARAMS), replicate(tx.init(PARAMS)),
                      X.reshape(NUM_DEVICES, PER_SHARD, DIM), Y.reshape(NUM_DEVICES, PER_SHARD))
    want, _ = expected(sync)
    for d in range(NUM_DEVICES):  # every device holds the same averaged gradient
        np.testing.assert_allclose(as_theta(jax.tree.map(lambda a: a[d], updates)), want,
                                   rtol=1e-5, atol=1e-6)


VARIANTS = {
    "usam": {}, "asam": {}, "reverse_sam": {}, "egr": {},
    "eigen_sam": {"refresh_every": 1, "power_iters": 3, "alpha": 0.5},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_synced_in_shard_map_equals_global_batch(name):
    """Synced epsilon on 4 devices = the same transform on the global batch (one device).

    Two steps, so Eigen-SAM's refresh (a cond holding pmean-ed HVPs) runs too.
    """
    kw = VARIANTS[name]
    sharded = sam_jax.make_perturbation(name, RHO, axis_name="data", **kw)
    single = sam_jax.make_perturbation(name, RHO, **kw)
    step_sharded, step_single = shard_map_step(sharded), jax.jit(partial(local_step, single))
    s_sharded, s_single = sharded.init(PARAMS), single.init(PARAMS)
    for _ in range(2):
        u_sharded, s_sharded = step_sharded(PARAMS, s_sharded, X, Y)
        u_single, s_single = step_single(PARAMS, s_single, X, Y)
        np.testing.assert_allclose(as_theta(u_sharded), as_theta(u_single), rtol=1e-5, atol=1e-6)
    for key, value in perturbation_stats(s_single).items():
        np.testing.assert_allclose(perturbation_stats(s_sharded)[key], value, rtol=1e-5, atol=1e-6)


def test_eigen_sam_per_device_runs_in_shard_map_with_replicated_state():
    tx = sam_jax.eigen_sam(RHO, refresh_every=1, power_iters=3, axis_name="data",
                           sync_perturbation=False)
    step = shard_map_step(tx)
    state = tx.init(PARAMS)
    for _ in range(2):
        updates, state = step(PARAMS, state, X, Y)
    assert np.all(np.isfinite(ravel_pytree(updates)[0]))
    stats = perturbation_stats(state)
    assert 0.0 < float(stats["eigen_cosine"]) <= 1.0 + 1e-6
    # the eigenvector is the global-batch Hessian's: compare with the dense one
    xa = np.concatenate([X, np.ones((len(X), 1), np.float32)], axis=1).astype(np.float64)
    hessian = xa.T @ xa / len(X)
    top = np.linalg.eigh(hessian)[1][:, -1]
    v = as_theta(state.eigenvector)
    assert abs(v @ top) > 0.9  # 6 warm-started iterations from a random start


def test_sgd_identity_averages_over_devices():
    tx = sam_jax.make_perturbation("sgd", 0.0, axis_name="data", sync_perturbation=False)
    updates, _ = shard_map_step(tx)(PARAMS, tx.init(PARAMS), X, Y)
    _, grads = expected(True)
    np.testing.assert_allclose(as_theta(updates), np.mean(grads, axis=0), rtol=1e-5, atol=1e-6)


def test_injected_rho_inside_shard_map():
    """A traced rho (lax.cond on rho == 0) inside shard_map: rho = RHO, then 0."""
    schedule = optax.piecewise_constant_schedule(RHO, {1: 0.0})
    tx = optax.inject_hyperparams(sam_jax.sam)(rho=schedule, axis_name="data",
                                               sync_perturbation=False)
    step = shard_map_step(tx)
    state = tx.init(PARAMS)
    updates, state = step(PARAMS, state, X, Y)
    want, grads = expected(False)
    np.testing.assert_allclose(as_theta(updates), want, rtol=1e-5, atol=1e-6)
    updates, state = step(PARAMS, state, X, Y)  # rho = 0: the averaged plain gradient
    np.testing.assert_allclose(as_theta(updates), np.mean(grads, axis=0), rtol=1e-5, atol=1e-6)
