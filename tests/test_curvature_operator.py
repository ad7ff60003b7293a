"""Dataset-level Hessian operators on tiny Flax models against dense jax.hessian."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sam_jax import curvature


class TinyMLP(nn.Module):
    hidden: int = 5
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.tanh(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.tanh(x))


class TinyDropout(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dropout(0.5, deterministic=not train)(nn.Dense(4)(x))
        return nn.Dense(3)(x)


def to_float64(variables):
    # Flax initializes float32 params even in x64 mode (param_dtype default).
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)


def make_data(n, dim=3, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, dim)).astype(dtype), "y": rng.integers(0, 3, n).astype(np.int32)}


def split(batch, sizes):
    edges = np.cumsum([0, *sizes])
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(edges[:-1], edges[1:])]


def dense_hessian(mean_loss, params):
    flat, unravel = ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda f: mean_loss(unravel(f))))(flat))


def operator_matrix(operator):
    eye = np.eye(operator.dim, dtype=np.dtype(operator.dtype))
    return np.stack([np.asarray(operator.matvec_flat(jnp.asarray(col))) for col in eye], axis=1)


def test_tiny_mlp_float64_eigenvalues_match_dense_hessian():
    with jax.enable_x64(True):
        model = TinyMLP()
        data = make_data(40)
        variables = to_float64(model.init(jax.random.key(0), data["x"]))
        loss_fn = curvature.flax_loss_fn(model, variables, bn_mode="running")
        params = variables["params"]
        hessian = dense_hessian(lambda p: loss_fn(p, data)[0] / 40, params)
        exact = np.linalg.eigvalsh(hessian)
        operator = curvature.HessianOperator(loss_fn, params, split(data, [16, 16, 8]))
        result = curvature.lanczos_eigs(
            operator, top_k=5, bottom_k=2, num_steps=operator.dim, accumulate_dtype=jnp.float64
        )
        # Eigenvectors come back as pytrees shaped like the params and satisfy Hv = λv.
        vector = result.eigenvectors[0]
        assert jax.tree.structure(vector) == jax.tree.structure(params)
        flat = np.asarray(ravel_pytree(vector)[0])
    assert flat.dtype == np.float64
    np.testing.assert_allclose(hessian @ flat, result.eigenvalues[0] * flat, atol=1e-12)
    assert exact[0] < 0  # the tiny MLP has negative curvature: bottom pairs matter
    np.testing.assert_allclose(result.eigenvalues, exact[::-1][:5], rtol=1e-8)
    np.testing.assert_allclose(result.bottom_eigenvalues, exact[:2], rtol=1e-8)
    assert np.all(result.residual_norms < 1e-8 * abs(exact).max())
    assert result.settings.bn_mode == "running" and result.settings.reduction == "mean"
    assert result.settings.num_examples == 40 and result.settings.num_batches == 3
    # The Hessian has repeated zero eigenvalues (softmax shift invariance), so the
    # Krylov space closes before ``dim`` steps: an early, exact stop.
    assert result.num_steps <= operator.dim
    assert result.num_hvps == result.num_steps + 7


def test_unequal_batches_equal_full_batch_mean_and_sum():
    with jax.enable_x64(True):
        model = TinyMLP()
        data = make_data(23, seed=1)
        variables = to_float64(model.init(jax.random.key(1), data["x"]))
        loss_fn = curvature.flax_loss_fn(model, variables, bn_mode="running", label_smoothing=0.1)
        params = variables["params"]
        full = curvature.HessianOperator(loss_fn, params, data)
        many = curvature.HessianOperator(loss_fn, params, split(data, [10, 10, 3]))
        from_callable = curvature.HessianOperator(
            loss_fn, params, lambda: iter(split(data, [5, 18])), reduction="sum"
        )
        exact = dense_hessian(lambda p: loss_fn(p, data)[0] / 23, params)
        np.testing.assert_allclose(operator_matrix(full), exact, atol=1e-12)
        np.testing.assert_allclose(operator_matrix(many), exact, atol=1e-12)
        np.testing.assert_allclose(operator_matrix(from_callable), 23 * exact, atol=1e-11)
        # Pytree interface equals the flat one.
        vector = jax.tree.map(jnp.ones_like, params)
        np.testing.assert_allclose(
            ravel_pytree(many.matvec(vector))[0], exact @ np.ones(many.dim), atol=1e-12
        )
        loss = curvature.dataset_loss(loss_fn, params, split(data, [10, 10, 3]))
        assert loss == pytest.approx(float(loss_fn(params, data)[0]) / 23, rel=1e-12)
    assert many.settings().label_smoothing == 0.1
    assert from_callable.settings().reduction == "sum"


def test_batchnorm_modes_give_their_own_hessians():
    with jax.enable_x64(True):
        model = TinyBN()
        data = make_data(12, seed=2)
        variables = to_float64(model.init(jax.random.key(2), data["x"]))
        # Non-trivial running statistics, so the two modes differ.
        _, updates = model.apply(variables, data["x"] * 3 + 1, mutable=["batch_stats"])
        variables = {"params": variables["params"], **updates}
        params = variables["params"]

        def train_mode_loss(p):
            logits, _ = model.apply({"params": p, **updates}, data["x"], train=True, mutable=["batch_stats"])
            return curvature.cross_entropy_sum(logits, data["y"], 0.0)[0] / 12

        def eval_mode_loss(p):
            logits = model.apply({"params": p, **updates}, data["x"], train=False)
            return curvature.cross_entropy_sum(logits, data["y"], 0.0)[0] / 12

        for mode, reference in (("batch", train_mode_loss), ("running", eval_mode_loss)):
            operator = curvature.HessianOperator(curvature.flax_loss_fn(model, variables, bn_mode=mode), params, data)
            np.testing.assert_allclose(operator_matrix(operator), dense_hessian(reference, params), atol=1e-12)
            assert operator.settings().bn_mode == mode
        assert not np.allclose(dense_hessian(train_mode_loss, params), dense_hessian(eval_mode_loss, params))


def test_dropout_key_gives_a_fixed_matrix_and_off_needs_no_dropout():
    model = TinyDropout()
    data = make_data(10, seed=3, dtype=np.float32)
    variables = model.init(jax.random.key(3), data["x"], train=False)
    loss_fn = curvature.flax_loss_fn(model, variables, bn_mode="batch", dropout=jax.random.key(7))
    operator = curvature.HessianOperator(loss_fn, variables["params"], data)
    vector = jnp.ones(operator.dim)
    np.testing.assert_array_equal(operator.matvec_flat(vector), operator.matvec_flat(vector))
    assert operator.settings().dropout == "fixed-key"
    with pytest.raises(ValueError, match="dropout"):
        curvature.flax_loss_fn(model, variables, bn_mode="batch")(variables["params"], data)
    with pytest.raises(ValueError, match="no effect"):
        curvature.flax_loss_fn(model, variables, bn_mode="running", dropout=jax.random.key(0))


def test_invalid_inputs():
    model = TinyMLP()
    data = make_data(4, dtype=np.float32)
    variables = model.init(jax.random.key(0), data["x"])
    with pytest.raises(ValueError, match="bn_mode"):
        curvature.flax_loss_fn(model, variables, bn_mode="eval")
    loss_fn = curvature.flax_loss_fn(model, variables)
    with pytest.raises(ValueError, match="reduction"):
        curvature.HessianOperator(loss_fn, variables["params"], data, reduction="avg")
    with pytest.raises(ValueError, match="empty"):
        curvature.HessianOperator(loss_fn, variables["params"], [])
    with pytest.raises(ValueError, match="one-shot"):
        curvature.HessianOperator(loss_fn, variables["params"], iter([data]))
    operator = curvature.HessianOperator(loss_fn, variables["params"], data)
    with pytest.raises(ValueError, match="shape"):
        operator.matvec_flat(jnp.ones(3))
