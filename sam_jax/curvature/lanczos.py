"""Lanczos tridiagonalization with full reorthogonalization, and eigenpairs from it.

Algorithm (Ghorbani, Krishnan, Xiao 2019; papers.md §4): from a random unit start
vector build an orthonormal Krylov basis ``V`` and the tridiagonal ``T = Vᵀ H V``.
Every new vector is reorthogonalized against the *whole* stored basis (twice —
"twice is enough", Kahan–Parlett), which removes the ghost eigenvalues that plain
Lanczos produces in finite precision.

Implementation notes:
  * The basis is a preallocated ``(num_steps + 1, dim)`` array of flattened vectors
    (``jax.flatten_util.ravel_pytree``); one jitted step does the three-term update
    and the reorthogonalization as two matrix-vector products with the stacked
    basis (unfilled rows are zero and contribute nothing), so it compiles once,
    whatever ``num_steps`` — unlike a Python-unrolled Gram–Schmidt.
  * The Hessian product itself runs outside that step (it iterates over host
    batches), so the outer loop is a Python loop over the jitted step.
  * float64 accumulation: pass ``accumulate_dtype=jnp.float64`` while JAX's x64 mode
    is on (``with jax.enable_x64(True): ...``); the basis, α and β are then kept in
    float64 while the model still computes its HVPs in its own dtype. Without x64
    JAX cannot hold float64 arrays and we raise a ValueError. Independently of
    this, the small tridiagonal eigenproblem is always solved in numpy float64.
  * Memory (``basis_memory``): ``"device"`` (default) keeps the basis on the
    accelerator, ``(num_steps + 1) × dim × itemsize`` bytes (float32: ResNet-50,
    25.6 M parameters, 100 steps ≈ 10.3 GB); ``"host"`` keeps it in host memory as a
    numpy array and does the recurrence and reorthogonalization there, so the
    device holds only the vector being multiplied and its product (O(dim), not
    growing with ``num_steps``); each step then moves two vectors between host and
    device and costs ``4 · (j + 1) · dim`` host flops at step j. In host mode a
    float64 basis needs no x64 mode (numpy holds it; the model stays in its dtype).
    :func:`lanczos_memory` gives the numbers for both modes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sam_jax.curvature._results import EigenResult
from sam_jax.curvature.operator import LinearOperator, as_operator


@dataclasses.dataclass(frozen=True)
class LanczosDecomposition:
    """``H V ≈ V T`` after ``num_steps`` Lanczos steps.

    Attributes:
      alphas: diagonal of T (numpy float64, length ``num_steps``).
      betas: off-diagonal of T (length ``num_steps − 1``).
      last_beta: norm of the residual after the last step (0 at an invariant subspace).
      basis: ``(num_steps, dim)`` orthonormal Lanczos vectors (jax, ``dtype``).
      num_steps: steps taken (may be fewer than requested at an invariant subspace).
      seed: seed of the start vector (``None`` if a start vector was given).
      dtype: accumulation dtype name.
      basis_memory: ``"device"`` (``basis`` is a jax array) or ``"host"`` (numpy).
    """

    alphas: np.ndarray
    betas: np.ndarray
    last_beta: float
    basis: Any
    num_steps: int
    seed: int | None
    dtype: str
    basis_memory: str = "device"

    def tridiagonal(self) -> np.ndarray:
        """Dense T in float64."""
        return np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)

    def ritz(self, steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and T's eigenvectors after ``steps`` steps.

        The leading ``steps × steps`` block of T is the tridiagonal the run had at
        that step, so convergence histories cost no extra products.
        """
        steps = self.num_steps if steps is None else steps
        t = self.tridiagonal()[:steps, :steps]
        return np.linalg.eigh(t)


BASIS_MEMORY = ("device", "host")


def lanczos_memory(dim: int, num_steps: int, dtype: Any = np.float32, basis_memory: str = "device") -> dict:
    """Bytes the Lanczos run itself holds, excluding the operator (params, batches,
    HVP activations), for ``lanczos_tridiagonal(..., basis_memory=...)``.

    Both modes hold two vectors on the device while a product is formed (the vector
    being multiplied and its product); ``"device"`` mode adds the basis
    ``(num_steps + 1) × dim`` there, ``"host"`` mode keeps it, plus three work
    vectors, in host memory — so its device share does not grow with ``num_steps``.
    The vector counts are what ``jax.live_arrays()`` shows during a run
    (tests/test_curvature_lanczos_host.py). The operator's own memory comes on top:
    params, a batch and its HVP activations, a ``HessianOperator``'s running sum (one
    more vector) and, for a data-parallel operator, its replicated copies.

    Returns:
      ``{"device": bytes, "host": bytes, "basis": bytes}`` (all ints).
    """
    if basis_memory not in BASIS_MEMORY:
        raise ValueError(f"basis_memory must be one of {BASIS_MEMORY}, got {basis_memory!r}")
    vector = int(dim) * np.dtype(dtype).itemsize
    basis = (int(num_steps) + 1) * vector
    if basis_memory == "device":
        return {"device": basis + 2 * vector, "host": 0, "basis": basis}
    return {"device": 2 * vector, "host": basis + 3 * vector, "basis": basis}


def resolve_dtype(accumulate_dtype: Any, operator_dtype: Any, host: bool = False) -> jnp.dtype:
    """The dtype to accumulate in; float64 requires JAX's x64 mode (not on the host)."""
    if accumulate_dtype is None:
        return jnp.dtype(operator_dtype)
    dtype = jnp.dtype(accumulate_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"accumulate_dtype must be a float dtype, got {dtype}")
    if dtype == jnp.float64 and not jax.config.jax_enable_x64 and not host:
        raise ValueError(
            "accumulate_dtype=float64 needs JAX's x64 mode: run inside "
            "`with jax.enable_x64(True):` (the model may stay float32), or keep the "
            "basis on the host (basis_memory='host')"
        )
    return dtype


def start_vector(dim: int, seed: int, dtype: Any) -> jax.Array:
    """A random unit vector (Gaussian direction), as Ghorbani et al. and PyHessian."""
    vector = jax.random.normal(jax.random.key(seed), (dim,), dtype=dtype)
    return vector / jnp.linalg.norm(vector)


@functools.partial(jax.jit, donate_argnums=(0,))
def _lanczos_step(basis, index, product, beta_prev):
    """One step: α, three-term recurrence, full reorthogonalization, β, next vector.

    ``basis[index]`` is v_j and ``product`` is H v_j. Rows above ``index`` are zero,
    so the stacked products below only involve the vectors built so far.
    """
    v = basis[index]
    alpha = jnp.vdot(v, product)
    w = product - alpha * v - beta_prev * basis[index - 1]
    for _ in range(2):  # twice is enough (Kahan–Parlett)
        w = w - basis.T @ (basis @ w)
    beta = jnp.linalg.norm(w)
    safe = jnp.where(beta > 0, beta, 1.0)
    basis = basis.at[index + 1].set(jnp.where(beta > 0, w / safe, 0.0))
    return basis, alpha, beta


def _host_lanczos_step(basis: np.ndarray, index: int, product: np.ndarray, beta_prev: float):
    """:func:`_lanczos_step` in numpy on a host basis (in place), against the filled rows."""
    v = basis[index]
    alpha = float(v @ product)
    w = product - alpha * v
    if index > 0:
        w -= beta_prev * basis[index - 1]
    filled = basis[: index + 1]
    for _ in range(2):  # twice is enough (Kahan–Parlett)
        w -= filled.T @ (filled @ w)
    beta = float(np.linalg.norm(w))
    basis[index + 1] = w / beta if beta > 0 else 0.0
    return alpha, beta


def lanczos_tridiagonal(
    operator: Any,
    num_steps: int,
    *,
    seed: int = 0,
    start: Any = None,
    accumulate_dtype: Any = None,
    stop_fn: Callable[[np.ndarray, np.ndarray, float], bool] | None = None,
    basis_memory: str = "device",
) -> LanczosDecomposition:
    """Run ``num_steps`` steps of Lanczos with full reorthogonalization.

    Args:
      operator: a :class:`~sam_jax.curvature.LinearOperator` (e.g. ``HessianOperator``)
        or a dense symmetric matrix.
      num_steps: Krylov dimension; at most ``operator.dim``. 90–100 for densities
        (Ghorbani et al.; PyHessian), fewer suffice for the top few eigenvalues.
      seed: seed of the random unit start vector (ignored when ``start`` is given).
      start: optional start vector (pytree like the params, or flat); normalized here.
      accumulate_dtype: dtype of the basis and α, β (see module docstring).
      stop_fn: optional ``(alphas, betas, beta_last) -> bool`` checked after every
        step; ``True`` stops early (used for tolerance-based eigen-solves).
      basis_memory: ``"device"`` or ``"host"`` (large models; see the module
        docstring and :func:`lanczos_memory`). Both give the same decomposition up
        to float summation order from the same start vector.

    Returns:
      A :class:`LanczosDecomposition`. Stops early at an invariant subspace
      (β below ``max(10, √dim) · eps`` times the largest entry of T so far).
    """
    operator = as_operator(operator)
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > operator.dim:
        raise ValueError(f"num_steps={num_steps} exceeds the operator dimension {operator.dim}")
    if basis_memory not in BASIS_MEMORY:
        raise ValueError(f"basis_memory must be one of {BASIS_MEMORY}, got {basis_memory!r}")
    host = basis_memory == "host"
    dtype = resolve_dtype(accumulate_dtype, operator.dtype, host=host)
    # Host float64 without x64: draw the start in the operator's dtype, then widen.
    jax_dtype = dtype if (dtype != jnp.float64 or jax.config.jax_enable_x64) else operator.dtype
    if start is None:
        v0 = start_vector(operator.dim, seed, jax_dtype)
    else:
        v0 = ravel_pytree(start)[0] if not isinstance(start, np.ndarray) else start.reshape(-1)
        if v0.shape != (operator.dim,):
            raise ValueError(f"start has {v0.size} entries, expected {operator.dim}")
        v0 = np.asarray(v0, dtype) if host else jnp.asarray(v0, dtype=dtype)
        norm = np.linalg.norm(v0) if host else jnp.linalg.norm(v0)
        if not norm > 0:
            raise ValueError("start vector is zero")
        v0 = v0 / norm
        seed = None
    if host:
        basis = np.zeros((num_steps + 1, operator.dim), dtype)
        basis[0] = np.asarray(v0, dtype)
        if start is None and np.dtype(jax_dtype) != np.dtype(dtype):
            basis[0] /= np.linalg.norm(basis[0])  # renormalize after widening
    else:
        basis = jnp.zeros((num_steps + 1, operator.dim), dtype).at[0].set(v0)
    del v0  # the basis holds it
    alphas, betas = [], []
    beta = 0.0 if host else jnp.zeros((), dtype)
    # Breakdown threshold relative to the largest entry of T so far: an exactly
    # invariant Krylov space leaves only rounding noise (~ eps·‖H‖) in the residual.
    tiny = max(10.0, float(np.sqrt(operator.dim))) * float(np.finfo(dtype).eps)
    scale = 0.0
    steps = 0
    for index in range(num_steps):
        if host:
            # Only O(dim) crosses to the device: the vector and its product.
            product = operator.matvec_flat(jnp.asarray(basis[index].astype(operator.dtype)))
            alpha, beta = _host_lanczos_step(basis, index, np.asarray(product, dtype), beta)
            del product
        else:
            product = operator.matvec_flat(basis[index])
            basis, alpha, beta = _lanczos_step(basis, index, product, beta)
            del product  # not alive during the next product
        alphas.append(float(alpha))
        steps = index + 1
        beta_value = float(beta)
        scale = max(scale, abs(alphas[-1]), beta_value)
        if beta_value <= tiny * scale:
            break  # invariant subspace: T's eigenvalues are exact eigenvalues of H
        if stop_fn is not None and stop_fn(np.array(alphas), np.array(betas), beta_value):
            break
        if index + 1 < num_steps:
            betas.append(beta_value)
    return LanczosDecomposition(
        alphas=np.asarray(alphas, np.float64),
        betas=np.asarray(betas[: steps - 1], np.float64),
        last_beta=float(beta),
        basis=basis[:steps],
        num_steps=steps,
        seed=seed,
        dtype=np.dtype(dtype).name,
        basis_memory=basis_memory,
    )


def _residual_norms(operator: LinearOperator, vectors: list, values: np.ndarray) -> np.ndarray:
    """``‖H v − λ v‖`` with one extra product per pair."""
    norms = [float(jnp.linalg.norm(operator.matvec_flat(v) - lam * v)) for v, lam in zip(vectors, values)]
    return np.asarray(norms, np.float64)


def lanczos_eigs(
    operator: Any,
    top_k: int = 1,
    bottom_k: int = 0,
    *,
    num_steps: int | None = None,
    seed: int = 0,
    accumulate_dtype: Any = None,
    tol: float | None = None,
    compute_residuals: bool = True,
    basis_memory: str = "device",
) -> EigenResult:
    """Top-k (largest) and bottom-k (smallest, possibly negative) eigenpairs by Lanczos.

    Args:
      operator: a ``LinearOperator`` (e.g. ``HessianOperator``) or dense symmetric matrix.
      top_k: number of largest eigenvalues (the late-phase SAM paper logs 2, papers.md §2).
      bottom_k: number of smallest eigenvalues.
      num_steps: maximum Lanczos steps; default ``min(dim, max(20, 3·(top_k+bottom_k)))``.
      seed: seed of the random start vector.
      accumulate_dtype: basis dtype (float64 needs x64 mode; see module docstring).
      tol: if given, stop once every wanted Ritz pair has the Lanczos residual
        estimate ``β_j |s_{j,i}| ≤ tol · |θ_i|`` (saves products).
      compute_residuals: measure the true residuals ``‖Hv − λv‖`` (one extra
        product per pair), reported in the result.
      basis_memory: ``"device"`` (default) or ``"host"``: where the Lanczos basis
        lives (see :func:`lanczos_memory`); the Ritz vectors are formed there and
        only the ``top_k + bottom_k`` eigenvectors go to the device.

    Returns:
      An :class:`EigenResult` (``method="lanczos"``).
    """
    operator = as_operator(operator)
    if top_k < 0 or bottom_k < 0 or top_k + bottom_k == 0:
        raise ValueError(f"need top_k, bottom_k >= 0 and at least one pair, got {top_k}, {bottom_k}")
    if num_steps is None:
        num_steps = min(operator.dim, max(20, 3 * (top_k + bottom_k)))
    if top_k + bottom_k > num_steps:
        raise ValueError(f"top_k + bottom_k = {top_k + bottom_k} exceeds num_steps = {num_steps}")
    start_hvps = operator.num_matvecs

    stop_fn = None
    if tol is not None:
        if tol <= 0:
            raise ValueError(f"tol must be positive, got {tol}")

        def stop_fn(alphas, betas, beta_last):
            if len(alphas) < top_k + bottom_k:
                return False
            t = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
            values, vectors = np.linalg.eigh(t)
            wanted = list(range(len(values) - top_k, len(values))) + list(range(bottom_k))
            estimates = beta_last * np.abs(vectors[-1, wanted])
            return bool(np.all(estimates <= tol * np.maximum(np.abs(values[wanted]), 1e-30)))

    decomposition = lanczos_tridiagonal(
        operator, num_steps, seed=seed, accumulate_dtype=accumulate_dtype, stop_fn=stop_fn,
        basis_memory=basis_memory,
    )
    values, vectors = decomposition.ritz()
    if top_k + bottom_k > len(values):
        raise ValueError(
            f"Lanczos stopped after {len(values)} steps (invariant subspace); fewer than "
            f"top_k + bottom_k = {top_k + bottom_k} eigenpairs are available"
        )
    basis = decomposition.basis
    host = decomposition.basis_memory == "host"
    coefficients = vectors.astype(basis.dtype) if host else jnp.asarray(vectors, basis.dtype)
    # A host float64 basis without x64 mode: eigenvectors go to the device in the
    # operator's dtype.
    device_dtype = basis.dtype if (basis.dtype != np.float64 or jax.config.jax_enable_x64) else operator.dtype

    def ritz_vector(i):
        if host:
            v = basis.T @ coefficients[:, i]
            return jnp.asarray((v / np.linalg.norm(v)).astype(device_dtype))
        v = basis.T @ coefficients[:, i]
        return v / jnp.linalg.norm(v)

    def pairs(indices):
        vals = values[indices]
        vecs = [ritz_vector(i) for i in indices]
        if compute_residuals:
            res = _residual_norms(operator, vecs, vals)
        else:
            res = np.full(len(indices), np.nan)
        return np.asarray(vals, np.float64), tuple(operator.unravel(v) for v in vecs), res

    top = pairs(list(range(len(values) - 1, len(values) - 1 - top_k, -1)))
    bottom = pairs(list(range(bottom_k)))
    return EigenResult(
        eigenvalues=top[0],
        eigenvectors=top[1],
        residual_norms=top[2],
        bottom_eigenvalues=bottom[0],
        bottom_eigenvectors=bottom[1],
        bottom_residual_norms=bottom[2],
        method="lanczos",
        num_steps=decomposition.num_steps,
        seed=seed,
        dtype=decomposition.dtype,
        num_hvps=operator.num_matvecs - start_hvps,
        settings=operator.settings(),
    )
