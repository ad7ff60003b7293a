"""Loss landscapes: linear interpolation, barrier height, L''(θ_λ), 2-D surfaces.

Losses follow the curvature convention ``loss_fn(params, batch) -> (loss_sum, count)``
(docs/ARCHITECTURE.md); a dataset loss is ``Σ loss_sum / Σ count`` over the batches
(a batch dict, a list of batches, or a callable returning a fresh iterator). Metric
functions use the same convention, e.g. ``(params, batch) -> (num_correct, count)``
for accuracy (see :func:`flax_accuracy_fn`).

* Interpolation (late-phase SAM, Fig. 4c; papers.md §2):
  ``θ_λ = (1 − λ) θ_a + λ θ_b`` on ``λ ∈ linspace(−0.2, 1.2, 40)`` (their code's grid);
  in the paper ``θ_a = θ_{SGD→SAM}`` and ``θ_b = θ_SGD``.
* Barrier height: the standard definition of linear mode connectivity
  (Frankle et al. 2020): ``max_{λ∈[0,1]} L(θ_λ) − [(1−λ) L(θ_a) + λ L(θ_b)]``,
  the largest rise above the straight line between the endpoint losses; also
  reported: ``max_{λ∈[0,1]} L(θ_λ) − max(L(θ_a), L(θ_b))``. Both are ≥ 0 (the
  endpoints are included) and 0 for a convex loss.
* Second-order finite difference, exactly the paper's formula:
  ``L''(θ_λ) = (L(θ_{λ+h}) + L(θ_{λ−h}) − 2 L(θ_λ)) / (2h)²``, h = 0.1. Note the
  ``(2h)²`` denominator: the numerator is ``h² dᵀHd`` for a quadratic (d = θ_b − θ_a),
  so the paper's L'' is **a quarter** of the directional curvature ``dᵀHd``.
  ``denominator="central"`` divides by ``h²`` instead (the textbook central
  difference, equal to ``dᵀHd`` on a quadratic).
* 2-D surface (Li et al. 2018): ``L(θ + α δ + β η)`` with random Gaussian directions
  δ, η, *filter-normalized*: each filter of δ is rescaled to the norm of the same
  filter of θ. In Flax a filter is one output unit: the last axis of a conv
  (``HWIO``) or dense (``(in, out)``) kernel. Parameters with ≤ 1 dimension (biases,
  BatchNorm scale/offset) get a zero direction (``ignore="biasbn"``, their default)
  or the parameter itself (``ignore="none"``, their alternative). BatchNorm running
  statistics are not parameters and stay fixed.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sam_jax.curvature.hvp import cached_per_function
from sam_jax.curvature.operator import Batches, _batch_source

PyTree = Any
LossFn = Callable[[PyTree, Any], tuple[jax.Array, jax.Array]]

DEFAULT_LAMBDAS = np.linspace(-0.2, 1.2, 40)  # late-phase SAM code, Fig. 4c
DEFAULT_H = 0.1  # late-phase SAM, Fig. 4c
DENOMINATORS = ("paper", "central")
IGNORE_MODES = ("biasbn", "none")


@dataclasses.dataclass(frozen=True)
class InterpolationResult:
    """Loss (and metric) along ``θ_λ = (1 − λ) θ_a + λ θ_b``.

    Attributes:
      lambdas: the λ grid.
      losses: dataset loss at each λ.
      metrics: metric (e.g. accuracy) at each λ, or ``None`` without ``metric_fn``.
      endpoint_losses: ``(L(θ_a), L(θ_b))``.
      barrier: standard barrier (see module docstring), ≥ 0.
      barrier_above_max_endpoint: ``max_{λ∈[0,1]} L(θ_λ) − max(L(θ_a), L(θ_b))``, ≥ 0.
      second_derivative: ``L''(θ_λ)`` at each λ, or ``None`` if not requested.
      h: finite-difference step; ``denominator``: ``"paper"`` ((2h)²) or ``"central"`` (h²).
      num_evaluations: dataset losses evaluated.
    """

    lambdas: np.ndarray
    losses: np.ndarray
    metrics: np.ndarray | None
    endpoint_losses: tuple[float, float]
    barrier: float
    barrier_above_max_endpoint: float
    second_derivative: np.ndarray | None
    h: float
    denominator: str
    num_evaluations: int


@dataclasses.dataclass(frozen=True)
class SurfaceResult:
    """Loss on the plane ``θ + α δ + β η``; ``losses[i, j]`` is at ``(alphas[i], betas[j])``.

    Attributes:
      alphas, betas: grid coordinates along δ and η.
      losses: ``(len(alphas), len(betas))`` dataset losses.
      metrics: same shape, or ``None`` without ``metric_fn``.
      directions: ``(δ, η)`` pytrees used.
      seed: seed of the random directions (``None`` if directions were given).
      ignore: how ≤1-D parameters were handled (``"biasbn"`` or ``"none"``).
    """

    alphas: np.ndarray
    betas: np.ndarray
    losses: np.ndarray
    metrics: np.ndarray | None
    directions: tuple[PyTree, PyTree]
    seed: int | None
    ignore: str


def _check_same_structure(a: PyTree, b: PyTree) -> None:
    shapes_a = jax.tree.map(jnp.shape, a)
    shapes_b = jax.tree.map(jnp.shape, b)
    if jax.tree.structure(a) != jax.tree.structure(b) or shapes_a != shapes_b:
        raise ValueError("the two parameter pytrees differ in structure or shapes")


@cached_per_function
def _combination_evaluator(loss_fn: LossFn, metric_fn: LossFn | None) -> Callable:
    """Jitted ``(base, dirs, coefs, batch) -> [(sum, count) per fn]`` at ``base + Σ c_i dir_i``.

    Cached per (loss, metric), so repeated calls (two solutions, several surfaces)
    reuse one compiled program.
    """
    fns = [loss_fn] if metric_fn is None else [loss_fn, metric_fn]

    @jax.jit
    def evaluate(base, directions, coefficients, batch):
        point = base
        for direction, coefficient in zip(directions, coefficients):
            point = jax.tree.map(lambda p, d: p + coefficient.astype(p.dtype) * d, point, direction)
        return [fn(point, batch) for fn in fns]

    return evaluate


def _dataset_values(evaluate, base, directions, coefficients, iterate) -> list[float]:
    """Dataset averages ``Σ sum / Σ count`` of each function at one point."""
    # Default float dtype: float64 under x64 mode, so λ ± h is not rounded to float32.
    coefficients = [jnp.asarray(float(c)) for c in coefficients]
    totals = None
    for batch in iterate():
        values = evaluate(base, directions, coefficients, batch)
        pairs = [(s, c) for s, c in values]
        totals = pairs if totals is None else [(ts + s, tc + c) for (ts, tc), (s, c) in zip(totals, pairs)]
    if totals is None:
        raise ValueError("the batch source produced no batches")
    return [float(s / c) for s, c in totals]


def interpolate(
    loss_fn: LossFn,
    params_a: PyTree,
    params_b: PyTree,
    batches: Batches,
    *,
    lambdas: Sequence[float] | None = None,
    metric_fn: LossFn | None = None,
    h: float | None = DEFAULT_H,
    denominator: str = "paper",
) -> InterpolationResult:
    """Loss (and metric) along the segment from ``params_a`` (λ=0) to ``params_b`` (λ=1).

    Args:
      loss_fn: ``(params, batch) -> (loss_sum, count)``.
      params_a: θ at λ = 0 (the paper: θ_{SGD→SAM}).
      params_b: θ at λ = 1 (the paper: θ_SGD).
      batches: a batch dict, list of batches, or callable returning an iterator.
      lambdas: λ grid; default ``linspace(−0.2, 1.2, 40)`` (late-phase SAM code).
      metric_fn: optional ``(params, batch) -> (metric_sum, count)``, e.g. accuracy.
      h: finite-difference step of ``L''`` (paper: 0.1); ``None`` skips ``L''``.
      denominator: ``"paper"`` divides by ``(2h)²`` (papers.md §2, exactly), ``"central"`` by ``h²``.

    Returns:
      An :class:`InterpolationResult`.
    """
    _check_same_structure(params_a, params_b)
    if denominator not in DENOMINATORS:
        raise ValueError(f"denominator must be one of {DENOMINATORS}, got {denominator!r}")
    if h is not None and not h > 0:
        raise ValueError(f"h must be positive, got {h}")
    lambdas = np.asarray(DEFAULT_LAMBDAS if lambdas is None else lambdas, np.float64)
    if lambdas.ndim != 1 or len(lambdas) == 0:
        raise ValueError("lambdas must be a non-empty 1-D sequence")
    iterate = _batch_source(batches)
    evaluate = _combination_evaluator(loss_fn, metric_fn)
    direction = jax.tree.map(jnp.subtract, params_b, params_a)

    cache: dict[float, list[float]] = {}

    def at(lam: float) -> list[float]:
        key = round(float(lam), 12)
        if key not in cache:
            cache[key] = _dataset_values(evaluate, params_a, (direction,), (lam,), iterate)
        return cache[key]

    values = [at(lam) for lam in lambdas]
    losses = np.array([v[0] for v in values])
    metrics = None if metric_fn is None else np.array([v[1] for v in values])
    loss_a, loss_b = at(0.0)[0], at(1.0)[0]

    inside = [(float(lam), loss) for lam, loss in zip(lambdas, losses) if 0.0 <= lam <= 1.0]
    inside += [(0.0, loss_a), (1.0, loss_b)]
    barrier = max(loss - ((1 - lam) * loss_a + lam * loss_b) for lam, loss in inside)
    above_max = max(loss for _, loss in inside) - max(loss_a, loss_b)

    second = None
    if h is not None:
        scale = (2 * h) ** 2 if denominator == "paper" else h**2
        second = np.array(
            [(at(lam + h)[0] + at(lam - h)[0] - 2 * at(lam)[0]) / scale for lam in lambdas]
        )
    return InterpolationResult(
        lambdas=lambdas,
        losses=losses,
        metrics=metrics,
        endpoint_losses=(loss_a, loss_b),
        barrier=float(max(barrier, 0.0)),
        barrier_above_max_endpoint=float(max(above_max, 0.0)),
        second_derivative=second,
        h=float(h) if h is not None else float("nan"),
        denominator=denominator,
        num_evaluations=len(cache),
    )


def filter_normalized_direction(params: PyTree, key: jax.Array, *, ignore: str = "biasbn") -> PyTree:
    """A random Gaussian direction with each filter rescaled to the norm of θ's filter.

    Args:
      params: θ (pytree of arrays).
      key: ``jax.random`` key.
      ignore: ``"biasbn"`` zeroes ≤1-D leaves (biases, BN scale/offset; Li et al.'s
        default); ``"none"`` sets them to the parameter itself (their alternative).

    Returns:
      A pytree like ``params``. A filter of θ that is all zero gets a zero direction.
    """
    if ignore not in IGNORE_MODES:
        raise ValueError(f"ignore must be one of {IGNORE_MODES}, got {ignore!r}")
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    directions = []
    for leaf, leaf_key in zip(leaves, keys):
        leaf = jnp.asarray(leaf)
        if leaf.ndim <= 1:
            directions.append(jnp.zeros_like(leaf) if ignore == "biasbn" else leaf)
            continue
        direction = jax.random.normal(leaf_key, leaf.shape, leaf.dtype)
        axes = tuple(range(leaf.ndim - 1))  # all but the output-unit axis
        leaf_norm = jnp.sqrt(jnp.sum(leaf**2, axis=axes, keepdims=True))
        direction_norm = jnp.sqrt(jnp.sum(direction**2, axis=axes, keepdims=True))
        directions.append(direction * leaf_norm / jnp.maximum(direction_norm, 1e-30))
    return jax.tree.unflatten(treedef, directions)


def loss_surface(
    loss_fn: LossFn,
    params: PyTree,
    batches: Batches,
    *,
    seed: int = 0,
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    directions: tuple[PyTree, PyTree] | None = None,
    ignore: str = "biasbn",
    metric_fn: LossFn | None = None,
) -> SurfaceResult:
    """Dataset loss on ``θ + α δ + β η`` for contour plots (Li et al. 2018).

    Args:
      loss_fn: ``(params, batch) -> (loss_sum, count)``.
      params: the centre θ.
      batches: a batch dict, list of batches, or callable returning an iterator.
      seed: seed of the two random directions.
      alphas, betas: grid coordinates; default ``linspace(−1, 1, 21)`` (Li et al. plot ±1).
      directions: optional ``(δ, η)`` to use instead of random filter-normalized ones.
      ignore: treatment of ≤1-D parameters (see :func:`filter_normalized_direction`).
      metric_fn: optional ``(params, batch) -> (metric_sum, count)``.

    Returns:
      A :class:`SurfaceResult`.
    """
    alphas = np.asarray(np.linspace(-1, 1, 21) if alphas is None else alphas, np.float64)
    betas = np.asarray(np.linspace(-1, 1, 21) if betas is None else betas, np.float64)
    if directions is None:
        key_a, key_b = jax.random.split(jax.random.key(seed))
        directions = (
            filter_normalized_direction(params, key_a, ignore=ignore),
            filter_normalized_direction(params, key_b, ignore=ignore),
        )
    else:
        if len(directions) != 2:
            raise ValueError("directions must be a pair (δ, η)")
        for direction in directions:
            _check_same_structure(params, direction)
        seed = None
    iterate = _batch_source(batches)
    evaluate = _combination_evaluator(loss_fn, metric_fn)
    values = np.array(
        [[_dataset_values(evaluate, params, directions, (a, b), iterate) for b in betas] for a in alphas]
    )
    return SurfaceResult(
        alphas=alphas,
        betas=betas,
        losses=values[..., 0],
        metrics=None if metric_fn is None else values[..., 1],
        directions=tuple(directions),
        seed=seed,
        ignore=ignore,
    )


def flax_accuracy_fn(model: Any, variables: dict, bn_mode: str = "running") -> LossFn:
    """``(params, batch) -> (num_correct, count)`` for a Flax classifier.

    Args:
      model: linen module with ``__call__(x, train)`` returning logits.
      variables: its variables (non-``params`` collections held fixed).
      bn_mode: ``"running"`` (``train=False``, evaluation) or ``"batch"`` (batch statistics).

    Returns:
      The metric function (uses ``batch["mask"]`` when present).
    """
    if bn_mode not in ("batch", "running"):
        raise ValueError(f"bn_mode must be 'batch' or 'running', got {bn_mode!r}")
    fixed = {name: value for name, value in variables.items() if name != "params"}

    def accuracy_fn(params, batch):
        all_variables = {"params": params, **fixed}
        if bn_mode == "batch":
            logits, _ = model.apply(all_variables, batch["x"], train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(all_variables, batch["x"], train=False)
        correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        mask = batch.get("mask")
        if mask is None:
            return jnp.sum(correct), jnp.asarray(correct.shape[0], jnp.float32)
        return jnp.sum(correct * mask), jnp.sum(mask)

    return accuracy_fn
