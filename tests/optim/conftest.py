"""Shared fixtures of the per-algorithm tests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture
def shards():
    """A least-squares problem on 4 shards of 5 examples: ``(x, y, params, np_grad,
    step)``, ``np_grad(w, s)`` shard ``s``'s gradient in float64, ``step(tx)`` the
    jitted ``shard_map`` of ``tx.update`` with each device's own gradient."""
    from functools import partial

    from jax.sharding import Mesh, PartitionSpec as P

    rng = np.random.default_rng(1)
    x = rng.normal(size=(4 * 5, 3)).astype(np.float32)
    y = rng.normal(size=(4 * 5,)).astype(np.float32)
    params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}

    def loss(p, xs, ys):
        return 0.5 * jnp.mean((xs @ p["w"] - ys) ** 2)

    def np_grad(w, s):
        xs, ys = x[5 * s:5 * s + 5].astype(np.float64), y[5 * s:5 * s + 5].astype(np.float64)
        return xs.T @ (xs @ w - ys) / 5

    def local(tx, p, state, xs, ys):
        grad = lambda q: jax.grad(loss)(q, xs, ys)  # noqa: E731
        return tx.update(grad(jax.lax.pcast(p, "data", to="varying")), state, p, grad_fn=grad)

    def step(tx):
        mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
        return jax.jit(jax.shard_map(partial(local, tx), mesh=mesh,
                                     in_specs=(P(), P(), P("data"), P("data")),
                                     out_specs=(P(), P())))

    return x, y, params, np_grad, step
