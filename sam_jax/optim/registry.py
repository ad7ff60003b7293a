"""Build SAM-family transforms by name, find their state, count their cost."""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax

from sam_jax.optim import _core
from sam_jax.optim._core import PerturbationState
from sam_jax.optim.asam import asam
from sam_jax.optim.egr import EGRState, egr
from sam_jax.optim.eigen_sam import EigenSAMState, eigen_sam
from sam_jax.optim.reverse_sam import reverse_sam
from sam_jax.optim.sam import sam
from sam_jax.optim.usam import usam

STATE_TYPES = (PerturbationState, EigenSAMState, EGRState)


def _identity(rho=0.0, *, axis_name=None, sync_perturbation=True, **kwargs):
    """Plain SGD's "perturbation": the gradient passes through; ``grad_fn`` is ignored.

    Takes the same multi-device options as the SAM family so that a training loop can
    treat every phase alike: with ``axis_name`` the gradient is ``pmean``-ed (plain
    data parallelism); ``sync_perturbation`` has nothing to act on.
    """
    del rho, sync_perturbation
    if kwargs:
        raise ValueError(f"'sgd' takes no options besides axis_name, got {sorted(kwargs)}")
    _core.check_axis_name(axis_name)
    if axis_name is None:
        return optax.with_extra_args_support(optax.identity())

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        return _core.mean_over_devices(updates, axis_name), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


PERTURBATIONS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    "sgd": _identity,
    "sam": sam,
    "usam": usam,
    "asam": asam,
    "reverse_sam": reverse_sam,
    "eigen_sam": eigen_sam,
    "egr": egr,
}


def make_perturbation(name: str, rho=0.05, **kwargs) -> optax.GradientTransformationExtraArgs:
    """The perturbation transform called ``name`` with radius ``rho``.

    Args:
      name: one of ``sgd`` (identity), ``sam``, ``usam``, ``asam``, ``reverse_sam``,
        ``eigen_sam``, ``egr``.
      rho: perturbation radius (ignored by ``sgd``).
      **kwargs: the variant's own options (e.g. ``alpha=`` for ``eigen_sam``,
        ``axis_name=``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` to chain before a base optimizer;
      every one of them accepts ``grad_fn=`` in ``update``.

    Raises:
      ValueError: unknown name, or an option the variant does not take.
    """
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
    try:
        return PERTURBATIONS[name](rho, **kwargs)
    except TypeError as err:  # unexpected keyword: say which variant refused it
        raise ValueError(f"bad options for {name!r}: {err}") from None


def gradient_evals_per_step(name: str, **kwargs) -> float:
    """Gradient evaluations one step of ``name`` costs, averaged over steps.

    An HVP counts as 2. ``sgd``: 1; ``sam``, ``usam``, ``asam``, ``reverse_sam``: 2;
    ``egr``: 2 (finite difference) or 3 (``mode="hvp"``); a factory that declares
    ``gradient_evals_per_step`` (an attribute) gives its own, e.g. ``eigen_sam``:
    ``2 + 2 * power_iters / refresh_every`` on the global counter (defaults 5 and
    100: 2.1), ``2 + 2 * power_iters * floor((steps_per_epoch - 1) / refresh_every)
    / steps_per_epoch`` on the per-epoch counter (the default when
    ``steps_per_epoch`` is given).

    Args:
      name: as in :func:`make_perturbation`.
      **kwargs: the options that change the cost (``mode``, ``power_iters``,
        ``refresh_every``, ``steps_per_epoch``, ``refresh_counter``); others are
        ignored.
    """
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
    if name == "sgd":
        return 1.0
    if name == "egr":
        return 3.0 if kwargs.get("mode", "finite_difference") == "hvp" else 2.0
    declared = getattr(PERTURBATIONS[name], "gradient_evals_per_step", None)
    if declared is not None:
        return float(declared(**kwargs))
    return 2.0


def engine_kwargs(name: str, kwargs: dict, **context) -> dict:
    """``kwargs`` plus what the engine knows and the transform asks for.

    A factory may declare ``engine_options`` (an attribute: a tuple of option names,
    e.g. Eigen-SAM's ``("steps_per_epoch",)``); each declared option that ``kwargs``
    does not set is taken from ``context`` (e.g. ``steps_per_epoch=195``) when
    there. Options the user set always win.
    """
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
    wanted = getattr(PERTURBATIONS[name], "engine_options", ())
    extra = {k: context[k] for k in wanted
             if k not in kwargs and context.get(k) is not None}
    return {**kwargs, **extra}


def step_picker(name: str, **kwargs) -> Callable[[int], bool] | None:
    """A host-side ``count -> bool`` choosing between two compiled step kinds.

    For transforms whose steps differ in cost (Eigen-SAM: a refresh step and a plain
    one) and that declare ``step_picker`` (an attribute building it from the
    transform's options); None for all others. ``count`` is the transform's state
    count before the step; the answer is what the in-graph schedule would do.
    """
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
    build = getattr(PERTURBATIONS[name], "step_picker", None)
    return None if build is None else build(**kwargs)


def perturbation_stats(opt_state) -> dict[str, jax.Array]:
    """What to log from the first SAM-family state found inside ``opt_state``.

    Searches any nesting of optax states (``chain``, ``inject_hyperparams``,
    ``MultiSteps``, ...).

    Args:
      opt_state: an optax optimizer state.

    Returns:
      ``{"grad_norm", "perturbation_norm", "count"}`` plus ``"eigenvalue"`` and
      ``"eigen_cosine"`` for Eigen-SAM, and ``"rho"`` when an enclosing
      ``inject_hyperparams`` state holds it; ``{}`` when there is no SAM-family
      state (e.g. plain SGD).
    """
    is_ours = lambda x: isinstance(x, STATE_TYPES)  # noqa: E731
    is_injected = lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)  # noqa: E731
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: is_ours(x) or is_injected(x)):
        if is_injected(node):
            inner = perturbation_stats(node.inner_state)
            if inner and "rho" in node.hyperparams:
                inner["rho"] = node.hyperparams["rho"]
            if inner:
                return inner
        elif is_ours(node):
            stats = {
                "grad_norm": node.grad_norm,
                "perturbation_norm": node.perturbation_norm,
                "count": node.count,
            }
            if isinstance(node, EigenSAMState):
                stats["eigenvalue"] = node.eigenvalue
                stats["eigen_cosine"] = node.eigen_cosine
            return stats
    return {}
