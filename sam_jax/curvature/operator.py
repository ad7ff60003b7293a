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

Data parallelism (``mesh=``): every batch is split over the devices of a mesh axis
and the per-batch HVP runs as one ``jax.jit`` program on global arrays (batch sharded
on the axis, parameters and vector replicated; XLA sums the per-device shares with
an all-reduce). Because the program is the *same function of the whole batch*, the
product equals the single-device one up to float summation order — including
BatchNorm in ``"batch"`` mode, whose statistics are computed over the whole batch
(synchronized across devices), not per device. A batch whose size the device count
does not divide is padded with masked examples (``batch["mask"] = 0``, which
contribute zero to ``(loss_sum, count)``; the count is checked), except under
BatchNorm ``"batch"`` mode, where padded examples would enter the batch statistics:
such a batch runs whole on every device (exact, not parallel).

Several processes (``jax.distributed``, a mesh spanning the devices of all of them):
every process builds the same operator from the same host batches and takes part in
every product. Host values (the batches, θ, the vector) go onto the mesh shard by
shard: each process copies only the rows its own devices hold; the only cross-process
traffic is the compiled product's own all-reduces, and every process reads the
(replicated) product back from its own devices. See docs/curvature.md.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Iterator, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sam_jax._placement import local_replica, put_global
from sam_jax.curvature.hvp import LossFn, PyTree, batch_hvp, cached_per_function

Batches = Union[list, tuple, Callable[[], Iterable[Any]], dict]

REDUCTIONS = ("sum", "mean")
UNEVEN_MODES = ("auto", "pad", "replicate", "error")
DATA_AXIS = "data"


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
      num_devices: devices each batch is split over (1: single device).
    """

    reduction: str
    bn_mode: str | None
    dropout: str | None
    label_smoothing: float | None
    num_examples: float | None
    num_batches: int | None
    dim: int
    num_devices: int = 1


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


def data_mesh(num_devices: int | None = None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (None: all), axis ``axis``.

    For :class:`HessianOperator`'s ``mesh=`` argument (any mesh with a data axis works).
    """
    devices = jax.devices()
    num_devices = len(devices) if num_devices is None else num_devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"num_devices must be in [1, {len(devices)}] (devices available), got {num_devices}")
    return Mesh(np.asarray(devices[:num_devices]), (axis,))


def _leading_size(batch: Any) -> int:
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in jax.tree.leaves(batch)}
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(
            "a data-parallel operator needs batches whose arrays all share the leading "
            f"(example) dimension; got leading sizes {sorted(sizes)}"
        )
    return sizes.pop()


def pad_batch(batch: dict, multiple: int) -> tuple[dict, float]:
    """Pad a batch dict to a multiple of ``multiple`` examples with masked examples.

    Padded examples are zeros with ``mask = 0``; an existing ``"mask"`` is kept for
    the real examples (absent: all ones). Returns ``(padded batch, real count)``.
    """
    if not isinstance(batch, dict):
        raise ValueError(f"padding needs a batch dict (to add a 'mask'), got {type(batch).__name__}")
    size = _leading_size(batch)
    mask = np.asarray(batch["mask"], np.float32) if "mask" in batch else np.ones(size, np.float32)
    real = float(mask.sum())
    extra = -size % multiple
    if extra == 0:
        return {**batch, "mask": mask}, real

    def pad(leaf):
        leaf = np.asarray(leaf)
        return np.pad(leaf, [(0, extra)] + [(0, 0)] * (leaf.ndim - 1))

    padded = {key: pad(value) for key, value in batch.items() if key != "mask"}
    padded["mask"] = pad(mask)
    return padded, real


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
      mesh: optional ``jax.sharding.Mesh``: split every batch over its ``axis``
        (data parallel, see the module docstring); ``None``: one device.
        :func:`data_mesh` builds a 1-D mesh over all devices.
      axis: the mesh axis the examples are split over (default ``"data"``).
      uneven: what to do with a batch whose size the device count does not divide:
        ``"pad"`` (masked padding; the loss must honour ``batch["mask"]`` — checked
        through the returned count — and treat examples independently),
        ``"replicate"`` (run that batch whole on every device: exact, not parallel),
        ``"error"``, or ``"auto"`` (default: ``"replicate"`` for BatchNorm
        ``"batch"`` mode, whose statistics padded examples would change, else
        ``"pad"``).

    Attributes:
      dim: number of parameters; ``dtype``: dtype of the flattened parameters;
      ``unravel``: flat vector -> pytree like ``params``; ``num_matvecs``: dataset-level
      products computed so far; ``num_batch_hvps``: per-batch HVPs computed so far;
      ``num_devices``: devices per batch; ``num_padded_batch_hvps`` and
      ``num_replicated_batch_hvps``: per-batch HVPs that were padded / run whole on
      every device.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: PyTree,
        batches: Batches,
        *,
        reduction: str = "mean",
        mesh: Mesh | None = None,
        axis: str = DATA_AXIS,
        uneven: str = "auto",
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if uneven not in UNEVEN_MODES:
            raise ValueError(f"uneven must be one of {UNEVEN_MODES}, got {uneven!r}")
        flat, unravel = ravel_pytree(params)
        if flat.size == 0:
            raise ValueError("params has no parameters")
        if not jnp.issubdtype(flat.dtype, jnp.floating):
            raise ValueError(f"params must be floating point, got {flat.dtype}")
        self.loss_fn = loss_fn
        self.reduction = reduction
        self.dim = int(flat.size)
        self.dtype = flat.dtype
        self.unravel = unravel
        self._iterate = _batch_source(batches)
        self.num_batch_hvps = 0
        self.num_padded_batch_hvps = 0
        self.num_replicated_batch_hvps = 0
        self.num_examples: float | None = None
        self.num_batches: int | None = None
        self.mesh, self.axis = mesh, axis
        if mesh is None:
            self.num_devices = 1
            self.params = params
            self._flat_hvp = _flat_batch_hvp(loss_fn)
            return
        if not isinstance(mesh, Mesh):
            raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
        if axis not in mesh.axis_names:
            raise ValueError(f"axis {axis!r} is not an axis of the mesh {mesh.axis_names}")
        self.num_devices = int(mesh.shape[axis])
        bn_mode = getattr(loss_fn, "curvature_settings", {}).get("bn_mode")
        if uneven == "auto":
            uneven = "replicate" if bn_mode == "batch" else "pad"
        self.uneven = uneven
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._sharded = NamedSharding(mesh, PartitionSpec(axis))
        self.params = put_global(params, self._replicated)
        self._sharded_hvp = _flat_batch_hvp_on_mesh(loss_fn, mesh, axis, True)
        self._replicated_hvp = _flat_batch_hvp_on_mesh(loss_fn, mesh, axis, False)

    def _apply(self, vector: jax.Array) -> jax.Array:
        if self.mesh is not None:
            vector_in = vector
            vector = put_global(vector, self._replicated)
        total = jnp.zeros_like(vector)
        count = 0.0
        num_batches = 0
        for batch in self._iterate():
            if self.mesh is None:
                product, batch_count = self._flat_hvp(self.params, batch, vector)
            else:
                product, batch_count = self._parallel_batch_hvp(batch, vector)
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
        result = total / count if self.reduction == "mean" else total
        if self.mesh is not None and isinstance(vector_in, jax.Array):
            # Back where the caller's vector lives, so that a Lanczos basis on one
            # device (or anywhere) combines with it without resharding surprises.
            result = local_replica(result, vector_in)
        return result

    def _parallel_batch_hvp(self, batch: Any, vector: jax.Array):
        # Explicit placement: also moves batches the caller committed to a device.
        size = _leading_size(batch)
        if size % self.num_devices == 0:
            return self._sharded_hvp(self.params, put_global(batch, self._sharded), vector)
        if self.uneven == "error":
            raise ValueError(
                f"a batch of {size} examples does not split over {self.num_devices} devices "
                "(uneven='error'); use uneven='pad' or 'replicate'"
            )
        if self.uneven == "replicate":
            self.num_replicated_batch_hvps += 1
            return self._replicated_hvp(self.params, put_global(batch, self._replicated), vector)
        padded, real = pad_batch(batch, self.num_devices)
        self.num_padded_batch_hvps += 1
        product, batch_count = self._sharded_hvp(self.params, put_global(padded, self._sharded), vector)
        if abs(float(batch_count) - real) > 1e-3 * max(1.0, real):
            raise ValueError(
                f"loss_fn returned count {float(batch_count)} for a batch padded with masked "
                f"examples holding {real:g} real ones: it does not honour batch['mask'], so "
                "padding would change the Hessian; use uneven='replicate' or divisible batches"
            )
        return product, batch_count

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
            num_devices=self.num_devices,
        )


def _flat_hvp_fn(loss_fn: LossFn) -> Callable:
    tree_hvp = batch_hvp(loss_fn)

    def flat_hvp(params, batch, v_flat):
        _, unravel = ravel_pytree(params)
        product, count = tree_hvp(params, batch, unravel(v_flat))
        return ravel_pytree(product)[0], count

    return flat_hvp


@cached_per_function
def _flat_batch_hvp(loss_fn: LossFn) -> Callable:
    """Jitted ``(params, batch, v_flat) -> (H_b v flat, count)`` built on ``batch_hvp``.

    Cached per ``loss_fn`` so that every operator built from the same loss (e.g. at
    two different solutions) reuses one compiled program.
    """
    return jax.jit(_flat_hvp_fn(loss_fn))


@cached_per_function
def _flat_batch_hvp_on_mesh(loss_fn: LossFn, mesh: Mesh, axis: str, shard_batch: bool) -> Callable:
    """The same per-batch HVP jitted over ``mesh``: batch split on ``axis`` (or
    replicated), params and vector replicated, outputs replicated. XLA partitions
    the computation by the batch and all-reduces the per-device shares."""
    replicated = NamedSharding(mesh, PartitionSpec())
    data = NamedSharding(mesh, PartitionSpec(axis)) if shard_batch else replicated
    return jax.jit(
        _flat_hvp_fn(loss_fn),
        in_shardings=(replicated, data, replicated),
        out_shardings=(replicated, replicated),
    )


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
