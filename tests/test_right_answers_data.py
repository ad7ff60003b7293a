"""Augmentation through ``Dataset.batches(augment=True)``, one transform at a time,
against the exact right answer (issue 11: a pipeline that silently skipped Cutout or
the crop passed the old "differs from plain" test).

Each test reproduces the pipeline's random draws (``SeedSequence([seed, epoch])``,
second child, drawn in the documented order crop → flip → Cutout) and also checks the
structure that holds whatever the draws are.
"""
import numpy as np
import pytest

from sam_jax.data import Augmentation, Dataset

N, H, W, C = 12, 9, 7, 2
SEED, EPOCH = 5, 3


def _dataset(augmentation):
    # uint8 pixels in [1, 255]: never 0, all distinct per image position mostly; with no
    # normalization a zero in the output can only come from padding or Cutout.
    x = np.random.default_rng(0).integers(1, 256, (N, H, W, C), dtype=np.uint8)
    return Dataset("t", "train", x, np.arange(N) % 3, 3, augmentation=augmentation)


def _batch(data, augment=True):
    return next(data.batches(N, seed=SEED, epoch=EPOCH, shuffle=False, augment=augment))["x"]


def _augment_rng():
    return np.random.default_rng(np.random.SeedSequence([SEED, EPOCH]).spawn(2)[1])


def _plain(data):
    # the un-augmented pipeline (uint8 -> float32 in [0, 1]); checked against x / 255 below
    plain = _batch(data, augment=False)
    np.testing.assert_allclose(plain, data.x / 255.0, rtol=1e-6)
    return plain


def test_cutout_alone_zeroes_exactly_the_drawn_clipped_square():
    size = 4
    data = _dataset(Augmentation(cutout=size))
    out, plain = _batch(data), _plain(data)
    rng = _augment_rng()
    cy, cx = rng.integers(0, H, size=N), rng.integers(0, W, size=N)
    clipped_somewhere = False
    for i in range(N):
        top, left = cy[i] - size // 2, cx[i] - size // 2
        rows = [r for r in range(top, top + size) if 0 <= r < H]
        cols = [c for c in range(left, left + size) if 0 <= c < W]
        clipped_somewhere |= len(rows) * len(cols) < size * size
        expected = plain[i].copy()
        expected[np.ix_(rows, cols)] = 0.0
        np.testing.assert_array_equal(out[i], expected)
        # structure, independent of the draws: one rectangle of zeros, at most size x size,
        # every other pixel untouched (all channels zeroed together)
        zero = np.all(out[i] == 0, axis=-1)
        assert zero.sum() >= 1 and np.all(out[i][~zero] == plain[i][~zero])
        zr, zc = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
        assert zero.sum() == len(zr) * len(zc) <= size * size
    assert clipped_somewhere  # the draws include a square clipped at the border


def test_random_crop_alone_is_a_window_of_the_zero_padded_image():
    pad = 2
    data = _dataset(Augmentation(crop_padding=pad))
    out, plain = _batch(data), _plain(data)
    rng = _augment_rng()
    dy, dx = rng.integers(0, 2 * pad + 1, size=N), rng.integers(0, 2 * pad + 1, size=N)
    padded = np.pad(plain, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = set()
    for i in range(N):
        np.testing.assert_array_equal(out[i], padded[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W])
        # structure: the output is exactly one of the (2p+1)² windows
        matches = [(a, b) for a in range(2 * pad + 1) for b in range(2 * pad + 1)
                   if np.array_equal(out[i], padded[i, a:a + H, b:b + W])]
        assert matches == [(dy[i], dx[i])]
        offsets.add(matches[0])
    assert len(offsets) > 1 and any(o != (pad, pad) for o in offsets)  # not the identity


def test_flip_alone_mirrors_exactly_the_drawn_images():
    data = _dataset(Augmentation(flip=True))
    out, plain = _batch(data), _plain(data)
    flip = _augment_rng().random(N) < 0.5
    assert 0 < flip.sum() < N
    for i in range(N):
        np.testing.assert_array_equal(out[i], plain[i, :, ::-1] if flip[i] else plain[i])


def test_all_three_equal_an_independent_reimplementation():
    pad, size = 1, 3
    mean, std = np.array([0.3, 0.6], np.float32), np.array([0.5, 0.25], np.float32)
    x = np.random.default_rng(1).integers(1, 256, (N, H, W, C), dtype=np.uint8)
    data = Dataset("t", "train", x, np.zeros(N), 2, normalization=(mean, std),
                   augmentation=Augmentation(crop_padding=pad, flip=True, cutout=size))
    out = _batch(data)
    rng = _augment_rng()
    dy, dx = rng.integers(0, 2 * pad + 1, size=N), rng.integers(0, 2 * pad + 1, size=N)
    flip = rng.random(N) < 0.5
    cy, cx = rng.integers(0, H, size=N), rng.integers(0, W, size=N)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    for i in range(N):
        img = padded[i, dy[i]:dy[i] + H, dx[i]:dx[i] + W]
        if flip[i]:
            img = img[:, ::-1]
        img = (img.astype(np.float64) / 255.0 - mean) / std
        top, left = max(cy[i] - size // 2, 0), max(cx[i] - size // 2, 0)
        img[top:max(cy[i] - size // 2 + size, 0), left:max(cx[i] - size // 2 + size, 0)] = 0.0
        np.testing.assert_allclose(out[i], img, rtol=1e-5, atol=1e-5)
