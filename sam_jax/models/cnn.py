"""The 6-layer CNN of the Eigen-SAM alignment study (Luo et al. 2024).

The paper trains "a 6-layer CNN on CIFAR-10" to track the cosine between the SAM
perturbation and the top Hessian eigenvector, and lambda_max, over training; its
exact layers were not retrieved (papers.md §1). Our reading, documented as such:
six 3x3 convolutions in three VGG-style stages of two convolutions each, with
``width, 2*width, 4*width`` channels (32/64/128 by default), ReLU after every
convolution, 2x2 max-pooling after each stage, then global average pooling and a
linear classifier. BatchNorm after each convolution is optional (``use_bn``) and
off by default, so the loss is a plain function of the parameters and the
Hessian needs no choice of BN mode.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class CNN6(nn.Module):
    """Six-convolution CNN (see module docstring for the layer layout).

    Attributes:
      num_classes: number of output logits.
      width: channels of the first stage; stages use width, 2*width, 4*width.
      use_bn: add BatchNorm (collection ``batch_stats``) after each convolution.
    """

    num_classes: int
    width: int = 32
    use_bn: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Args: x NHWC images; train selects BN batch statistics.

        Returns: logits (N, num_classes).
        """
        for stage in range(3):
            channels = self.width * 2**stage
            for _ in range(2):
                x = nn.Conv(channels, (3, 3), padding="SAME", use_bias=not self.use_bn)(x)
                if self.use_bn:
                    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)
