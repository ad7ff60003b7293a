"""Build a model by name: ``get_model(name, num_classes, **kwargs)``."""
from __future__ import annotations

from typing import Callable

import flax.linen as nn

from sam_jax.models.cnn import CNN6
from sam_jax.models.cnn1d import CNN1D
from sam_jax.models.mlp import MLP
from sam_jax.models.patch_cnn import PatchCNN
from sam_jax.models.resnet import resnet18, resnet50
from sam_jax.models.wrn import WideResNet

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn6": CNN6,
    "cnn1d": CNN1D,
    "resnet18": resnet18,
    "resnet50": resnet50,
    "wrn": WideResNet,
    "wrn16_8": lambda num_classes, **kw: WideResNet(num_classes, depth=16, widen_factor=8, **kw),
    "wrn28_10": lambda num_classes, **kw: WideResNet(num_classes, depth=28, widen_factor=10, **kw),
    # The SAM / late-phase SAM papers' "WRN-16-8": davda54/sam's layout (17.16 M parameters).
    "wrn16_8_davda54": lambda num_classes, **kw: WideResNet(
        num_classes, depth=16, widen_factor=8, layout="davda54", **kw),
    "patch_cnn": PatchCNN,
}


def model_names() -> list[str]:
    """The names ``get_model`` accepts."""
    return sorted(_MODELS)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """Build a Flax module by name.

    Args:
      name: one of ``model_names()``: mlp, cnn6, cnn1d, resnet18, resnet50,
        wrn16_8, wrn28_10 (Zagoruyko & Komodakis' layout), wrn16_8_davda54 (the SAM
        papers' WRN-16-8: davda54/sam's layout, 17.16 M parameters), wrn (takes
        ``depth``, ``widen_factor`` and ``layout``), patch_cnn.
      num_classes: number of output logits.
      **kwargs: module attributes, e.g. ``width`` (every model has one, so tests
        can build tiny versions), ``use_bn`` (cnn6), ``dropout_rate`` (wrn).

    Returns:
      An unbound ``flax.linen.Module`` with ``__call__(x, train=True) -> logits``.

    Raises:
      ValueError: unknown name, non-positive num_classes or an unknown keyword.
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {model_names()}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if "width" in kwargs and (not isinstance(kwargs["width"], int) or kwargs["width"] < 1):
        raise ValueError(f"width must be a positive int, got {kwargs['width']!r}")
    try:
        return _MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as error:
        raise ValueError(f"bad arguments for model {name!r}: {error}") from error
