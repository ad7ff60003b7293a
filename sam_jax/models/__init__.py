"""Flax linen models sharing one convention: ``__call__(x, train=True) -> logits``.

BatchNorm layers use ``use_running_average=not train`` and live in the
``batch_stats`` collection; build any model with ``get_model(name, num_classes)``.
"""
from sam_jax.models.cnn import CNN6
from sam_jax.models.cnn1d import CNN1D
from sam_jax.models.mlp import MLP
from sam_jax.models.patch_cnn import PatchCNN, noise_memorization, signal_learning
from sam_jax.models.registry import get_model, model_names
from sam_jax.models.resnet import ResNet, resnet18, resnet50
from sam_jax.models.wrn import WideResNet

__all__ = [
    "CNN1D",
    "CNN6",
    "MLP",
    "PatchCNN",
    "ResNet",
    "WideResNet",
    "get_model",
    "model_names",
    "noise_memorization",
    "resnet18",
    "resnet50",
    "signal_learning",
]
