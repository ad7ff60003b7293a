"""The validation split carved from a training split (``get_dataset(..., validation_fraction=)``).

* train ∪ validation is exactly the original training split (as a multiset of
  rows, with every row at its original position), the two are disjoint, the sizes
  are round(f N) and N − round(f N), and the carve is a pure function of
  ``validation_seed``;
* label noise is drawn on the whole training split before the carve, so both parts
  are exactly as noisy as the original (same noisy labels row by row);
* the test split is unaffected;
* the training engine takes it through ``dataset_kwargs`` and trains on exactly the
  carved training part (its step count says so) and tests on the full test set.
"""

import json

import numpy as np
import pytest

from sam_jax.data import get_dataset
from sam_jax.data.base import validation_indices


def _row_keys(x):
    """Each example's bytes: identifies a row of x exactly."""
    flat = np.ascontiguousarray(x).reshape(x.shape[0], -1)
    return [row.tobytes() for row in flat]


@pytest.mark.parametrize("fraction", [0.1, 0.25])
def test_validation_indices_partition(fraction):
    n = 1437
    keep, held = validation_indices(n, fraction, seed=3)
    assert held.size == round(fraction * n) and keep.size == n - round(fraction * n)
    assert np.intersect1d(keep, held).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([keep, held])), np.arange(n))
    assert np.all(np.diff(keep) > 0) and np.all(np.diff(held) > 0)  # stored order kept
    keep2, held2 = validation_indices(n, fraction, seed=3)
    np.testing.assert_array_equal(held, held2)
    assert not np.array_equal(held, validation_indices(n, fraction, seed=4)[1])


def test_digits_train_union_validation_is_the_original_train_set():
    original = get_dataset("digits", "train")
    train = get_dataset("digits", "train", validation_fraction=0.1, validation_seed=7)
    val = get_dataset("digits", "validation", validation_fraction=0.1, validation_seed=7)
    n = original.num_examples                                   # 1437
    assert (val.num_examples, train.num_examples) == (144, n - 144)  # round(143.7) = 144
    assert val.split == "validation" and train.split == "train"
    keep, held = validation_indices(n, 0.1, 7)
    np.testing.assert_array_equal(train.x, original.x[keep])
    np.testing.assert_array_equal(train.y, original.y[keep])
    np.testing.assert_array_equal(val.x, original.x[held])
    np.testing.assert_array_equal(val.y, original.y[held])
    # Disjoint and complete as sets of rows (digits has no duplicate images in train).
    original_rows = _row_keys(original.x)
    assert len(set(original_rows)) == n
    train_rows, val_rows = set(_row_keys(train.x)), set(_row_keys(val.x))
    assert not train_rows & val_rows
    assert train_rows | val_rows == set(original_rows)


def test_mnist1d_sizes_and_test_split_unaffected():
    kwargs = {"validation_fraction": 0.1, "validation_seed": 0}
    train = get_dataset("mnist1d", "train", **kwargs)
    val = get_dataset("mnist1d", "validation", **kwargs)
    assert (train.num_examples, val.num_examples) == (3600, 400)
    test = get_dataset("mnist1d", "test", **kwargs)
    np.testing.assert_array_equal(test.x, get_dataset("mnist1d", "test").x)
    assert test.num_examples == 1000


def test_label_noise_is_drawn_before_the_carve():
    noisy = get_dataset("mnist1d", "train", label_noise=0.2, label_noise_seed=1)
    kwargs = {"label_noise": 0.2, "label_noise_seed": 1, "validation_fraction": 0.1}
    train = get_dataset("mnist1d", "train", **kwargs)
    val = get_dataset("mnist1d", "validation", **kwargs)
    keep, held = validation_indices(4000, 0.1, 0)
    # Row by row the same noisy labels as the full noisy training split.
    np.testing.assert_array_equal(train.y, noisy.y[keep])
    np.testing.assert_array_equal(val.y, noisy.y[held])
    for part, index in ((train, keep), (val, held)):
        np.testing.assert_array_equal(part.per_example["clean_y"], noisy.per_example["clean_y"][index])
        np.testing.assert_array_equal(part.per_example["noisy"], noisy.per_example["noisy"][index])
        assert np.array_equal(part.y != part.per_example["clean_y"], part.per_example["noisy"])
    # 800 flipped labels in all, split between the parts.
    assert int(train.per_example["noisy"].sum() + val.per_example["noisy"].sum()) == 800
    assert 0.1 < val.per_example["noisy"].mean() < 0.3   # "as noisy as training" (≈ 0.2)


def test_errors():
    with pytest.raises(ValueError, match="validation_fraction > 0"):
        get_dataset("digits", "validation")
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        get_dataset("digits", "train", validation_fraction=1.0)
    with pytest.raises(ValueError, match="both must be > 0"):
        validation_indices(5, 0.01)
    with pytest.raises(ValueError, match="split must be one of"):
        get_dataset("digits", "valid", validation_fraction=0.1)


def test_engine_trains_on_the_carved_split(tmp_path):
    from sam_jax.train import TrainConfig, run

    config = TrainConfig(workdir=str(tmp_path / "run"), dataset="digits",
                         dataset_kwargs={"validation_fraction": 0.1, "validation_seed": 7},
                         model="mlp", model_kwargs={"width": 8}, phases="sgd:1",
                         batch_size=100, lr=0.1, progress=False)
    result = run(config)
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["steps_per_epoch"] == (1437 - 144) // 100       # 12 steps on 1293 examples
    assert result.grad_evals == 12.0
    assert record["config"]["dataset_kwargs"]["validation_fraction"] == 0.1
