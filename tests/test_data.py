"""Embedded datasets, the batch iterator, augmentation and label noise, checked
against the source packages and against independent numpy computations."""
import random

import numpy as np
import pytest

from sam_jax.data import (Augmentation, Dataset, cutout, digits, flip_labels, get_dataset, mnist1d,
                          normalize, patch_data, random_crop, random_flip)

# ----------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_standard_split_matches_package_and_keeps_global_rng():
    from mnist1d.data import get_dataset_args, make_dataset

    np.random.seed(123)
    random.seed(123)
    expected_next = (np.random.rand(), random.random())
    np.random.seed(123)
    random.seed(123)
    train, test = mnist1d("train"), mnist1d("test")
    assert (np.random.rand(), random.random()) == expected_next  # no global side effect

    assert (train.num_examples, test.num_examples) == (4000, 1000)
    assert train.input_shape == (40, 1) and train.num_classes == 10
    assert train.x.dtype == np.float32 and train.y.dtype == np.int32
    reference = make_dataset(get_dataset_args())
    np.testing.assert_allclose(train.x[..., 0], reference["x"], rtol=1e-6)
    np.testing.assert_array_equal(test.y, reference["y_test"])
    assert set(np.unique(train.y)) == set(range(10))


def test_mnist1d_larger_and_bad_sizes():
    big = get_dataset("mnist1d", "test", num_samples=10_000)
    assert big.num_examples == 2000
    with pytest.raises(ValueError, match="multiple of 10"):
        mnist1d("train", num_samples=4005)
    with pytest.raises(ValueError, match="split"):
        mnist1d("validation")


# ----------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_complete():
    from sklearn.datasets import load_digits

    train, test = digits("train"), get_dataset("digits", "test")
    assert (train.num_examples, test.num_examples) == (1437, 360)
    assert train.input_shape == (8, 8, 1) and train.x.dtype == np.float32
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    # Stratified: each class's share of the test split is within one example of 20%.
    full = load_digits()
    for c in range(10):
        assert abs(np.sum(test.y == c) - 0.2 * np.sum(full.target == c)) <= 1
    # The two splits partition the 1797 images.
    together = np.concatenate([train.x, test.x]).reshape(1797, 64) * 16
    assert sorted(map(tuple, together.round())) == sorted(map(tuple, full.data))
    np.testing.assert_array_equal(digits("train").y, train.y)  # fixed split


# ----------------------------------------------------------------------------- batches


def _toy(n=10, shape=(4, 4, 3)):
    x = np.arange(n * int(np.prod(shape)), dtype=np.float32).reshape((n, *shape))
    return Dataset("toy", "train", x, np.arange(n) % 3, num_classes=3)


def test_batches_deterministic_and_cover_each_example_once():
    data = _toy()
    run = lambda **kw: [b["y"].tolist() + b["x"][:, 0, 0, 0].tolist() for b in data.batches(3, **kw)]
    assert run(seed=1, epoch=2) == run(seed=1, epoch=2)
    assert run(seed=1, epoch=2) != run(seed=1, epoch=3)
    assert run(seed=1, epoch=2) != run(seed=2, epoch=2)
    batches = list(data.batches(3, seed=0, epoch=0, drop_remainder=False))
    assert [b["x"].shape[0] for b in batches] == [3, 3, 3, 1]
    seen = np.concatenate([b["x"][:, 0, 0, 0] for b in batches])
    np.testing.assert_array_equal(np.sort(seen), data.x[:, 0, 0, 0])
    assert len(list(data.batches(3))) == data.steps_per_epoch(3) == 3
    unshuffled = next(data.batches(4, shuffle=False))
    np.testing.assert_array_equal(unshuffled["x"], data.x[:4])
    assert unshuffled["x"].dtype == np.float32 and unshuffled["y"].dtype == np.int32


def test_pad_remainder_adds_mask_and_bad_batch_sizes():
    data = _toy(n=5)
    batches = list(data.batches(4, drop_remainder=False, pad_remainder=True, shuffle=False))
    assert [b["x"].shape[0] for b in batches] == [4, 4]
    np.testing.assert_array_equal(batches[1]["mask"], [1, 0, 0, 0])
    np.testing.assert_array_equal(batches[1]["x"][1:], 0)
    with pytest.raises(ValueError, match="exceeds"):
        list(data.batches(6))
    with pytest.raises(ValueError, match="positive"):
        list(data.batches(0))


def test_subset_take_and_arrays():
    data = _toy().with_label_noise(0.5, seed=0)
    sub = data.subset(4)
    np.testing.assert_array_equal(sub.x, data.x[:4])
    np.testing.assert_array_equal(sub.per_example["clean_y"], data.per_example["clean_y"][:4])
    assert data.subset(4, seed=3).num_examples == 4
    np.testing.assert_array_equal(data.arrays()["x"], data.x)
    with pytest.raises(ValueError):
        data.subset(11)


def test_uint8_images_are_scaled_then_normalized():
    x = np.full((2, 2, 2, 3), 255, np.uint8)
    data = Dataset("t", "train", x, np.zeros(2), 2, normalization=((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)))
    np.testing.assert_allclose(data.arrays()["x"][0, 0, 0], [2.0, 1.0, 0.5])


# ----------------------------------------------------------------------------- augmentation


def _windows(image, padding):
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    h, w = image.shape[:2]
    return {(dy, dx): padded[dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)}


def test_random_crop_is_a_zero_padded_window_with_uniform_offsets():
    image = np.arange(1, 8 * 8 * 3 + 1, dtype=np.float32).reshape(8, 8, 3)  # all pixels distinct, nonzero
    images = np.repeat(image[None], 2000, axis=0)
    crops = random_crop(images, 4, np.random.default_rng(0))
    assert crops.shape == images.shape and crops.dtype == images.dtype
    windows = _windows(image, 4)
    counts = dict.fromkeys(windows, 0)
    for crop in crops:
        # The top-left real pixel identifies the offset; the crop must equal that window exactly.
        match = [key for key, window in windows.items() if np.array_equal(window, crop)]
        assert len(match) == 1
        counts[match[0]] += 1
    assert min(counts.values()) > 5  # all 81 offsets occur (expected 24.7 each)
    assert max(counts.values()) < 55


def test_random_flip_mirrors_about_half():
    image = np.arange(4 * 5 * 2, dtype=np.float32).reshape(1, 4, 5, 2)
    images = np.repeat(image, 1000, axis=0)
    out = random_flip(images, np.random.default_rng(1))
    mirrored = np.array([np.array_equal(o, image[0, :, ::-1]) for o in out])
    same = np.array([np.array_equal(o, image[0]) for o in out])
    assert np.all(mirrored ^ same)
    assert 430 < mirrored.sum() < 570


def test_cutout_zeros_one_clipped_square():
    images = np.ones((500, 32, 32, 3), np.float32)
    out = cutout(images, 16, np.random.default_rng(2))
    sizes = []
    for o in out:
        zero = o[..., 0] == 0
        assert np.all(o[zero] == 0) and np.all(o[~zero] == 1)
        rows, cols = np.nonzero(zero.any(1))[0], np.nonzero(zero.any(0))[0]
        # A single axis-aligned rectangle of at most 16 x 16 pixels.
        assert zero.sum() == len(rows) * len(cols)
        assert np.all(np.diff(rows) == 1) and np.all(np.diff(cols) == 1)
        sizes.append((len(rows), len(cols)))
    assert max(sizes) == (16, 16) and (16, 16) in sizes
    assert any(s != (16, 16) for s in sizes)  # clipped at the border sometimes


def test_normalize_per_channel():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(100, 4, 4, 3)).astype(np.float32)
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    z = normalize(x, mean, std)
    np.testing.assert_allclose(z.mean(axis=(0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 1, 2)), 1, rtol=1e-5)
    with pytest.raises(ValueError, match="positive"):
        normalize(x, 0.0, 0.0)


def test_augmented_batches_keep_shape_and_differ_from_plain():
    data = Dataset("t", "train", np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
                   np.zeros(16), 2, augmentation=Augmentation(crop_padding=2, flip=True, cutout=4))
    plain = next(data.batches(16, shuffle=False))
    augmented = next(data.batches(16, shuffle=False, augment=True))
    assert augmented["x"].shape == plain["x"].shape == (16, 8, 8, 3)
    assert augmented["x"].dtype == np.float32
    assert not np.array_equal(augmented["x"], plain["x"])
    again = next(data.batches(16, shuffle=False, augment=True))
    np.testing.assert_array_equal(again["x"], augmented["x"])  # deterministic
    with pytest.raises(ValueError, match="NHWC"):
        next(_toy(shape=(5,)).batches(2, augment=Augmentation(flip=True)))


# ----------------------------------------------------------------------------- label noise


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 1.0])
def test_label_noise_flips_exactly_the_fraction(fraction):
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    noisy, flipped = flip_labels(labels, fraction, 10, seed=4)
    assert flipped.sum() == round(fraction * 1000)
    assert np.all(noisy[flipped] != labels[flipped])
    np.testing.assert_array_equal(noisy[~flipped], labels[~flipped])
    assert noisy.dtype == np.int32 and noisy.min() >= 0 and noisy.max() < 10


def test_label_noise_new_labels_uniform_over_other_classes():
    labels = np.zeros(20_000, int)
    noisy, _ = flip_labels(labels, 1.0, 5, seed=0)
    counts = np.bincount(noisy, minlength=5)
    assert counts[0] == 0
    assert np.all(np.abs(counts[1:] - 5000) < 4 * np.sqrt(5000 * 0.75))


def test_get_dataset_label_noise_only_on_train():
    train = get_dataset("digits", "train", label_noise=0.2, label_noise_seed=1)
    assert np.mean(train.y != train.per_example["clean_y"]) == pytest.approx(0.2, abs=1e-3)
    np.testing.assert_array_equal(get_dataset("digits", "test", label_noise=0.2).y, digits("test").y)
    with pytest.raises(ValueError, match="label noise"):
        flip_labels(np.zeros(3), 1.5, 10, 0)


def test_get_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="bad arguments"):
        get_dataset("digits", "train", nonsense=1)
    with pytest.raises(ValueError, match="data_dir"):
        get_dataset("mnist1d", "train", data_dir="/tmp")
    with pytest.raises(ValueError, match="flip_prob"):
        get_dataset("patch", "train", label_noise=0.1)


# ----------------------------------------------------------------------------- patch data


def test_patch_data_structure():
    kw = dict(n=4000, num_patches=3, dim=50, noise_std=2.0, signal_norm=3.0, flip_prob=0.2, seed=5)
    train, test = patch_data("train", **kw), get_dataset("patch", "test", n_test=100, **kw)
    mu = train.info["signal"]
    np.testing.assert_array_equal(mu, test.info["signal"])  # one signal for both splits
    assert np.linalg.norm(mu) == pytest.approx(3.0, rel=1e-6)
    assert train.x.shape == (4000, 3, 50) and train.x.dtype == np.float32 and train.num_classes == 2

    clean_pm = 2 * train.per_example["clean_y"] - 1
    position = train.per_example["signal_position"]
    # The signal patch is yhat * mu.
    np.testing.assert_allclose(train.x[np.arange(4000), position], clean_pm[:, None] * mu, rtol=1e-6)
    # The other patches are the noise, orthogonal to mu, with covariance sigma^2 (I - mu mu^T/|mu|^2).
    noise_slots = np.arange(3)[None] != position[:, None]
    noise = train.x[noise_slots].reshape(4000, 2, 50)
    np.testing.assert_allclose(noise, train.per_example["noise"], rtol=1e-6)
    assert np.max(np.abs(noise @ mu)) < 1e-3
    covariance = np.cov(noise.reshape(-1, 50), rowvar=False)
    expected = 4.0 * (np.eye(50) - np.outer(mu, mu) / 9.0)
    assert np.max(np.abs(covariance - expected)) < 0.25  # ~6 standard errors at 8000 samples
    # Label flips: observed differs from clean exactly on the "noisy" examples, at rate ~ p.
    flipped = train.y != train.per_example["clean_y"]
    np.testing.assert_array_equal(flipped, train.per_example["noisy"])
    assert abs(flipped.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 4000)
    assert abs(np.mean(clean_pm) ) < 4 / np.sqrt(4000)
    assert np.all(np.bincount(position, minlength=3) > 1200)


def test_patch_data_deterministic_and_validated():
    a, b = patch_data("train", seed=3), patch_data("train", seed=3)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.array_equal(a.x, patch_data("train", seed=4).x)
    assert a.num_examples == 20 and patch_data("test").num_examples == 1000
    with pytest.raises(ValueError, match="flip_prob"):
        patch_data("train", flip_prob=0.5)
    with pytest.raises(ValueError, match="num_patches"):
        patch_data("train", num_patches=1)
