"""The ``--investigate`` attempt "batch split over CPU devices" times the same step.

`benchmarks.vs_pytorch.jax_steps(devices=k)` shards the batch over ``k`` devices and
replicates the rest; XLA all-reduces gradients and BatchNorm statistics, so one SAM
step must equal the one-device step (up to float32 summation order). Without this,
the speed-up it reports could come from computing something else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import vs_pytorch as vp


def test_split_batch_sam_step_equals_one_device_step(devices=2):
    if len(jax.devices()) < devices:
        pytest.skip(f"needs {devices} devices")
    # The tiny ResNet compiles in ~20 s here; the engine's own tests check that a
    # split batch gives global BatchNorm statistics (test_train_parallel.py).
    module, x_shape, _ = vp.problem("cnn1d", tiny=True)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=x_shape[0]), jnp.int32)
    params, stats = vp.jax_init(module, x_shape)

    def one_step(k):
        (tx, step), _, _ = vp.jax_steps(module, devices=k)
        args = (jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, stats), tx.init(params))
        xs, ys = x, y
        if k > 1:
            data, repl = vp.batch_sharding(k)
            args, (xs, ys) = jax.device_put(args, repl), jax.device_put((x, y), data)
        new_params, new_stats, _, loss = step(*args, xs, ys)
        if k > 1:  # really split: each device holds 1/k of the batch
            assert {s.data.shape[0] for s in xs.addressable_shards} == {x_shape[0] // k}
        return jax.device_get((new_params, new_stats, loss))

    single, split = one_step(1), one_step(devices)
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(single[0]), jax.tree.leaves(params)))
    assert moved > 1e-4  # the step changed the parameters, so the comparison means something
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(split)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
