"""WideResNet (Zagoruyko & Komodakis 2016) with BatchNorm, CIFAR layout, in two layouts.

Both layouts share a 3x3 stem with ``width`` (16) channels, three groups with
``width*k, 2*width*k, 4*width*k`` channels and strides 1, 2, 2, a final BN-ReLU,
global average pooling and a linear head; convolutions have no bias. A block is
BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3; when its shape changes the
shortcut is a 1x1 convolution of the pre-activated input.

``layout="zagoruyko"`` (default; the paper's and xternalz/WideResNet-pytorch's):
``n = (depth - 4) / 6`` blocks per group, the first one changing the shape.
WRN-28-10 has 36,479,194 parameters and WRN-16-8 10,961,370 for 10 classes,
as in the WRN paper's table.

``layout="davda54"`` (davda54/sam ``example/model/wide_res_net.py`` [code], the
network of the SAM and late-phase SAM experiments on CIFAR): each group is a
``DownsampleUnit`` *plus* ``n = (depth - 4) / 6`` ``BasicUnit``s, i.e. n + 1
blocks per group (3 for depth 16), so its "WRN-16-8" has 17,158,106 parameters
for 10 classes (the 17.16 M of papers.md §2). The initialization follows that code
too: He-normal **fan-in** convolutions and a **zero** linear head (weight and bias).
Note: one stored version of that file omits the identity shortcut of ``BasicUnit``
(``return self.block(x)``), another has it (``return x + self.block(x)``); we
follow the latter (a residual network). The parameter count is the same.
"""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from sam_jax.models.layers import Conv, batch_norm as _batch_norm

LAYOUTS = ("zagoruyko", "davda54")

# davda54/sam's init: kaiming_normal_(mode="fan_in", nonlinearity="relu") for convs,
# zeros for the linear layer.
_DavdaConv = partial(nn.Conv, use_bias=False,
                     kernel_init=nn.initializers.variance_scaling(2.0, "fan_in", "normal"))


class WideBlock(nn.Module):
    """Pre-activation wide basic block."""

    channels: int
    strides: int = 1
    dropout_rate: float = 0.0
    conv: type = Conv

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        same_shape = self.strides == 1 and x.shape[-1] == self.channels
        activated = nn.relu(_batch_norm(train)(x))
        out = self.conv(self.channels, (3, 3), strides=self.strides, padding=1)(activated)
        out = nn.relu(_batch_norm(train)(out))
        if self.dropout_rate > 0:
            out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
        out = self.conv(self.channels, (3, 3), padding=1)(out)
        if same_shape:
            return x + out
        return self.conv(self.channels, (1, 1), strides=self.strides)(activated) + out


class WideResNet(nn.Module):
    """WRN-depth-widen_factor.

    Attributes:
      num_classes: number of output logits.
      depth: total depth, 6n + 4 (16 and 28 in the papers).
      widen_factor: k (8 for WRN-16-8, 10 for WRN-28-10).
      width: stem channels (16 in the paper); groups have width*k*(1, 2, 4).
      dropout_rate: dropout inside blocks (0 in the SAM papers); uses the
        ``dropout`` rng when > 0 and ``train``.
      layout: ``"zagoruyko"`` (n blocks per group) or ``"davda54"`` (a downsampling
        unit plus n basic units per group, davda54/sam's code and init); see the
        module docstring.
    """

    num_classes: int
    depth: int = 28
    widen_factor: int = 10
    width: int = 16
    dropout_rate: float = 0.0
    layout: str = "zagoruyko"

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Args: x NHWC images; train selects BN batch statistics and dropout.
        Returns: logits (N, num_classes)."""
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {self.depth}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"WideResNet layout must be one of {LAYOUTS}, got {self.layout!r}")
        davda = self.layout == "davda54"
        conv = _DavdaConv if davda else Conv
        blocks_per_group = (self.depth - 4) // 6 + (1 if davda else 0)
        x = conv(self.width, (3, 3), padding=1)(x)
        for group in range(3):
            channels = self.width * self.widen_factor * 2**group
            for index in range(blocks_per_group):
                strides = 2 if group > 0 and index == 0 else 1
                x = WideBlock(channels, strides, self.dropout_rate, conv)(x, train)
        x = nn.relu(_batch_norm(train)(x))
        x = jnp.mean(x, axis=(1, 2))
        if davda:
            return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros)(x)
        return nn.Dense(self.num_classes)(x)
