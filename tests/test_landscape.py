"""Landscape tools against closed forms on quadratics and a double well."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sam_jax import landscape

RNG = np.random.default_rng(0)
HALF_A = RNG.normal(size=(7, 7))
MATRIX = HALF_A @ HALF_A.T + 0.5 * np.eye(7)  # positive definite: convex quadratic
TARGETS = RNG.normal(size=(9, 7))


def quadratic_loss(params, batch):
    """Σ_i ½ (θ − x_i)ᵀ A (θ − x_i) over the batch; its mean has Hessian A."""
    theta, _ = ravel_pytree(params)
    diff = theta[None, :] - batch["x"]
    a = jnp.asarray(MATRIX, theta.dtype)
    return 0.5 * jnp.sum((diff @ a) * diff), jnp.asarray(batch["x"].shape[0], theta.dtype)


def as_params(vector):
    # Keys sorted as ravel_pytree orders them, so the flat vector is ``vector``.
    return {"a_kernel": jnp.asarray(vector[:4]).reshape(2, 2), "b_bias": jnp.asarray(vector[4:])}


BATCHES = [{"x": TARGETS[:5]}, {"x": TARGETS[5:]}]  # unequal sizes


def test_convex_quadratic_no_barrier_and_exact_second_difference():
    with jax.enable_x64(True):
        theta_a, theta_b = RNG.normal(size=7), RNG.normal(size=7)
        result = landscape.interpolate(quadratic_loss, as_params(theta_a), as_params(theta_b), BATCHES)
        central = landscape.interpolate(
            quadratic_loss, as_params(theta_a), as_params(theta_b), BATCHES,
            lambdas=[0.0, 0.5], denominator="central",
        )
    d = theta_b - theta_a
    curvature = d @ MATRIX @ d
    assert result.barrier == 0.0 and result.barrier_above_max_endpoint == 0.0
    # Paper formula, (2h)² denominator: numerator h²·dᵀAd → L'' = dᵀAd / 4 at every λ.
    np.testing.assert_allclose(result.second_derivative, curvature / 4, rtol=1e-9)
    np.testing.assert_allclose(central.second_derivative, curvature, rtol=1e-9)
    # The losses themselves: mean over the data of the quadratic at θ_λ.
    lam = result.lambdas[7]
    theta = (1 - lam) * theta_a + lam * theta_b
    exact = np.mean([0.5 * (theta - x) @ MATRIX @ (theta - x) for x in TARGETS])
    assert result.losses[7] == pytest.approx(exact, rel=1e-12)
    assert len(result.lambdas) == 40 and result.lambdas[0] == -0.2 and result.lambdas[-1] == 1.2
    assert result.h == 0.1 and result.denominator == "paper"


def double_well(params, batch):
    w = params["w"]
    return jnp.sum((w**2 - 1.0) ** 2) * batch["x"].shape[0], jnp.asarray(batch["x"].shape[0], w.dtype)


def test_double_well_barrier_and_metric():
    ones = {"x": np.ones((3, 1), np.float32)}

    def metric(params, batch):  # a made-up metric: |w| per example
        return jnp.sum(jnp.abs(params["w"])) * batch["x"].shape[0], jnp.asarray(batch["x"].shape[0], jnp.float32)

    result = landscape.interpolate(
        double_well, {"w": jnp.array([-1.0])}, {"w": jnp.array([1.0])}, ones,
        lambdas=np.linspace(0, 1, 11), metric_fn=metric, h=None,
    )
    # L(θ_λ) = ((2λ−1)² − 1)²: 0 at both ends, 1 at λ = 1/2.
    assert result.barrier == pytest.approx(1.0, abs=1e-6)
    assert result.barrier_above_max_endpoint == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(result.metrics, np.abs(2 * np.linspace(0, 1, 11) - 1), atol=1e-6)
    assert result.second_derivative is None


def test_tilted_double_well_barrier_against_the_chord_and_the_higher_end():
    """L(w) = (w² − 1)² + w from w = −1 (L = −1) to w = 1 (L = 1): the chord removes
    the tilt, so the standard barrier is exactly 1 (at λ = 1/2), while the height above
    the higher endpoint is max_grid L − 1 ≈ 0.13 (maximum near w ≈ 0.25). Different
    endpoints tell the two definitions (and a chord to the lower end) apart."""

    def tilted(params, batch):
        w = params["w"]
        n = batch["x"].shape[0]
        return (jnp.sum((w**2 - 1.0) ** 2) + jnp.sum(w)) * n, jnp.asarray(n, w.dtype)

    lambdas = np.linspace(0, 1, 101)
    with jax.enable_x64(True):
        result = landscape.interpolate(tilted, {"w": jnp.array([-1.0])}, {"w": jnp.array([1.0])},
                                       {"x": np.ones((2, 1))}, lambdas=lambdas, h=None)
    w = 2 * lambdas - 1
    losses = (w**2 - 1) ** 2 + w
    np.testing.assert_allclose(result.losses, losses, atol=1e-12)
    assert result.endpoint_losses == pytest.approx((-1.0, 1.0), abs=1e-12)
    assert result.barrier == pytest.approx(1.0, abs=1e-12)
    above = losses.max() - 1.0
    assert 0.12 < above < 0.14
    assert result.barrier_above_max_endpoint == pytest.approx(above, abs=1e-12)


def test_filter_normalized_direction():
    params = {
        "conv": {"kernel": jnp.asarray(RNG.normal(size=(3, 3, 2, 4)), jnp.float32), "bias": jnp.ones(4)},
        "bn": {"scale": jnp.ones(4)},
    }
    direction = landscape.filter_normalized_direction(params, jax.random.key(0))
    kernel, d_kernel = params["conv"]["kernel"], direction["conv"]["kernel"]
    np.testing.assert_allclose(
        jnp.linalg.norm(d_kernel.reshape(-1, 4), axis=0), jnp.linalg.norm(kernel.reshape(-1, 4), axis=0), rtol=1e-5
    )
    assert not np.allclose(d_kernel, kernel)
    assert np.all(direction["conv"]["bias"] == 0) and np.all(direction["bn"]["scale"] == 0)
    kept = landscape.filter_normalized_direction(params, jax.random.key(0), ignore="none")
    np.testing.assert_array_equal(kept["conv"]["bias"], params["conv"]["bias"])
    with pytest.raises(ValueError, match="ignore"):
        landscape.filter_normalized_direction(params, jax.random.key(0), ignore="bn")


def test_loss_surface_matches_closed_form():
    with jax.enable_x64(True):
        theta = RNG.normal(size=7)
        delta, eta = RNG.normal(size=7), RNG.normal(size=7)
        result = landscape.loss_surface(
            quadratic_loss, as_params(theta), BATCHES,
            alphas=[-1.0, 0.0, 0.5], betas=[0.0, 2.0],
            directions=(as_params(delta), as_params(eta)),
        )
    for i, a in enumerate([-1.0, 0.0, 0.5]):
        for j, b in enumerate([0.0, 2.0]):
            point = theta + a * delta + b * eta
            exact = np.mean([0.5 * (point - x) @ MATRIX @ (point - x) for x in TARGETS])
            assert result.losses[i, j] == pytest.approx(exact, rel=1e-12)
    assert result.seed is None and result.losses.shape == (3, 2)


class TinyCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.relu(nn.Conv(2, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_surface_and_accuracy_on_a_flax_model():
    from sam_jax.curvature import flax_loss_fn

    model = TinyCNN()
    batch = {"x": RNG.normal(size=(6, 4, 4, 1)).astype(np.float32), "y": RNG.integers(0, 3, 6).astype(np.int32)}
    variables = model.init(jax.random.key(0), batch["x"])
    loss_fn = flax_loss_fn(model, variables, bn_mode="running")
    accuracy = landscape.flax_accuracy_fn(model, variables)
    result = landscape.loss_surface(
        loss_fn, variables["params"], batch, alphas=[0.0, 1.0], betas=[0.0], metric_fn=accuracy, seed=3
    )
    logits = model.apply(variables, batch["x"], train=False)
    assert result.losses[0, 0] == pytest.approx(float(loss_fn(variables["params"], batch)[0]) / 6, rel=1e-6)
    assert result.metrics[0, 0] == pytest.approx(float(np.mean(np.argmax(logits, -1) == batch["y"])))
    assert result.losses[1, 0] != result.losses[0, 0] and result.seed == 3


def test_mismatched_params_rejected():
    with pytest.raises(ValueError, match="structure"):
        landscape.interpolate(double_well, {"w": jnp.ones(1)}, {"w": jnp.ones(2)}, {"x": np.ones((1, 1))})
    with pytest.raises(ValueError, match="denominator"):
        landscape.interpolate(double_well, {"w": jnp.ones(1)}, {"w": jnp.ones(1)}, {"x": np.ones((1, 1))}, denominator="x")
