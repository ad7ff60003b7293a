"""Image datasets from TensorFlow Datasets, read through ``tfds.data_source``.

Reading a prepared dataset needs ``tensorflow_datasets`` but not TensorFlow:
``tfds.data_source`` gives random access to the ``array_record`` files, and the
split is loaded into host memory as uint8 (CIFAR-10 train: 150 MB). Preparing a
dataset (download + conversion) needs TensorFlow; it is the ``[tfds]`` extra::

    pip install 'sam-jax[tfds]'
    python -m sam_jax.data.tfds cifar10 --data-dir ~/tensorflow_datasets

Datasets: cifar10, cifar100, svhn (TFDS ``svhn_cropped``), fashion_mnist, mnist.
"""
from __future__ import annotations

import argparse
import dataclasses
import os

import numpy as np

from sam_jax.data.augment import Augmentation
from sam_jax.data.base import Dataset


@dataclasses.dataclass(frozen=True)
class TfdsSpec:
    """How to read one TFDS dataset.

    Attributes:
      tfds_name: the TFDS builder name.
      num_classes: number of labels.
      mean, std: per-channel statistics of the training images in [0, 1], used
        for normalization (the values the PyTorch SAM code bases use).
      augmentation: the default training augmentation.
    """

    tfds_name: str
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augmentation: Augmentation


# Default augmentations: crop (pad 4) + flip for CIFAR and Fashion-MNIST as in
# davda54/sam and the late-phase SAM code; no flip for digits (SVHN, MNIST),
# whose mirror images are other symbols; nothing for MNIST.
SPECS = {
    "cifar10": TfdsSpec("cifar10", 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                        Augmentation(crop_padding=4, flip=True)),
    "cifar100": TfdsSpec("cifar100", 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                         Augmentation(crop_padding=4, flip=True)),
    "svhn": TfdsSpec("svhn_cropped", 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                     Augmentation(crop_padding=4)),
    "fashion_mnist": TfdsSpec("fashion_mnist", 10, (0.2860,), (0.3530,),
                              Augmentation(crop_padding=4, flip=True)),
    "mnist": TfdsSpec("mnist", 10, (0.1307,), (0.3081,), Augmentation()),
}

_READ_CHUNK = 2048


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "TFDS datasets need tensorflow-datasets: install the extra with "
            "`pip install 'sam-jax[tfds]'` (TensorFlow is needed once, to prepare a dataset)."
        ) from error
    return tfds


def prepare_command(name: str, data_dir: str | None) -> str:
    """The shell command that prepares ``name`` for ``load``."""
    where = f" --data-dir {data_dir}" if data_dir else ""
    return f"python -m sam_jax.data.tfds {name}{where}"


def _builder(name: str, data_dir: str | None):
    if name not in SPECS:
        raise ValueError(f"unknown TFDS dataset {name!r}; choose one of {sorted(SPECS)}")
    tfds = _import_tfds()
    data_dir = os.path.expanduser(os.fspath(data_dir)) if data_dir else None
    try:
        # array_record is the random-access format tfds.data_source reads.
        return tfds.builder(SPECS[name].tfds_name, data_dir=data_dir, file_format="array_record")
    except ValueError as error:
        if "File format is already set" not in str(error):
            raise
        raise ValueError(
            f"TFDS dataset {SPECS[name].tfds_name!r} in {data_dir or 'the default data_dir'} was prepared as "
            "TFRecord, which tfds.data_source cannot read. Convert it once with `tfds convert_format "
            "--dataset_version_dir DIR/NAME/VERSION --out_file_format array_record`, or prepare it into "
            f"another data_dir with `{prepare_command(name, '<new dir>')}`."
        ) from error


def prepare(name: str, data_dir: str | None = None, *, download_dir: str | None = None) -> None:
    """Download and prepare a dataset as array_record files (needs TensorFlow).

    Builds from the dataset's original source archives (``try_download_gcs=False``:
    TFDS's pre-built copies on GCS are TFRecord, which ``tfds.data_source`` cannot read).

    Args:
      name: cifar10, cifar100, svhn, fashion_mnist or mnist.
      data_dir: TFDS data directory (default: ``~/tensorflow_datasets``).
      download_dir: where to keep the downloaded archives (default: TFDS's,
        ``data_dir/downloads``).
    """
    import tensorflow_datasets as tfds

    builder = _builder(name, data_dir)
    builder.download_and_prepare(
        download_dir=os.path.expanduser(download_dir) if download_dir else None,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )


def load(
    name: str,
    split: str = "train",
    data_dir: str | None = None,
    *,
    crop_padding: int | None = None,
    flip: bool | None = None,
    cutout: int = 0,
    cutout_prob: float = 0.5,
    normalize: bool | tuple = True,
    max_examples: int | None = None,
) -> Dataset:
    """Load a prepared TFDS split into memory.

    Args:
      name: cifar10, cifar100, svhn, fashion_mnist or mnist.
      split: a TFDS split ("train", "test", or e.g. "train[:10%]").
      data_dir: TFDS data directory (default: TFDS's, ``~/tensorflow_datasets``).
      crop_padding, flip: override the dataset's default augmentation (``SPECS``).
      cutout: Cutout size in pixels (0 = off; 16 for CIFAR WRNs in the
        late-phase SAM code).
      cutout_prob: probability that an image is cut; default 0.5, the late-phase
        SAM code's (papers.md §2 [code]); 1.0 is DeVries & Taylor's Cutout.
      normalize: True uses the dataset's mean/std, False none, or a
        ``(mean, std)`` pair.
      max_examples: read only the first n examples (quick experiments).

    Returns:
      Dataset with x uint8 NHWC (converted and normalized per batch), y int32.

    Raises:
      ImportError: tensorflow-datasets is not installed (the message gives the
        pip command).
      FileNotFoundError: the dataset is not prepared in data_dir (the message
        gives the command that prepares it).
    """
    spec = SPECS.get(name)
    builder = _builder(name, data_dir)
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {builder.data_dir!r} "
            f"(as array_record files, which tfds.data_source reads). Prepare it once, with "
            f"TensorFlow installed (`pip install 'sam-jax[tfds]'`):\n    {prepare_command(name, data_dir)}"
        )
    source = builder.as_data_source(split=split)
    count = len(source) if max_examples is None else min(max_examples, len(source))
    images, labels = _read_all(source, count)
    if normalize is True:
        normalization = (spec.mean, spec.std)
    elif normalize is False or normalize is None:
        normalization = None
    else:
        normalization = tuple(normalize)
    default = spec.augmentation
    augmentation = Augmentation(
        crop_padding=default.crop_padding if crop_padding is None else crop_padding,
        flip=default.flip if flip is None else flip,
        cutout=cutout,
        cutout_prob=cutout_prob,
    )
    return Dataset(name, split, images, labels, spec.num_classes, normalization=normalization,
                   augmentation=augmentation, info={"tfds_name": spec.tfds_name, "data_dir": str(builder.data_dir)})


def _read_all(source, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Random-access reads in chunks, decoded to uint8 images and int32 labels."""
    images, labels = [], []
    for start in range(0, count, _READ_CHUNK):
        records = source.__getitems__(list(range(start, min(start + _READ_CHUNK, count))))
        images.extend(np.asarray(r["image"], np.uint8) for r in records)
        labels.extend(int(r["label"]) for r in records)
    if not images:
        raise ValueError("the requested TFDS split is empty")
    return np.stack(images), np.asarray(labels, np.int32)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a TFDS dataset for sam_jax (needs TensorFlow).")
    parser.add_argument("name", choices=sorted(SPECS))
    parser.add_argument("--data-dir", default=None, help="TFDS data directory (default: ~/tensorflow_datasets)")
    args = parser.parse_args(argv)
    prepare(args.name, args.data_dir)
    print(f"prepared {args.name} in {_builder(args.name, args.data_dir).data_dir}")


if __name__ == "__main__":
    main()
