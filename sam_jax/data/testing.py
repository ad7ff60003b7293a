"""Tiny fake datasets in their real on-disk formats, for end-to-end tests.

``write_fake_cifar10`` writes ``cifar-10-binary.tar.gz`` exactly as the CIFAR-10
site serves it (``cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin``,
``batches.meta.txt``; each record is 1 label byte then 3072 bytes: the red, green
and blue 32x32 planes, row-major). ``prepare_fake_cifar10`` runs TFDS's own
``cifar10`` builder on it through ``sam_jax.data.tfds.prepare`` (what the
preparation command runs) -- extraction, parsing and array_record writing are
TFDS's -- with only the network fetch replaced by the local archive.
Preparing needs the ``[tfds]`` extra (TensorFlow).
"""
from __future__ import annotations

import contextlib
import io
import os
import tarfile
from typing import Iterator
from unittest import mock

import numpy as np

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_LABEL_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
                       "dog", "frog", "horse", "ship", "truck")


def _records(images: np.ndarray, labels: np.ndarray) -> bytes:
    """CIFAR binary records: label byte + channel-major (3, 32, 32) pixels."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    return np.concatenate([labels.astype(np.uint8)[:, None], planes], axis=1).tobytes()


def write_fake_cifar10(tmp_dir, n_train: int = 10, n_test: int = 5, seed: int = 0) -> dict:
    """Write a tiny CIFAR-10 archive in the original binary format.

    Args:
      tmp_dir: directory to write ``cifar-10-binary.tar.gz`` into.
      n_train: training images, spread over the five ``data_batch_*.bin`` files
        in order (file k holds the k-th chunk).
      n_test: images in ``test_batch.bin``.
      seed: seed of the random pixels and labels.

    Returns:
      dict with ``archive`` (path) and the arrays written, in file order:
      ``train_images`` (n_train, 32, 32, 3) uint8, ``train_labels``,
      ``test_images``, ``test_labels`` (int64).
    """
    if n_train < 1 or n_test < 1:
        raise ValueError(f"need at least one train and one test image, got {n_train}, {n_test}")
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test),
    }
    files = {"batches.meta.txt": ("\n".join(CIFAR10_LABEL_NAMES) + "\n\n").encode()}
    chunks = np.array_split(np.arange(n_train), 5)
    for k, chunk in enumerate(chunks, start=1):
        files[f"data_batch_{k}.bin"] = _records(arrays["train_images"][chunk], arrays["train_labels"][chunk])
    files["test_batch.bin"] = _records(arrays["test_images"], arrays["test_labels"])

    archive = os.path.join(os.fspath(tmp_dir), "cifar-10-binary.tar.gz")
    with tarfile.open(archive, "w:gz") as tar:
        for name, payload in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return {"archive": archive, **arrays}


@contextlib.contextmanager
def serve_archive_locally(url: str, archive: str) -> Iterator[None]:
    """Within the block, TFDS's ``download_and_extract(url)`` extracts ``archive``.

    Only the network fetch is replaced; extraction goes through TFDS's own
    ``DownloadManager.extract``. Any other URL raises, so a test cannot reach
    the network by accident.
    """
    import tensorflow_datasets as tfds

    def download_and_extract(manager, url_or_urls):
        if url_or_urls != url:
            raise AssertionError(f"unexpected download of {url_or_urls!r} (serving only {url!r})")
        return manager.extract(archive)

    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", download_and_extract):
        yield


def prepare_fake_cifar10(data_dir, n_train: int = 10, n_test: int = 5, seed: int = 0, *, archive_dir=None) -> dict:
    """Write a fake CIFAR-10 archive and prepare TFDS ``cifar10`` from it.

    Args:
      data_dir: TFDS data directory to prepare into (array_record files, so
        ``tfds.data_source`` and ``sam_jax.data.get_dataset("cifar10", ...,
        data_dir=data_dir)`` can read it).
      n_train, n_test, seed: see ``write_fake_cifar10``.
      archive_dir: where to write the archive (default: ``data_dir/fake_download``).

    Returns:
      The dict of ``write_fake_cifar10`` (the arrays that were written).
    """
    from sam_jax.data import tfds as tfds_source

    data_dir = os.fspath(data_dir)
    archive_dir = os.fspath(archive_dir or os.path.join(data_dir, "fake_download"))
    os.makedirs(archive_dir, exist_ok=True)
    written = write_fake_cifar10(archive_dir, n_train, n_test, seed)
    with serve_archive_locally(CIFAR10_URL, written["archive"]):
        # The same call as `python -m sam_jax.data.tfds cifar10 --data-dir DATA_DIR`.
        tfds_source.prepare("cifar10", data_dir, download_dir=os.path.join(archive_dir, "downloads"))
    return written
