"""Data-parallel HessianOperator (``mesh=``) on 4 simulated CPU devices (conftest.py)
against the single-device operator.

Tolerances: in float64 (``jax.enable_x64``) the two operators differ only by the
order of float summation (per-device partial sums + all-reduce vs one sum), so they
agree to ~1e-15 relative; we assert 1e-12. In float32 the same reassociation gives
differences of a few eps32 (1.2e-7) times the largest entry — measured 1.4e-7
relative — and we assert 1e-5 relative to ‖Hv‖∞ (≈ 80 eps32: sums over ≤ 8
examples per batch and 3 batches, plus XLA fusing the partitioned program
differently).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import curvature

SIZES = (8, 8, 7)  # the last batch is smaller and not divisible by the 4 devices


class TinyBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(3)(nn.tanh(x))


def make_data(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(n, 5)).astype(dtype), "y": rng.integers(0, 3, n).astype(np.int32)}


def split(batch, sizes):
    edges = np.cumsum([0, *sizes])
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(edges[:-1], edges[1:])]


def model_and_variables(dtype):
    model = TinyBN()
    data = make_data(sum(SIZES), dtype)
    variables = model.init(jax.random.key(0), data["x"])
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
    # Non-trivial running statistics, so that "batch" and "running" modes differ.
    _, updates = model.apply(variables, data["x"] * 2 + 1, mutable=["batch_stats"])
    return model, {"params": variables["params"], **updates}, data


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 4, "tests/conftest.py simulates 4 CPU devices"
    return curvature.data_mesh(4)


def products(operator, vectors):
    return np.stack([np.asarray(operator.matvec_flat(v)) for v in vectors])


@pytest.mark.parametrize("bn_mode", ["running", "batch"])
def test_parallel_hvp_equals_single_device_float64(mesh, bn_mode):
    with jax.enable_x64(True):
        model, variables, data = model_and_variables(np.float64)
        loss_fn = curvature.flax_loss_fn(model, variables, bn_mode=bn_mode)
        params = variables["params"]
        batches = split(data, SIZES)
        for reduction in ("mean", "sum"):
            single = curvature.HessianOperator(loss_fn, params, batches, reduction=reduction)
            parallel = curvature.HessianOperator(loss_fn, params, batches, reduction=reduction, mesh=mesh)
            vectors = np.random.default_rng(1).normal(size=(3, single.dim))
            expected, got = products(single, vectors), products(parallel, vectors)
            assert got.dtype == np.float64
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
            assert parallel.settings().num_devices == 4 and single.settings().num_devices == 1
            assert parallel.num_examples == sum(SIZES) and parallel.num_batches == 3
        # The 7-example batch: masked padding in "running" mode (exact: padded
        # examples contribute zero), whole on every device in "batch" mode (padding
        # would enter the batch statistics).
        if bn_mode == "running":
            assert parallel.num_padded_batch_hvps == 3 and parallel.num_replicated_batch_hvps == 0
        else:
            assert parallel.num_padded_batch_hvps == 0 and parallel.num_replicated_batch_hvps == 3
        # The matrix is not trivially mode-independent: the two modes differ.
        other = curvature.flax_loss_fn(model, variables, bn_mode="batch" if bn_mode == "running" else "running")
        different = products(curvature.HessianOperator(other, params, batches, mesh=mesh, reduction="sum"), vectors[:1])
        assert np.abs(different - got[:1]).max() > 1e-3 * np.abs(got[:1]).max()


def test_parallel_hvp_equals_single_device_float32_and_is_partitioned(mesh):
    model, variables, data = model_and_variables(np.float32)
    for bn_mode in ("running", "batch"):
        loss_fn = curvature.flax_loss_fn(model, variables, bn_mode=bn_mode)
        batches = split(data, SIZES)
        single = curvature.HessianOperator(loss_fn, variables["params"], batches)
        parallel = curvature.HessianOperator(loss_fn, variables["params"], batches, mesh=mesh)
        vectors = np.random.default_rng(2).normal(size=(2, single.dim)).astype(np.float32)
        expected, got = products(single, vectors), products(parallel, vectors)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # Each device gets its share: the compiled per-batch program works on 8 / 4 = 2
    # examples per device and all-reduces the partial products.
    vector = jax.device_put(jnp.asarray(vectors[0]), parallel._replicated)
    hlo = parallel._sharded_hvp.lower(parallel.params, batches[0], vector).compile().as_text()
    assert "f32[2,5]" in hlo and "f32[8,5]" not in hlo
    assert "all-reduce" in hlo


def test_lanczos_on_parallel_operator_equals_single_device(mesh):
    with jax.enable_x64(True):
        model, variables, data = model_and_variables(np.float64)
        loss_fn = curvature.flax_loss_fn(model, variables, bn_mode="running")
        batches = split(data, SIZES)
        single = curvature.HessianOperator(loss_fn, variables["params"], batches)
        parallel = curvature.HessianOperator(loss_fn, variables["params"], batches, mesh=mesh)
        ours = curvature.lanczos_eigs(parallel, top_k=3, bottom_k=1, num_steps=15, seed=4)
        reference = curvature.lanczos_eigs(single, top_k=3, bottom_k=1, num_steps=15, seed=4)
        host = curvature.lanczos_eigs(parallel, top_k=3, num_steps=15, seed=4, basis_memory="host")
    np.testing.assert_allclose(ours.eigenvalues, reference.eigenvalues, rtol=1e-10)
    np.testing.assert_allclose(ours.bottom_eigenvalues, reference.bottom_eigenvalues, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(host.eigenvalues, reference.eigenvalues, rtol=1e-10)
    assert ours.num_hvps == reference.num_hvps
    assert ours.settings.num_devices == 4 and ours.settings.num_examples == sum(SIZES)


def test_uneven_modes_and_the_mask_check(mesh):
    model, variables, data = model_and_variables(np.float32)
    batches = split(data, SIZES)
    params = variables["params"]
    vector = jnp.ones(sum(p.size for p in jax.tree.leaves(params)), jnp.float32)
    running = curvature.flax_loss_fn(model, variables, bn_mode="running")
    expected = np.asarray(curvature.HessianOperator(running, params, batches).matvec_flat(vector))

    # Batches the caller committed to one device are moved to the mesh.
    committed = [jax.device_put(b, jax.devices()[1]) for b in batches]
    np.testing.assert_allclose(
        curvature.HessianOperator(running, params, committed, mesh=mesh).matvec_flat(vector),
        expected, rtol=0, atol=1e-5 * np.abs(expected).max(),
    )

    # A loss that ignores batch["mask"] reports the padded count: refused, since
    # padding would change the Hessian.
    def no_mask_loss(p, batch):
        return running(p, {"x": batch["x"], "y": batch["y"]})

    with pytest.raises(ValueError, match="mask"):
        curvature.HessianOperator(no_mask_loss, params, batches, mesh=mesh).matvec_flat(vector)
    # ... but runs the uneven batch whole on every device when asked.
    replicated = curvature.HessianOperator(no_mask_loss, params, batches, mesh=mesh, uneven="replicate")
    np.testing.assert_allclose(replicated.matvec_flat(vector), expected, atol=1e-5 * np.abs(expected).max())
    assert replicated.num_replicated_batch_hvps == 1
    with pytest.raises(ValueError, match="does not split"):
        curvature.HessianOperator(running, params, batches, mesh=mesh, uneven="error").matvec_flat(vector)
    # A batch that already carries a mask keeps it: masked-out examples stay out.
    masked = [dict(b) for b in batches]
    masked[2]["mask"] = np.array([1, 1, 1, 1, 1, 0, 0], np.float32)
    trimmed = batches[:2] + [{k: v[:5] for k, v in batches[2].items()}]
    np.testing.assert_allclose(
        curvature.HessianOperator(running, params, masked, mesh=mesh).matvec_flat(vector),
        curvature.HessianOperator(running, params, trimmed).matvec_flat(vector),
        atol=1e-5 * np.abs(expected).max(),
    )

    # BatchNorm "batch" mode: forcing masked padding changes the matrix (the zeros
    # enter the batch statistics) — why uneven="auto" replicates such a batch.
    batch_mode = curvature.flax_loss_fn(model, variables, bn_mode="batch")
    exact = np.asarray(curvature.HessianOperator(batch_mode, params, batches).matvec_flat(vector))
    padded = np.asarray(curvature.HessianOperator(batch_mode, params, batches, mesh=mesh, uneven="pad").matvec_flat(vector))
    assert np.abs(padded - exact).max() > 1e-3 * np.abs(exact).max()

    with pytest.raises(ValueError, match="axis"):
        curvature.HessianOperator(running, params, batches, mesh=mesh, axis="model")
    with pytest.raises(ValueError, match="uneven"):
        curvature.HessianOperator(running, params, batches, mesh=mesh, uneven="drop")
    with pytest.raises(ValueError, match="Mesh"):
        curvature.HessianOperator(running, params, batches, mesh=4)
