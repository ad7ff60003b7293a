"""``Dataset.batches(rows=...)``: each process of a multi-host job builds only its
rows of every global batch, and gets exactly those rows, bit for bit, including the
random augmentation and the padded last batch."""
import numpy as np
import pytest

from sam_jax.data import Augmentation, Dataset, cutout, random_crop, random_flip
from sam_jax.data import augment as aug

BATCH = 8
AUGMENTATION = Augmentation(crop_padding=2, flip=True, cutout=4, cutout_prob=0.5)
# Tilings of the batch, one list per "number of processes", plus single slices.
TILINGS = [
    [slice(0, 4), slice(4, 8)],
    [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)],
    [slice(0, 3), slice(3, 8)],
    [slice(None, 5), slice(5, None)],
]
TILING_IDS = ["halves", "quarters", "3+5", "5+3"]
SINGLE = [slice(6, 8), slice(7, 8), slice(0, 8), slice(1, 7)]
# drop_remainder True; padded last batch with mask; short last batch without padding.
MODES = [dict(drop_remainder=True), dict(drop_remainder=False, pad_remainder=True),
         dict(drop_remainder=False)]


def image_dataset(n=37):
    """A uint8 NHWC dataset: 37 = 4 full batches of 8 plus 5 in the last one."""
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (n, 8, 7, 3), dtype=np.uint8)  # no zero pixel: augmentation is visible
    return Dataset("imgs", "train", x, rng.integers(0, 5, n), 5,
                   normalization=((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)), augmentation=AUGMENTATION)


def vector_dataset(n=29):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 6)).astype(np.float32)
    return Dataset("vecs", "train", x, rng.integers(0, 3, n), 3, normalization=(0.1, 2.0))


def _epoch(dataset, rows=None, **kwargs):
    return list(dataset.batches(BATCH, rows=rows, **kwargs))


def _assert_parts_make_global(dataset, parts, **kwargs):
    whole = _epoch(dataset, **kwargs)
    pieces = [_epoch(dataset, rows=rows, **kwargs) for rows in parts]
    assert all(len(p) == len(whole) for p in pieces)
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            joined = np.concatenate([p[step][key] for p in pieces])
            assert joined.dtype == value.dtype, key
            np.testing.assert_array_equal(joined, value, err_msg=f"{key} at step {step}")
    return whole


@pytest.mark.parametrize("mode", MODES, ids=["drop", "pad", "short"])
@pytest.mark.parametrize("epoch", [0, 1, 2])
@pytest.mark.parametrize("parts", TILINGS, ids=TILING_IDS)
def test_augmented_image_rows_tile_the_global_batch(parts, epoch, mode):
    dataset = image_dataset()
    whole = _assert_parts_make_global(dataset, parts, seed=3, epoch=epoch, augment=True, **mode)
    # Not vacuous: the augmentation changes the images.
    plain = _epoch(dataset, seed=3, epoch=epoch, augment=False, **mode)
    assert not np.array_equal(whole[0]["x"], plain[0]["x"])


@pytest.mark.parametrize("mode", MODES, ids=["drop", "pad", "short"])
@pytest.mark.parametrize("parts", TILINGS, ids=TILING_IDS)
def test_vector_rows_tile_the_global_batch(parts, mode):
    dataset = vector_dataset()
    for epoch in range(2):
        _assert_parts_make_global(dataset, parts, seed=5, epoch=epoch, **mode)


@pytest.mark.parametrize("mode", MODES, ids=["drop", "pad", "short"])
@pytest.mark.parametrize("rows", SINGLE, ids=str)
def test_single_slice_is_that_slice_of_the_global_batch(rows, mode):
    for dataset, augment in [(image_dataset(), True), (vector_dataset(), False)]:
        whole = _epoch(dataset, seed=7, epoch=1, augment=augment, **mode)
        part = _epoch(dataset, rows=rows, seed=7, epoch=1, augment=augment, **mode)
        assert len(part) == len(whole)
        for batch, piece in zip(whole, part):
            assert piece.keys() == batch.keys()
            for key in batch:
                np.testing.assert_array_equal(piece[key], batch[key][rows])


def test_padded_last_batch_rows_beyond_the_data_are_zero_with_mask_zero():
    dataset = image_dataset()  # last batch: 5 real examples of 8
    last = _epoch(dataset, rows=slice(4, 8), seed=0, augment=True, drop_remainder=False,
                  pad_remainder=True)[-1]
    np.testing.assert_array_equal(last["mask"], [1, 0, 0, 0])
    assert last["x"].shape == (4, 8, 7, 3) and (last["x"][0] != 0).any()
    assert (last["x"][1:] == 0).all() and (last["y"][1:] == 0).all()
    tail = _epoch(dataset, rows=slice(6, 8), seed=0, augment=True, drop_remainder=False,
                  pad_remainder=True)[-1]
    np.testing.assert_array_equal(tail["mask"], [0, 0])
    assert (tail["x"] == 0).all() and tail["x"].dtype == np.float32
    # Without padding the short last batch holds only the real rows of the slice.
    short = _epoch(dataset, rows=slice(4, 8), seed=0, augment=True, drop_remainder=False)[-1]
    assert short["x"].shape[0] == short["y"].shape[0] == 1


def test_only_the_selected_rows_are_augmented_and_converted(monkeypatch):
    seen = {"crop": [], "flip": [], "cutout": [], "convert": []}

    def spy(name, fn):
        def wrapped(images, *args, **kwargs):
            seen[name].append(images.shape[0])
            return fn(images, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(aug, "random_crop", spy("crop", aug.random_crop))
    monkeypatch.setattr(aug, "random_flip", spy("flip", aug.random_flip))
    monkeypatch.setattr(aug, "cutout", spy("cutout", aug.cutout))
    monkeypatch.setattr(aug, "to_float_normalized", spy("convert", aug.to_float_normalized))
    dataset = image_dataset()
    batches = _epoch(dataset, rows=slice(2, 4), seed=1, augment=True, drop_remainder=False,
                     pad_remainder=True)
    # 4 full batches (2 of their rows each) and the last one, whose rows 2:4 are real.
    for name, counts in seen.items():
        assert counts == [2] * len(batches), name
    seen = {key: [] for key in seen}
    _epoch(dataset, rows=slice(6, 8), seed=1, augment=True, drop_remainder=False, pad_remainder=True)
    assert seen["convert"] == [2, 2, 2, 2, 0]  # the last batch's rows 6:8 are padding


@pytest.mark.parametrize("rows", [slice(0, 8, 2), slice(0, 8, -1), slice(-2, 8), slice(0, 9),
                                  slice(4, 4), slice(5, 3), slice(0.0, 4), [0, 1], 3])
def test_invalid_rows_raise_value_error(rows):
    with pytest.raises(ValueError, match="rows"):
        next(image_dataset().batches(BATCH, rows=rows, augment=True))


# ----------------------------------------------------------------- augment-level API


@pytest.mark.parametrize("rows", [slice(0, 3), slice(3, 10), slice(4, 5), slice(10, 10)], ids=str)
def test_augmentation_on_rows_equals_rows_of_full_batch_and_keeps_the_stream(rows):
    images = np.random.default_rng(2).integers(1, 256, (10, 6, 5, 2), dtype=np.uint8)
    full_rng, part_rng = np.random.default_rng(9), np.random.default_rng(9)
    full = AUGMENTATION.erase(AUGMENTATION.geometric(images, full_rng), full_rng)
    part = AUGMENTATION.geometric(images[rows], part_rng, rows=rows, total=10)
    part = AUGMENTATION.erase(part, part_rng, rows=rows, total=10)
    np.testing.assert_array_equal(part, full[rows])
    assert full_rng.random() == part_rng.random()  # same generator state afterwards


def test_public_functions_take_rows_and_check_them():
    images = np.random.default_rng(3).integers(1, 256, (12, 6, 6, 1), dtype=np.uint8)
    rows = slice(5, 9)
    for fn in [lambda x, r, **k: random_crop(x, 2, r, **k), lambda x, r, **k: random_flip(x, r, **k),
               lambda x, r, **k: cutout(x, 3, r, 0.5, **k)]:
        expected = fn(images, np.random.default_rng(4))[rows]
        np.testing.assert_array_equal(fn(images[rows], np.random.default_rng(4), rows=rows, total=12),
                                      expected)
        with pytest.raises(ValueError, match="rows"):
            fn(images[:3], np.random.default_rng(4), rows=rows, total=12)  # 3 images for 4 rows
        with pytest.raises(ValueError, match="together"):
            fn(images[rows], np.random.default_rng(4), rows=rows)
