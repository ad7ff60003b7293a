"""Eigen-SAM (Luo et al. 2024): SAM plus the top Hessian eigenvector's orthogonal part."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from sam_jax.optim import _core

PRE_ESTIMATE_MODES = ("unnormalized", "sam")


class EigenSAMState(NamedTuple):
    """State of :func:`eigen_sam`.

    Attributes:
      count: number of ``update`` calls so far (optimizer steps, never reset).
      grad_norm: ``||g||`` of the last ascent gradient.
      perturbation_norm: ``||epsilon||`` of the last step.
      eigenvector: unit-norm estimate of the top Hessian eigenvector (a params-shaped
        pytree); before the first refresh, the random start vector.
      eigenvalue: Rayleigh quotient ``<v, Hv>`` of the last power iteration (0 before
        the first refresh).
      eigen_cosine: ``|cos(epsilon, v)|`` of the last step (the eigenvector's sign is
        arbitrary, so the absolute value is what measures alignment); 0 before the
        first refresh.
      has_eigenvector: whether at least one refresh has happened.
    """

    count: jax.Array
    grad_norm: jax.Array
    perturbation_norm: jax.Array
    eigenvector: _core.Params
    eigenvalue: jax.Array
    eigen_cosine: jax.Array
    has_eigenvector: jax.Array

    logged_fields = ("eigenvalue", "eigen_cosine")  # read by sam_jax.optim.perturbation_stats


# The HVP lives with the other in-graph tools in `_core` (EGR uses it too); this
# name stays for callers of `sam_jax.optim.eigen_sam.hessian_vector_product`.
hessian_vector_product = _core.hessian_vector_product


# The warm-started in-graph power iteration lives with the other in-graph tools in
# `_core` (`warm_power_iteration`); this name stays for older callers. It is not
# `sam_jax.curvature.power_iteration` (a host loop with deflation and a stopping rule).
power_iteration = _core.warm_power_iteration


REFRESH_COUNTERS = ("epoch", "global")

# Released defaults (RitianLuo/EigenSAM): `freq` = 100 steps between refreshes,
# `steps` = 5 power iterations per refresh.
DEFAULT_REFRESH_EVERY = 100
DEFAULT_POWER_ITERS = 5

# What this transform asks of a training engine: options the engine fills in from
# what it knows when the user gave none (see `sam_jax.optim.engine_kwargs`).
ENGINE_OPTIONS = ("steps_per_epoch",)


def resolve_refresh_counter(refresh_counter=None, steps_per_epoch=None) -> str:
    """The step counter the refresh rule uses: ``"epoch"`` or ``"global"``.

    ``None`` (default) means ``"epoch"`` (the released code) when ``steps_per_epoch``
    is given and ``"global"`` otherwise. ``"epoch"`` requires ``steps_per_epoch``.
    """
    if refresh_counter is None:
        return "global" if steps_per_epoch is None else "epoch"
    if refresh_counter not in REFRESH_COUNTERS:
        raise ValueError(
            f"refresh_counter must be one of {REFRESH_COUNTERS}, got {refresh_counter!r}")
    if refresh_counter == "epoch" and steps_per_epoch is None:
        raise ValueError("refresh_counter='epoch' needs steps_per_epoch (optimizer steps "
                         "per epoch); the training engine passes it")
    return refresh_counter


def is_refresh_step(count, refresh_every, steps_per_epoch=None, refresh_counter=None):
    """Whether the step whose state count is ``count`` refreshes the eigenvector.

    ``refresh_every`` is the **interval between refreshes** in optimizer steps (the
    released code's ``freq``, the reviewers' k), not the number of power iterations.

    * ``"global"`` counter: ``count % refresh_every == 0 and count > 0``.
    * ``"epoch"`` counter (released code, whose step index restarts every epoch):
      with ``i = count % steps_per_epoch`` (the index within the epoch),
      ``i % refresh_every == 0 and i > 0``: ``floor((steps_per_epoch - 1) /
      refresh_every)`` refreshes per epoch, never at an epoch's first step. E.g.
      ``steps_per_epoch=5, refresh_every=2``: counts 2, 4, 7, 9, 12, 14, ...;
      ``steps_per_epoch=195, refresh_every=100`` (CIFAR, batch 256): count 100 of
      each epoch only. ``count`` must start at an epoch boundary (it does in
      ``sam_jax.train``: phases are whole epochs).

    ``count`` is the state's count before the step. On Python ints it returns a
    Python bool, which is how a host loop decides ``update(..., eigen_refresh=...)``
    by the same rule as the in-graph default; on arrays, a boolean array.
    ``refresh_counter`` resolves as in :func:`resolve_refresh_counter`.
    """
    if resolve_refresh_counter(refresh_counter, steps_per_epoch) == "epoch":
        count = count % steps_per_epoch
    return (count % refresh_every == 0) & (count > 0)


def refresh_picker(refresh_every=DEFAULT_REFRESH_EVERY, steps_per_epoch=None, refresh_counter=None, **_):
    """``count -> bool``: the refresh rule of an :func:`eigen_sam` built with these
    options (the others are ignored), for a host loop that compiles a refresh step
    and a plain step. Defaults are :func:`eigen_sam`'s."""
    refresh_every = int(refresh_every)
    steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
    resolve_refresh_counter(refresh_counter, steps_per_epoch)  # validate now

    def pick(count: int) -> bool:
        return bool(is_refresh_step(int(count), refresh_every, steps_per_epoch, refresh_counter))

    return pick


def refreshes_per_epoch(refresh_every, steps_per_epoch) -> int:
    """Refreshes in one epoch under the ``"epoch"`` counter:
    ``floor((steps_per_epoch - 1) / refresh_every)``."""
    return (int(steps_per_epoch) - 1) // int(refresh_every)


def gradient_evals_per_step(refresh_every=DEFAULT_REFRESH_EVERY, power_iters=DEFAULT_POWER_ITERS,
                            steps_per_epoch=None,
                            refresh_counter=None, **_) -> float:
    """Gradient evaluations per step of :func:`eigen_sam`, averaged over steps (an HVP
    counts as 2): ``2 + 2 * power_iters * r`` with ``r`` the refreshes per step,
    ``1 / refresh_every`` under the ``"global"`` counter and
    ``floor((steps_per_epoch - 1) / refresh_every) / steps_per_epoch`` under the
    ``"epoch"`` counter (exact over whole epochs)."""
    if resolve_refresh_counter(refresh_counter, steps_per_epoch) == "epoch":
        rate = refreshes_per_epoch(refresh_every, steps_per_epoch) / int(steps_per_epoch)
    else:
        rate = 1.0 / refresh_every
    return 2.0 + 2.0 * power_iters * rate


def eigen_sam(
    rho=0.05,
    alpha=0.2,
    refresh_every=DEFAULT_REFRESH_EVERY,
    power_iters=DEFAULT_POWER_ITERS,
    *,
    steps_per_epoch: Optional[int] = None,
    refresh_counter: Optional[str] = None,
    pre_estimate: str = "unnormalized",
    seed=0,
    eps: float = 1e-12,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Eigen-SAM: SAM's perturbation plus the top eigenvector's part orthogonal to ``g``.

    ``epsilon = rho (g_hat + alpha sign(<g, v>) v_perp)``, ``v_perp = v - <g_hat, v> g_hat``,
    ``g_hat = g / (||g|| + eps)``, **not renormalized** (so ``||epsilon|| = rho
    sqrt(1 + alpha^2 ||v_perp||^2)``), as in the released code. ``v`` is the state's
    estimate of the top Hessian eigenvector of the *current minibatch* loss,
    refreshed every ``refresh_every`` optimizer steps (see the step counter below) by
    ``power_iters`` warm-started power iterations on forward-over-reverse HVPs of
    ``grad_fn`` (or of ``hvp_grad_fn``, see below); the refresh sits in a
    ``lax.cond``, so other steps compute no HVP. The first start vector is standard
    normal (from ``seed``), normalized.

    Two integers, not to be confused: ``refresh_every`` is the *interval between
    refreshes* (the released code's ``freq``, the reviewers' k) and ``power_iters``
    the *power iterations per refresh* (the code's ``steps``, the reviewers' p).

    Step counter (:func:`is_refresh_step`): the released code tests
    ``step % freq == 0 and step > 0`` with ``step`` the index *within the epoch*
    (it restarts every epoch), so it refreshes at steps k, 2k, ... of each epoch,
    never at an epoch's first step, and ``v`` carries over across epochs (CIFAR,
    batch 256, 195 steps per epoch, k = 100: once per epoch, at step 100).
    ``refresh_counter="epoch"`` does this with ``i = count % steps_per_epoch``;
    ``refresh_counter="global"`` tests ``count % refresh_every == 0 and count > 0``
    on the never-reset ``count`` (about twice as many refreshes in the CIFAR
    example). The default ``None`` is ``"epoch"`` when ``steps_per_epoch`` is given
    and ``"global"`` otherwise; ``sam_jax.train`` passes its ``steps_per_epoch``
    (this transform declares it in :data:`ENGINE_OPTIONS`), so the engine follows
    the released code unless a phase says ``refresh_counter=global``.

    BatchNorm: the released code takes the HVP with the model in eval mode (running
    statistics). Pass ``hvp_grad_fn=`` (a ``params -> grads`` function of the same
    minibatch in eval mode) to ``update`` to do the same; without it the HVP uses
    ``grad_fn``.

    Args:
      rho: perturbation radius; 0.05 is the released default (README example 0.1).
      alpha: weight of the eigenvector component; 0.2 released default (the paper
        tunes it in {0.05, 0.1, 0.2}).
      refresh_every: interval between eigenvector refreshes, in optimizer steps
        (released ``freq`` = 100; the reviewers' k).
      power_iters: power iterations (HVPs) per refresh (released ``steps`` = 5;
        the reviewers' p).
      steps_per_epoch: optimizer steps per epoch, for the ``"epoch"`` counter.
      refresh_counter: ``"epoch"`` (released code: the counter restarts every
        epoch; needs ``steps_per_epoch``), ``"global"`` (never reset), or None:
        ``"epoch"`` if ``steps_per_epoch`` is given, else ``"global"``.
      pre_estimate: perturbation before the first eigenvector estimate exists:
        ``"unnormalized"`` (``rho * g``, as the released code) or ``"sam"``
        (``rho * g_hat``).
      seed: seed of the first (standard normal) start vector.
      eps: normalization eps of ``g_hat``, as in :func:`sam_jax.sam`.
      axis_name: as in :func:`sam_jax.sam`. With it, ``Hv`` is always averaged
        over devices (the eigenvector is the global-batch Hessian's, so the state
        stays replicated); ``sync_perturbation`` only decides which ``g`` enters
        epsilon.
      sync_perturbation: as in :func:`sam_jax.sam`.

    Refresh decided by the caller: ``update(..., eigen_refresh=True/False)`` (a
    Python bool, e.g. a static argument of the jitted train step) replaces the
    in-graph schedule and removes the ``lax.cond``: the caller compiles a refresh
    step and a plain step. Use it on CPU with convolutional models, where XLA runs
    convolutions inside ``cond`` / ``while`` bodies 20-50x slower than at top level
    (jax-ml/jax#12868, measured in ``benchmarks/step_cost.py``). A traced bool is
    accepted too (then it goes through the cond).

    Under ``optax.inject_hyperparams`` pass
    ``static_args=("refresh_every", "power_iters", "steps_per_epoch", "refresh_counter",
    "seed")`` unless they should be traced (traced values work, at the cost of a
    ``while_loop``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (state :class:`EigenSAMState`);
      ``update(grads, state, params, grad_fn=..., hvp_grad_fn=None,
      eigen_refresh=None)``. Cost per step: 2 gradients plus ``2 * power_iters``
      per refresh (:func:`gradient_evals_per_step`).

    References:
      Luo, Truong, Pham, Harandi, Phung, Le, "Explicit Eigenvalue Regularization
      Improves Sharpness-Aware Minimization", NeurIPS 2024; code RitianLuo/EigenSAM.
    """
    if pre_estimate not in PRE_ESTIMATE_MODES:
        raise ValueError(f"pre_estimate must be one of {PRE_ESTIMATE_MODES}, got {pre_estimate!r}")
    _core.check_rho(alpha, "alpha")
    refresh_counter = resolve_refresh_counter(refresh_counter, steps_per_epoch)
    for arg_name, value in (("refresh_every", refresh_every), ("power_iters", power_iters),
                            ("steps_per_epoch", steps_per_epoch)):
        if value is None:
            continue
        concrete = _core.static_value(value)
        if concrete is not None and (concrete < 1 or concrete != int(concrete)):
            raise ValueError(f"{arg_name} must be an integer >= 1, got {value!r}")

    def init_extra(params):
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
        start = treedef.unflatten(
            [jax.random.normal(k, p.shape, p.dtype) for k, p in zip(keys, leaves)]
        )
        start, _ = _core.normalized(start, 0.0)
        return {
            "eigenvector": start,
            "eigenvalue": jnp.zeros((), jnp.float32),
            "eigen_cosine": jnp.zeros((), jnp.float32),
            "has_eigenvector": jnp.zeros((), jnp.bool_),
        }

    def perturb(g, params, state, grad_fn, extra_args):
        hvp_grad_fn = extra_args.get("hvp_grad_fn") or grad_fn
        refresh = extra_args.get("eigen_refresh")
        if refresh is None:  # the released schedule, decided in the graph
            refresh = is_refresh_step(state.count, refresh_every, steps_per_epoch,
                                      refresh_counter)

        def estimate():
            return _core.warm_power_iteration(hvp_grad_fn, params, state.eigenvector, power_iters, axis_name)

        def keep():
            return state.eigenvector, state.eigenvalue

        if isinstance(refresh, bool):  # decided by the caller in Python: no cond at all
            vector, eigenvalue = estimate() if refresh else keep()
        else:
            vector, eigenvalue = jax.lax.cond(refresh, estimate, keep)
        has_eigenvector = state.has_eigenvector | refresh

        # Everything below needs only three reductions, <g, g>, <g, v>, <v, v>, which
        # XLA fuses into one pass; norms and the cosine follow in closed form.
        g_norm = _core.tree_norm(g)
        inverse = _core.safe_inverse_norm(g_norm, eps)
        g_dot_v = _core.tree_vdot(g, vector)
        v_sq = _core.tree_vdot(vector, vector)
        along = g_dot_v * inverse  # <g_hat, v>
        weight = alpha * jnp.sign(g_dot_v)  # alpha sign(<g, v>)
        before_scale = rho if pre_estimate == "unnormalized" else rho * inverse
        # epsilon = rho (g_hat + weight (v - along g_hat)) = a g + b v, or rho g / rho g_hat
        a = jnp.where(has_eigenvector, rho * inverse * (1.0 - weight * along), before_scale)
        b = jnp.where(has_eigenvector, rho * weight, 0.0)
        epsilon = jax.tree.map(
            lambda gi, v: (a * gi + b * v.astype(gi.dtype)).astype(gi.dtype), g, vector
        )
        # ||epsilon||^2 = a^2 <g,g> + 2ab <g,v> + b^2 <v,v>;  <epsilon, v> = a <g,v> + b <v,v>
        eps_sq = a * a * g_norm * g_norm + 2 * a * b * g_dot_v + b * b * v_sq
        eps_norm = jnp.sqrt(jnp.maximum(eps_sq, 0.0))
        cosine = jnp.abs(a * g_dot_v + b * v_sq) * _core.safe_inverse_norm(
            eps_norm * jnp.sqrt(v_sq), 0.0
        )
        # Before the first estimate v is only the random start: log 0, not noise.
        cosine = jnp.where(has_eigenvector, jnp.minimum(cosine, 1.0), 0.0)
        return epsilon, {
            "eigenvector": vector,
            "eigenvalue": eigenvalue,
            "eigen_cosine": cosine.astype(jnp.float32),
            "has_eigenvector": has_eigenvector,
            "perturbation_norm": eps_norm,
        }

    return _core.perturbation_transform(
        perturb,
        rho,
        axis_name=axis_name,
        sync_perturbation=sync_perturbation,
        state_type=EigenSAMState,
        init_extra=init_extra,
        per_device_fields=("eigen_cosine",),
        name="eigen_sam",
    )


ALGORITHM = _core.Algorithm(
    name="eigen_sam",
    factory=eigen_sam,
    title="Eigen-SAM",
    gradient_evals_per_step=gradient_evals_per_step,
    logged_fields=EigenSAMState.logged_fields,
    update_inputs=(_core.EVAL_MODE_GRAD_FN,),  # the HVP's eval-mode gradient
    engine_options=ENGINE_OPTIONS,
    step_picker=refresh_picker,  # refresh step / plain step
    step_kind_arg="eigen_refresh",
    options_help="alpha, refresh_every (steps between eigenvector refreshes, code 'freq'), "
                 "power_iters (power iterations per refresh, code 'steps'), "
                 "refresh_counter=epoch (default: the step index restarts every epoch, "
                 "as released) | global, pre_estimate, seed",
)

# The same declarations as attributes of the factory, for code written before
# `ALGORITHM` existed.
eigen_sam.engine_options = ENGINE_OPTIONS
eigen_sam.gradient_evals_per_step = gradient_evals_per_step
eigen_sam.step_picker = refresh_picker
