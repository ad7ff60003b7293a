"""Reverse-SAM: SAM's perturbation with the sign flipped (a descent probe)."""

from __future__ import annotations

from typing import Optional

import optax

from sam_jax.optim import _core
from sam_jax.optim.sam import normalized_ascent_rule

ReverseSAMState = _core.PerturbationState


def reverse_sam(
    rho=0.05,
    *,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Reverse-SAM: returns ``grad_fn(w - rho * g / (||g|| + eps))``.

    The counter-example of the Eigen-SAM paper: evaluating the gradient a step
    *downhill* implicitly rewards sharpness instead of penalizing it.

    Args:
      rho: perturbation radius (``||epsilon|| = rho`` for a nonzero gradient).
      eps: normalization eps, as in :func:`sam_jax.sam`.
      axis_name: as in :func:`sam_jax.sam`.
      sync_perturbation: as in :func:`sam_jax.sam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state :class:`ReverseSAMState`).

    References:
      Luo et al., "Explicit Eigenvalue Regularization Improves Sharpness-Aware
      Minimization", NeurIPS 2024.
    """

    return _core.perturbation_transform(
        normalized_ascent_rule(rho, eps, direction=-1.0), rho, axis_name=axis_name, sync_perturbation=sync_perturbation,
        name="reverse_sam",
    )


ALGORITHM = _core.Algorithm(name="reverse_sam", factory=reverse_sam, title="Reverse-SAM")
