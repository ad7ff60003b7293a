"""Data parallelism: a 1-D ``data`` mesh, sharded batches, replicated state.

Two ways to run a step on several devices:

* **synced** (default): ``jax.jit`` with explicit in/out shardings on global arrays.
  The batch is sharded on the ``data`` axis, params and optimizer state are
  replicated; XLA inserts the all-reduces. Everything (the SAM ε, BatchNorm
  statistics) is computed on the *global* batch, so the step equals the
  single-device step on the same batch.
* **per-device ε** (m-sharpness, official JAX SAM's default): the step body runs per
  device inside ``jax.shard_map``; each device perturbs with its own gradient, the
  two SAM gradients are averaged across devices (the transform's
  ``axis_name='data', sync_perturbation=False``) and BatchNorm statistics are
  pmean-ed.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: Optional[int] = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (None: all) named ``data``."""
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}] (devices available), "
                         f"got {num_devices}")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def num_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS]


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
    if batch_size % num_shards(mesh):
        raise ValueError(f"{what} {batch_size} is not divisible by the {num_shards(mesh)} "
                         "devices of the data mesh; change it or num_devices")


def put_replicated(tree, mesh: Mesh):
    if jax.process_count() > 1:  # process-local arrays (a restore) -> global
        from sam_jax.train import distributed
        return distributed.put_replicated(tree, mesh)
    return jax.device_put(tree, replicated(mesh))


def process_rows(mesh: Mesh, batch_size: int) -> Optional[slice]:
    """The rows of a global batch of ``batch_size`` this process's devices hold.

    None in a single process (all rows). In a multi-process job, pass it to
    ``Dataset.batches(rows=...)`` so this process reads, augments and converts only
    its own rows, then `put_batch` with ``global_batch_size=batch_size``.
    """
    if jax.process_count() == 1:
        return None
    from sam_jax.train import distributed
    return distributed.local_rows(batch_sharded(mesh), (batch_size,))


def put_batch(batch: dict, mesh: Mesh, global_batch_size: Optional[int] = None) -> dict:
    """``batch`` sharded on the mesh's ``data`` axis.

    Args:
      batch: the global batch; or, with ``global_batch_size``, only this process's
        rows of it (``process_rows``).
      mesh: the data mesh.
      global_batch_size: the global batch's size when ``batch`` holds only this
        process's rows (multi-process jobs).
    """
    if jax.process_count() > 1:  # each process feeds only its devices' rows
        from sam_jax.train import distributed
        if global_batch_size is not None:
            return distributed.put_local_rows(batch, mesh, global_batch_size)
        return distributed.put_process_batch(batch, mesh)
    return jax.device_put(batch, batch_sharded(mesh))


def jit_train_step(step: Callable, mesh: Mesh, per_device: bool,
                   donate_state: bool = False) -> Callable:
    """Jit ``step(state, batch, hyper, rng) -> (state, metrics)`` over ``mesh``.

    Args:
      step: from `sam_jax.train.step.make_train_step` (built with
        ``axis_name='data'`` when ``per_device``).
      mesh: the data mesh.
      per_device: run ``step`` per device inside ``jax.shard_map``.
      donate_state: donate the input state's buffers to the output state (no
        second copy of params and optimizer state in memory); the caller must not
        read the state it passed in after the call (its arrays are deleted).

    Returns:
      The jitted step; the state and metrics come out replicated.
    """
    repl, data = replicated(mesh), batch_sharded(mesh)
    if per_device:
        # check_vma=False: the SAM state logs device-averaged scalars, and the
        # pmean-ed outputs are replicated by construction.
        step = jax.shard_map(step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(), P()),
                             out_specs=(P(), P()), check_vma=False)
    return jax.jit(step, in_shardings=(repl, data, repl, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,) if donate_state else ())


def jit_eval_step(step: Callable, mesh: Mesh) -> Callable:
    """Jit ``step(params, batch_stats, batch) -> metrics`` (batch sharded)."""
    repl, data = replicated(mesh), batch_sharded(mesh)
    return jax.jit(step, in_shardings=(repl, repl, data), out_shardings=repl)
