"""SAM: sharpness-aware minimization (Foret et al. 2021)."""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax

from sam_jax.optim import _core

SAMState = _core.PerturbationState


def normalized_ascent_rule(rho, eps, direction: float = 1.0):
    """The rule ``epsilon = direction * rho * g / (||g|| + eps)`` (SAM; Reverse-SAM: -1)."""

    def perturb(g, params, state, grad_fn, extra_args):
        inverse = _core.safe_inverse_norm(norm := _core.tree_norm(g), eps)
        epsilon = _core.tree_scale(direction * rho * inverse, g)
        return epsilon, {"perturbation_norm": jnp.abs(rho) * norm * inverse}

    return perturb


def sam(
    rho=0.05,
    *,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Sharpness-aware minimization as an Optax gradient transformation.

    Returns ``grad_fn(w + epsilon)`` with ``epsilon = rho * g / (||g|| + eps)``, where
    ``g`` is the incoming minibatch gradient at ``w``. Chain it before a base
    optimizer so that the base optimizer steps from the SAM gradient::

      tx = optax.chain(sam_jax.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
      updates, state = tx.update(grads, state, params, grad_fn=grad_fn)

    ``grad_fn(p)`` must return the gradient of the *same minibatch* at ``p``
    (BatchNorm: keep the statistics of the clean pass, discard the perturbed pass's,
    as google-research/sam does). Put ``optax.clip_by_global_norm`` after ``sam`` in
    the chain to clip the final gradient as google-research/sam does (5.0 there).

    Args:
      rho: perturbation radius; 0.05 is the SAM paper's typical value (searched in
        {0.01, ..., 0.5}). May be scheduled with ``optax.inject_hyperparams``.
        ``rho = 0`` returns ``g`` unchanged: bit for bit the base optimizer.
      eps: added to ``||g||`` in the normalization; 1e-12 as davda54/sam.
        google-research/sam and ``optax.contrib.sam`` use none; ``eps=0`` matches
        them. A zero gradient gives ``epsilon = 0`` for every ``eps`` (never NaN).
      axis_name: ``None`` for one device or global (sharded) arrays under ``jax.jit``;
        the mapped axis name inside ``jax.shard_map`` / ``jax.pmap``. The returned
        gradient is then averaged over that axis.
      sync_perturbation: with ``axis_name``: True computes epsilon from the
        device-averaged gradient (synced epsilon, as one big batch); False from each
        device's local gradient (per-device epsilon, "m-sharpness", the default of
        google-research/sam, whose paper reports that smaller m generalizes better).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update`` requires
      ``grad_fn=``. State: :class:`SAMState` (``count``, ``grad_norm``,
      ``perturbation_norm``).

    References:
      Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for
      Efficiently Improving Generalization", ICLR 2021.
    """

    return _core.perturbation_transform(
        normalized_ascent_rule(rho, eps), rho, axis_name=axis_name, sync_perturbation=sync_perturbation, name="sam"
    )


ALGORITHM = _core.Algorithm(name="sam", factory=sam, title="SAM")
