"""Helpers shared by the training-engine tests (imported as ``_helpers``; pytest puts
``tests/`` on ``sys.path``).

``TINY_MLP`` is the tiny run several fault and resume tests share: MNIST-1D, an MLP
of width 8, 2 steps per epoch, ``sgd:2,sam:1``, every checkpoint kept. The finished
run itself is the session fixture ``finished_tiny_mlp`` in ``conftest.py``, so the
modules that use it train it once.
"""
import hashlib
import os

import jax
import numpy as np

TINY_MLP = dict(dataset="mnist1d", model="mlp", model_kwargs={"width": 8, "depth": 1},
                phases="sgd:2,sam:1", batch_size=32, steps_per_epoch=2, eval_batch_size=500,
                lr=0.05, keep_last=None, progress=False)


def tiny_mlp_config(workdir, **changes):
    """``TrainConfig`` of the ``TINY_MLP`` run in ``workdir``, with ``changes``."""
    from sam_jax.train import TrainConfig

    return TrainConfig(workdir=str(workdir), **{**TINY_MLP, **changes})


def trees_equal(a, b) -> bool:
    """Same number of leaves and every leaf equal bit for bit."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


def tree_sha(root) -> dict:
    """Relative path -> sha256 of every file under ``root`` (a byte-for-byte snapshot)."""
    out = {}
    for base, _, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out
