r"""LookSAM (Liu et al. 2022): the full SAM gradient every ``k`` steps, its part
orthogonal to ``g`` reused in between.

With ``g = grad L(w)`` the clean minibatch gradient and ``t`` the step count
(from 0), on *full* steps (``t % k == 0``):

.. math::

   g_s = \nabla L\big(w + \rho\, g / (\|g\| + \text{eps})\big), \qquad
   g_v = g_s - \frac{\langle g_s, g\rangle}{\|g\|^2} g, \qquad
   \text{update} = g_s,

and ``g_v`` (the component of the SAM gradient orthogonal to ``g``, which the
paper finds changes slowly) is stored; on the other, *cheap* steps

.. math::

   \text{update} = g + \alpha \frac{\|g\|}{\|g_v\|} g_v

(the paper's adaptive form, Algorithm 1), with the stored ``g_v`` and the current
``g``. Cheap steps evaluate no second gradient: the cost is ``1 + 1/k`` gradient
evaluations per step on average; ``N`` steps from count 0 cost ``N + ceil(N / k)``,
so the average undercounts by less than one gradient per run of the transform
(exact when ``k`` divides ``N``).

Two ways to run it:

* in-graph (default): the step kind is chosen by ``lax.cond`` on ``count % k == 0``,
  so cheap steps skip the second gradient at run time;
* decided by the caller: ``update(..., looksam_full=True/False)`` with a Python
  bool removes the ``cond`` (two compiled step kinds; :func:`full_step_picker`
  gives the host-side rule, which ``sam_jax.train`` uses through the registry).

Multi-device (``axis_name``): ``g_v`` is computed from each device's own ``g``
and ``g_s`` and stored averaged over devices (the state stays replicated).

Provenance: Liu, Mai, Chen, Hsieh, You, "Towards Efficient and Scalable
Sharpness-Aware Minimization", CVPR 2022 (arXiv 2203.02714), Algorithm 1 [text,
recalled]. Defaults ``k = 10``, ``alpha = 0.7`` are those of kozistr/pytorch_optimizer's
``LookSAM`` [code]; we did not verify them against the paper's tables.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_jax.optim import _core

DEFAULT_K = 10  # kozistr/pytorch_optimizer
DEFAULT_ALPHA = 0.7  # kozistr/pytorch_optimizer
STEP_KIND_ARG = "looksam_full"


class LookSAMState(NamedTuple):
    """State of :func:`looksam`.

    Attributes:
      count: number of ``update`` calls so far.
      grad_norm: ``||g||`` of the last ascent gradient.
      perturbation_norm: ``||epsilon||`` of the last step (0 on cheap steps, which
        evaluate no perturbed point).
      orthogonal: the stored ``g_v`` (params-shaped; zeros before the first full step).
      orthogonal_norm: ``||g_v||``.
    """

    count: jax.Array
    grad_norm: jax.Array
    perturbation_norm: jax.Array
    orthogonal: _core.Params
    orthogonal_norm: jax.Array

    logged_fields = ("orthogonal_norm",)


def is_full_step(count, k=DEFAULT_K):
    """Whether the step whose state count is ``count`` computes the SAM gradient:
    ``count % k == 0`` (Python bool on ints, boolean array on arrays)."""
    return count % k == 0


def full_step_picker(k=DEFAULT_K, **_):
    """``count -> bool``: :func:`is_full_step` for a :func:`looksam` built with
    ``k`` (other options ignored), for a host loop with two compiled step kinds."""
    k = int(k)

    def pick(count: int) -> bool:
        return bool(is_full_step(int(count), k))

    return pick


def gradient_evals_per_step(k=DEFAULT_K, **_) -> float:
    """``1 + 1/k``: one gradient per step, a second one every ``k`` steps."""
    return 1.0 + 1.0 / float(k)


def looksam(
    rho=0.05,
    alpha=DEFAULT_ALPHA,
    k=DEFAULT_K,
    *,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""LookSAM (see the module docstring for the math).

    Args:
      rho: perturbation radius of the full steps; 0 returns ``g`` unchanged.
      alpha: weight of the reused orthogonal direction on cheap steps (0.7,
        kozistr/pytorch_optimizer).
      k: a full SAM step every ``k`` steps (10, kozistr/pytorch_optimizer);
        ``k = 1`` is SAM.
      eps: added to ``||g||`` in the perturbation's normalization.
      axis_name, sync_perturbation: as in :func:`sam_jax.sam`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state :class:`LookSAMState`);
      ``update(grads, state, params, grad_fn=..., looksam_full=None)``.
    """
    _core.check_rho(alpha, "alpha")
    k_value = _core.static_value(k)
    if k_value is None or k_value < 1 or k_value != int(k_value):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    k = int(k_value)

    def full_flag(state, extra_args):
        flag = extra_args.get(STEP_KIND_ARG)
        return is_full_step(state.count, k) if flag is None else flag

    def init_extra(params):
        return {"orthogonal": jax.tree.map(jnp.zeros_like, params),
                "orthogonal_norm": jnp.zeros((), jnp.float32)}

    def perturb(g, params, state, grad_fn, extra_args):
        full = full_flag(state, extra_args)
        inverse = _core.safe_inverse_norm(norm := _core.tree_norm(g), eps)
        epsilon = _core.tree_scale(rho * inverse, g)
        eps_norm = jnp.abs(rho) * norm * inverse
        return epsilon, {"perturbation_norm": jnp.where(full, eps_norm, 0.0)}

    def evaluate(grads, params, epsilon, ascent, grad_fn, axis_name, state, extra_args):
        del ascent

        def full_step():
            g_s = _core.gradient_at(grad_fn, params, epsilon, like=grads, axis_name=axis_name)
            g_sq = _core.tree_vdot(grads, grads)
            coef = _core.tree_vdot(g_s, grads) * _core.safe_inverse_norm(g_sq, 0.0)
            g_v = jax.tree.map(lambda s, g: (s - coef * g).astype(s.dtype), g_s, grads)
            g_v = _core.mean_over_devices(g_v, axis_name)
            return g_s, {"orthogonal": g_v,
                         "orthogonal_norm": _core.tree_norm(g_v).astype(jnp.float32)}

        def cheap_step():
            g_v = state.orthogonal
            scale = alpha * _core.tree_norm(grads) * _core.safe_inverse_norm(
                state.orthogonal_norm, 0.0)
            out = jax.tree.map(lambda g, v: (g + scale * v.astype(g.dtype)).astype(g.dtype),
                               grads, g_v)
            return out, {"orthogonal": g_v, "orthogonal_norm": state.orthogonal_norm}

        full = full_flag(state, extra_args)
        if isinstance(full, bool):  # decided by the caller: one kind compiled, no cond
            return full_step() if full else cheap_step()
        return jax.lax.cond(full, full_step, cheap_step)

    return _core.perturbation_transform(
        perturb,
        rho,
        axis_name=axis_name,
        sync_perturbation=sync_perturbation,
        state_type=LookSAMState,
        init_extra=init_extra,
        evaluate=evaluate,
        evaluate_fields=("orthogonal", "orthogonal_norm"),
        name="looksam",
    )


ALGORITHM = _core.Algorithm(
    name="looksam",
    factory=looksam,
    title="LookSAM",
    gradient_evals_per_step=gradient_evals_per_step,
    logged_fields=LookSAMState.logged_fields,
    step_picker=full_step_picker,  # full SAM step / cheap step
    step_kind_arg=STEP_KIND_ARG,
)
