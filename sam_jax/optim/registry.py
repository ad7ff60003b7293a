"""The SAM family by name: collects each member's `Algorithm` declaration.

Every algorithm declares itself in its own module (``ALGORITHM``, a
:class:`sam_jax.optim._core.Algorithm`: factory, cost, logged fields, extra
``update`` inputs, engine options, step picker); this module only collects the
declarations and answers questions about them by name, so that a training engine
names no algorithm. Adding a variant: write its module with an ``ALGORITHM`` and
add it to :data:`ALGORITHMS` here (or call :func:`register` from your own code).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import optax

from sam_jax.optim import _core
from sam_jax.optim._core import Algorithm
from sam_jax.optim.asam import ALGORITHM as _ASAM
from sam_jax.optim.egr import ALGORITHM as _EGR
from sam_jax.optim.eigen_sam import ALGORITHM as _EIGEN_SAM
from sam_jax.optim.gsam import ALGORITHM as _GSAM
from sam_jax.optim.identity import ALGORITHM as _SGD
from sam_jax.optim.looksam import ALGORITHM as _LOOKSAM
from sam_jax.optim.reverse_sam import ALGORITHM as _REVERSE_SAM
from sam_jax.optim.sam import ALGORITHM as _SAM
from sam_jax.optim.usam import ALGORITHM as _USAM

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a for a in (_SGD, _SAM, _USAM, _ASAM, _REVERSE_SAM, _EIGEN_SAM, _EGR, _GSAM, _LOOKSAM)
}

# name -> factory. Code may add a bare factory here (declarations are then read from
# its attributes, see `Algorithm.from_factory`); `register` adds a full declaration.
PERTURBATIONS: dict[str, Callable[..., optax.GradientTransformationExtraArgs]] = {
    name: declared.factory for name, declared in ALGORITHMS.items()
}

def register(algorithm: Algorithm) -> None:
    """Make ``algorithm`` available by its name (replaces one of the same name)."""
    ALGORITHMS[algorithm.name] = algorithm
    PERTURBATIONS[algorithm.name] = algorithm.factory


def algorithm(name: str) -> Algorithm:
    """The declaration of ``name``.

    Raises:
      ValueError: unknown name.
    """
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; choose from {sorted(PERTURBATIONS)}")
    factory = PERTURBATIONS[name]
    declared = ALGORITHMS.get(name)
    if declared is not None and declared.factory is factory:
        return declared
    return Algorithm.from_factory(name, factory)


def make_perturbation(name: str, rho=0.05, **kwargs) -> optax.GradientTransformationExtraArgs:
    """The perturbation transform called ``name`` with radius ``rho``.

    Args:
      name: a registered name: ``sgd`` (identity), ``sam``, ``usam``, ``asam``,
        ``reverse_sam``, ``eigen_sam``, ``egr``, ``gsam``, ``looksam``, ...
      rho: perturbation radius (ignored by ``sgd``).
      **kwargs: the variant's own options (e.g. ``alpha=`` for ``eigen_sam``,
        ``axis_name=``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` to chain before a base optimizer;
      every one of them accepts ``grad_fn=`` in ``update``.

    Raises:
      ValueError: unknown name, or an option the variant does not take.
    """
    factory = algorithm(name).factory
    try:
        return factory(rho, **kwargs)
    except TypeError as err:  # unexpected keyword: say which variant refused it
        raise ValueError(f"bad options for {name!r}: {err}") from None


def gradient_evals_per_step(name: str, **kwargs) -> float:
    """Gradient evaluations one step of ``name`` costs, averaged over steps.

    The algorithm's own declaration (an HVP counts as 2): ``sgd``: 1; ``sam``,
    ``usam``, ``asam``, ``reverse_sam``, ``gsam``: 2; ``egr``: 2 (finite
    difference) or 3 (``mode="hvp"``); ``eigen_sam``: ``2 + 2 * power_iters /
    refresh_every`` on the global counter (defaults 5 and 100: 2.1), ``2 + 2 *
    power_iters * floor((steps_per_epoch - 1) / refresh_every) / steps_per_epoch`` on
    the per-epoch counter; ``looksam``: ``1 + 1 / k``.

    Args:
      name: as in :func:`make_perturbation`.
      **kwargs: the options that change the cost; others are ignored.
    """
    return float(algorithm(name).gradient_evals_per_step(**kwargs))


def engine_kwargs(name: str, kwargs: dict, **context) -> dict:
    """``kwargs`` plus what the engine knows and the transform asks for.

    An algorithm may declare ``engine_options`` (option names, e.g. Eigen-SAM's
    ``("steps_per_epoch",)``); each declared option that ``kwargs`` does not set is
    taken from ``context`` (e.g. ``steps_per_epoch=195``) when there. Options the
    user set always win.
    """
    wanted = algorithm(name).engine_options
    extra = {k: context[k] for k in wanted
             if k not in kwargs and context.get(k) is not None}
    return {**kwargs, **extra}


def step_picker(name: str, **kwargs) -> Callable[[int], bool] | None:
    """A host-side ``count -> bool`` choosing between two compiled step kinds.

    For algorithms whose steps differ in cost (Eigen-SAM: a refresh step and a plain
    one; LookSAM: a full SAM step and a cheap one) and that declare a
    ``step_picker``; None for all others. ``count`` is the transform's state count
    before the step; the answer is what the in-graph schedule would do, and is
    passed to ``update`` as the keyword :func:`step_kind_arg`.
    """
    build = algorithm(name).step_picker
    return None if build is None else build(**kwargs)


def step_kind_arg(name: str) -> str | None:
    """The ``update`` keyword that takes the kind picked by :func:`step_picker`."""
    return algorithm(name).step_kind_arg


# Keywords every member takes that are not a user's phase option (the engine sets
# the multi-device ones; rho has its own phase field).
_NOT_PHASE_OPTIONS = ("rho", "axis_name", "sync_perturbation")


def phase_options(name: str) -> str:
    """What a user can set as ``key=value`` in a ``name`` phase: the declared
    ``options_help``, else the factory's keyword names ("" when none)."""
    declared = algorithm(name)
    if declared.options_help:
        return declared.options_help
    try:
        parameters = inspect.signature(declared.factory).parameters.values()
    except (TypeError, ValueError):  # a builtin or odd callable: nothing to list
        return ""
    return ", ".join(p.name for p in parameters
                     if p.name not in _NOT_PHASE_OPTIONS
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def phases_help() -> str:
    """One line per registered algorithm, ``name (Title): options``, generated from
    the declarations (the training CLI's ``--phases`` help)."""
    lines = []
    for name in sorted(PERTURBATIONS):
        declared = algorithm(name)
        title = f" ({declared.title})" if declared.title and declared.title != name else ""
        options = phase_options(name)
        lines.append(f"{name}{title}: {options or 'no options'}")
    return "; ".join(lines)


def perturbation_stats(opt_state) -> dict[str, jax.Array]:
    """What to log from the first SAM-family state found inside ``opt_state``.

    Searches any nesting of optax states (``chain``, ``inject_hyperparams``,
    ``MultiSteps``, ...). A family state is any NamedTuple with ``count``,
    ``grad_norm`` and ``perturbation_norm``; its type's ``logged_fields`` class
    attribute names what else it logs.

    Args:
      opt_state: an optax optimizer state.

    Returns:
      ``{"grad_norm", "perturbation_norm", "count"}`` plus the state's own logged
      fields (e.g. ``"eigenvalue"`` and ``"eigen_cosine"`` for Eigen-SAM), and
      ``"rho"`` when an enclosing ``inject_hyperparams`` state holds it; ``{}`` when
      there is no SAM-family state (e.g. plain SGD).
    """
    is_ours = _core.is_family_state
    is_injected = lambda x: isinstance(x, optax.InjectStatefulHyperparamsState)  # noqa: E731
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: is_ours(x) or is_injected(x)):
        if is_injected(node):
            inner = perturbation_stats(node.inner_state)
            if inner and "rho" in node.hyperparams:
                inner["rho"] = node.hyperparams["rho"]
            if inner:
                return inner
        elif is_ours(node):
            return _core.family_stats(node)
    return {}
