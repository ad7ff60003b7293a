"""1-D CNN for MNIST-1D.

The layout is the baseline CNN of the MNIST-1D paper and package (Greydanus 2020,
``ConvBase``): three 1-D convolutions with 25 channels (kernel 5 then 3 and 3,
stride 2, padding 1), ReLU, then a linear classifier on the flattened features.
On the 40-sample signals the lengths go 40 -> 19 -> 10 -> 5 (125 features).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class CNN1D(nn.Module):
    """Three strided 1-D convolutions and a linear head.

    Attributes:
      num_classes: number of output logits.
      width: channels of every convolution (25 in the MNIST-1D baseline).
    """

    num_classes: int
    width: int = 25

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Args: x of shape (N, L, C) (a (N, L) signal is treated as C = 1).

        Returns: logits (N, num_classes).
        """
        del train
        if x.ndim == 2:
            x = x[..., None]
        for kernel in (5, 3, 3):
            x = nn.Conv(self.width, (kernel,), strides=(2,), padding=((1, 1),))(x)
            x = nn.relu(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes)(x)
