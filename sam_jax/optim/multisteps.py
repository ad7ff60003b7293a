"""Gradient accumulation that is right for the SAM family.

``optax.MultiSteps(optax.chain(sam(rho), optax.sgd(lr)), k)`` is wrong for SAM:
MultiSteps hands the inner chain the running mean of the incoming gradients and
the ``grad_fn`` of the *current* microbatch only, so its final step returns
``grad L_k(w + rho * g_mean / ||g_mean||)``, the last microbatch's gradient at the
averaged ascent point: neither full-batch SAM nor the mean of per-microbatch SAM
gradients. Every family member therefore refuses, in ``init``, to be wrapped by
``optax.MultiSteps`` with more than one mini-step (:func:`refuse_inside_multisteps`).

What works is to put the accumulation *after* the perturbation::

  tx = sam_jax.optim.accumulate(sam_jax.sam(rho), optax.sgd(lr, momentum=0.9), k)
  # = optax.chain(sam_jax.sam(rho), optax.MultiSteps(optax.sgd(lr, momentum=0.9), k))

Call ``tx.update(g_j, state, params, grad_fn=grad_fn_j)`` once per microbatch
``j`` with that microbatch's gradient and ``grad_fn``: the perturbation runs per
microbatch (``epsilon_j = rho * g_j / ||g_j||``, m-sharpness with m = the microbatch
size), and the base optimizer steps every ``k`` calls from
``mean_j grad L_j(w + epsilon_j)`` (the other calls return zero updates, so the
params stay at ``w`` while the microbatches are visited). The transform's state
(``count``, logged norms) advances once per microbatch.
"""
from __future__ import annotations

import sys

import optax

_MULTISTEPS_INIT = "MultiSteps.init"


def accumulate(perturbation: optax.GradientTransformation, base: optax.GradientTransformation,
               every_k: int) -> optax.GradientTransformationExtraArgs:
    """Per-microbatch perturbation, base optimizer every ``every_k`` microbatches.

    Args:
      perturbation: a SAM-family transform (``sam_jax.sam(rho)``, ...).
      base: the base optimizer (e.g. ``optax.sgd(lr, momentum)``); it sees the mean
        over the ``every_k`` microbatches of the perturbation's outputs.
      every_k: microbatches per optimizer step (>= 1).

    Returns:
      ``optax.chain(perturbation, optax.MultiSteps(base, every_k))``; pass
      ``grad_fn=`` of the current microbatch to ``update``.
    """
    if int(every_k) != every_k or every_k < 1:
        raise ValueError(f"every_k must be a positive integer, got {every_k!r}")
    return optax.chain(perturbation,
                       optax.MultiSteps(base, int(every_k)).gradient_transformation())


def refuse_inside_multisteps(name: str) -> None:
    """ValueError when called (from a family member's ``init``) under the ``init``
    of an ``optax.MultiSteps`` that accumulates more than one mini-step.

    A best-effort check on the Python call stack: it finds ``optax.MultiSteps``
    itself (any nesting of ``chain`` etc. between them), not other accumulation
    wrappers. ``every_k_schedule`` functions are called at step 0 to read k.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if (getattr(code, "co_qualname", code.co_name) == _MULTISTEPS_INIT
                and "optax" in code.co_filename):
            wrapper = frame.f_locals.get("self")
            k = None
            try:
                k = int(wrapper._every_k_schedule(0))
            except Exception:  # noqa: BLE001  (unreadable schedule: refuse)
                pass
            if k == 1:
                return
            raise ValueError(
                f"{name} inside optax.MultiSteps computes the wrong gradient: MultiSteps "
                "gives it the mean of the microbatch gradients with the grad_fn of the "
                "last microbatch only (neither full-batch SAM nor the mean of "
                "per-microbatch SAM gradients). Accumulate after the perturbation "
                "instead: sam_jax.optim.accumulate(perturbation, base_optimizer, k), i.e. "
                "optax.chain(perturbation, optax.MultiSteps(base_optimizer, k)) "
                "(docs/optim.md, 'Gradient accumulation').")
        frame = frame.f_back
