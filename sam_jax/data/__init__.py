"""Datasets with one batch interface: ``{"x": float32, "y": int32}`` numpy dicts.

``get_dataset(name, split)`` returns a ``Dataset`` (in memory) whose
``batches(batch_size, seed=, epoch=, augment=)`` yields an epoch deterministically.
Embedded sources (mnist1d, digits, patch) need no download; TFDS sources (cifar10,
cifar100, svhn, fashion_mnist, mnist) read prepared data via ``tfds.data_source``.
"""
from sam_jax.data.augment import Augmentation, cutout, flip_labels, normalize, random_crop, random_flip
from sam_jax.data.base import Dataset
from sam_jax.data.embedded import digits, mnist1d, patch_data, patch_signal
from sam_jax.data.registry import dataset_names, get_dataset

__all__ = [
    "Augmentation",
    "Dataset",
    "cutout",
    "dataset_names",
    "digits",
    "flip_labels",
    "get_dataset",
    "mnist1d",
    "normalize",
    "patch_data",
    "patch_signal",
    "random_crop",
    "random_flip",
]
