"""Embedded, offline datasets: MNIST-1D, scikit-learn digits, synthetic patch data."""
from __future__ import annotations

import functools
import random

import numpy as np

from sam_jax.data.base import Dataset

_SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")


# ----------------------------------------------------------------------------- MNIST-1D


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(num_samples: int, seed: int, train_split: float) -> dict:
    """Build MNIST-1D from the package's templates (no download)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.train_split = train_split
    # make_dataset seeds numpy's and Python's global generators; restore them so
    # building data has no side effect on the caller.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = {
        "train": (data["x"].astype(np.float32)[..., None], data["y"].astype(np.int32)),
        "test": (data["x_test"].astype(np.float32)[..., None], data["y_test"].astype(np.int32)),
    }
    for array in (a for pair in arrays.values() for a in pair):
        array.setflags(write=False)  # cached and shared between Dataset objects
    return arrays


def mnist1d(split: str = "train", *, num_samples: int = 5000, seed: int = 42, train_split: float = 0.8) -> Dataset:
    """MNIST-1D (Greydanus 2020), built offline by ``mnist1d.data.make_dataset``.

    The defaults are the package's ``get_dataset_args()``: 5000 examples, 80/20
    split, seed 42 -- the standard 4000 train / 1000 test. Larger datasets: raise
    ``num_samples`` (the total over both splits, a multiple of 10). The signals are
    already centred and scaled to unit standard deviation by the package.

    Args:
      split: "train" or "test".
      num_samples: total examples before the split (package default 5000).
      seed: generation seed (package default 42).
      train_split: fraction of examples in the train split (package default 0.8).

    Returns:
      Dataset with x of shape (N, 40, 1) float32 and 10 classes.
    """
    _check_split(split)
    if num_samples < 10 or num_samples % 10:
        raise ValueError(f"mnist1d num_samples must be a positive multiple of 10, got {num_samples}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"train_split must be in (0, 1), got {train_split}")
    x, y = _mnist1d_arrays(int(num_samples), int(seed), float(train_split))[split]
    return Dataset("mnist1d", split, x, y, num_classes=10,
                   info={"num_samples": num_samples, "seed": seed, "train_split": train_split})


# ----------------------------------------------------------------------------- digits


def digits(split: str = "train", *, test_fraction: float = 0.2, split_seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images, bundled with sklearn).

    Pixels 0..16 are scaled to [0, 1]. The train/test split is stratified and
    fixed by ``split_seed`` (default: 1437 train / 360 test).

    Returns:
      Dataset with x of shape (N, 8, 8, 1) float32 in [0, 1] and 10 classes.
    """
    _check_split(split)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        images, bunch.target.astype(np.int32), test_size=test_fraction,
        stratify=bunch.target, random_state=split_seed)
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    return Dataset("digits", split, x, y, num_classes=10,
                   info={"test_fraction": test_fraction, "split_seed": split_seed})


# ----------------------------------------------------------------------------- patch data


def patch_signal(dim: int, signal_norm: float, seed: int) -> np.ndarray:
    """The signal vector mu: a uniformly random direction of norm ``signal_norm``."""
    direction = np.random.default_rng([seed, 2]).standard_normal(dim)
    return (signal_norm * direction / np.linalg.norm(direction)).astype(np.float32)


def patch_data(
    split: str = "train",
    *,
    n: int = 20,
    n_test: int = 1000,
    num_patches: int = 2,
    dim: int = 100,
    noise_std: float = 1.0,
    signal_norm: float = 5.0,
    flip_prob: float = 0.1,
    seed: int = 0,
) -> Dataset:
    """Synthetic patch data of Chen et al. (NeurIPS 2023), papers.md §3.

    The true label yhat in {-1, +1} is uniform; the observed label y equals yhat
    flipped with probability ``flip_prob`` (in both splits: it is part of the
    data distribution, so the Bayes test error is ``flip_prob``). Each x has
    ``num_patches`` patches of dimension ``dim``: one, at a uniformly random
    position, is the signal ``yhat * mu``; the others are noise
    ``xi ~ N(0, noise_std^2 (I - mu mu^T / ||mu||^2))`` (orthogonal to mu).

    Defaults are the template of Kou et al. 2023 (same group, [code]): P = 2,
    d = 100, n = 20 train / 1000 test, sigma_p = 1, ||mu|| = 5, p = 0.1.

    Args:
      split: "train" or "test" (``n`` or ``n_test`` examples).
      n, n_test: sizes of the train and test splits.
      num_patches: P >= 2.
      dim: d, dimension of a patch.
      noise_std: sigma_p.
      signal_norm: ||mu||.
      flip_prob: label-flip probability p in [0, 1/2).
      seed: one seed for mu and both splits (each split uses its own stream, and
        the two splits share mu).

    Returns:
      Dataset with x (N, P, d) float32, y int32 in {0, 1} (class 1 is y = +1).
      ``per_example``: ``clean_y`` (yhat as a class), ``noisy`` (label flipped),
      ``signal_position`` (patch index of the signal), ``noise`` (N, P-1, d) the
      noise patches in order. ``info``: ``signal`` (mu, shape (d,)) and all
      parameters.
    """
    _check_split(split)
    if num_patches < 2:
        raise ValueError(f"num_patches must be >= 2 (one signal, at least one noise patch), got {num_patches}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2, got {dim}")
    if not 0.0 <= flip_prob < 0.5:
        raise ValueError(f"flip_prob must be in [0, 0.5), got {flip_prob}")
    if noise_std < 0 or signal_norm <= 0:
        raise ValueError(f"need noise_std >= 0 and signal_norm > 0, got {noise_std}, {signal_norm}")
    size = n if split == "train" else n_test
    if size < 1:
        raise ValueError(f"the {split} split needs at least one example, got {size}")

    mu = patch_signal(dim, signal_norm, seed)
    rng = np.random.default_rng([seed, _SPLITS.index(split)])
    clean_pm = rng.choice(np.array([-1, 1]), size=size)
    flipped = rng.random(size) < flip_prob
    observed_pm = np.where(flipped, -clean_pm, clean_pm)
    position = rng.integers(0, num_patches, size=size)

    unit = mu.astype(np.float64) / np.linalg.norm(mu)
    noise = noise_std * rng.standard_normal((size, num_patches - 1, dim))
    noise -= (noise @ unit)[..., None] * unit  # project onto the complement of mu

    x = np.empty((size, num_patches, dim), np.float64)
    slots = np.arange(num_patches)[None, :] != position[:, None]  # (N, P) noise slots
    x[slots] = noise.reshape(-1, dim)
    x[np.arange(size), position] = clean_pm[:, None] * mu
    to_class = lambda pm: ((pm + 1) // 2).astype(np.int32)
    params = dict(n=n, n_test=n_test, num_patches=num_patches, dim=dim, noise_std=noise_std,
                  signal_norm=signal_norm, flip_prob=flip_prob, seed=seed)
    return Dataset(
        "patch", split, x.astype(np.float32), to_class(observed_pm), num_classes=2,
        per_example={"clean_y": to_class(clean_pm), "noisy": flipped,
                     "signal_position": position.astype(np.int32), "noise": noise.astype(np.float32)},
        info={"signal": mu, **params},
    )
