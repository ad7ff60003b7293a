"""Third-order directional derivatives by nested forward-mode differentiation.

For a scalar loss ``L`` and a direction ``v`` (held fixed)::

    ∇³L(w)[v, v] = d/dt H(w + t v) v |_{t=0} = ∇_w (vᵀ H(w) v)

i.e. the gradient of the curvature along ``v``. With ``v`` the top Hessian
eigenvector this is ∇λ_max (the eigenvector's own change drops out because it is
a unit stationary point of the Rayleigh quotient): the λ_max regularizer of the
third-order SAM SDE (docs/sam_sde.md).

It is computed forward-over-forward-over-reverse: the HVP ``w ↦ H(w) v`` is a
``jax.jvp`` of ``jax.grad``, and its directional derivative along ``v`` is one more
``jax.jvp``. The outer JVP returns the HVP as its primal, so one call gives both
``H v`` and ``∇³L[v, v]``.

Not exported from ``sam_jax.curvature`` (import this module directly).
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from sam_jax.optim import _core

PyTree = Any


def hvp_and_third(grad_fn: Callable[[PyTree], PyTree], params: PyTree, vector: PyTree):
    """``(H v, ∇³L[v, v])`` at ``params`` for ``grad_fn = ∇L``.

    Args:
      grad_fn: ``params -> ∇L(params)`` (a pytree like ``params``), e.g. ``jax.grad(L)``.
      params: the point.
      vector: the direction ``v`` (same structure and dtypes as ``params``).

    Returns:
      The Hessian-vector product and the third-order term, both pytrees like ``params``.
    """

    def hvp_at(p):
        return _core.hessian_vector_product(grad_fn, p, vector)

    return jax.jvp(hvp_at, (params,), (vector,))


def third_order_directional(scalar_fn: Callable[[PyTree], jax.Array], params: PyTree,
                            vector: PyTree) -> PyTree:
    """``∇³L(params)[v, v] = ∇_w (vᵀ H(w) v)`` with ``v = vector`` held fixed."""
    return hvp_and_third(jax.grad(scalar_fn), params, vector)[1]


def taylor_perturbed_gradient(grad_fn: Callable[[PyTree], PyTree], params: PyTree,
                              direction: PyTree, rho: float | jax.Array, order: int = 3):
    """Taylor model of ``∇L(w + ρ d)`` in ρ, truncated after ``order``.

    ``order=1``: ``∇L``; ``order=2``: ``∇L + ρ H d``; ``order=3``:
    ``∇L + ρ H d + (ρ²/2) ∇³L[d, d]``.

    Args:
      grad_fn: ``params -> ∇L(params)``.
      params: the point w.
      direction: the perturbation direction d (SAM: the normalized gradient ĝ).
      rho: the radius ρ.
      order: 1, 2 or 3.

    Returns:
      The truncated expansion, a pytree like ``params``.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    grad = grad_fn(params)
    if order == 1:
        return grad
    if order == 2:
        hv = _core.hessian_vector_product(grad_fn, params, direction)
        return jax.tree.map(lambda g, h: g + rho * h, grad, hv)
    hv, third = hvp_and_third(grad_fn, params, direction)
    return jax.tree.map(lambda g, h, t: g + rho * h + 0.5 * rho**2 * t, grad, hv, third)


def normalized(tree: PyTree, eps: float = 1e-12) -> PyTree:
    """``tree / (‖tree‖ + eps)`` (global L2 norm; a zero tree stays zero, no NaN)."""
    return _core.normalized(tree, eps)[0]
