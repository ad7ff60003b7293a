"""`run(config)`: switching, momentum at the switch, init_from, NaN, checkpoints.

All runs are tiny (MNIST-1D, cnn1d of width 4, 2 steps per epoch) and share the
compiled steps through run()'s process-wide cache.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from sam_jax.train import (CheckpointError, TrainConfig, TrainingDiverged, checkpoint_epochs,
                           load_variables, read_metrics, run)

from _helpers import trees_equal

BASE = dict(dataset="mnist1d", model="cnn1d", model_kwargs={"width": 4}, batch_size=32,
            steps_per_epoch=2, eval_batch_size=500, progress=False, lr=0.05)


def _config(workdir, **changes):
    return TrainConfig(workdir=str(workdir), **{**BASE, **changes})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An SGD run, SGD→SAM runs with momentum reset and carried, and branches."""
    root = tmp_path_factory.mktemp("runs")
    out = {"root": root}
    out["sgd"] = run(_config(root / "sgd", phases="sgd:2"))
    out["reset"] = run(_config(root / "reset", phases="sgd:1,sam:1"))
    out["carry"] = run(_config(root / "carry", phases="sgd:1,sam:1", momentum_at_switch="carry"))
    out["branch"] = run(_config(root / "branch", phases="sgd:1,sam:1",
                                init_from=str(root / "sgd"), init_step=1))
    out["branch_carry"] = run(_config(root / "branch_carry", phases="sgd:1,sam:1",
                                      momentum_at_switch="carry",
                                      init_from=str(root / "sgd"), init_step=1))
    return out


def test_jsonl_shows_the_switch(runs):
    history = read_metrics(runs["reset"].workdir)
    assert [r["phase"] for r in history] == ["sgd", "sam"]
    assert [r["epoch"] for r in history] == [0, 1]
    # SGD costs 1 gradient per step, SAM 2: 2 steps each.
    assert [r["grad_evals"] for r in history] == [2.0, 6.0]
    assert history[0]["perturbation_norm"] == 0.0
    assert history[1]["perturbation_norm"] == pytest.approx(0.05, rel=1e-4)
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "wall_time",
                "grad_norm", "optimizer", "rho"):
        assert key in history[1]
    assert history == runs["reset"].history
    record = json.load(open(runs["reset"].config_path))
    assert record["sam_jax_version"] and record["config"]["phases"] == "sgd:1,sam:1"


def test_lr_schedule_is_global(runs):
    # cosine over 2 epochs x 2 steps; the logged lr is that of the epoch's last step.
    lrs = [r["lr"] for r in runs["reset"].history]
    assert lrs == pytest.approx([0.025 * (1 + np.cos(np.pi / 4)), 0.025 * (1 + np.cos(3 * np.pi / 4))])
    assert [r["lr"] for r in runs["branch"].history] == pytest.approx(lrs[1:])


def test_momentum_reset_and_carry_differ(runs):
    assert trees_equal(runs["reset"].history[0]["train_loss"], runs["carry"].history[0]["train_loss"])
    assert not trees_equal(runs["reset"].variables, runs["carry"].variables)


def test_init_from_equals_the_uninterrupted_switching_run(runs):
    # Branching from the SGD run's epoch-1 checkpoint reproduces the run that did
    # epoch 0 itself, bit for bit: same data order, schedule and optimizer state.
    assert runs["branch"].resumed_from == 1
    assert [r["epoch"] for r in runs["branch"].history] == [1]
    assert trees_equal(runs["branch"].variables, runs["reset"].variables)
    assert trees_equal(runs["branch_carry"].variables, runs["carry"].variables)
    # the gradient evaluations of the SGD prefix are counted
    assert runs["branch"].grad_evals == 6.0


def test_phase_boundaries_are_kept(runs):
    assert checkpoint_epochs(runs["sgd"].workdir) == [1, 2]
    assert checkpoint_epochs(runs["reset"].workdir) == [1, 2]


def test_keep_policy(tmp_path):
    # last 1 (epoch 4), every 2nd (2, 4), phase boundaries (3 = the switch, 4 = the end)
    run(_config(tmp_path, phases="sgd:3,sam:1", keep_last=1, keep_every=2))
    assert checkpoint_epochs(str(tmp_path)) == [2, 3, 4]


def test_finished_run_returns_at_once(runs):
    again = run(runs["reset"].config)
    assert again.resumed_from == 2 and trees_equal(again.variables, runs["reset"].variables)
    assert len(again.history) == 2


def test_resume_with_a_different_config_is_refused(runs):
    with pytest.raises(CheckpointError, match="different run.*seed"):
        run(runs["reset"].config.replace(seed=3))


def test_init_from_a_mismatched_model_names_the_problem(runs, tmp_path):
    config = _config(tmp_path, phases="sgd:1,sam:1", model_kwargs={"width": 3},
                     init_from=str(runs["root"] / "sgd"), init_step=1)
    with pytest.raises(CheckpointError, match="does not match the model"):
        run(config)


def test_init_from_a_missing_epoch(runs, tmp_path):
    config = _config(tmp_path, phases="sgd:3,sam:1", init_from=str(runs["root"] / "sgd"),
                     init_step=3)
    with pytest.raises(CheckpointError, match=r"no checkpoint at epoch 3.*available epochs: \[1, 2\]"):
        run(config)


def test_corrupt_checkpoint_gives_a_clear_error(runs, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(runs["sgd"].workdir, copy)
    step_dir = copy / "checkpoints" / "2" / "variables"
    for root, _, files in os.walk(step_dir):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    with pytest.raises(CheckpointError, match="epoch 2"):
        load_variables(str(copy), 2)


def test_load_variables_matches_run_result(runs):
    assert trees_equal(load_variables(runs["sgd"].workdir), runs["sgd"].variables)


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    # USAM with a huge rho blows the parameters up in the second phase.
    config = _config(tmp_path, phases="sgd:1,usam:1:1e30")
    with pytest.raises(TrainingDiverged, match="epoch 1.*usam.*last good checkpoint: epoch 1"):
        run(config)
    assert checkpoint_epochs(str(tmp_path)) == [1]
    good = load_variables(str(tmp_path), 1)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(good))
    assert [r["epoch"] for r in read_metrics(str(tmp_path))] == [0]


def test_per_device_perturbation_and_lambda_max(tmp_path):
    result = run(_config(tmp_path, phases="sam:1", per_device_perturbation=True,
                         lambda_max_every=1, lambda_max_examples=64, lambda_max_iters=6))
    record = result.history[-1]
    assert np.isfinite(record["train_loss"])
    assert record["lambda_max"] > 0  # its value: tests/test_right_answers_train.py
    assert record["lambda_max_bn_mode"] == "batch" and record["lambda_max_examples"] == 64
