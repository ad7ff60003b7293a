"""Power iteration with deflation: the PyHessian baseline (papers.md §4).

Pitfall: power iteration converges to the eigenvalue of largest **magnitude**,
which is the most negative one when |λ_min| > λ_max (common early in training or
at saddle points); Lanczos has no such bias and also needs several times fewer
products (benchmarks/curvature_cost.py). Each later eigenvalue is found by
re-orthogonalizing the iterate against the eigenvectors already found (deflation).

This is the *measurement* (random start, deflation, stopping rule, host loop over a
dataset-level operator). The optimizers' in-graph, warm-started, fixed-length
iteration is a different tool: ``sam_jax.optim.warm_power_iteration``.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.curvature._results import EigenResult
from sam_jax.curvature.lanczos import _residual_norms, resolve_dtype, start_vector
from sam_jax.curvature.operator import as_operator


@jax.jit
def _orthonormalize(vector, found):
    """Remove the components along the rows of ``found`` (zero rows are inert); normalize."""
    vector = vector - found.T @ (found @ vector)
    return vector / jnp.linalg.norm(vector)


def power_iteration(
    operator: Any,
    top_k: int = 1,
    *,
    tol: float = 1e-3,
    max_iters: int = 100,
    seed: int = 0,
    accumulate_dtype: Any = None,
    compute_residuals: bool = True,
) -> EigenResult:
    """Top-k eigenpairs (by magnitude!) by power iteration with deflation.

    Follows PyHessian's ``eigenvalues``: start from a random unit vector, iterate
    ``v ← Hv/‖Hv‖`` with the Rayleigh quotient ``vᵀHv`` as the estimate, stop when it
    changes by less than ``tol`` relative (``|Δ| / (|λ| + 1e-6) < tol``) or after
    ``max_iters`` iterations.

    Args:
      operator: a ``LinearOperator`` or dense symmetric matrix.
      top_k: number of eigenpairs.
      tol: relative tolerance; PyHessian's default 1e-3.
      max_iters: iteration cap per eigenvalue; PyHessian's default 100.
      seed: start-vector seed (eigenvalue i uses ``seed + i``).
      accumulate_dtype: iterate dtype (float64 needs x64 mode).
      compute_residuals: measure ``‖Hv − λv‖`` (one extra product per pair).

    Returns:
      An :class:`EigenResult` with ``method="power"``, ``iterations`` and ``converged``.
    """
    operator = as_operator(operator)
    if top_k < 1 or top_k > operator.dim:
        raise ValueError(f"top_k must be in [1, {operator.dim}], got {top_k}")
    if tol <= 0 or max_iters < 1:
        raise ValueError(f"need tol > 0 and max_iters >= 1, got tol={tol}, max_iters={max_iters}")
    dtype = resolve_dtype(accumulate_dtype, operator.dtype)
    start_hvps = operator.num_matvecs
    found = jnp.zeros((top_k, operator.dim), dtype)
    values, vectors, iterations, converged, history = [], [], [], [], []
    for i in range(top_k):
        vector = _orthonormalize(start_vector(operator.dim, seed + i, dtype), found)
        estimate, done, used, trace = None, False, 0, []
        for used in range(1, max_iters + 1):
            product = operator.matvec_flat(vector)
            new_estimate = float(jnp.vdot(vector, product))
            trace.append(new_estimate)
            vector = _orthonormalize(product, found)
            if estimate is not None and abs(estimate - new_estimate) / (abs(estimate) + 1e-6) < tol:
                estimate, done = new_estimate, True
                break
            estimate = new_estimate
        found = found.at[i].set(vector)
        values.append(estimate)
        vectors.append(vector)
        iterations.append(used)
        converged.append(done)
        history.append(tuple(trace))
    values = np.asarray(values, np.float64)
    residuals = _residual_norms(operator, vectors, values) if compute_residuals else np.full(top_k, np.nan)
    empty = np.zeros((0,), np.float64)
    return EigenResult(
        eigenvalues=values,
        eigenvectors=tuple(operator.unravel(v) for v in vectors),
        residual_norms=residuals,
        bottom_eigenvalues=empty,
        bottom_eigenvectors=(),
        bottom_residual_norms=empty,
        method="power",
        num_steps=int(sum(iterations)),
        seed=seed,
        dtype=jnp.dtype(dtype).name,
        num_hvps=operator.num_matvecs - start_hvps,
        settings=operator.settings(),
        iterations=tuple(iterations),
        converged=tuple(converged),
        history=tuple(history),
    )
