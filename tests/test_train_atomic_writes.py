"""Writes that a kill cannot destroy: ``metrics.jsonl`` and ``config.json``.

The kill windows are simulated deterministically: ``os.replace`` / ``os.fsync``
raise inside the atomic rewrite (the old file must be intact byte for byte), and a
torn last line (what a kill mid-append leaves) is written by hand into a finished
tiny run (MNIST-1D, cnn1d of width 4, 2 steps per epoch, 3 epochs, every
checkpoint kept), which is then resumed.
"""
import json
import os
import shutil

import pytest

from sam_jax.train import TrainConfig, read_metrics, run
from sam_jax.train import logging as tlog

from _helpers import trees_equal

BASE = dict(dataset="mnist1d", model="cnn1d", model_kwargs={"width": 4}, batch_size=32,
            steps_per_epoch=2, eval_batch_size=500, progress=False, lr=0.05,
            phases="sgd:3", keep_last=None)
TIMING = ("epoch_time", "wall_time")


def _config(workdir, **changes):
    return TrainConfig(workdir=str(workdir), **{**BASE, **changes})


def _no_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted 3-epoch run with checkpoints at epochs 1, 2, 3."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    result = run(_config(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2", "3"]
    return result


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished run's workdir."""
    dst = tmp_path / "run"
    shutil.copytree(finished.workdir, dst)
    return dst


def _metrics_path(workdir):
    return os.path.join(workdir, tlog.METRICS_FILE)


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _leftovers(directory):
    return [n for n in os.listdir(directory) if n.endswith(".tmp")]


# ------------------------------------------------------------ atomic rewrite
@pytest.mark.parametrize("fail", ["replace", "fsync", "write"])
def test_atomic_write_failing_midway_keeps_the_old_file(tmp_path, monkeypatch, fail):
    path = tmp_path / "f.txt"
    path.write_bytes(b"old line 1\nold line 2\n")

    def boom(*args, **kwargs):
        raise OSError(f"simulated kill in {fail}")

    if fail == "write":  # the temporary file is half written when the kill lands
        real_fdopen = os.fdopen

        class Half:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, text):
                self.f.write(text[: len(text) // 2])
                self.f.flush()
                boom()

        monkeypatch.setattr(os, "fdopen", lambda fd, mode: Half(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(os, fail, boom)
    with pytest.raises(OSError, match="simulated kill"):
        tlog.atomic_write_text(str(path), "new text\n")
    monkeypatch.undo()
    assert path.read_bytes() == b"old line 1\nold line 2\n"
    assert _leftovers(tmp_path) == []


def test_atomic_write_replaces_the_whole_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("a much longer old text than the new one\n")
    tlog.atomic_write_text(str(path), "new\n")
    assert path.read_bytes() == b"new\n"
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert _leftovers(tmp_path) == []


def test_metrics_trim_killed_in_the_rename_keeps_the_history(copy, monkeypatch):
    """The old code opened metrics.jsonl with "w" and refilled it: a kill in between
    emptied a finished run's history. Now the trim is one rename."""
    before = _bytes(_metrics_path(copy))
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        tlog.MetricsLog(str(copy), keep_before_epoch=1)
    monkeypatch.undo()
    assert _bytes(_metrics_path(copy)) == before
    assert _leftovers(copy) == []


def test_run_killed_while_writing_config_keeps_both_files(copy, monkeypatch):
    """A rerun of a finished run killed in its config.json / metrics rewrite: both
    files are intact byte for byte."""
    metrics, config = _bytes(_metrics_path(copy)), _bytes(copy / "config.json")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError, match="killed"):
        run(_config(copy))
    monkeypatch.undo()
    assert _bytes(_metrics_path(copy)) == metrics
    assert _bytes(copy / "config.json") == config
    assert _leftovers(copy) == []


def test_trim_keeps_exactly_the_earlier_lines(copy):
    lines = _bytes(_metrics_path(copy)).splitlines(keepends=True)
    assert len(lines) == 3
    log = tlog.MetricsLog(str(copy), keep_before_epoch=2)
    assert _bytes(_metrics_path(copy)) == b"".join(lines[:2])
    assert [r["epoch"] for r in log.records] == [0, 1]


# ---------------------------------------------------------- torn last line
def _tear_last_line(workdir):
    path = _metrics_path(workdir)
    data = _bytes(path)
    last_start = data.rstrip(b"\n").rfind(b"\n") + 1
    with open(path, "wb") as f:  # what a kill mid-append leaves: half a line
        f.write(data[: last_start + (len(data) - last_start) // 2])


def test_read_metrics_drops_a_torn_last_line_with_a_warning(copy, finished):
    _tear_last_line(copy)
    with pytest.warns(RuntimeWarning, match=r"metrics\.jsonl, line 3: dropped a torn last line"):
        history = read_metrics(str(copy))
    assert history == finished.history[:2]


def test_a_bad_line_before_the_last_is_an_error(copy):
    path = _metrics_path(copy)
    lines = _bytes(path).splitlines(keepends=True)
    with open(path, "wb") as f:
        f.write(lines[0] + lines[1][:10] + b"\n" + lines[2])
    with pytest.raises(ValueError, match=r"metrics\.jsonl, line 2: not a valid epoch record"):
        read_metrics(str(copy))


def test_resume_after_a_kill_mid_append_rewrites_that_epoch(copy, finished):
    """Killed while appending epoch 2's record (so before the epoch-3 checkpoint):
    the torn line does not block the resume, and the resumed run ends with the
    uninterrupted run's metrics and parameters."""
    shutil.rmtree(copy / "checkpoints" / "3")
    _tear_last_line(copy)
    with pytest.warns(RuntimeWarning, match=r"metrics\.jsonl, line 3: dropped a torn last line"):
        resumed = run(_config(copy))
    assert resumed.resumed_from == 2
    assert _no_timing(resumed.history) == _no_timing(finished.history)
    assert _no_timing(read_metrics(str(copy))) == _no_timing(finished.history)
    assert resumed.history[:2] == finished.history[:2]  # earlier lines untouched
    assert trees_equal(resumed.variables, finished.variables)
    # the file is well formed again: every line ends with a newline and parses
    assert _bytes(_metrics_path(copy)).endswith(b"}\n")


def test_lines_past_the_checkpoint_are_discarded(copy, finished):
    """Records of epochs past the restored checkpoint (logged, then killed before
    the checkpoint) are dropped and rewritten, not duplicated."""
    shutil.rmtree(copy / "checkpoints" / "3")
    extra = dict(finished.history[-1], epoch=3, train_loss=123.0)
    with open(_metrics_path(copy), "a") as f:
        f.write(json.dumps(extra) + "\n")
    resumed = run(_config(copy))
    assert resumed.resumed_from == 2
    assert [r["epoch"] for r in read_metrics(str(copy))] == [0, 1, 2]
    assert _no_timing(read_metrics(str(copy))) == _no_timing(finished.history)


def test_a_finished_run_is_left_byte_for_byte_alone(copy):
    metrics = _bytes(_metrics_path(copy))
    again = run(_config(copy))
    assert again.resumed_from == 3
    assert _bytes(_metrics_path(copy)) == metrics


def test_missing_records_of_checkpointed_epochs_are_reported(copy, finished):
    """A torn last record whose epoch is already checkpointed cannot be recomputed
    without retraining: the run still returns, and says which epoch is missing."""
    _tear_last_line(copy)
    with pytest.warns(RuntimeWarning) as caught:
        again = run(_config(copy))
    messages = [str(w.message) for w in caught]
    assert any("dropped a torn last line" in m for m in messages)
    assert any("lacks the records of epochs [2]" in m for m in messages)
    assert again.history == finished.history[:2]


# ------------------------------------------------- checkpoint retention/listing
def test_retention_leaves_no_deleted_steps_behind(tmp_path):
    """keep_last=1: epochs 1 and 2 are renamed into checkpoints/_deleted/ and
    removed from there; only the step directory of epoch 3 remains."""
    from sam_jax.train.checkpoint import TRASH_SUBDIR, Checkpointer

    run(_config(tmp_path / "r", keep_last=1))
    ckdir = tmp_path / "r" / "checkpoints"
    assert sorted(n for n in os.listdir(ckdir) if n != TRASH_SUBDIR) == ["3"]
    assert os.listdir(ckdir / TRASH_SUBDIR) == []
    ck = Checkpointer(str(ckdir), read_only=True, keep_last=None)
    try:
        assert ck.epochs() == [3] and ck.latest_epoch() == 3
    finally:
        ck.close()


def test_a_half_deleted_step_is_not_listed(copy):
    """A step directory half removed in place (what a kill during orbax's in-place
    deletion left): not listed, and branching from it is a clear CheckpointError
    that names it, not orbax's KeyError."""
    from sam_jax.train import CheckpointError, checkpoint_epochs, load_variables

    shutil.rmtree(copy / "checkpoints" / "1" / "meta")
    assert checkpoint_epochs(str(copy)) == [2, 3]
    with pytest.raises(CheckpointError, match=r"incomplete step directories skipped: \[1\]"):
        load_variables(str(copy), epoch=1)
    with pytest.raises(CheckpointError, match=r"no checkpoint at epoch 1 .*skipped: \[1\]"):
        run(_config(copy.parent / "branch", phases="sgd:1,sam:2", init_from=str(copy),
                    init_step=1))
    assert (copy / "checkpoints" / "1").is_dir()  # never deleted automatically


def test_a_step_caught_in_the_trash_is_removed_on_the_next_open(copy, finished):
    """A kill after retention's rename but before the trash was emptied: the step
    is already unlisted, and the next run empties the trash."""
    from sam_jax.train import checkpoint_epochs
    from sam_jax.train.checkpoint import TRASH_SUBDIR

    trash = copy / "checkpoints" / TRASH_SUBDIR
    trash.mkdir(exist_ok=True)
    os.rename(copy / "checkpoints" / "1", trash / "1")
    shutil.rmtree(trash / "1" / "variables")  # and its removal was cut short
    assert checkpoint_epochs(str(copy)) == [2, 3]
    again = run(_config(copy))
    assert again.resumed_from == 3 and trees_equal(again.variables, finished.variables)
    assert os.listdir(trash) == []


def test_an_incomplete_newest_step_falls_back_and_is_kept(copy, finished):
    from sam_jax.train.checkpoint import CorruptCheckpointWarning

    os.remove(copy / "checkpoints" / "3" / "_CHECKPOINT_METADATA")
    with pytest.warns(CorruptCheckpointWarning, match=r"epoch 3 .*incomplete \(missing "
                                                      r"_CHECKPOINT_METADATA\).*falling back to epoch 2"):
        result = run(_config(copy))
    assert result.resumed_from == 2
    assert trees_equal(result.variables, finished.variables)  # epoch 3 retrained bit for bit
    kept = sorted(os.listdir(copy / "checkpoints" / "corrupt" / "3"))  # moved aside, not deleted
    assert kept == ["commit_success.txt", "meta", "opt_state", "variables"]


def test_temporaries_left_by_a_kill_are_removed_when_a_run_starts(copy):
    stale = [copy / ".metrics.jsonl.abc123.tmp", copy / ".config.json.xyz.tmp"]
    for path in stale:
        path.write_text("partial")
    keep = copy / ".other.tmp"  # not ours: left alone
    keep.write_text("x")
    tlog.MetricsLog(str(copy), keep_before_epoch=3, resumed=True)
    assert not any(path.exists() for path in stale)
    assert keep.exists()
