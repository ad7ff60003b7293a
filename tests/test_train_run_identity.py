"""A run's identity: a resume that would mix two configurations is refused.

Every `TrainConfig` field except the logistics ones (`LOGISTICS_FIELDS`) is part of
the run's identity; a resume with any of them changed raises `CheckpointError`
naming each field with its old and new value, and leaves the workdir untouched
(config.json, metrics.jsonl and the checkpoints byte for byte). Logistics changes
resume, and the resumed run ends bit for bit where the uninterrupted one did.

One finished tiny run (``_helpers.TINY_MLP``: MNIST-1D, MLP of width 8, 2 steps per
epoch, ``sgd:2,sam:1``, every checkpoint kept; the session fixture
``finished_tiny_mlp``) is shared by all tests; each test works on its own copy.
A "killed" copy is the finished one without its last checkpoint (epoch 3), i.e. a
run killed after the checkpoint of epoch 2.
"""
import dataclasses
import os
import shutil
import warnings

import jax
import pytest

from sam_jax.train import CheckpointError, TrainConfig, checkpoint_epochs, run
from sam_jax.train import loop
from sam_jax.train.config import (LOGISTICS_FIELDS, RUN_IDENTITY_FIELDS,
                                  identity_differences)

from _helpers import tiny_mlp_config, tree_sha, trees_equal


@pytest.fixture(scope="module")
def finished(finished_tiny_mlp):
    """The shared finished run (``conftest.py``): read only, tests change a copy."""
    return finished_tiny_mlp


@pytest.fixture
def finished_copy(finished, tmp_path):
    copy = tmp_path / "finished"
    shutil.copytree(finished.workdir, copy)
    return copy


@pytest.fixture
def killed_copy(finished, tmp_path):
    """The run as a kill after epoch 2's checkpoint leaves it (checkpoints 1, 2)."""
    copy = tmp_path / "killed"
    shutil.copytree(finished.workdir, copy)
    shutil.rmtree(copy / "checkpoints" / "3")
    assert checkpoint_epochs(str(copy)) == [1, 2]
    return copy


def _refused(workdir, changes: dict, expected: list[tuple[str, str, str]]):
    """Runs with ``changes``; checks the refusal names each (field, old, new) and that
    nothing in the workdir changed (config.json byte for byte included)."""
    before = tree_sha(workdir)
    config_json = (workdir / "config.json").read_bytes()
    with pytest.raises(CheckpointError) as info:
        run(tiny_mlp_config(workdir, **changes))
    message = str(info.value)
    for field, old, new in expected:
        assert f"{field} (--{field.replace('_', '-')}): run {old}, now {new}" in message
    assert "different run" in message
    assert "new --workdir" in message and "--init-from" in message
    assert (workdir / "config.json").read_bytes() == config_json
    assert tree_sha(workdir) == before
    return message


# ------------------------------------------------------------- observed cases
def test_clip_norm_on_a_killed_run_is_refused(killed_copy):
    _refused(killed_copy, dict(clip_norm=0.01), [("clip_norm", "None", "0.01")])


def test_nesterov_and_warmup_on_a_killed_run_are_refused(killed_copy):
    message = _refused(killed_copy, dict(nesterov=True, warmup_epochs=1.0),
                       [("nesterov", "False", "True"), ("warmup_epochs", "0.0", "1.0")])
    # only the differing fields are named
    assert "clip_norm" not in message.split("Only logistics")[0]


def test_label_smoothing_on_a_finished_run_is_refused(finished_copy):
    # with a retention change too: a refused run deletes no checkpoint
    _refused(finished_copy, dict(label_smoothing=0.1, keep_last=1),
             [("label_smoothing", "0.0", "0.1")])


def test_init_from_on_an_existing_workdir_is_refused(finished, finished_copy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(finished.workdir, other)
    message = _refused(finished_copy, dict(init_from=str(other), init_step=1),
                       [("init_from", "None", repr(str(other))), ("init_step", "None", "1")])
    # the advice names this run's directory and checkpoint epochs to branch from
    assert f"--init-from {finished_copy}" in message and "[1, 2, 3]" in message


# ------------------------------------------------------- what may change
def test_logistics_changes_resume_bit_for_bit(finished, killed_copy):
    result = run(tiny_mlp_config(killed_copy, eval_every=2, keep_last=1, progress=True,
                         checkpoint_every=2, host_step_kinds=False))
    assert result.resumed_from == 2
    assert trees_equal(result.variables, finished.variables)
    assert [r["train_loss"] for r in result.history] == \
        [r["train_loss"] for r in finished.history]
    # config.json now records the (same-identity) config that resumed
    import json
    record = json.load(open(killed_copy / "config.json"))
    assert record["config"]["eval_every"] == 2 and record["resumed_from"] == 2
    assert identity_differences(record["config"], finished.config) == []


def test_same_config_on_a_finished_run_is_complete(finished, finished_copy):
    result = run(tiny_mlp_config(finished_copy))
    assert result.resumed_from == 3 and result.final_epoch == 3
    assert trees_equal(result.variables, finished.variables)
    assert len(result.history) == 3


def test_a_code_version_change_warns_and_resumes(finished, finished_copy, monkeypatch):
    monkeypatch.setattr(loop, "_code_version",
                        lambda: {"sam_jax_version": "9.9.9", "sam_jax_git_commit": "abc"})
    with pytest.warns(loop.CodeVersionWarning) as record:
        result = run(tiny_mlp_config(finished_copy))
    message = str(record[0].message)
    assert "sam_jax_version '0.1.0' then, '9.9.9' now" in message
    assert result.resumed_from == 3 and trees_equal(result.variables, finished.variables)


def test_no_code_warning_when_the_code_is_the_same(finished_copy):
    with warnings.catch_warnings():
        warnings.simplefilter("error", loop.CodeVersionWarning)
        run(tiny_mlp_config(finished_copy))


# ------------------------------------------------------------ the split itself
def test_identity_and_logistics_partition_the_fields():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RUN_IDENTITY_FIELDS) | set(LOGISTICS_FIELDS) == fields
    assert not set(RUN_IDENTITY_FIELDS) & set(LOGISTICS_FIELDS)
    # the documented logistics set (docs/train.md, "What a resume checks"); a new
    # field is identity unless added here on purpose
    assert set(LOGISTICS_FIELDS) == {
        "workdir", "resume", "progress", "eval_every", "checkpoint_every", "keep_last",
        "keep_every", "keep_epochs", "lambda_max_every", "eval_batch_size",
        "host_step_kinds", "eigen_refresh_on_host"}
    assert loop._RESUME_MUST_MATCH == RUN_IDENTITY_FIELDS


def test_identity_differences_by_hand(tmp_path):
    saved = TrainConfig(seed=1, model_kwargs={"width": 8}).to_dict()
    assert identity_differences(saved, TrainConfig(seed=1, model_kwargs={"width": 8},
                                                   workdir="elsewhere", keep_last=7)) == []
    assert identity_differences(saved, TrainConfig(seed=2, lr=0.2, model_kwargs={"width": 9})) \
        == [("model_kwargs", {"width": 8}, {"width": 9}), ("lr", 0.1, 0.2), ("seed", 1, 2)]
    # a field an older version did not save counts as its default
    old = {k: v for k, v in saved.items() if k != "clip_norm"}
    assert identity_differences(old, TrainConfig(seed=1, model_kwargs={"width": 8})) == []
    assert identity_differences(old, TrainConfig(seed=1, model_kwargs={"width": 8},
                                                 clip_norm=1.0)) == [("clip_norm", None, 1.0)]
    # init_from compares as a path: relative and absolute spellings agree
    here = os.getcwd()
    try:
        os.chdir(tmp_path)
        a = TrainConfig(init_from="runs/sgd", init_step=1).to_dict()
        assert identity_differences(a, TrainConfig(init_from=str(tmp_path / "runs" / "sgd"),
                                                   init_step=1)) == []
    finally:
        os.chdir(here)


def test_the_number_of_devices_used_is_identity():
    config = TrainConfig()  # num_devices=None: all devices, so the count is recorded
    meta = {"config": config.to_dict(), "num_shards": 4}
    with pytest.raises(CheckpointError, match=r"devices used .*: run 4, now 1"):
        loop._check_resume_compatible(meta, config, "somewhere", [1], num_shards=1)
    loop._check_resume_compatible(meta, config, "somewhere", [1], num_shards=4)
    # a checkpoint from before the count was recorded is not refused for it
    loop._check_resume_compatible({"config": config.to_dict()}, config, "somewhere", [1], 1)


def test_the_checkpoint_records_devices_and_code(finished):
    from sam_jax.train.checkpoint import Checkpointer, checkpoint_dir
    ckpt = Checkpointer(checkpoint_dir(finished.workdir), read_only=True, keep_last=None)
    try:
        meta = ckpt.restore_meta(3)
    finally:
        ckpt.close()
    assert meta["num_shards"] == len(jax.devices())
    assert meta["sam_jax_version"] == loop._code_version()["sam_jax_version"]
    assert meta["sam_jax_git_commit"] == loop._code_version()["sam_jax_git_commit"]


def test_the_cli_refuses_with_the_field_names(killed_copy, capsys):
    from sam_jax.train import cli

    argv = ["--workdir", str(killed_copy), "--dataset", "mnist1d", "--model", "mlp",
            "--model-kwargs", '{"width": 8, "depth": 1}', "--phases", "sgd:2,sam:1",
            "--batch-size", "32", "--steps-per-epoch", "2", "--lr", "0.05",
            "--keep-last", "none", "--no-progress"]
    config_json = (killed_copy / "config.json").read_bytes()
    with pytest.raises(SystemExit) as info:
        cli.main(argv + ["--clip-norm", "0.01", "--label-smoothing", "0.1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "label_smoothing (--label-smoothing): run 0.0, now 0.1" in err
    assert "clip_norm (--clip-norm): run None, now 0.01" in err
    assert (killed_copy / "config.json").read_bytes() == config_json
