"""The one mechanism every member of the SAM family is built on.

A SAM-like step has two parts:

1. a *perturbation rule* ``(ascent_grads, params, state) -> epsilon`` that says where
   to look (SAM: ``rho * g / ||g||``; ASAM scales it elementwise; Eigen-SAM adds an
   eigenvector component, ...), and
2. the evaluation of the same minibatch's gradient there, ``grad_fn(params + epsilon)``
   (EGR combines it with ``g`` instead of returning it as is).

:func:`perturbation_transform` turns a rule into an
``optax.GradientTransformationExtraArgs`` and handles everything the variants share:
the multi-device contract of ``docs/ARCHITECTURE.md`` (``axis_name``,
``sync_perturbation``), the logged norms, the step counter, and the guarantee that
``rho == 0`` returns the incoming gradient untouched (bit for bit the base optimizer),
also when ``rho`` is a traced value under ``optax.inject_hyperparams``.

It also defines :class:`Algorithm`, the declaration each member's module exports as
``ALGORITHM`` (cost, logged fields, extra ``update`` inputs, step kinds), and the
in-graph tools several members share (:func:`hessian_vector_product`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

Params = Any
Updates = Any
GradFn = Callable[[Params], Updates]


class PerturbationState(NamedTuple):
    """State of ``sam``, ``usam``, ``asam`` and ``reverse_sam``.

    Attributes:
      count: number of ``update`` calls so far (int32 scalar).
      grad_norm: ``||g||`` of the ascent gradient of the last step (the synced one
        when ``sync_perturbation``; with per-device perturbations the mean over
        devices of the local norms, so that the state stays replicated).
      perturbation_norm: ``||epsilon||`` of the last step (same averaging rule).
    """

    count: jax.Array
    grad_norm: jax.Array
    perturbation_norm: jax.Array


# ---------------------------------------------------------------------------
# What a family member declares about itself (docs/ARCHITECTURE.md, "Contract of
# a family member"). Each algorithm's module defines one `Algorithm`;
# `sam_jax.optim.registry` only collects them, and the training engine reads
# nothing else.
# ---------------------------------------------------------------------------

# Inputs a training engine can hand to ``update`` as keyword arguments when an
# algorithm lists them in ``Algorithm.update_inputs``:
EVAL_MODE_GRAD_FN = "hvp_grad_fn"
"""``params -> grads`` of the same minibatch with the model in eval mode (BatchNorm
running statistics), e.g. for HVPs; engines pass it only when the model has
BatchNorm state (otherwise it is ``grad_fn``)."""
LEARNING_RATE = "learning_rate"
"""The learning rate of the current step (a scalar; traced inside a compiled step)."""
ENGINE_INPUTS = (EVAL_MODE_GRAD_FN, LEARNING_RATE)

# Fields every family state has and every engine logs.
BASE_FIELDS = ("count", "grad_norm", "perturbation_norm")


def _two_evals(**_) -> float:
    return 2.0


class Algorithm(NamedTuple):
    """The declaration of one member of the SAM family.

    Attributes:
      name: registry name (the ``--phases`` name), e.g. ``"sam"``.
      factory: ``factory(rho, **options) -> optax.GradientTransformationExtraArgs``.
      title: the name people write (``"Eigen-SAM"``), for messages and docs.
      gradient_evals_per_step: ``(**options) -> float``, gradient evaluations per
        step averaged over steps (an HVP counts 2); options it does not use are
        ignored.
      logged_fields: state fields beyond :data:`BASE_FIELDS` that engines log
        (each a float32 scalar of the state; the state type lists them too, as its
        ``logged_fields`` class attribute, so :func:`family_stats` finds them).
      update_inputs: names from :data:`ENGINE_INPUTS` the transform's ``update``
        accepts as keyword arguments (an engine passes those it can provide).
      engine_options: option names an engine fills in from what it knows when
        the user did not set them (e.g. ``("steps_per_epoch",)``).
      step_picker: for algorithms with two kinds of steps (an expensive and a
        cheap one): ``(**options) -> (count -> bool)``, the in-graph rule on the
        state's count before the step, for an engine that compiles both kinds and
        picks one per step on the host. None for one kind of step.
      step_kind_arg: the ``update`` keyword that receives the picked kind (a
        Python bool, which removes the in-graph ``lax.cond``); None with no picker.
      options_help: one line on the options a user sets as ``key=value`` in a
        phase (``--phases`` help is generated from it); empty: the factory's
        keyword names are listed.
    """

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    title: str = ""
    gradient_evals_per_step: Callable[..., float] = _two_evals
    logged_fields: tuple = ()
    update_inputs: tuple = ()
    engine_options: tuple = ()
    step_picker: Optional[Callable[..., Callable[[int], bool]]] = None
    step_kind_arg: Optional[str] = None
    options_help: str = ""

    @classmethod
    def from_factory(cls, name: str, factory) -> "Algorithm":
        """A declaration for a bare factory registered by name only, read from the
        attributes it may carry (``gradient_evals_per_step``, ``engine_options``,
        ``step_picker``, ``step_kind_arg``, ``logged_fields``, ``update_inputs``);
        missing ones take the defaults (cost 2, one kind of step)."""
        return cls(
            name=name, factory=factory, title=name,
            gradient_evals_per_step=getattr(factory, "gradient_evals_per_step", _two_evals),
            logged_fields=tuple(getattr(factory, "logged_fields", ())),
            update_inputs=tuple(getattr(factory, "update_inputs", ())),
            engine_options=tuple(getattr(factory, "engine_options", ())),
            step_picker=getattr(factory, "step_picker", None),
            step_kind_arg=getattr(factory, "step_kind_arg", None))


def is_family_state(x) -> bool:
    """Whether ``x`` is the state of a family member: a NamedTuple with the
    :data:`BASE_FIELDS` (duck-typed, so a user's variant is found too)."""
    fields = getattr(type(x), "_fields", None)
    return isinstance(x, tuple) and fields is not None and all(f in fields for f in BASE_FIELDS)


def family_stats(state) -> dict:
    """The logged fields of a family state: :data:`BASE_FIELDS` plus the state
    type's own ``logged_fields`` (a class attribute, e.g. Eigen-SAM's eigenvalue)."""
    names = BASE_FIELDS + tuple(getattr(type(state), "logged_fields", ()))
    return {name: getattr(state, name) for name in names}


# ---------------------------------------------------------------------------
# Pytree arithmetic used by every rule.
# ---------------------------------------------------------------------------


def _accumulation_dtype(x) -> jnp.dtype:
    # Sum squares in at least float32 (bf16 params), keep float64 when enabled.
    return jnp.promote_types(x.dtype, jnp.float32)


def tree_vdot(a: Updates, b: Updates) -> jax.Array:
    """Inner product ``<a, b>`` of two pytrees with the same structure."""
    products = jax.tree.map(
        lambda x, y: jnp.sum(x.astype(_accumulation_dtype(x)) * y.astype(_accumulation_dtype(x))),
        a,
        b,
    )
    leaves = jax.tree.leaves(products)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return sum(leaves[1:], leaves[0])


def tree_norm(tree: Updates) -> jax.Array:
    """Euclidean norm of a pytree (all leaves flattened into one vector)."""
    return jnp.sqrt(tree_vdot(tree, tree))


def tree_scale(scalar, tree: Updates) -> Updates:
    """``scalar * tree`` leafwise, keeping each leaf's dtype."""
    return jax.tree.map(lambda x: (scalar * x).astype(x.dtype), tree)


def tree_add(a: Updates, b: Updates) -> Updates:
    """``a + b`` leafwise, in ``a``'s dtypes (``a`` is usually the params)."""
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def safe_inverse_norm(norm: jax.Array, eps) -> jax.Array:
    """``1 / (norm + eps)``, and 0 where ``norm == 0``.

    The ``norm > 0`` guard is what makes a zero gradient give a zero perturbation
    even with ``eps = 0`` (google-research/sam and optax.contrib divide by the bare
    norm and return NaN there, optax PR #1743).
    """
    positive = norm > 0
    return jnp.where(positive, 1.0 / jnp.where(positive, norm + eps, 1.0), 0.0)


def normalized(tree: Updates, eps) -> tuple[Updates, jax.Array]:
    """``(tree / (||tree|| + eps), ||tree||)``, with 0 for a zero tree (never NaN)."""
    norm = tree_norm(tree)
    return tree_scale(safe_inverse_norm(norm, eps), tree), norm


def gradient_at(
    grad_fn: GradFn, params: Params, epsilon: Updates, like: Updates, axis_name=None
) -> Updates:
    """``grad_fn(params + epsilon)`` on each device, cast to the dtypes of ``like``.

    With ``axis_name`` the point is marked per-device (:func:`as_per_device`), so the
    result is the local gradient even when params and epsilon are replicated.
    """
    perturbed = grad_fn(as_per_device(tree_add(params, epsilon), axis_name))
    return jax.tree.map(lambda g, ref: g.astype(ref.dtype), perturbed, like)


# In-graph curvature tools used by several members (Eigen-SAM, EGR) and by
# `sam_jax.curvature` (its `hvp` is this one).


def hessian_vector_product(grad_fn: GradFn, params, vector, axis_name=None):
    """``H v`` by forward-over-reverse: the JVP of ``grad_fn`` at ``params`` along ``v``.

    With ``axis_name`` (inside ``shard_map`` / ``pmap``) it is each device's own
    ``H v``; average it with ``pmean`` for the global batch's.
    """
    tangent = jax.tree.map(lambda p, v: v.astype(p.dtype), params, vector)
    point, tangent = as_per_device((params, tangent), axis_name)
    return jax.jvp(grad_fn, (point,), (tangent,))[1]


# Added to ||Hv||^2 before the square root in each power-iteration normalization,
# as in Eigen-SAM's released code (RitianLuo/EigenSAM).
POWER_ITERATION_EPS = 1e-12


def warm_power_iteration(grad_fn: GradFn, params, start, num_iters, axis_name=None):
    """Warm-started, fixed-length power iteration on the Hessian of ``grad_fn``'s loss.

    The in-graph tool an optimizer uses (Eigen-SAM refreshes its eigenvector from
    the previous one). Not to be confused with ``sam_jax.curvature.power_iteration``,
    the host-side measurement (random start, deflation for top-k, stopping rule).

    Each iteration: ``Hv`` (device-averaged when ``axis_name`` is given),
    ``lambda = <v, Hv>``, ``v <- Hv / sqrt(||Hv||^2 + 1e-12)`` (Eigen-SAM's code).

    Args:
      grad_fn: ``params -> grads`` of the loss whose Hessian is wanted.
      params: the point.
      start: starting vector (pytree like params), ideally unit norm.
      num_iters: number of HVPs; a Python int unrolls the loop (XLA:CPU runs
        convolutions inside while bodies far slower), a traced one uses a while loop.
      axis_name: average ``Hv`` over this mapped axis (Hessian of the global batch).

    Returns:
      ``(v, eigenvalue)``: the new unit vector and the Rayleigh quotient of the last
      iteration's input vector. Power iteration finds the eigenvalue of largest
      *magnitude*, which may be negative away from a minimum.
    """

    def body(_, carry):
        v, _ = carry
        hv = mean_over_devices(hessian_vector_product(grad_fn, params, v, axis_name), axis_name)
        eigenvalue = tree_vdot(v, hv).astype(jnp.float32)
        norm = jnp.sqrt(tree_vdot(hv, hv) + POWER_ITERATION_EPS)
        new_v = jax.tree.map(lambda h, old: (h / norm).astype(old.dtype), hv, v)
        return new_v, eigenvalue

    init = (start, jnp.zeros((), jnp.float32))
    if static_value(num_iters) is not None:
        # Unrolled: XLA:CPU runs convolutions inside while-loop bodies 20-50x slower
        # than at top level (jax-ml/jax#12868); a handful of HVPs compile fine unrolled.
        return jax.lax.fori_loop(0, int(num_iters), body, init, unroll=True)
    return jax.lax.fori_loop(0, num_iters, body, init)


# ---------------------------------------------------------------------------
# Multi-device helpers (docs/ARCHITECTURE.md, "Optimizers").
# ---------------------------------------------------------------------------


def mean_over_devices(tree, axis_name: Optional[str]):
    """``pmean`` over ``axis_name``, or the identity when it is ``None``."""
    if axis_name is None:
        return tree
    return jax.lax.pmean(tree, axis_name=axis_name)


def _varying_axes(x) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty elsewhere)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "mat", None)  # jax >= 0.9: manual axis type
    if manual is not None and hasattr(manual, "varying"):
        return frozenset(manual.varying)
    return frozenset(getattr(aval, "vma", ()))  # older jax


def as_per_device(tree, axis_name: Optional[str]):
    """Mark ``tree`` as varying over ``axis_name`` so that gradients taken at it stay local.

    Inside ``jax.shard_map`` (``check_vma=True``, the default) JAX *sums* over devices
    the gradient with respect to a replicated input. Evaluating ``grad_fn`` at
    ``pcast(point, to="varying")`` instead returns each device's own gradient, which
    is what the contract averages with ``pmean``. Leaves already varying are left
    alone; under ``jax.pmap`` or ``check_vma=False`` the cast is a no-op.
    """
    if axis_name is None:
        return tree
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

    def cast(x):
        varying = _varying_axes(x)
        missing = tuple(a for a in axes if a not in varying)
        if not missing:
            return x
        return jax.lax.pcast(x, missing if len(missing) > 1 else missing[0], to="varying")

    return jax.tree.map(cast, tree)


def ascent_gradient(grads: Updates, axis_name: Optional[str], sync_perturbation: bool) -> Updates:
    """The gradient the perturbation is computed from.

    Synced epsilon averages it over devices first (the global-batch ascent direction);
    per-device epsilon (m-sharpness, the default of google-research/sam) keeps the
    local one.
    """
    if sync_perturbation:
        return mean_over_devices(grads, axis_name)
    return grads


# ---------------------------------------------------------------------------
# rho == 0 pass-through.
# ---------------------------------------------------------------------------


def static_value(x) -> Optional[float]:
    """The Python value of a concrete scalar, ``None`` for a tracer (e.g. an injected rho)."""
    try:
        return float(x)
    except (jax.errors.ConcretizationTypeError, TypeError):
        return None


_NONZERO_RHO = threading.local()


@contextlib.contextmanager
def assume_nonzero_rho():
    """While tracing a step that its caller knows has ρ > 0 (a training engine passing
    ρ as a traced value to share one compiled step across ρ values), a traced ρ takes
    the perturbed branch without the ``ρ == 0`` ``lax.cond`` of `select_on_rho`.

    Why: XLA:CPU runs convolutions inside a ``cond`` body far slower than at top level
    (jax-ml/jax#12868). Safe even if misused: at ρ = 0 the perturbed branch evaluates
    the gradient at ``θ + 0 = θ``, the same values, at the cost of a second gradient.
    """
    previous = getattr(_NONZERO_RHO, "on", False)
    _NONZERO_RHO.on = True
    try:
        yield
    finally:
        _NONZERO_RHO.on = previous


def select_on_rho(rho, grads: Updates, perturbed: Callable[[], Updates]) -> Updates:
    """``grads`` when ``rho == 0`` (untouched, bit for bit), ``perturbed()`` otherwise.

    A concrete ``rho`` decides in Python, so the compiled step carries no branch;
    a traced ``rho`` (``optax.inject_hyperparams``) uses ``lax.cond``, so the second
    gradient is not even computed on steps where the schedule gives 0 — unless the
    caller traces under `assume_nonzero_rho`.
    """
    value = static_value(rho)
    if value is not None:
        return grads if value == 0.0 else perturbed()
    if getattr(_NONZERO_RHO, "on", False):
        return perturbed()
    return jax.lax.cond(jnp.asarray(rho) == 0, lambda: grads, perturbed)


def check_rho(rho, name: str = "rho") -> None:
    """Refuses a ``rho`` that is not a number, or a concrete one that is negative or
    not finite; traced values (``optax.inject_hyperparams``, a ρ the engine passes
    as a traced scalar) and schedules (callables) pass through unchecked.

    Raises:
      TypeError: ``rho`` is a string, None or a bool.
      ValueError: a concrete ``rho`` < 0, NaN or infinite.
    """
    if callable(rho):
        return
    if rho is None or isinstance(rho, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number (the perturbation radius, e.g. 0.05), "
                        f"got {rho!r} of type {type(rho).__name__}")
    try:
        value = static_value(rho)
    except ValueError:  # e.g. a NumPy string scalar
        raise TypeError(f"{name} must be a number (the perturbation radius, e.g. 0.05), "
                        f"got {rho!r}") from None
    if value is not None and (not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {rho!r}")


def check_param_dtypes(params, name: str = "sam") -> None:
    """TypeError naming the first parameter that is not floating point.

    SAM-family transforms step along ``g / ||g||``; integer or boolean parameters
    cannot move along it (and their gradients are ``float0``). Floating parameters
    of any width work: norms and inner products accumulate in at least float32
    (bfloat16 / float16 parameters), and each leaf keeps its dtype.
    """
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            continue
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{name}: parameter {jax.tree_util.keystr(path) or '(root)'} has dtype "
                f"{jnp.dtype(dtype).name}; SAM-family optimizers need floating-point "
                "parameters (float32, bfloat16, float16 or float64): keep integer "
                "state out of the optimized tree (e.g. a separate Flax collection)")


def check_axis_name(axis_name) -> None:
    if axis_name is not None and not isinstance(axis_name, (str, tuple)):
        raise ValueError(f"axis_name must be None, a str or a tuple of str, got {axis_name!r}")


# ---------------------------------------------------------------------------
# The transform factory.
# ---------------------------------------------------------------------------

# perturb(ascent_grads, params, state, grad_fn, extra_args) -> (epsilon, extra_state_fields)
PerturbFn = Callable[..., tuple[Updates, dict]]
# evaluate(grads, params, epsilon, ascent_grads, grad_fn, axis_name) -> updates
EvaluateFn = Callable[..., Updates]


def default_evaluate(grads, params, epsilon, ascent_grads, grad_fn, axis_name=None):
    """The SAM evaluation: the local gradient at the perturbed point."""
    del ascent_grads
    return gradient_at(grad_fn, params, epsilon, like=grads, axis_name=axis_name)


def perturbation_transform(
    perturb: PerturbFn,
    rho,
    *,
    axis_name: Optional[str] = None,
    sync_perturbation: bool = True,
    state_type: type = PerturbationState,
    init_extra: Optional[Callable[[Params], dict]] = None,
    evaluate: EvaluateFn = default_evaluate,
    evaluate_fields: tuple = (),
    per_device_fields: tuple = (),
    name: str = "sam",
) -> optax.GradientTransformationExtraArgs:
    """Build a SAM-family transform from a perturbation rule.

    Args:
      perturb: ``perturb(ascent_grads, params, state, grad_fn, extra_args) ->
        (epsilon, extra_fields)``; ``epsilon`` may be None for a member that
        evaluates no perturbed point (EGR's ``mode="hvp"``; its ``evaluate`` then
        gets None); ``extra_fields`` updates the variant's own state
        fields (e.g. Eigen-SAM's eigenvector) and may carry ``"perturbation_norm"``
        in closed form (otherwise ``||epsilon||`` is computed).
      rho: perturbation radius (a number, or a traced scalar under
        ``optax.inject_hyperparams``). ``rho == 0`` returns the incoming gradient.
      axis_name: ``None`` (single device, or global arrays under ``jax.jit``), or the
        mapped axis inside ``jax.shard_map`` / ``jax.pmap``; the returned gradient is
        then ``pmean``-ed over it.
      sync_perturbation: with ``axis_name``, compute epsilon from the device-averaged
        gradient (True) or from each device's own gradient (False, m-sharpness).
      state_type: NamedTuple with at least ``count``, ``grad_norm``,
        ``perturbation_norm``, plus the fields ``init_extra`` returns.
      init_extra: ``params -> dict`` of the variant's own initial state fields.
      evaluate: ``evaluate(grads, params, epsilon, ascent_grads, grad_fn,
        axis_name) -> updates``, how the perturbed point becomes the output
        gradient (before the ``pmean``); by default ``grad_fn(params + epsilon)``.
      evaluate_fields: state fields that ``evaluate`` computes (e.g. LookSAM's
        stored direction). When given, ``evaluate`` takes two more arguments,
        ``state`` and ``extra_args``, and returns ``(updates, fields)``; with
        ``rho == 0`` the fields keep their values.
      per_device_fields: scalar fields from ``perturb`` that depend on the local
        gradient; averaged over devices in per-device mode so that the state
        stays replicated (e.g. Eigen-SAM's ``eigen_cosine``).
      name: the variant's name, for error messages.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
      ``grad_fn`` (required) as a keyword argument; other keyword arguments are
      passed to ``perturb`` as ``extra_args``.
    """
    check_rho(rho)
    check_axis_name(axis_name)

    def init_fn(params):
        from sam_jax.optim.multisteps import refuse_inside_multisteps

        refuse_inside_multisteps(name)  # optax.MultiSteps around us is wrong for SAM
        check_param_dtypes(params, name)
        extra = init_extra(params) if init_extra is not None else {}
        zero = jnp.zeros((), jnp.float32)
        return state_type(
            count=jnp.zeros((), jnp.int32), grad_norm=zero, perturbation_norm=zero, **extra
        )

    def update_fn(updates, state, params=None, *, grad_fn: Optional[GradFn] = None, **extra_args):
        if params is None:
            raise ValueError(f"{name}.update needs params (the point the gradient was taken at).")
        if grad_fn is None:
            raise ValueError(
                f"{name}.update needs grad_fn=..., a function params -> grads of the same "
                "minibatch, e.g. tx.update(grads, state, params, grad_fn=grad_fn)."
            )
        check_param_dtypes(params, name)
        ascent = ascent_gradient(updates, axis_name, sync_perturbation)
        epsilon, extra_fields = perturb(ascent, params, state, grad_fn, extra_args)
        if evaluate_fields:
            kept = {k: getattr(state, k) for k in evaluate_fields}
            out, evaluated = select_on_rho(
                rho, (updates, kept),
                lambda: evaluate(updates, params, epsilon, ascent, grad_fn, axis_name,
                                 state, extra_args))
            extra_fields = {**extra_fields, **evaluated}
        else:
            out = select_on_rho(
                rho, updates, lambda: evaluate(updates, params, epsilon, ascent, grad_fn, axis_name)
            )
        out = mean_over_devices(out, axis_name)

        # A rule may give ||epsilon|| in closed form (saves a pass over the params).
        perturbation_norm = extra_fields.pop("perturbation_norm", None)
        if perturbation_norm is None:
            perturbation_norm = 0.0 if epsilon is None else tree_norm(epsilon)
        stats = {
            "grad_norm": tree_norm(ascent).astype(jnp.float32),
            "perturbation_norm": jnp.asarray(perturbation_norm).astype(jnp.float32),
        }
        # Per-device quantities differ across devices; average the logged scalars so
        # the optimizer state stays replicated (its out_specs can stay P()).
        scalar_fields = {k: v for k, v in extra_fields.items() if k in per_device_fields}
        stats.update(scalar_fields)
        if axis_name is not None and not sync_perturbation:
            stats = mean_over_devices(stats, axis_name)
        extra_fields = {**extra_fields, **stats}
        new_state = state._replace(
            count=optax.safe_increment(state.count), **extra_fields
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)

