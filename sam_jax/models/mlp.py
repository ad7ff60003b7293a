"""Multilayer perceptron (flattens its input)."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """A fully connected ReLU network on flattened inputs.

    Attributes:
      num_classes: number of output logits.
      width: hidden units per layer (default 256; tests use tiny widths).
      depth: number of hidden layers (default 2).
      activation: elementwise nonlinearity (default ``nn.relu``).
    """

    num_classes: int
    width: int = 256
    depth: int = 2
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Args: x of shape (N, ...); train is accepted for the common signature.

        Returns: logits of shape (N, num_classes).
        """
        del train  # no BatchNorm or dropout
        x = x.reshape((x.shape[0], -1))
        for _ in range(self.depth):
            x = self.activation(nn.Dense(self.width)(x))
        return nn.Dense(self.num_classes)(x)
