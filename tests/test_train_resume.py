"""Resuming after a real SIGKILL gives the uninterrupted run's params, bit for bit.

Runs ``python -m sam_jax.train`` in subprocesses: one uninterrupted, one killed
with SIGKILL as soon as its first checkpoint is on disk and then rerun with the
same command (it resumes from the checkpoint by itself).
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from sam_jax.train import load_variables, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_EPOCHS = 5


def _command(workdir):
    return [sys.executable, "-m", "sam_jax.train", "--dataset", "mnist1d", "--model", "cnn1d",
            "--model-kwargs", '{"width": 4}', "--phases", "sgd:2,sam:3", "--batch-size", "32",
            "--steps-per-epoch", "8", "--lr", "0.05", "--no-progress", "--workdir", str(workdir)]


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _finished_checkpoints(workdir):
    path = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(path):
        return []
    return sorted(int(name) for name in os.listdir(path) if name.isdigit())


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_for_bit(tmp_path):
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    full = subprocess.Popen(_command(full_dir), cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    victim = subprocess.Popen(_command(killed_dir), cwd=REPO, env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _finished_checkpoints(killed_dir):
        assert victim.poll() is None, "the run ended before its first checkpoint appeared"
        assert time.time() < deadline, "no checkpoint appeared within 300 s"
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done_before_kill = _finished_checkpoints(killed_dir)
    assert max(done_before_kill) < TOTAL_EPOCHS, "the kill came too late to test a resume"

    resumed = subprocess.run(_command(killed_dir), cwd=REPO, env=_env(), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    full_out, _ = full.communicate(timeout=600)
    assert full.returncode == 0, full_out

    record = json.load(open(killed_dir / "config.json"))
    assert record["resumed_from"] >= 1

    final_full = load_variables(str(full_dir), TOTAL_EPOCHS)
    final_resumed = load_variables(str(killed_dir), TOTAL_EPOCHS)
    for a, b in zip(jax.tree.leaves(final_full), jax.tree.leaves(final_resumed), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    # the metrics file holds each epoch once, with the same training losses
    full_losses = [r["train_loss"] for r in read_metrics(str(full_dir))]
    resumed_records = read_metrics(str(killed_dir))
    assert [r["epoch"] for r in resumed_records] == list(range(TOTAL_EPOCHS))
    assert [r["train_loss"] for r in resumed_records] == full_losses
