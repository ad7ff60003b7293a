"""Host-side (numpy), vectorized augmentation, normalization and label noise.

Pipeline order follows the PyTorch code the papers build on (davda54/sam, the
late-phase SAM code): random crop with zero padding and horizontal flip on the
raw image, then conversion to float and per-channel normalization, then Cutout
(which zeroes a square of the *normalized* image).

Every random function draws one vector per parameter for the whole batch
(``rng.integers(..., size=N)``, ``rng.random(N)``). Given ``rows`` and ``total``
they treat ``images`` as rows ``rows`` of a batch of ``total`` images: they still
draw for all ``total`` images, so the generator advances exactly as for the full
batch, and apply only the selected draws. Each process of a multi-host job thus
augments only its own rows and gets exactly those rows of the global batch.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def random_crop(images: np.ndarray, padding: int, rng: np.random.Generator, *,
                rows: slice | None = None, total: int | None = None) -> np.ndarray:
    """Zero-pad each NHWC image by ``padding`` pixels and crop back at a random offset.

    Args:
      images: (N, H, W, C) array of any dtype.
      padding: pixels of zero padding on each side (4 for CIFAR).
      rng: numpy Generator; one (dy, dx) offset in [0, 2*padding] per image
        (``integers``, N each: all dy, then all dx).
      rows, total: ``images`` are rows ``rows`` of a batch of ``total`` images
        (see the module docstring); both or neither.

    Returns:
      Array of the same shape and dtype.
    """
    _check_images(images)
    if padding < 0:
        raise ValueError(f"crop padding must be >= 0, got {padding}")
    draws, pick = _draw_plan(images, rows, total)
    if padding == 0:
        return images
    n, h, w, _ = images.shape
    dy = rng.integers(0, 2 * padding + 1, size=draws)[pick]
    dx = rng.integers(0, 2 * padding + 1, size=draws)[pick]
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    # All (2p+1)^2 windows as a strided view (no copy); pick one per image.
    windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), axis=(1, 2))  # (N, 2p+1, 2p+1, C, H, W)
    return np.ascontiguousarray(windows[np.arange(n), dy, dx].transpose(0, 2, 3, 1))


def random_flip(images: np.ndarray, rng: np.random.Generator, probability: float = 0.5, *,
                rows: slice | None = None, total: int | None = None) -> np.ndarray:
    """Mirror each NHWC image left-right with the given probability.

    Draws ``rng.random(N)``; image i is mirrored iff its draw is ``< probability``.
    ``rows``/``total``: as in `random_crop`.
    """
    _check_images(images)
    draws, pick = _draw_plan(images, rows, total)
    flip = (rng.random(draws) < probability)[pick]
    out = images.copy()
    out[flip] = images[flip, :, ::-1, :]
    return out


def cutout(images: np.ndarray, size: int, rng: np.random.Generator,
           probability: float = 1.0, *, rows: slice | None = None,
           total: int | None = None) -> np.ndarray:
    """Zero a ``size`` x ``size`` square per image (DeVries & Taylor 2017).

    The centre is uniform over the image and the square is clipped at the
    border, as in the reference implementation (16 px for CIFAR WRNs).

    Args:
      images: (N, H, W, C).
      size: side of the square (0 = off).
      rng: numpy Generator. Draws, in this order: the centres ``cy``, ``cx``
        (``integers``, N each), then, only when ``probability < 1``, ``rng.random(N)``;
        image i is cut iff its draw is ``< probability``.
      probability: chance that an image is cut (1: every image, DeVries & Taylor;
        0.5 in the late-phase SAM code, papers.md §2 [code]).
      rows, total: ``images`` are rows ``rows`` of a batch of ``total`` images
        (see the module docstring); both or neither.
    """
    _check_images(images)
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"cutout probability must be in [0, 1], got {probability}")
    draws, pick = _draw_plan(images, rows, total)
    if size <= 0:
        return images
    _, h, w, _ = images.shape
    cy = rng.integers(0, h, size=draws)
    cx = rng.integers(0, w, size=draws)
    if probability < 1.0:
        skip = rng.random(draws) >= probability
        cy = np.where(skip, -10 * (h + w + size), cy)  # a square entirely off the image
    cy, cx = cy[pick], cx[pick]
    half = size // 2
    ys = np.arange(h)[None, :]
    xs = np.arange(w)[None, :]
    in_rows = (ys >= (cy - half)[:, None]) & (ys < (cy - half + size)[:, None])  # (N, H)
    in_cols = (xs >= (cx - half)[:, None]) & (xs < (cx - half + size)[:, None])  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return np.where(mask[..., None], np.zeros((), images.dtype), images)


def to_float(x: np.ndarray) -> np.ndarray:
    """uint8 images -> float32 in [0, 1]; float inputs -> float32 unchanged."""
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    return x.astype(np.float32, copy=False)


def normalize(x: np.ndarray, mean, std) -> np.ndarray:
    """(x - mean) / std with per-channel (last axis) or scalar statistics."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    if np.any(std <= 0):
        raise ValueError(f"normalization std must be positive, got {std}")
    return (x - mean) / std


def to_float_normalized(x: np.ndarray, normalization) -> np.ndarray:
    """``normalize(to_float(x), mean, std)`` in one pass over a fresh float32 copy.

    Args:
      x: uint8 (scaled by 1/255) or float array.
      normalization: (mean, std) or None.
    """
    scale = np.float32(1 / 255) if x.dtype == np.uint8 else np.float32(1)
    out = x.astype(np.float32)  # always a copy: the in-place ops below never touch x
    if normalization is None:
        if scale != 1:
            out *= scale
        return out
    mean = np.asarray(normalization[0], np.float32)
    std = np.asarray(normalization[1], np.float32)
    if np.any(std <= 0):
        raise ValueError(f"normalization std must be positive, got {std}")
    out *= scale / std
    out -= mean / std
    return out


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation of NHWC images.

    Attributes:
      crop_padding: zero padding for random crops (4 for CIFAR/SVHN; 0 = off).
      flip: random horizontal flips (on for CIFAR, off for digits).
      cutout: Cutout square size in pixels (16 for WRN in the late-phase SAM code; 0 = off).
      cutout_prob: probability that an image gets its Cutout square. 1.0 (default
        here) is DeVries & Taylor's Cutout; the late-phase SAM code applies it with
        probability 0.5 (papers.md §2 [code]), which ``sam_jax.data.tfds`` uses as
        its default for the CIFAR-style datasets.
    """

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0
    cutout_prob: float = 1.0

    def __post_init__(self):
        if self.crop_padding < 0 or self.cutout < 0:
            raise ValueError(f"crop_padding and cutout must be >= 0, got {self}")
        if not 0.0 <= self.cutout_prob <= 1.0:
            raise ValueError(f"cutout_prob must be in [0, 1], got {self.cutout_prob}")

    @property
    def is_identity(self) -> bool:
        return self.crop_padding == 0 and not self.flip and (self.cutout == 0 or self.cutout_prob == 0)

    def geometric(self, images: np.ndarray, rng: np.random.Generator, *,
                  rows: slice | None = None, total: int | None = None) -> np.ndarray:
        """Crop and flip (applied to raw images, before normalization).

        ``rows``/``total``: ``images`` are rows ``rows`` of a batch of ``total``
        images; the draws are made for all ``total``, so the result is exactly
        those rows of ``geometric(batch, rng)`` and ``rng`` ends in the same state.
        """
        if self.crop_padding:
            images = random_crop(images, self.crop_padding, rng, rows=rows, total=total)
        if self.flip:
            images = random_flip(images, rng, rows=rows, total=total)
        return images

    def erase(self, images: np.ndarray, rng: np.random.Generator, *,
              rows: slice | None = None, total: int | None = None) -> np.ndarray:
        """Cutout (applied to normalized images); ``rows``/``total`` as in `geometric`."""
        if not self.cutout:
            return images
        return cutout(images, self.cutout, rng, self.cutout_prob, rows=rows, total=total)


def flip_labels(
    labels: np.ndarray, fraction: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric label noise: exactly round(fraction * N) labels changed.

    The chosen examples get a label drawn uniformly from the *other* classes, so
    the fraction of wrong labels is exactly the requested one.

    Args:
      labels: (N,) integer labels.
      fraction: in [0, 1].
      num_classes: number of classes (>= 2).
      seed: seed of the noise (independent of the shuffling seed).

    Returns:
      (noisy_labels int32, flipped bool mask).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label noise fraction must be in [0, 1], got {fraction}")
    if num_classes < 2:
        raise ValueError(f"label noise needs >= 2 classes, got {num_classes}")
    labels = np.asarray(labels).astype(np.int32)
    rng = np.random.default_rng(seed)
    num_flipped = int(round(fraction * labels.shape[0]))
    chosen = rng.choice(labels.shape[0], size=num_flipped, replace=False)
    offset = rng.integers(1, num_classes, size=num_flipped)  # never 0: a different class
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + offset) % num_classes
    flipped = np.zeros(labels.shape[0], bool)
    flipped[chosen] = True
    return noisy, flipped


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4:
        raise ValueError(f"image augmentation expects NHWC arrays, got shape {images.shape}")


def _draw_plan(images: np.ndarray, rows: slice | None, total: int | None) -> tuple[int, slice]:
    """How many images to draw for, and which draws belong to ``images``."""
    if rows is None and total is None:
        return images.shape[0], slice(None)
    if rows is None or total is None:
        raise ValueError(f"rows and total go together, got rows={rows!r}, total={total!r}")
    if not isinstance(rows, slice):
        raise ValueError(f"rows must be a slice, got {rows!r}")
    if not isinstance(total, (int, np.integer)) or total < 0:
        raise ValueError(f"total must be a non-negative int, got {total!r}")
    selected = len(range(total)[rows])
    if images.shape[0] != selected:
        raise ValueError(f"rows {rows} of a batch of {total} are {selected} images, "
                         f"got {images.shape[0]}")
    return int(total), rows
