"""Placing host values on a mesh that may span several processes.

In a multi-process job (``jax.distributed``) every process computes the same host
value (a batch, the parameters, a Lanczos vector) and must turn it into one global
array. ``jax.device_put`` is the wrong tool there: for an array committed to one
local device it attempts a cross-host transfer (the CPU backend refuses it), and
for a host array it first all-gathers the whole value to check that it agrees
across processes. `put_global` copies, in each process, only the slices its own
devices hold. Used by the training engine (`sam_jax.train.distributed`) and the
data-parallel Hessian operator (`sam_jax.curvature.HessianOperator`).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Sharding


def put_global(tree: Any, sharding: Sharding) -> Any:
    """``tree`` placed on ``sharding``, each process copying only its devices' slices.

    One process: ``jax.device_put`` (which also moves arrays committed elsewhere).
    Several processes: each leaf (the same value in every process) is built with
    ``jax.make_array_from_callback`` from the host value or from the local device
    holding it; leaves that are already global arrays go to ``jax.device_put``
    (a no-op when they already have ``sharding``).
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return jax.device_put(leaf, sharding)
        value = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def local_replica(result: jax.Array, like: jax.Array) -> jax.Array:
    """The replicated ``result`` placed where ``like`` lives.

    A process-local ``like`` (a Lanczos basis vector in a multi-process job) gets
    this process's own replica of ``result``: every device of the mesh holds the
    whole value, so nothing needs to cross processes.
    """
    if like.is_fully_addressable and not result.is_fully_addressable:
        wanted = like.sharding.device_set
        shards = result.addressable_shards
        local = next((s.data for s in shards if s.device in wanted), shards[0].data)
        return jax.device_put(local, like.sharding)
    return jax.device_put(result, like.sharding)
