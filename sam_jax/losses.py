"""The library's one softmax cross-entropy (train step, eval step, curvature losses).

Labels are integer class indices; ``label_smoothing`` mixes the one-hot targets with
the uniform distribution (``optax.smooth_labels``). Without smoothing it equals
``optax.softmax_cross_entropy_with_integer_labels`` (to float rounding).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy ``(N,)`` with optional label smoothing."""
    targets = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def cross_entropy_sum(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0,
                      mask=None) -> tuple[jax.Array, jax.Array]:
    """``(summed cross-entropy, count)`` of a batch; ``mask`` (1 = real example)
    weights the examples and the count (the curvature loss convention)."""
    losses = cross_entropy(logits, labels, label_smoothing)
    if mask is None:
        return jnp.sum(losses), jnp.asarray(losses.shape[0], logits.dtype)
    mask = mask.astype(logits.dtype)
    return jnp.sum(losses * mask), jnp.sum(mask)
