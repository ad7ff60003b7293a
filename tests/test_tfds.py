"""The TFDS path for real: a tiny archive in CIFAR-10's own binary format is
prepared by TFDS's own cifar10 builder, then read back through
``sam_jax.data.get_dataset`` (``tfds.data_source``)."""
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from sam_jax.data import get_dataset
from sam_jax.data.testing import write_fake_cifar10


def test_fake_archive_has_cifar_layout(tmp_path):
    written = write_fake_cifar10(tmp_path, n_train=7, n_test=3, seed=1)
    with tarfile.open(written["archive"]) as tar:
        names = sorted(tar.getnames())
        assert names == sorted(f"cifar-10-batches-bin/{n}" for n in
                               ["batches.meta.txt", "test_batch.bin", *[f"data_batch_{k}.bin" for k in range(1, 6)]])
        raw = np.frombuffer(tar.extractfile("cifar-10-batches-bin/test_batch.bin").read(), np.uint8)
    records = raw.reshape(3, 3073)  # 1 label byte + 3072 pixel bytes
    np.testing.assert_array_equal(records[:, 0], written["test_labels"])
    # Pixels are the R, G, B planes, each 32x32 row-major.
    np.testing.assert_array_equal(records[:, 1:].reshape(3, 3, 32, 32).transpose(0, 2, 3, 1), written["test_images"])


def test_missing_tfds_package_error_names_the_extra(monkeypatch):
    from sam_jax.data import tfds as tfds_source

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'sam-jax\[tfds\]'"):
        tfds_source.load("cifar10", "train", data_dir="/nonexistent")



@pytest.fixture(scope="module")
def fake_cifar10(tmp_path_factory):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorflow_datasets")
    from sam_jax.data.testing import prepare_fake_cifar10

    data_dir = tmp_path_factory.mktemp("tfds")
    written = prepare_fake_cifar10(data_dir, n_train=12, n_test=5, seed=3)
    return str(data_dir), written


def _pairs(images, labels):
    return sorted((image.tobytes(), int(label)) for image, label in zip(images, labels))


@pytest.mark.tfds
def test_prepared_cifar10_reads_back_what_was_written(fake_cifar10):
    data_dir, written = fake_cifar10
    for split in ("train", "test"):
        data = get_dataset("cifar10", split, data_dir=data_dir)
        assert data.num_examples == len(written[f"{split}_labels"])
        assert data.x.dtype == np.uint8 and data.input_shape == (32, 32, 3) and data.num_classes == 10
        # TFDS stores the examples in its own (shuffled) order: compare as multisets.
        assert _pairs(data.x, data.y) == _pairs(written[f"{split}_images"], written[f"{split}_labels"])

    train = get_dataset("cifar10", "train", data_dir=data_dir, cutout=8)
    assert train.augmentation.crop_padding == 4 and train.augmentation.flip and train.augmentation.cutout == 8
    plain = train.arrays()["x"]
    mean, std = np.array([0.4914, 0.4822, 0.4465]), np.array([0.2470, 0.2435, 0.2616])
    np.testing.assert_allclose(plain, (train.x / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    batch = next(train.batches(4, seed=0, augment=True))
    assert batch["x"].shape == (4, 32, 32, 3) and batch["x"].dtype == np.float32
    assert batch["y"].dtype == np.int32
    assert get_dataset("cifar10", "train", data_dir=data_dir, max_examples=5).num_examples == 5
    noisy = get_dataset("cifar10", "train", data_dir=data_dir, label_noise=0.5)
    assert np.sum(noisy.y != noisy.per_example["clean_y"]) == 6


@pytest.mark.tfds
def test_reading_needs_no_tensorflow(fake_cifar10):
    data_dir, written = fake_cifar10
    script = textwrap.dedent(f"""
        import sys

        class HideTensorFlow:  # every finder now answers as if TensorFlow were not installed
            def __init__(self, finder):
                self.finder = finder

            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow" or name.startswith("tensorflow."):
                    return None
                find = getattr(self.finder, "find_spec", None)
                return find(name, path, target) if find else None

            def __getattr__(self, attribute):
                return getattr(self.finder, attribute)

        sys.meta_path[:] = [HideTensorFlow(finder) for finder in sys.meta_path]
        import importlib.util
        assert importlib.util.find_spec("tensorflow") is None
        from sam_jax.data import get_dataset
        data = get_dataset("cifar10", "test", data_dir={data_dir!r})
        assert "tensorflow" not in sys.modules
        print(data.num_examples, sorted(data.y.tolist()))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"5 {sorted(written['test_labels'].tolist())}"


@pytest.mark.tfds
def test_unprepared_dataset_error_says_how_to_prepare(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(FileNotFoundError) as info:
        get_dataset("svhn", "train", data_dir=str(tmp_path))
    message = str(info.value)
    assert "pip install 'sam-jax[tfds]'" in message
    assert f"python -m sam_jax.data.tfds svhn --data-dir {tmp_path}" in message
