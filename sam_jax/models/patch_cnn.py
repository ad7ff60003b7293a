"""Two-layer patch CNN of Chen, Zhang, Kou, Chen, Hsieh, Gu (NeurIPS 2023).

    f(W, x) = F_{+1}(W, x) - F_{-1}(W, x),
    F_j(W, x) = (1/m) sum_{r=1..m} sum_{p=1..P} sigma(<w_{j,r}, x^(p)>),

with sigma = ReLU, the second layer fixed to +-1/m (not a parameter) and the
first layer initialised i.i.d. N(0, sigma_0^2) (papers.md §3, [recalled]).

Parameter layout: ``params["filters"]`` has shape (2, m, d); row 0 holds the
filters w_{-1,r} of the class j = -1 and row 1 those of j = +1.

Label convention: integer class 1 means y = +1 and class 0 means y = -1. With
``num_classes=2`` the model returns the logits ``[-f/2, +f/2]``: then softmax
cross-entropy of class c equals the logistic loss log(1 + exp(-y f)) with
y = 2c - 1, since softmax([-f/2, f/2])[1] = 1 / (1 + exp(-f)). (``[0, f]`` gives
the same loss; the symmetric form keeps the logits antisymmetric in f.) With
``num_classes=1`` it returns f itself, shape (N, 1), for losses written on the
margin y f directly.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchCNN(nn.Module):
    """f = F_{+1} - F_{-1} on inputs of shape (N, P, d).

    Attributes:
      num_classes: 2 (logits [-f/2, f/2]) or 1 (f, shape (N, 1)).
      width: m, the number of filters per class (Kou et al. 2023 template: 10).
      sigma0: standard deviation of the Gaussian initialization [recalled; the
        paper's theory takes it small -- 0.01 is our default, an option].
      activation: sigma, ReLU in the paper.
    """

    num_classes: int = 2
    width: int = 10
    sigma0: float = 0.01
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
        """Args: x of shape (N, P, d); train is accepted for the common signature.

        Returns: logits (N, 2) = [-f/2, f/2], or f of shape (N, 1).
        """
        del train
        if self.num_classes not in (1, 2):
            raise ValueError(f"PatchCNN supports num_classes 1 or 2, got {self.num_classes}")
        if x.ndim != 3:
            raise ValueError(f"PatchCNN expects inputs of shape (N, P, d), got {x.shape}")
        init = jax.nn.initializers.normal(stddev=self.sigma0)
        filters = self.param("filters", init, (2, self.width, x.shape[-1]))
        pre_activation = jnp.einsum("npd,jmd->njmp", x, filters)
        per_class = self.activation(pre_activation).sum(axis=(2, 3)) / self.width  # F_{-1}, F_{+1}
        margin = per_class[:, 1] - per_class[:, 0]
        if self.num_classes == 1:
            return margin[:, None]
        return jnp.stack([-margin / 2, margin / 2], axis=-1)


def signal_learning(params, signal: jnp.ndarray) -> jnp.ndarray:
    """Signal learning of Chen et al.: ``max_r <w_{j,r}, j mu>`` for j = -1, +1.

    Args:
      params: the PatchCNN ``params`` collection (``filters`` of shape (2, m, d)).
      signal: mu, shape (d,) (``Dataset.info["signal"]`` of the patch data).

    Returns:
      Array (2,): [class j = -1, class j = +1].
    """
    filters = params["filters"]
    signs = jnp.array([-1.0, 1.0], filters.dtype)
    # <w_{j,r}, j mu>: the sign enters before the max over r.
    return jnp.max(jnp.einsum("jmd,d->jm", filters, signal) * signs[:, None], axis=1)


def noise_memorization(params, noise: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Noise memorization of Chen et al.: ``max_r <w_{y_i,r}, xi_i>`` per example.

    Args:
      params: the PatchCNN ``params`` collection.
      noise: (N, P-1, d) noise patches (``Dataset.per_example["noise"]``); with
        several noise patches the maximum over them is taken.
      labels: (N,) integer classes (1 = y = +1) -- the labels used in training.

    Returns:
      Array (N,), one value per example (aggregate, e.g. mean or max, as needed).
    """
    own_filters = params["filters"][labels]  # (N, m, d)
    return jnp.max(jnp.einsum("nmd,npd->nmp", own_filters, noise), axis=(1, 2))
