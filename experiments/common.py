"""Shared pieces of the experiment modules: CLI, run directory, JSON, seeds, plots.

Every experiment is ``python -m experiments.NAME --scale tiny|cpu|paper --workdir DIR
[--seeds 0 1 2]``. Its results go to ``DIR/results.json`` (every number, the config,
the package versions, the wall time) and PNG figures beside it, never into the
repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

SCALES = ("tiny", "cpu", "paper")
RESULTS_FILE = "results.json"


def build_parser(description: str, default_scale: str = "cpu") -> argparse.ArgumentParser:
    """The CLI shared by every experiment module.

    Args:
      description: the module's one-line description (shown by ``--help``).
      default_scale: preset used when ``--scale`` is not given.

    Returns:
      An ``argparse.ArgumentParser`` with ``--scale``, ``--workdir`` and ``--seeds``.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--scale", choices=SCALES, default=default_scale,
                        help="preset: tiny (seconds, tests), cpu (minutes on 2 cores), "
                             "paper (the paper's configuration, GPU)")
    parser.add_argument("--workdir", required=True, type=Path,
                        help="run directory for results.json, figures and checkpoints")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds to run (default: the preset's)")
    return parser


def prepare_workdir(workdir: str | os.PathLike) -> Path:
    """Create the run directory (and parents) and return it as a ``Path``.

    Raises:
      ValueError: if ``workdir`` exists and is not a directory.
    """
    path = Path(workdir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"workdir {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine a result (sam_jax first)."""
    versions = {"python": platform.python_version()}
    for name in ("sam_jax", "jax", "jaxlib", "flax", "optax", "numpy"):
        try:
            module = __import__(name)
            versions[name] = str(getattr(module, "__version__", "unknown"))
        except ImportError:
            versions[name] = "not installed"
    return versions


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/JAX scalars and arrays, dataclasses, paths and tuples to JSON types.

    Non-finite floats become ``None`` so that the file stays strict JSON.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__array__") and not isinstance(obj, (str, bytes)):
        array = np.asarray(obj)
        if array.ndim == 0:
            return to_jsonable(array.item())
        return [to_jsonable(v) for v in array.tolist()]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return to_jsonable(float(obj))
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented strict JSON (see ``to_jsonable``) and return the path."""
    path = Path(path)
    path.write_text(json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_results(workdir: Path, experiment: str, scale: str, config: Any,
                  results: Mapping[str, Any], wall_time_s: float,
                  figures: Sequence[str] = ()) -> Path:
    """Write ``workdir/results.json`` with the standard envelope.

    Args:
      workdir: the run directory.
      experiment: module name, e.g. ``"late_sam"``.
      scale: the preset used.
      config: the resolved configuration (dataclass or dict).
      results: every number the experiment produced.
      wall_time_s: wall-clock seconds of the whole experiment.
      figures: file names of the PNGs written beside the JSON.

    Returns:
      The path of the JSON file.
    """
    envelope = {
        "experiment": experiment,
        "scale": scale,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": wall_time_s,
        "versions": package_versions(),
        "config": config,
        "figures": list(figures),
        "results": results,
    }
    return write_json(Path(workdir) / RESULTS_FILE, envelope)


def mean_std(values: Iterable[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds.

    Returns:
      ``{"mean", "std", "n", "values"}``.

    Raises:
      ValueError: if ``values`` is empty.
    """
    array = np.asarray(list(values), dtype=np.float64)
    if array.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size),
            "values": array.tolist()}


def aggregate_seeds(per_seed: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """``mean_std`` of every numeric key shared by all per-seed result dicts."""
    if not per_seed:
        raise ValueError("aggregate_seeds needs at least one seed")
    keys = [k for k, v in per_seed[0].items()
            if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
            and all(k in d for d in per_seed)]
    return {k: mean_std(d[k] for d in per_seed) for k in keys}


def fmt_mean_std(stats: Mapping[str, float], digits: int = 2, scale: float = 1.0) -> str:
    """``'mean ± std'`` of a ``mean_std`` dict, values multiplied by ``scale``."""
    return f"{stats['mean'] * scale:.{digits}f} ± {stats['std'] * scale:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> str:
    """Save and close a figure; return its file name (for the JSON's ``figures``)."""
    path = Path(path)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    return path.name


class Timer:
    """Wall-clock stopwatch: ``with Timer() as t: ...; t.seconds``."""

    def __enter__(self):
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        return False


# ------------------------------------------------------------------ model evaluation

_EVAL_FNS: dict = {}


def _eval_fn(model):
    """A jitted (loss_sum, correct, count) of one padded batch, cached per model."""
    import jax
    import jax.numpy as jnp
    import optax

    if model not in _EVAL_FNS:
        @jax.jit
        def fn(variables, batch):
            logits = model.apply(variables, batch["x"], train=False)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
            mask = batch["mask"]
            correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
            return jnp.sum(losses * mask), jnp.sum(correct * mask), jnp.sum(mask)
        _EVAL_FNS[model] = fn
    return _EVAL_FNS[model]


def evaluate(model, variables, dataset, batch_size: int = 500) -> dict[str, float]:
    """Loss and accuracy of ``variables`` on every (un-augmented) example of ``dataset``.

    The model runs in eval mode (BatchNorm running statistics), as for test accuracy.

    Args:
      model: the Flax module.
      variables: ``{"params": ..., ["batch_stats": ...]}``.
      dataset: a ``sam_jax.data.Dataset``.
      batch_size: evaluation batch size (the last batch is padded and masked).

    Returns:
      ``{"loss": mean cross entropy, "acc": accuracy}``.
    """
    fn = _eval_fn(model)
    totals = np.zeros(3)
    batch_size = min(batch_size, dataset.num_examples)
    for batch in dataset.batches(batch_size, shuffle=False, drop_remainder=False,
                                 pad_remainder=True):
        totals += np.array([float(v) for v in fn(variables, batch)])
    return {"loss": totals[0] / totals[2], "acc": totals[1] / totals[2]}
