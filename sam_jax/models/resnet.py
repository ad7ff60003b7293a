"""CIFAR-style ResNet-18 / ResNet-50 with BatchNorm.

The CIFAR variant (as in kuangliu/pytorch-cifar and the SAM / Eigen-SAM code): a
3x3 stride-1 stem with no max-pool, four stages with strides 1, 2, 2, 2, global
average pooling and a linear head. Convolutions have no bias; each is followed
by BatchNorm (PyTorch's momentum 0.1 == Flax ``momentum=0.9``, eps 1e-5).
ResNet-18 has 11,173,962 parameters and ResNet-50 23,520,842 for 10 classes.
Convolution kernels use He (fan-out, normal) initialization as torchvision.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from sam_jax.models.layers import Conv, batch_norm as _batch_norm


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    channels: int
    strides: int = 1
    expansion = 1

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out = Conv(self.channels, (3, 3), strides=self.strides, padding=1)(x)
        out = nn.relu(_batch_norm(train)(out))
        out = Conv(self.channels, (3, 3), padding=1)(out)
        out = _batch_norm(train)(out)
        return nn.relu(out + _shortcut(x, self.channels, self.strides, train))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with a projection shortcut when needed."""

    channels: int
    strides: int = 1
    expansion = 4

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out = nn.relu(_batch_norm(train)(Conv(self.channels, (1, 1))(x)))
        out = Conv(self.channels, (3, 3), strides=self.strides, padding=1)(out)
        out = nn.relu(_batch_norm(train)(out))
        out = _batch_norm(train)(Conv(self.channels * 4, (1, 1))(out))
        return nn.relu(out + _shortcut(x, self.channels * 4, self.strides, train))


def _shortcut(x: jnp.ndarray, channels: int, strides: int, train: bool) -> jnp.ndarray:
    """Identity, or 1x1 strided convolution + BN when the shape changes."""
    if strides == 1 and x.shape[-1] == channels:
        return x
    return _batch_norm(train)(Conv(channels, (1, 1), strides=strides)(x))


class ResNet(nn.Module):
    """CIFAR ResNet.

    Attributes:
      num_classes: number of output logits.
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block: ``BasicBlock`` or ``Bottleneck``.
      width: channels of the stem and the first stage (64 in the paper models).
    """

    num_classes: int
    stage_sizes: Sequence[int]
    block: type[nn.Module] = BasicBlock
    width: int = 64

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Args: x NHWC images; train selects BN batch statistics (and updates them
        when ``batch_stats`` is mutable). Returns: logits (N, num_classes)."""
        x = nn.relu(_batch_norm(train)(Conv(self.width, (3, 3), padding=1)(x)))
        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = self.block(self.width * 2**stage, strides=strides)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def resnet18(num_classes: int, width: int = 64, **kwargs) -> ResNet:
    """ResNet-18: BasicBlock, stages (2, 2, 2, 2)."""
    return ResNet(num_classes, (2, 2, 2, 2), BasicBlock, width=width, **kwargs)


def resnet50(num_classes: int, width: int = 64, **kwargs) -> ResNet:
    """ResNet-50: Bottleneck, stages (3, 4, 6, 3)."""
    return ResNet(num_classes, (3, 4, 6, 3), Bottleneck, width=width, **kwargs)
