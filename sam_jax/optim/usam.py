"""USAM: unnormalized SAM (Andriushchenko & Flammarion 2022)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax

from sam_jax.optim import _core

USAMState = _core.PerturbationState


def usam(
    rho=0.05,
    *,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Unnormalized SAM: returns ``grad_fn(w + rho * g)``.

    The variant analysed in the late-phase SAM theory and released by
    tml-epfl/understanding-sam as ``sam_no_grad_norm``. There is no normalization,
    so no eps: a zero gradient gives a zero perturbation.

    Args:
      rho: perturbation scale (not a radius: ``||epsilon|| = rho ||g||``). The
        right value depends on the gradient scale; 0.05 is only a placeholder
        shared with ``sam``.
      axis_name: as in :func:`sam_jax.sam`.
      sync_perturbation: as in :func:`sam_jax.sam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state :class:`USAMState`).

    References:
      Andriushchenko, Flammarion, "Towards Understanding Sharpness-Aware
      Minimization", ICML 2022.
    """

    def perturb(g, params, state, grad_fn, extra_args):
        return _core.tree_scale(rho, g), {"perturbation_norm": jnp.abs(rho) * _core.tree_norm(g)}

    return _core.perturbation_transform(
        perturb, rho, axis_name=axis_name, sync_perturbation=sync_perturbation, name="usam"
    )


ALGORITHM = _core.Algorithm(name="usam", factory=usam, title="USAM")
