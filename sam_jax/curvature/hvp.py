"""Hessian-vector products by forward-over-reverse differentiation.

``H v = d/dt ∇L(θ + t v)|_{t=0}``, computed as ``jax.jvp`` of ``jax.grad``: the
JAX autodiff cookbook's recommendation and papers.md §4 ("≈ 2–3 gradient costs").
Reverse-over-reverse (PyHessian) costs more memory and time. :func:`hvp` is the
optimizers' own ``sam_jax.optim._core.hessian_vector_product`` (one copy).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax

# One HVP for the library: the optimizers' in-graph tool (forward-over-reverse).
from sam_jax.optim._core import hessian_vector_product

PyTree = Any
LossFn = Callable[[PyTree, Any], tuple[jax.Array, jax.Array]]

# Jitted programs are cached per loss function, so every operator built from the
# same ``loss_fn`` reuses one compiled program. The caches hold strong references
# (a weak one would be kept alive by the closure anyway), so they are small LRUs.
CACHE_SIZE = 8


def cached_per_function(build: Callable) -> Callable:
    """``build(fn, ...)`` memoized on its (hashable) arguments, LRU of ``CACHE_SIZE``."""
    cached = functools.lru_cache(maxsize=CACHE_SIZE)(build)

    @functools.wraps(build)
    def wrapper(*args):
        try:
            return cached(*args)
        except TypeError:  # an unhashable callable: build without caching
            return build(*args)

    return wrapper


def hvp(scalar_fn: Callable[[PyTree], jax.Array], params: PyTree, vector: PyTree) -> PyTree:
    """Hessian of ``scalar_fn`` at ``params`` applied to ``vector`` (same pytree).

    Args:
      scalar_fn: ``params -> scalar``, twice differentiable.
      params: point at which the Hessian is taken.
      vector: pytree with the structure and dtypes of ``params``.

    Returns:
      ``H(params) @ vector`` as a pytree like ``params``.
    """
    return hessian_vector_product(jax.grad(scalar_fn), params, vector)


@cached_per_function
def batch_hvp(loss_fn: LossFn) -> Callable[[PyTree, Any, PyTree], tuple[PyTree, jax.Array]]:
    """Jitted per-batch HVP of a ``loss_fn(params, batch) -> (loss_sum, count)``.

    The returned function ``(params, batch, vector) -> (H_batch @ vector, count)``
    differentiates the *summed* loss of the batch, so that a dataset-level operator
    can add the products of all batches and divide once by the total count (exact
    for unequal batch sizes, papers.md §4 pitfall). It is compiled once per batch
    shape and cached per ``loss_fn``.

    Args:
      loss_fn: the curvature loss convention of docs/ARCHITECTURE.md.

    Returns:
      The jitted function.
    """
    # jax.jvp with has_aux returns (primal_out, tangent_out, aux).
    def one_batch_with_count(params, batch, vector):
        def grad_fn(p):
            # has_aux: the count rides along undifferentiated.
            return jax.grad(lambda q: loss_fn(q, batch), has_aux=True)(p)

        _, product, count = jax.jvp(grad_fn, (params,), (vector,), has_aux=True)
        return product, count

    return jax.jit(one_batch_with_count)


@cached_per_function
def batch_loss_and_grad(loss_fn: LossFn) -> Callable[[PyTree, Any], tuple[jax.Array, PyTree, jax.Array]]:
    """Jitted ``(params, batch) -> (loss_sum, grad_of_sum, count)``; used for timing baselines."""

    def fn(params, batch):
        (loss_sum, count), grads = jax.value_and_grad(lambda q: loss_fn(q, batch), has_aux=True)(params)
        return loss_sum, grads, count

    return jax.jit(fn)
