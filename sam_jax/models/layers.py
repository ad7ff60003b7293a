"""Layers shared by the BatchNorm ResNets (``resnet.py``, ``wrn.py``)."""

from __future__ import annotations

from functools import partial

import flax.linen as nn

# He (fan-out) init without bias, as torchvision / the CIFAR WRN code use for convs
# that are followed by BatchNorm.
he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
Conv = partial(nn.Conv, use_bias=False, kernel_init=he_init)


def batch_norm(train: bool) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults (momentum 0.1 is Flax's 0.9; eps 1e-5)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
