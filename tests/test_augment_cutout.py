"""Cutout with a probability (the late-phase SAM code's 0.5): the share of cut images
is binomial(N, p), and every cut image carries exactly its drawn square."""
import math

import numpy as np
import pytest

from sam_jax.data import Augmentation, Dataset, cutout

N, H, W, C = 2000, 10, 9, 2
SIZE = 4


def _expected(images, rng, size, probability):
    """Independent re-implementation from the documented draws (cy, cx, then u < p)."""
    n, h, w, _ = images.shape
    cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
    cut = rng.random(n) < probability if probability < 1 else np.ones(n, bool)
    out = images.copy()
    for i in np.nonzero(cut)[0]:
        top, left = cy[i] - size // 2, cx[i] - size // 2
        out[i, max(top, 0):max(top + size, 0), max(left, 0):max(left + size, 0)] = 0
    return out, cut


def test_half_the_images_are_cut_each_exactly_its_square():
    images = np.random.default_rng(0).uniform(0.1, 1.0, (N, H, W, C)).astype(np.float32)
    out = cutout(images, SIZE, np.random.default_rng(7), probability=0.5)
    expected, cut = _expected(images, np.random.default_rng(7), SIZE, 0.5)
    np.testing.assert_array_equal(out, expected)
    # The fraction cut: binomial(N, 0.5); 4.5 standard deviations (p ≈ 7e-6 to fail).
    touched = np.array([not np.array_equal(o, x) for o, x in zip(out, images)])
    np.testing.assert_array_equal(touched, cut)  # no pixel is zero in the input
    assert abs(touched.mean() - 0.5) <= 4.5 * math.sqrt(0.25 / N)
    for o, x, was_cut in zip(out[:200], images[:200], touched[:200]):
        zero = np.all(o == 0, axis=-1)
        if not was_cut:
            assert not zero.any()
            continue
        rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
        assert zero.sum() == len(rows) * len(cols) <= SIZE * SIZE  # one rectangle
        assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        np.testing.assert_array_equal(o[~zero], x[~zero])  # the rest untouched


def test_probability_one_keeps_the_draws_of_plain_cutout_and_zero_is_identity():
    images = np.ones((50, H, W, C), np.float32)
    always = cutout(images, SIZE, np.random.default_rng(3))
    np.testing.assert_array_equal(always, cutout(images, SIZE, np.random.default_rng(3), 1.0))
    assert all((o == 0).any() for o in always)
    np.testing.assert_array_equal(cutout(images, SIZE, np.random.default_rng(3), 0.0), images)
    with pytest.raises(ValueError, match="probability"):
        cutout(images, SIZE, np.random.default_rng(3), 1.5)


def test_dataset_pipeline_applies_cutout_prob():
    x = np.random.default_rng(1).integers(1, 256, (400, H, W, C), dtype=np.uint8)
    data = Dataset("t", "train", x, np.zeros(400), 2,
                   augmentation=Augmentation(cutout=SIZE, cutout_prob=0.5))
    out = next(data.batches(400, seed=2, epoch=1, shuffle=False, augment=True))["x"]
    rng = np.random.default_rng(np.random.SeedSequence([2, 1]).spawn(2)[1])
    expected, cut = _expected(x.astype(np.float32) / 255.0, rng, SIZE, 0.5)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert abs(cut.mean() - 0.5) <= 4.5 * math.sqrt(0.25 / 400)
    with pytest.raises(ValueError, match="cutout_prob"):
        Augmentation(cutout=4, cutout_prob=-0.1)


def test_tfds_default_is_the_authors_half():
    import inspect

    from sam_jax.data import tfds

    assert inspect.signature(tfds.load).parameters["cutout_prob"].default == 0.5
