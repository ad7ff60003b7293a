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
    validation_fraction: float = 0.0,
    validation_seed: int = 0,
    **kwargs,
) -> Dataset:
    """Load one split of a dataset into memory.

    Args:
      name: one of ``dataset_names()``: embedded ``mnist1d``, ``digits``,
        ``patch`` (built offline), or TFDS ``cifar10``, ``cifar100``, ``svhn``
        (cropped digits), ``fashion_mnist``, ``mnist`` (need a prepared TFDS
        dataset, see ``sam_jax.data.tfds``).
      split: "train", "validation" (needs ``validation_fraction > 0``) or "test"
        (TFDS also takes its slicing syntax, e.g. "train[:10%]").
      data_dir: TFDS data directory (TFDS datasets only; default: TFDS's own).
      label_noise: fraction of *training* labels replaced by a different class
        (symmetric noise; the test split is never corrupted). The patch data has
        its own ``flip_prob`` instead. With a validation split the noise is drawn
        on the whole original training split *before* the validation examples are
        carved out, so the validation labels are as noisy as the training labels
        (it is part of the same noisy training data; ``per_example["clean_y"]``
        keeps the clean ones).
      label_noise_seed: seed of the label noise.
      validation_fraction: share of the original training split held out as the
        "validation" split (0: none). "train" then returns only the other
        examples, so train and validation are disjoint and together are exactly
        the original training split; the test split is unaffected (so a
        ``TrainConfig.dataset_kwargs`` with it trains on the rest and tests on the
        full test set). Deterministic in ``validation_seed`` (not the run seed):
        see ``sam_jax.data.base.validation_indices``.
      validation_seed: seed of the held-out choice.
      **kwargs: passed to the loader, e.g. ``num_samples`` (mnist1d), ``n``, ``dim``
        (patch), ``crop_padding``, ``flip``, ``cutout``, ``cutout_prob``, ``normalize`` (TFDS).

    Returns:
      A ``Dataset``.

    Raises:
      ValueError: unknown name or split, bad arguments.
      FileNotFoundError / ImportError: a TFDS dataset that is not prepared or a
        missing ``[tfds]`` extra (the message says what to run).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    if split == "validation" and not validation_fraction > 0:
        raise ValueError("the 'validation' split is carved from 'train': "
                         "pass validation_fraction > 0 (e.g. 0.1)")
    source_split = "train" if split == "validation" else split
    if name in EMBEDDED:
        if data_dir is not None:
            raise ValueError(f"data_dir is for TFDS datasets; {name!r} is built offline")
        try:
            dataset = EMBEDDED[name](source_split, **kwargs)
        except TypeError as error:
            raise ValueError(f"bad arguments for dataset {name!r}: {error}") from error
    elif name in TFDS:
        from sam_jax.data import tfds as tfds_source

        dataset = tfds_source.load(name, source_split, data_dir=data_dir, **kwargs)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose one of {dataset_names()}")
    if label_noise and source_split == "train":
        if name == "patch":
            raise ValueError("the patch data has its own label noise: use flip_prob")
        dataset = dataset.with_label_noise(label_noise, seed=label_noise_seed)
    elif not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    if validation_fraction and source_split == "train":
        train, validation = dataset.split_validation(validation_fraction, validation_seed)
        dataset = validation if split == "validation" else train
    return dataset
