"""The SAM family as Optax gradient transformations.

Every member is an ``optax.GradientTransformationExtraArgs`` that turns the minibatch
gradient into the gradient to step from, given ``grad_fn`` (the same minibatch's
gradient function)::

  tx = optax.chain(sam_jax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
  updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

All are built on :func:`sam_jax.optim._core.perturbation_transform`. Each member
declares itself in its own module (``ALGORITHM``, an :class:`Algorithm`: cost,
logged fields, extra ``update`` inputs, step kinds); :mod:`sam_jax.optim.registry`
collects the declarations (``docs/ARCHITECTURE.md``, "Contract of a family member").

In-graph tools the members share live in ``_core``: :func:`hessian_vector_product`
(also behind ``sam_jax.curvature.hvp``) and :func:`warm_power_iteration`
(``power_iteration`` here is its deprecated alias).
"""

from sam_jax.optim._core import (
    Algorithm,
    PerturbationState,
    perturbation_transform,
    warm_power_iteration,
)
from sam_jax.optim.multisteps import accumulate
from sam_jax.optim.asam import ASAMState, asam
from sam_jax.optim.egr import EGRState, egr
from sam_jax.optim.eigen_sam import EigenSAMState, eigen_sam, hessian_vector_product

from sam_jax.optim.gsam import GSAMState, gsam
from sam_jax.optim.looksam import LookSAMState, looksam
from sam_jax.optim.registry import (
    ALGORITHMS,
    PERTURBATIONS,
    gradient_evals_per_step,
    make_perturbation,
    perturbation_stats,
    register,
)
from sam_jax.optim.reverse_sam import ReverseSAMState, reverse_sam
from sam_jax.optim.sam import SAMState, sam
from sam_jax.optim.usam import USAMState, usam

# Deprecated alias (kept for importers): the in-graph, warm-started power iteration
# is `warm_power_iteration`; `sam_jax.curvature.power_iteration` is a different tool
# (host loop, random start, deflation, stopping rule).
power_iteration = warm_power_iteration

__all__ = [
    "ALGORITHMS",
    "accumulate",
    "ASAMState",
    "Algorithm",
    "GSAMState",
    "LookSAMState",
    "EGRState",
    "EigenSAMState",
    "PERTURBATIONS",
    "PerturbationState",
    "ReverseSAMState",
    "SAMState",
    "USAMState",
    "asam",
    "egr",
    "eigen_sam",
    "gradient_evals_per_step",
    "gsam",
    "hessian_vector_product",
    "looksam",
    "make_perturbation",
    "perturbation_stats",
    "perturbation_transform",
    "power_iteration",
    "register",
    "reverse_sam",
    "sam",
    "usam",
    "warm_power_iteration",
]
