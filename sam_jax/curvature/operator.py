"""Dataset-level Hessian operators acting on flattened parameter vectors.

The Hessian of a loss summed (or averaged) over many batches is the sum of the
per-batch Hessians of the *summed* batch losses, divided (for ``reduction="mean"``)
by the total number of examples. Averaging per-batch *mean* losses instead would
weight examples of a short last batch more: not the dataset Hessian (papers.md §4
pitfall; PyHessian weights its batch HVPs by batch size for the same reason).

Batches come from the host: a list (or tuple) of batches, or a callable returning a
fresh iterator, re-iterated at every matrix-vector product, so the data need not fit
on the device. Each batch goes through one jitted per-batch HVP (compiled once per
batch shape: an unequal last batch costs one extra compilation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from sam_jax.curvature.hvp import LossFn, PyTree, batch_hvp, cached_per_function

Batches = Union[list, tuple, Callable[[], Iterable[Any]], dict]

REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """What defines the matrix; copied into every result computed from it.

    Attributes:
      reduction: ``"sum"`` or ``"mean"`` (mean divides by the total example count).
      bn_mode: ``"batch"``/``"running"`` when the loss came from ``flax_loss_fn``,
        else ``None`` (unknown / no BatchNorm).
      dropout: ``"off"``, ``"fixed-key"`` or ``None`` (unknown).
      label_smoothing: label smoothing of the loss, ``None`` if unknown.
      num_examples: total count over the batches (known after the first product).
      num_batches: number of batches per product (known after the first product).
      dim: number of parameters.
    """

    reduction: str
    bn_mode: str | None
    dropout: str | None
    label_smoothing: float | None
    num_examples: float | None
    num_batches: int | None
    dim: int


class LinearOperator:
    """A symmetric linear operator on flat vectors of length ``dim``.

    Subclasses implement ``_apply(v_flat) -> Hv_flat`` in ``self.dtype``. The public
    ``matvec_flat`` casts to the operator's dtype and back to the caller's (so a
    Lanczos basis may be kept in float64 while the model runs in float32) and counts
    the products in ``num_matvecs``.
    """

    dim: int
    dtype: Any
    unravel: Callable[[jax.Array], PyTree]

    def __init__(self) -> None:
        self.num_matvecs = 0

    def matvec_flat(self, vector: jax.Array) -> jax.Array:
        """``H @ vector`` for a flat vector of length ``dim`` (any float dtype)."""
        vector = jnp.asarray(vector)
        if vector.shape != (self.dim,):
            raise ValueError(f"vector has shape {vector.shape}, expected ({self.dim},)")
        self.num_matvecs += 1
        return self._apply(vector.astype(self.dtype)).astype(vector.dtype)

    def matvec(self, vector: PyTree) -> PyTree:
        """``H @ vector`` for a pytree shaped like the parameters."""
        flat, _ = ravel_pytree(vector)
        return self.unravel(self.matvec_flat(flat))

    def settings(self) -> OperatorSettings:
        return OperatorSettings("none", None, None, None, None, None, self.dim)

    def _apply(self, vector: jax.Array) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


class MatrixOperator(LinearOperator):
    """A dense symmetric matrix as an operator (tests, toy problems).

    Args:
      matrix: ``(n, n)`` symmetric array.
    """

    def __init__(self, matrix: Any) -> None:
        super().__init__()
        matrix = jnp.asarray(matrix)
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square, got shape {matrix.shape}")
        self.matrix = matrix
        self.dim = int(matrix.shape[0])
        self.dtype = matrix.dtype
        self.unravel = lambda flat: flat
        self._product = jax.jit(jnp.matmul)

    def _apply(self, vector: jax.Array) -> jax.Array:
        return self._product(self.matrix, vector)


def _batch_source(batches: Batches) -> Callable[[], Iterator[Any]]:
    """A function returning a fresh iterator over the batches at every call."""
    if isinstance(batches, dict):
        return lambda: iter((batches,))
    if isinstance(batches, (list, tuple)):
        if len(batches) == 0:
            raise ValueError("batches is empty")
        return lambda: iter(batches)
    if callable(batches):
        return lambda: iter(batches())
    raise ValueError(
        "batches must be a batch dict, a list/tuple of batches, or a callable returning a "
        f"fresh iterator (a one-shot iterator cannot be re-read at every product); got "
        f"{type(batches).__name__}"
    )


class HessianOperator(LinearOperator):
    """Hessian of ``loss_fn`` over a whole dataset, at fixed ``params``.

    ``H = Σ_b ∇²loss_sum_b(θ)`` for ``reduction="sum"`` and that divided by
    ``Σ_b count_b`` for ``reduction="mean"`` (exact for unequal batch sizes).

    Args:
      loss_fn: ``loss_fn(params, batch) -> (loss_sum, count)`` (docs/ARCHITECTURE.md).
        If built by :func:`sam_jax.curvature.flax_loss_fn`, its BatchNorm mode,
        dropout and label smoothing are recorded in the settings.
      params: the point θ (a pytree of float arrays).
      batches: a batch dict, a list/tuple of batches, or a callable returning a
        fresh iterator of batches (re-iterated at every product).
      reduction: ``"mean"`` (default; the loss the papers measure, papers.md §2/§4)
        or ``"sum"``.

    Attributes:
      dim: number of parameters; ``dtype``: dtype of the flattened parameters;
      ``unravel``: flat vector -> pytree like ``params``; ``num_matvecs``: dataset-level
      products computed so far; ``num_batch_hvps``: per-batch HVPs computed so far.
    """

    def __init__(self, loss_fn: LossFn, params: PyTree, batches: Batches, *, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        flat, unravel = ravel_pytree(params)
        if flat.size == 0:
            raise ValueError("params has no parameters")
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            raise ValueError(f"params must be floating point, got {flat.dtype}")
        self.loss_fn = loss_fn
        self.params = params
        self.reduction = reduction
        self.dim = int(flat.size)
        self.dtype = flat.dtype
        self.unravel = unravel
        self._iterate = _batch_source(batches)
        self._flat_hvp = _flat_batch_hvp(loss_fn)
        self.num_batch_hvps = 0
        self.num_examples: float | None = None
        self.num_batches: int | None = None

    def _apply(self, vector: jax.Array) -> jax.Array:
        total = jnp.zeros_like(vector)
        count = 0.0
        num_batches = 0
        for batch in self._iterate():
            product, batch_count = self._flat_hvp(self.params, batch, vector)
            total = total + product
            count = count + batch_count
            num_batches += 1
            self.num_batch_hvps += 1
        if num_batches == 0:
            raise ValueError("the batch source produced no batches")
        count = float(count)
        if count <= 0:
            raise ValueError(f"the batches hold no examples (total count {count})")
        self.num_examples, self.num_batches = count, num_batches
        return total / count if self.reduction == "mean" else total

    def settings(self) -> OperatorSettings:
        extra = getattr(self.loss_fn, "curvature_settings", {})
        return OperatorSettings(
            reduction=self.reduction,
            bn_mode=extra.get("bn_mode"),
            dropout=extra.get("dropout"),
            label_smoothing=extra.get("label_smoothing"),
            num_examples=self.num_examples,
            num_batches=self.num_batches,
            dim=self.dim,
        )


@cached_per_function
def _flat_batch_hvp(loss_fn: LossFn) -> Callable:
    """Jitted ``(params, batch, v_flat) -> (H_b v flat, count)`` built on ``batch_hvp``.

    Cached per ``loss_fn`` so that every operator built from the same loss (e.g. at
    two different solutions) reuses one compiled program.
    """
    tree_hvp = batch_hvp(loss_fn)

    @jax.jit
    def flat_hvp(params, batch, v_flat):
        _, unravel = ravel_pytree(params)
        product, count = tree_hvp(params, batch, unravel(v_flat))
        return ravel_pytree(product)[0], count

    return flat_hvp


def dataset_loss(loss_fn: LossFn, params: PyTree, batches: Batches, *, reduction: str = "mean") -> float:
    """The loss over all batches: ``Σ loss_sum / Σ count`` (``"mean"``) or ``Σ loss_sum``.

    Args:
      loss_fn: ``(params, batch) -> (loss_sum, count)``.
      params: parameters.
      batches: as for :class:`HessianOperator`.
      reduction: ``"mean"`` or ``"sum"``.

    Returns:
      A Python float.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    jitted = jax.jit(loss_fn)
    total, count = 0.0, 0.0
    for batch in _batch_source(batches)():
        loss_sum, batch_count = jitted(params, batch)
        total, count = total + loss_sum, count + batch_count
    if float(count) <= 0:
        raise ValueError("the batches hold no examples")
    return float(total / count) if reduction == "mean" else float(total)


def as_operator(operator_or_matrix: Any) -> LinearOperator:
    """Accept a :class:`LinearOperator` or a dense symmetric matrix."""
    if isinstance(operator_or_matrix, LinearOperator):
        return operator_or_matrix
    if isinstance(operator_or_matrix, (np.ndarray, jax.Array)):
        return MatrixOperator(operator_or_matrix)
    raise ValueError(
        "expected a LinearOperator (e.g. HessianOperator) or a square matrix, got "
        f"{type(operator_or_matrix).__name__}"
    )
