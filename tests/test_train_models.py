"""A few steps end to end on every embedded dataset and every model family.

Each run is one epoch of 2 steps of a SAM phase (the SAM step contains the SGD
step's work) at tiny width; the deep families take SGD steps and are marked slow.
The TFDS path trains one step on a fake CIFAR-10 archive prepared by TFDS's own
builder.
"""
import jax
import numpy as np
import pytest

from sam_jax.train import TrainConfig, checkpoint_epochs, load_variables, run

# The deep families compile slowly on CPU (minutes for ResNet-50 on a busy 2-core
# machine): they take SGD steps (half the SAM step's graph) and are marked slow.
CASES = [
    pytest.param("mnist1d", "mlp", {"width": 8}, {}, "sam", id="mnist1d-mlp"),
    pytest.param("mnist1d", "cnn1d", {"width": 4}, {}, "sam", id="mnist1d-cnn1d"),
    pytest.param("digits", "cnn6", {"width": 2, "use_bn": True}, {}, "sam", id="digits-cnn6"),
    pytest.param("patch", "patch_cnn", {"width": 4}, {"n": 16, "n_test": 40}, "sam",
                 id="patch-patch_cnn"),
    pytest.param("digits", "wrn", {"depth": 10, "widen_factor": 1, "width": 2}, {}, "sam",
                 id="digits-wrn", marks=pytest.mark.slow),
    pytest.param("digits", "resnet18", {"width": 2}, {}, "sgd", id="digits-resnet18",
                 marks=pytest.mark.slow),
    pytest.param("digits", "resnet50", {"width": 2}, {}, "sgd", id="digits-resnet50",
                 marks=pytest.mark.slow),
]


def _tiny(workdir, **kw):
    settings = dict(phases="sam:1", batch_size=8, steps_per_epoch=2, eval_batch_size=64,
                    progress=False, lr=0.05, num_devices=1)  # 1 device: cheaper compiles
    return TrainConfig(workdir=str(workdir), **{**settings, **kw})


def _check_trained(result, workdir, optimizer):
    (record,) = result.history
    assert record["phase"] == optimizer
    assert record["grad_evals"] == {"sam": 4.0, "sgd": 2.0}[optimizer]
    assert np.isfinite(record["train_loss"]) and np.isfinite(record["test_loss"])
    assert 0.0 <= record["test_acc"] <= 1.0
    assert checkpoint_epochs(str(workdir)) == [1]
    saved = load_variables(str(workdir))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(result.variables), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dataset, model, model_kwargs, dataset_kwargs, optimizer", CASES)
def test_a_few_steps_end_to_end(dataset, model, model_kwargs, dataset_kwargs, optimizer,
                                tmp_path):
    result = run(_tiny(tmp_path, dataset=dataset, model=model, model_kwargs=model_kwargs,
                       dataset_kwargs=dataset_kwargs, phases=f"{optimizer}:1"))
    _check_trained(result, tmp_path, optimizer)


@pytest.mark.tfds
def test_one_step_on_fake_cifar10_through_tfds(tmp_path):
    pytest.importorskip("tensorflow")
    from sam_jax.data.testing import prepare_fake_cifar10

    data_dir = tmp_path / "tfds"
    prepare_fake_cifar10(data_dir, n_train=16, n_test=8)
    workdir = tmp_path / "run"
    result = run(_tiny(workdir, dataset="cifar10", dataset_kwargs={"data_dir": str(data_dir)},
                       model="cnn6", model_kwargs={"width": 2}, steps_per_epoch=1))
    (record,) = result.history
    assert np.isfinite(record["train_loss"]) and record["grad_evals"] == 2.0
    assert 0.0 <= record["test_acc"] <= 1.0
