"""Cosine alignment between a pytree (e.g. a SAM perturbation) and an eigenvector."""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from sam_jax.curvature._results import EigenResult


def cosine_alignment(tree: Any, direction: Any, *, absolute: bool = True) -> float:
    """``⟨a, b⟩ / (‖a‖ ‖b‖)`` between two pytrees of the same structure.

    Args:
      tree: any pytree like the params (a SAM perturbation ε, a gradient, ...).
      direction: a pytree like ``tree``, or an :class:`EigenResult` (its top eigenvector).
      absolute: return ``|cos|`` (default): an eigenvector's sign is arbitrary.

    Returns:
      The cosine as a float; 0.0 when either vector is zero (no direction to align).
    """
    if isinstance(direction, EigenResult):
        direction = direction.top_eigenvector
    a, _ = ravel_pytree(tree)
    b, _ = ravel_pytree(direction)
    if a.shape != b.shape:
        raise ValueError(f"pytrees differ in size: {a.size} vs {b.size}")
    dtype = jnp.promote_types(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    norms = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    if not float(norms) > 0:
        return 0.0
    cosine = float(jnp.vdot(a, b) / norms)
    return abs(cosine) if absolute else cosine
