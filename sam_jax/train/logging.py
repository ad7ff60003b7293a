"""Run records: ``config.json``, per-epoch ``metrics.jsonl`` and a tqdm progress bar."""
from __future__ import annotations

import json
import math
import os
import platform
from typing import Iterable, Optional

import jax
from tqdm.auto import tqdm

import sam_jax

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    return value


def write_config(workdir: str, config_dict: dict, extra: Optional[dict] = None) -> str:
    """Writes ``config.json`` with the config, package/JAX versions and devices."""
    record = {
        "config": config_dict,
        "sam_jax_version": sam_jax.__version__,
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        **(extra or {}),
    }
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
    return path


def read_metrics(workdir: str) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (empty if absent)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLog:
    """Appends one JSON line per epoch to ``workdir/metrics.jsonl``.

    On resume the file is cut back to the epochs before the resumed epoch, so a run
    killed between logging and checkpointing leaves no duplicate line.

    Args:
      workdir: run directory.
      keep_before_epoch: drop existing records with ``epoch >= keep_before_epoch``
        (None: start a new file).
    """

    def __init__(self, workdir: str, keep_before_epoch: Optional[int] = None):
        self.path = os.path.join(workdir, METRICS_FILE)
        kept = []
        if keep_before_epoch is not None:
            kept = [r for r in read_metrics(workdir) if r["epoch"] < keep_before_epoch]
        self.records: list[dict] = kept
        with open(self.path, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")

    def append(self, record: dict) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class Progress:
    """A tqdm bar over the run's steps (a no-op when disabled)."""

    def __init__(self, total_steps: int, initial: int = 0, enabled: bool = True):
        self._bar = tqdm(total=total_steps, initial=initial, disable=not enabled,
                         unit="step", dynamic_ncols=True, leave=True)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def describe(self, epoch: int, phase: str, record: Optional[dict] = None) -> None:
        self._bar.set_description(f"epoch {epoch} [{phase}]")
        if record:
            shown = {k: f"{record[k]:.4g}" for k in ("train_loss", "test_acc", "lr")
                     if isinstance(record.get(k), (int, float))}
            self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self._bar.close()


def summarize(records: Iterable[dict]) -> str:
    """One line per epoch, for printing at the end of a CLI run."""
    lines = []
    for r in records:
        lines.append(f"epoch {r['epoch']:4d} {r['phase']:>10s}  lr {r['lr']:.4g}  "
                     f"train {r['train_loss']:.4f}/{r['train_acc']:.3f}  "
                     f"test {r.get('test_loss', float('nan')):.4f}/"
                     f"{r.get('test_acc', float('nan')):.3f}  evals {r['grad_evals']:.0f}")
    return "\n".join(lines)
