"""Hutchinson's stochastic trace estimator (PyHessian's ``trace``; papers.md §4)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.curvature._results import TraceResult
from sam_jax.curvature.lanczos import resolve_dtype
from sam_jax.curvature.operator import as_operator


def rademacher_probe(key: jax.Array, dim: int, dtype: Any) -> jax.Array:
    """A vector of independent ±1 entries (``E[zzᵀ] = I``, lowest-variance Hutchinson probe)."""
    return jax.random.rademacher(key, (dim,), dtype=dtype)


def hutchinson_trace(
    operator: Any,
    num_probes: int = 100,
    *,
    seed: int = 0,
    accumulate_dtype: Any = None,
) -> TraceResult:
    """Estimate ``tr(H) = E[zᵀ H z]`` with Rademacher probes ``z``.

    Args:
      operator: a ``LinearOperator`` or dense symmetric matrix.
      num_probes: number of probes, one product each (PyHessian iterates up to 100).
      seed: seed of the probes.
      accumulate_dtype: dtype of the probes and dot products (float64 needs x64).

    Returns:
      A :class:`TraceResult` with the mean and its standard error
      ``std(samples, ddof=1) / √num_probes`` (NaN with a single probe).
    """
    operator = as_operator(operator)
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    dtype = resolve_dtype(accumulate_dtype, operator.dtype)
    start_hvps = operator.num_matvecs
    keys = jax.random.split(jax.random.key(seed), num_probes)
    samples = []
    for key in keys:
        probe = rademacher_probe(key, operator.dim, dtype)
        samples.append(float(jnp.vdot(probe, operator.matvec_flat(probe))))
    samples = np.asarray(samples, np.float64)
    stderr = float(np.std(samples, ddof=1) / np.sqrt(num_probes)) if num_probes > 1 else float("nan")
    return TraceResult(
        trace=float(np.mean(samples)),
        stderr=stderr,
        samples=samples,
        num_probes=num_probes,
        seed=seed,
        num_hvps=operator.num_matvecs - start_hvps,
        distribution="rademacher",
        settings=operator.settings(),
    )
