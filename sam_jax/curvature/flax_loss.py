"""Curvature losses for Flax models following the project's model convention.

The BatchNorm mode changes the matrix (papers.md §4 pitfall), so it is an explicit
choice recorded in every result:

* ``bn_mode="batch"``: ``train=True`` with ``mutable=["batch_stats"]`` and the
  updated statistics discarded — each batch is normalized by its own statistics,
  as in the late-phase SAM paper's sharpness measurement [code].
* ``bn_mode="running"``: ``train=False`` — the stored running statistics, as in
  PyHessian and Eigen-SAM. Dropout is off in this mode (``train=False``).

Dropout (only meaningful with ``bn_mode="batch"``, which runs the model with
``train=True``): ``"off"`` requires a model without dropout layers (the convention
ties dropout to ``train``); a ``jax.random`` key gives the *same* masks at every
call (same key for every batch), so the operator stays one fixed matrix.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from sam_jax.losses import cross_entropy_sum  # noqa: F401  (the library's one cross-entropy)

BN_MODES = ("batch", "running")


def flax_loss_fn(
    model: Any,
    variables: dict,
    bn_mode: str = "batch",
    label_smoothing: float = 0.0,
    dropout: Any = "off",
) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """Build ``loss_fn(params, batch) -> (summed cross entropy, count)`` for a Flax model.

    Args:
      model: a linen module with ``__call__(x, train: bool)`` returning logits.
      variables: its variables; ``params`` is replaced by the argument of the returned
        function, the other collections (``batch_stats``) are held fixed.
      bn_mode: ``"batch"`` (late-phase SAM [code]) or ``"running"`` (PyHessian,
        Eigen-SAM). See the module docstring.
      label_smoothing: label smoothing of the loss (the papers measure sharpness
        without it: default 0).
      dropout: ``"off"`` or a ``jax.random`` key for fixed dropout masks.

    Returns:
      The loss function; it carries ``curvature_settings`` (bn_mode, dropout,
      label_smoothing) that operators copy into their results. Batches are dicts with
      ``"x"``, ``"y"`` and optionally ``"mask"`` (1 = real example; note that padded
      examples still enter BatchNorm's batch statistics in ``"batch"`` mode).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {BN_MODES}, got {bn_mode!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if "params" not in variables:
        raise ValueError("variables has no 'params' collection")
    dropout_off = isinstance(dropout, str)
    if dropout_off and dropout != "off":
        raise ValueError(f"dropout must be 'off' or a jax.random key, got {dropout!r}")
    if not dropout_off and bn_mode == "running":
        raise ValueError(
            "a dropout key has no effect with bn_mode='running' (train=False disables "
            "dropout); use dropout='off' or bn_mode='batch'"
        )
    fixed = {name: value for name, value in variables.items() if name != "params"}
    rngs = None if dropout_off else {"dropout": dropout}

    def loss_fn(params, batch):
        all_variables = {"params": params, **fixed}
        if bn_mode == "batch":
            try:
                logits, _ = model.apply(
                    all_variables, batch["x"], train=True, mutable=["batch_stats"], rngs=rngs
                )
            except Exception as error:  # flax raises on a missing 'dropout' rng
                if dropout_off and "dropout" in str(error).lower():
                    raise ValueError(
                        "the model uses dropout in train mode; pass dropout=<jax.random key> "
                        "for fixed masks or use bn_mode='running'"
                    ) from error
                raise
        else:
            logits = model.apply(all_variables, batch["x"], train=False)
        return cross_entropy_sum(logits, batch["y"], label_smoothing, batch.get("mask"))

    loss_fn.curvature_settings = {
        "bn_mode": bn_mode,
        "dropout": "off" if dropout_off else "fixed-key",
        "label_smoothing": float(label_smoothing),
    }
    return loss_fn
