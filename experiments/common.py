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
import sys
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
    parser = argparse.ArgumentParser(description=description, prog=_prog())
    parser.add_argument("--scale", choices=SCALES, default=default_scale,
                        help="preset: tiny (seconds, a smoke test), cpu (minutes on 2 cores), "
                             f"paper (the paper's configuration, GPU); default: {default_scale}")
    parser.add_argument("--workdir", required=True, type=Path,
                        help="run directory for results.json, figures and checkpoints")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds to run (default: the preset's)")
    return parser


def _prog() -> str | None:
    """``python -m experiments.NAME`` when run as a module (argparse would say ``NAME.py``)."""
    path = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if path is not None and path.suffix == ".py" and path.parent.name == "experiments":
        return f"python -m experiments.{path.stem}"
    return None


SMOKE_NOTICE = "tiny scale: smoke test, numbers are not results"


def smoke_tag(scale: str) -> str:
    """``" — tiny scale: smoke test, ..."`` for figure titles at ``tiny`` scale, else ``""``."""
    return f" — {SMOKE_NOTICE}" if scale == "tiny" else ""


def print_footer(scale: str, wall_time_s: float, workdir) -> None:
    """The last lines every experiment prints: the smoke-test notice and where results went."""
    if scale == "tiny":
        print(SMOKE_NOTICE)
    print(f"wall time {wall_time_s:.0f} s; results in {Path(workdir) / RESULTS_FILE}")


def parse_args(description: str, argv=None, parser: argparse.ArgumentParser | None = None):
    """Parse an experiment's command line; at ``--scale tiny`` say it is a smoke test.

    Args:
      description: the module's one-line description (``build_parser``'s).
      argv: the arguments (None: ``sys.argv``).
      parser: a parser from ``build_parser`` with the module's own extra flags.
    """
    parser = parser if parser is not None else build_parser(description)
    args = parser.parse_args(argv)
    if args.scale == "tiny":
        print(SMOKE_NOTICE)
    return args


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


# Okabe & Ito's colour-blind-safe palette; every experiment figure draws from it.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#000000")
BAND_CAPTION = "mean over seeds; band = 95 % t-interval of the mean"


def pyplot():
    """matplotlib.pyplot with the Agg backend and the project's figure style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams.update({
        "figure.dpi": 120, "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9,
        "legend.fontsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
        "axes.spines.right": False, "axes.prop_cycle": cycler(color=list(PALETTE)),
        "savefig.bbox": "tight",
    })
    return plt


def save_figure(fig, path: str | os.PathLike) -> str:
    """Save a figure as PNG (for reading) and PDF (vector, for papers) and close it.

    Returns:
      The PNG's file name (for the JSON's ``figures``); the PDF sits beside it.
    """
    path = Path(path).with_suffix(".png")
    fig.savefig(path, dpi=150)
    fig.savefig(path.with_suffix(".pdf"))
    pyplot().close(fig)
    return path.name


def plot_band(ax, x, runs, *, label: str, color=None, level: float = 0.95, **line_kw):
    """Mean curve over seeds with its ``level`` t-interval as a shaded band.

    Args:
      ax: matplotlib axes.
      x: (T,) abscissa.
      runs: (seeds, T) values; NaNs are ignored per point.
      label, color: legend label and colour.
      level: confidence level of the band (0.95: :data:`BAND_CAPTION`).

    Returns:
      The line artist.
    """
    runs = np.atleast_2d(np.asarray(runs, dtype=np.float64))
    mean = np.nanmean(runs, axis=0)
    half = np.array([ci_half_width(runs[:, j], level) for j in range(runs.shape[1])])
    (line,) = ax.plot(x, mean, label=label, color=color, **line_kw)
    ax.fill_between(x, mean - half, mean + half, color=line.get_color(), alpha=0.2, lw=0)
    return line


# ------------------------------------------------------------------------ statistics

def ci_half_width(values: Iterable[float], level: float = 0.95) -> float:
    """Half-width of the Student-t confidence interval of the mean (0 for < 2 values).

    NaNs are dropped first.
    """
    from scipy import stats

    array = np.asarray(list(values), dtype=np.float64)
    array = array[np.isfinite(array)]
    if array.size < 2:
        return 0.0
    sem = array.std(ddof=1) / math.sqrt(array.size)
    return float(stats.t.ppf(0.5 + level / 2, array.size - 1) * sem)


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """``a − b`` paired by index (same seeds, same data order) with a t-interval.

    Returns:
      ``{"mean", "std", "n", "ci_low", "ci_high", "level", "values"}``; with one pair
      the interval is the point (no spread can be estimated).

    Raises:
      ValueError: if the two sequences differ in length or are empty.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_difference needs two equal, non-empty sequences, got {a.shape} and {b.shape}")
    diff = a - b
    stats = mean_std(diff)
    half = ci_half_width(diff, level)
    return {**stats, "ci_low": stats["mean"] - half, "ci_high": stats["mean"] + half,
            "level": level}


def fmt_paired(diff: Mapping[str, float], digits: int = 2, scale: float = 1.0) -> str:
    """``'+0.52 [−0.10, +1.14]'`` from a :func:`paired_difference` dict."""
    f = lambda v: f"{v * scale:+.{digits}f}"
    pct = int(round(100 * diff.get("level", 0.95)))
    return f"{f(diff['mean'])} [{f(diff['ci_low'])}, {f(diff['ci_high'])}] ({pct} % CI, n={diff['n']})"


# -------------------------------------------------------------------------- progress

def _fmt_seconds(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class RunProgress:
    """Progress over an experiment's runs: ``[done/total]``, elapsed time and ETA.

    ``progress.finished(label, reused=False)`` after each run prints one line such as
    ``[ 3/30] seed 0 SAM: test acc 0.9480 (12 s; elapsed 1 min 02 s, ETA ~5 min 10 s)``.
    Reused (already finished) runs are marked and do not enter the ETA.
    """

    def __init__(self, total: int, name: str = "", stream=None):
        import sys

        self.total, self.name = int(total), name
        self.stream = stream if stream is not None else sys.stdout
        self.done = 0
        self._computed = 0
        self._computed_seconds = 0.0
        self._start = time.perf_counter()
        self._last = self._start

    def finished(self, label: str, *, reused: bool = False) -> None:
        now = time.perf_counter()
        took = now - self._last
        self._last = now
        self.done += 1
        if not reused:
            self._computed += 1
            self._computed_seconds += took
        left = self.total - self.done
        if reused:
            timing = "reused a finished run"
        else:
            timing = _fmt_seconds(took)
        eta = ""
        if left > 0 and self._computed:
            eta = f", ETA ~{_fmt_seconds(left * self._computed_seconds / self._computed)}"
        width = len(str(self.total))
        prefix = f"{self.name} " if self.name else ""
        print(f"{prefix}[{self.done:>{width}}/{self.total}] {label} "
              f"({timing}; elapsed {_fmt_seconds(now - self._start)}{eta})",
              file=self.stream, flush=True)


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


def _evaluator(model, batch_size: int):
    """The library's evaluation loop (`sam_jax.train.make_evaluator`), compiled once per
    (model, batch size) and kept for the process (experiments evaluate many runs)."""
    from sam_jax.train.loop import make_evaluator

    key = (model, batch_size)
    if key not in _EVAL_FNS:
        _EVAL_FNS[key] = make_evaluator(model, batch_size)
    return _EVAL_FNS[key]


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
    return _evaluator(model, batch_size)(variables, dataset)
