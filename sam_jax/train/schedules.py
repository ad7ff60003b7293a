"""Learning-rate schedules on the global step.

Every schedule is a pure function ``step -> lr`` of the *global* step (counted from
epoch 0 of the whole phase list), so a phase switch, a resume or a run branched
from another run's checkpoint at epoch N all see the same learning rate as the
uninterrupted run (late-phase SAM code: the schedule runs on the global epoch).
"""
from __future__ import annotations

import math
from typing import Callable

# Late-phase SAM code, WRN schedule (papers.md §2): lr × 1 for epoch < 0.3T,
# × 0.2 until 0.6T, then × 0.04.
WRN_STEP_BOUNDARIES = (0.3, 0.6)
WRN_STEP_FACTORS = (1.0, 0.2, 0.04)


def cosine(lr: float, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Cosine decay from ``lr`` to 0 over ``total_steps`` (after a linear warm-up).

    Args:
      lr: peak learning rate.
      total_steps: steps of the whole run (all phases).
      warmup_steps: linear warm-up from 0 (0 in the papers' code).

    Returns:
      ``step -> lr`` (a Python float).
    """
    _check(lr, total_steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * lr * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return schedule


def wrn_step(lr: float, total_steps: int, steps_per_epoch: int, warmup_steps: int = 0,
             boundaries: tuple[float, ...] = WRN_STEP_BOUNDARIES,
             factors: tuple[float, ...] = WRN_STEP_FACTORS) -> Callable[[int], float]:
    """The WRN step schedule of the late-phase SAM code on the global epoch.

    lr × 1 while ``epoch < 0.3 T``, × 0.2 while ``epoch < 0.6 T``, then × 0.04,
    where ``epoch = step // steps_per_epoch`` and ``T = total_steps / steps_per_epoch``.

    Args:
      lr: base learning rate.
      total_steps: steps of the whole run.
      steps_per_epoch: steps per epoch (the schedule is piecewise per epoch).
      warmup_steps: optional linear warm-up.
      boundaries, factors: fractions of T and the multipliers (len + 1).

    Returns:
      ``step -> lr``.
    """
    _check(lr, total_steps)
    if len(factors) != len(boundaries) + 1:
        raise ValueError("wrn_step needs len(factors) == len(boundaries) + 1")
    total_epochs = total_steps / steps_per_epoch

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        epoch = step // steps_per_epoch
        for boundary, factor in zip(boundaries, factors):
            if epoch < boundary * total_epochs:
                return lr * factor
        return lr * factors[-1]

    return schedule


def constant(lr: float, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Constant ``lr`` (after an optional linear warm-up)."""
    _check(lr, total_steps)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        return lr

    return schedule


def make_schedule(name: str, lr: float, total_steps: int, steps_per_epoch: int,
                  warmup_steps: int = 0) -> Callable[[int], float]:
    """Builds a schedule by name: ``cosine`` | ``wrn_step`` | ``constant``."""
    if name == "cosine":
        return cosine(lr, total_steps, warmup_steps)
    if name == "wrn_step":
        return wrn_step(lr, total_steps, steps_per_epoch, warmup_steps)
    if name == "constant":
        return constant(lr, total_steps, warmup_steps)
    raise ValueError(f"unknown schedule {name!r}; choose cosine, wrn_step or constant")


def _check(lr: float, total_steps: int) -> None:
    if lr < 0:
        raise ValueError(f"learning rate must be >= 0, got {lr}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0, got {total_steps}")
