"""Build a dataset split by name: ``get_dataset(name, split, data_dir=None, **kw)``."""
from __future__ import annotations

from sam_jax.data import embedded
from sam_jax.data.base import Dataset

EMBEDDED = {"mnist1d": embedded.mnist1d, "digits": embedded.digits, "patch": embedded.patch_data}
TFDS = ("cifar10", "cifar100", "svhn", "fashion_mnist", "mnist")


def dataset_names() -> list[str]:
    """Names ``get_dataset`` accepts."""
    return sorted([*EMBEDDED, *TFDS])


def get_dataset(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    *,
    label_noise: float = 0.0,
    label_noise_seed: int = 0,
    **kwargs,
) -> Dataset:
    """Load one split of a dataset into memory.

    Args:
      name: one of ``dataset_names()``: embedded ``mnist1d``, ``digits``,
        ``patch`` (built offline), or TFDS ``cifar10``, ``cifar100``, ``svhn``
        (cropped digits), ``fashion_mnist``, ``mnist`` (need a prepared TFDS
        dataset, see ``sam_jax.data.tfds``).
      split: "train" or "test".
      data_dir: TFDS data directory (TFDS datasets only; default: TFDS's own).
      label_noise: fraction of *training* labels replaced by a different class
        (symmetric noise; the test split is never corrupted). The patch data has
        its own ``flip_prob`` instead.
      label_noise_seed: seed of the label noise.
      **kwargs: passed to the loader, e.g. ``num_samples`` (mnist1d), ``n``, ``dim``
        (patch), ``crop_padding``, ``flip``, ``cutout``, ``normalize`` (TFDS).

    Returns:
      A ``Dataset``.

    Raises:
      ValueError: unknown name or split, bad arguments.
      FileNotFoundError / ImportError: a TFDS dataset that is not prepared or a
        missing ``[tfds]`` extra (the message says what to run).
    """
    if name in EMBEDDED:
        if data_dir is not None:
            raise ValueError(f"data_dir is for TFDS datasets; {name!r} is built offline")
        try:
            dataset = EMBEDDED[name](split, **kwargs)
        except TypeError as error:
            raise ValueError(f"bad arguments for dataset {name!r}: {error}") from error
    elif name in TFDS:
        from sam_jax.data import tfds as tfds_source

        dataset = tfds_source.load(name, split, data_dir=data_dir, **kwargs)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {dataset_names()}")
    if label_noise and split == "train":
        if name == "patch":
            raise ValueError("the patch data has its own label noise: use flip_prob")
        dataset = dataset.with_label_noise(label_noise, seed=label_noise_seed)
    elif not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    return dataset
