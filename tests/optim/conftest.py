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


class Quadratic:
    """L(w) = 0.5 wᵀAw − bᵀw on a 5-parameter pytree, with A = Q diag(eigenvalues) Qᵀ
    known, so gradients, Hessian-vector products and the top eigenvector are closed
    forms (numpy float64) that the per-algorithm tests compare against."""

    def __init__(self, eigenvalues=(5.0, 2.0, 1.0, 0.5, -0.25), seed: int = 0):
        from jax.flatten_util import ravel_pytree

        self.eigenvalues = np.asarray(eigenvalues, np.float64)
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
        self.A = q @ np.diag(self.eigenvalues) @ q.T
        self.B = rng.normal(size=5)
        self.top = q[:, 0]
        self.params = {"kernel": jnp.asarray(rng.normal(size=(1, 3)), jnp.float32),
                       "bias": jnp.asarray(rng.normal(size=(2,)), jnp.float32)}
        w0, self.unravel = ravel_pytree(self.params)
        self.w0 = np.asarray(w0, np.float64)
        self._ravel = ravel_pytree

    def grad(self, params):
        """The float32 gradient pytree (what a transform's ``grad_fn`` returns)."""
        w, _ = self._ravel(params)
        return self.unravel(jnp.asarray(self.A, jnp.float32) @ w - jnp.asarray(self.B, jnp.float32))

    def np_grad(self, w):
        """The float64 gradient at the flat vector ``w``."""
        return self.A @ w - self.B

    def minimizer(self):
        """The stationary point as a float32 pytree (its gradient is ~0)."""
        return self.unravel(jnp.asarray(np.linalg.solve(self.A, self.B), jnp.float32))

    def flat(self, tree):
        return np.asarray(self._ravel(tree)[0], np.float64)

    def run_steps(self, tx, num_steps, params=None, **extra):
        """``num_steps`` jitted updates at the same params (isolates the transform):
        (list of flat float64 outputs, final state)."""
        params = self.params if params is None else params
        state = tx.init(params)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=self.grad, **extra))
        outputs = []
        for _ in range(num_steps):
            updates, state = step(self.grad(params), state, params)
            outputs.append(self.flat(updates))
        return outputs, state


@pytest.fixture(scope="session")
def quadratic():
    """The shared indefinite quadratic (top eigenvalue 5, one negative eigenvalue)."""
    return Quadratic()


def close(actual, expected, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture(scope="session")
def assert_close():
    """``assert_close(actual, expected, rtol=1e-5, atol=1e-5)``."""
    return close
