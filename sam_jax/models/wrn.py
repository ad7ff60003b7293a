"""WideResNet (Zagoruyko & Komodakis 2016) with BatchNorm, CIFAR layout.

Follows the reference PyTorch port used by the SAM repositories
(xternalz/WideResNet-pytorch, davda54/sam): a 3x3 stem with ``width`` (16)
channels, three groups of ``(depth - 4) / 6`` pre-activation blocks with
``width*k, 2*width*k, 4*width*k`` channels and strides 1, 2, 2, a final BN-ReLU,
global average pooling and a linear head. A block is
BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3; when its shape changes the
shortcut is a 1x1 convolution of the pre-activated input. WRN-28-10 has
36,479,194 parameters and WRN-16-8 10,961,370 for 10 classes.
"""
from __future__ import annotations


import flax.linen as nn
import jax.numpy as jnp

from sam_jax.models.layers import Conv, batch_norm as _batch_norm


class WideBlock(nn.Module):
    """Pre-activation wide basic block."""

    channels: int
    strides: int = 1
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        same_shape = self.strides == 1 and x.shape[-1] == self.channels
        activated = nn.relu(_batch_norm(train)(x))
        out = Conv(self.channels, (3, 3), strides=self.strides, padding=1)(activated)
        out = nn.relu(_batch_norm(train)(out))
        if self.dropout_rate > 0:
            out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
        out = Conv(self.channels, (3, 3), padding=1)(out)
        if same_shape:
            return x + out
        return Conv(self.channels, (1, 1), strides=self.strides)(activated) + out


class WideResNet(nn.Module):
    """WRN-depth-widen_factor.

    Attributes:
      num_classes: number of output logits.
      depth: total depth, 6n + 4 (16 and 28 in the papers).
      widen_factor: k (8 for WRN-16-8, 10 for WRN-28-10).
      width: stem channels (16 in the paper); groups have width*k*(1, 2, 4).
      dropout_rate: dropout inside blocks (0 in the SAM papers); uses the
        ``dropout`` rng when > 0 and ``train``.
    """

    num_classes: int
    depth: int = 28
    widen_factor: int = 10
    width: int = 16
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Args: x NHWC images; train selects BN batch statistics and dropout.
        Returns: logits (N, num_classes)."""
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
        blocks_per_group = (self.depth - 4) // 6
        x = Conv(self.width, (3, 3), padding=1)(x)
        for group in range(3):
            channels = self.width * self.widen_factor * 2**group
            for index in range(blocks_per_group):
                strides = 2 if group > 0 and index == 0 else 1
                x = WideBlock(channels, strides, self.dropout_rate)(x, train)
        x = nn.relu(_batch_norm(train)(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)
