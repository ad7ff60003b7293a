r"""GSAM (Zhuang et al. 2022): SAM plus a descent step on the surrogate gap.

With ``g = grad L(w)`` the clean minibatch gradient,

.. math::

   \epsilon = \rho_t \, g / (\|g\| + \text{eps}), \qquad g_p = \nabla L(w + \epsilon),

   g_\parallel = \frac{\langle g, g_p\rangle}{\|g_p\|^2} g_p, \qquad
   g_\perp = g - g_\parallel, \qquad
   \text{update} = g_p - \alpha \, g_\perp .

``g_p`` descends the perturbed loss ``f_p = L(w + epsilon)`` (SAM); ``-g_perp`` is
a descent direction of the surrogate gap ``h = f_p - L(w)`` that leaves ``f_p``
unchanged to first order (it is orthogonal to ``g_p``): GSAM minimizes ``f_p``
and ``h`` together. ``alpha = 0`` is SAM exactly.

``rho_t`` is ``rho`` (constant), or, with ``rho_min`` set, tied to the learning
rate ``lr_t`` of the step as in the paper's Algorithm 1 and big_vision:

.. math::

   \rho_t = \rho_{min} + (\rho_{max} - \rho_{min})
            \frac{lr_t - lr_{min}}{lr_{max} - lr_{min}}, \quad \rho_{max} = \rho

(``rho_t = rho`` when ``lr_max == lr_min``). ``lr_t`` comes from ``update(...,
learning_rate=lr)`` (``sam_jax.train`` passes it: the algorithm declares it in
``update_inputs``) or from a ``learning_rate`` schedule of the state's count.

Provenance [code]: google-research/big_vision ``big_vision/trainers/proj/gsam/gsam.py``
(``gsam_gradient`` with ``minimize_fp=True``, the original GSAM; its perturbation is
SAM's, per worker, and its output is averaged over workers afterwards, as here in
per-device mode); its ViT-B/32 ImageNet config ``configs/proj/gsam/vit_i1k_gsam_no_aug.py``
uses ``rho_max=0.6, rho_min=0.1, alpha=0.6, lr_min = 0.01 * lr``. The default
``alpha=0.01`` here is chosen by us (small: close to SAM), not a paper value; tune
it (the big_vision config uses 0.6 for ViT with Adam).

Reference: Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu,
"Surrogate Gap Minimization Improves Sharpness-Aware Training", ICLR 2022.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from sam_jax.optim import _core

DEFAULT_ALPHA = 0.01  # chosen by us; big_vision's ViT config uses 0.6


class GSAMState(NamedTuple):
    """State of :func:`gsam`.

    Attributes:
      count: number of ``update`` calls so far.
      grad_norm: ``||g||`` of the last ascent gradient.
      perturbation_norm: ``||epsilon||`` of the last step.
      effective_rho: ``rho_t`` of the last step (``rho`` when not tied to the lr).
    """

    count: jax.Array
    grad_norm: jax.Array
    perturbation_norm: jax.Array
    effective_rho: jax.Array

    logged_fields = ("effective_rho",)


def rho_at(lr, rho_max, rho_min, lr_max, lr_min):
    """``rho_min + (rho_max - rho_min) (lr - lr_min) / (lr_max - lr_min)``;
    ``rho_max`` when ``lr_max == lr_min`` (big_vision)."""
    if lr_max == lr_min:
        return jnp.asarray(rho_max, jnp.float32)
    return rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)


def gsam(
    rho=0.05,
    alpha=DEFAULT_ALPHA,
    *,
    rho_min: Optional[float] = None,
    lr_max: Optional[float] = None,
    lr_min: float = 0.0,
    learning_rate: Union[None, Callable[[jax.Array], jax.Array]] = None,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""GSAM: ``g_p - alpha * g_perp`` (see the module docstring for the math).

    Args:
      rho: perturbation radius; ``rho_max`` when ``rho_min`` is given. ``rho == 0``
        returns ``g`` unchanged.
      alpha: weight of the surrogate-gap step; 0 is SAM exactly. Default 0.01 is
        chosen by us (big_vision's ViT-B/32 config: 0.6).
      rho_min: None (constant ``rho``) or the radius at ``lr_min``: then ``rho_t``
        follows the learning rate linearly (needs ``lr_max``).
      lr_max, lr_min: the learning rates at which ``rho_t`` is ``rho`` and
        ``rho_min`` (big_vision: the peak lr and the schedule's end).
      learning_rate: optional schedule ``count -> lr`` for use outside an engine;
        otherwise ``update(..., learning_rate=lr)`` gives the lr of the step.
      eps: added to ``||g||`` in the normalization, as in :func:`sam_jax.sam`.
      axis_name, sync_perturbation: as in :func:`sam_jax.sam`; the decomposition
        uses each device's own ``g`` and ``g_p`` and the result is averaged (as
        big_vision, whose output is ``pmean``-ed by the caller).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state :class:`GSAMState`);
      ``update(grads, state, params, grad_fn=..., learning_rate=None)``. Cost: 2
      gradient evaluations per step.
    """
    _core.check_rho(alpha, "alpha")
    tied = rho_min is not None
    if tied:
        _core.check_rho(rho_min, "rho_min")
        if lr_max is None:
            raise ValueError("gsam with rho_min needs lr_max (the lr at which rho_t = rho)")
        rho_value = _core.static_value(rho)
        if rho_value is not None and rho_min > rho_value:
            raise ValueError(f"rho_min ({rho_min}) must not exceed rho ({rho})")

    def current_rho(state, extra_args):
        if not tied:
            return jnp.asarray(rho, jnp.float32)
        lr = extra_args.get(_core.LEARNING_RATE)
        if lr is None and learning_rate is not None:
            lr = learning_rate(state.count)
        if lr is None:
            raise ValueError("gsam with rho_min needs the step's lr: update(..., "
                             "learning_rate=lr) or gsam(..., learning_rate=schedule)")
        return jnp.asarray(rho_at(lr, rho, rho_min, lr_max, lr_min), jnp.float32)

    def perturb(g, params, state, grad_fn, extra_args):
        rho_t = current_rho(state, extra_args)
        inverse = _core.safe_inverse_norm(norm := _core.tree_norm(g), eps)
        epsilon = _core.tree_scale(rho_t * inverse, g)
        return epsilon, {"perturbation_norm": jnp.abs(rho_t) * norm * inverse,
                         "effective_rho": rho_t}

    def evaluate(grads, params, epsilon, ascent, grad_fn, axis_name):
        del ascent
        g_p = _core.gradient_at(grad_fn, params, epsilon, like=grads, axis_name=axis_name)
        if _core.static_value(alpha) == 0.0:
            return g_p  # SAM, bit for bit
        # g_perp = g - (<g, g_p> / ||g_p||^2) g_p  (g_perp = g when g_p = 0)
        g_p_sq = _core.tree_vdot(g_p, g_p)
        coef = _core.tree_vdot(grads, g_p) * _core.safe_inverse_norm(g_p_sq, 0.0)
        return jax.tree.map(
            lambda gp, g: (gp - alpha * (g - coef * gp)).astype(gp.dtype), g_p, grads)

    return _core.perturbation_transform(
        perturb,
        rho,
        axis_name=axis_name,
        sync_perturbation=sync_perturbation,
        state_type=GSAMState,
        init_extra=lambda params: {"effective_rho": jnp.zeros((), jnp.float32)},
        evaluate=evaluate,
        name="gsam",
    )


ALGORITHM = _core.Algorithm(
    name="gsam",
    factory=gsam,
    title="GSAM",
    logged_fields=GSAMState.logged_fields,
    update_inputs=(_core.LEARNING_RATE,),  # for rho tied to the learning rate
)
