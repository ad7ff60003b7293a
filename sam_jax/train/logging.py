"""Run records: ``config.json``, per-epoch ``metrics.jsonl``, and the console
(a per-epoch table; a tqdm bar when stderr is a terminal).

What a kill cannot destroy: every *rewrite* of a record file (``config.json``, and
``metrics.jsonl`` when a run starts or resumes) goes through `atomic_write_text`
(a temporary file in the same directory, flushed and fsynced, then ``os.replace``
and an fsync of the directory), so the file holds either all of the old text or
all of the new. Per-epoch records are *appended* (flushed and fsynced); a kill
mid-append can only leave a torn last line, which `read_metrics` drops with a
warning naming the file and line (the resumed run writes that epoch again).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import warnings
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


def _fsync_dir(directory: str) -> None:
    """Makes a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str, text: str) -> None:
    """Replaces ``path`` by ``text`` atomically: readers (and a kill at any moment)
    see either the old file, byte for byte, or the new one.

    Writes a temporary file next to ``path`` (same filesystem), flushes and fsyncs
    it, ``os.replace``-s it over ``path`` and fsyncs the directory. On any failure
    the temporary file is removed and ``path`` is untouched.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(directory)


def remove_stale_temporaries(directory: str) -> list[str]:
    """Removes the temporary files a kill left behind in `atomic_write_text`
    (``.config.json.*.tmp``, ``.metrics.jsonl.*.tmp``): never read, only clutter.
    Called when a run (the workdir's only writer) starts. Returns the removed names."""
    removed = []
    for base in (CONFIG_FILE, METRICS_FILE):
        prefix = f".{base}."
        for name in os.listdir(directory):
            if name.startswith(prefix) and name.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(directory, name))
                    removed.append(name)
                except OSError:
                    pass
    return removed


def package_versions() -> dict:
    """``{"sam_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"}``
    versions (installed package metadata; sam_jax's falls back to
    ``sam_jax.__version__`` when it is not installed; None for a missing package)."""
    from importlib import metadata

    versions = {}
    for name in ("sam_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    if versions["sam_jax"] is None:
        versions["sam_jax"] = sam_jax.__version__
    return versions


def write_config(workdir: str, config_dict: dict, extra: Optional[dict] = None) -> str:
    """Writes ``config.json``: the config, the versions of sam_jax and the libraries
    that compute the run (``versions``, `package_versions`), Python and the devices
    (``extra`` adds e.g. the git commit)."""
    versions = package_versions()
    record = {
        "config": config_dict,
        "sam_jax_version": versions["sam_jax"],
        "jax_version": jax.__version__,
        "versions": versions,
        "python_version": platform.python_version(),
        "devices": [str(d) for d in jax.devices()],
        **(extra or {}),
    }
    path = os.path.join(workdir, CONFIG_FILE)
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True))
    return path


def read_metrics(workdir: str) -> list[dict]:
    """The per-epoch records of ``metrics.jsonl`` (empty if absent).

    A last line that is not valid JSON (a record torn by a kill mid-append) is
    dropped with a warning naming the file and line. An invalid line followed by
    valid ones is not a torn write: it raises ``ValueError`` naming the file and line.
    """
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "epoch" not in record:
                raise ValueError("not an epoch record")
        except ValueError as err:
            if i + 1 < len(lines):
                raise ValueError(f"{path}, line {n}: not a valid epoch record ({err}); the "
                                 "file was edited or corrupted (only a torn last line is "
                                 "repaired automatically)") from err
            warnings.warn(f"{path}, line {n}: dropped a torn last line (a record cut short "
                          f"by an interrupted write: {line.strip()[:60]!r}...); a run resuming from "
                          "a checkpoint before that epoch writes it again", RuntimeWarning,
                          stacklevel=2)
            break
        records.append(record)
    return records


class MetricsLog:
    """Appends one JSON line per epoch to ``workdir/metrics.jsonl``.

    On resume the file is cut back to the epochs before the resumed epoch, so a run
    killed between logging and checkpointing leaves no duplicate line, and a torn
    last line is dropped (`read_metrics`). The cut is one atomic rewrite
    (`atomic_write_text`): a kill during it leaves the old file intact. Appends are
    flushed and fsynced, so a kill can at worst tear the line being appended.

    Args:
      workdir: run directory.
      keep_before_epoch: drop existing records with ``epoch >= keep_before_epoch``
        (None: start a new file).
      resumed: the run resumes its own checkpoint at ``keep_before_epoch``: warn
        (naming the epochs) if the kept records do not reach up to it.
    """

    def __init__(self, workdir: str, keep_before_epoch: Optional[int] = None,
                 resumed: bool = False):
        self.path = os.path.join(workdir, METRICS_FILE)
        remove_stale_temporaries(workdir)
        kept = []
        if keep_before_epoch is not None:
            kept = [r for r in read_metrics(workdir) if r["epoch"] < keep_before_epoch]
            if resumed:
                _warn_missing(self.path, kept, keep_before_epoch)
        self.records: list[dict] = kept
        text = "".join(json.dumps(record) + "\n" for record in kept)
        if not (os.path.exists(self.path) and _read_bytes(self.path) == text.encode()):
            atomic_write_text(self.path, text)

    def append(self, record: dict) -> None:
        record = {k: _jsonable(v) for k, v in record.items()}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _warn_missing(path: str, records: list[dict], before_epoch: int) -> None:
    """Warns when ``records`` lack epochs the restored checkpoint covers."""
    if not records:
        if before_epoch > 0:
            warnings.warn(f"{path} has no records for epochs 0..{before_epoch - 1}, which the "
                          f"restored checkpoint (epoch {before_epoch}) covers; they cannot be "
                          "rewritten without retraining", RuntimeWarning, stacklevel=3)
        return
    have = {r["epoch"] for r in records}
    missing = [e for e in range(records[0]["epoch"], before_epoch) if e not in have]
    if missing:
        warnings.warn(f"{path} lacks the records of epochs {missing}, which the restored "
                      f"checkpoint (epoch {before_epoch}) covers; they cannot be rewritten "
                      "without retraining", RuntimeWarning, stacklevel=3)


# ------------------------------------------------------------------ the console
# The per-epoch table: (header, record key, width, format). Blank where a record
# has no value (test metrics between evaluations, lambda_max between measurements).
_COLUMNS = (
    ("epoch", "epoch", 5, "{:d}"),
    ("phase", "phase", 10, "{}"),
    ("lr", "lr", 9, "{:.4g}"),
    ("train loss", "train_loss", 10, "{:.4f}"),
    ("train acc", "train_acc", 9, "{:.4f}"),
    ("test loss", "test_loss", 9, "{:.4f}"),
    ("test acc", "test_acc", 8, "{:.4f}"),
    ("grad norm", "grad_norm", 9, "{:.4g}"),
    ("ε norm", "perturbation_norm", 9, "{:.4g}"),
    ("‖θ‖", "param_norm", 9, "{:.5g}"),
    ("λ_max", "lambda_max", 9, "{:.4g}"),
    ("epoch s", "epoch_time", 8, "{:.1f}"),
)


def _cell(record: dict, key: str, width: int, fmt: str) -> str:
    value = record.get(key)
    if value is None:
        text = ""
    else:
        try:
            text = fmt.format(value)
        except (TypeError, ValueError):
            text = str(value)
    return text.rjust(width) if key != "phase" else text.ljust(width)


def table_header() -> str:
    """The header line of the per-epoch table (`table_row`)."""
    return "  ".join(name.rjust(w) if key != "phase" else name.ljust(w)
                     for name, key, w, _ in _COLUMNS)


def table_row(record: dict) -> str:
    """One epoch record as a row of the per-epoch table: epoch, phase, lr, train
    loss/acc, test loss/acc, ‖∇L‖, ‖ε‖, ‖θ‖, λ_max and the epoch's seconds; blank
    where the epoch did not measure it."""
    return "  ".join(_cell(record, key, w, fmt) for _, key, w, fmt in _COLUMNS)


class Progress:
    """The console of a run: a per-epoch table, and a tqdm bar over the steps when
    stderr is a terminal (a no-op when disabled).

    The table (`table_header` once, then `table_row` per epoch) goes to stdout as
    epochs finish. When stderr is not a terminal (a log file, a pipe, CI) there is
    no bar: a bar redrawn into a file is one huge line.

    Args:
      total_steps, initial: the run's steps and those already done.
      enabled: show anything at all (``TrainConfig.progress``).
      bar: show the bar; None: when stderr is a terminal.
      stream: where the table goes (default stdout).
    """

    def __init__(self, total_steps: int, initial: int = 0, enabled: bool = True,
                 bar: Optional[bool] = None, stream=None):
        self.enabled = enabled
        self._stream = stream
        if bar is None:
            bar = enabled and _is_terminal(sys.stderr)
        self._bar = tqdm(total=total_steps, initial=initial, disable=not (enabled and bar),
                         unit="step", dynamic_ncols=True, leave=False)
        self._header_shown = False

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def describe(self, epoch: int, phase: str, record: Optional[dict] = None) -> None:
        self._bar.set_description(f"epoch {epoch} [{phase}]")

    def _print(self, line: str) -> None:
        stream = self._stream if self._stream is not None else sys.stdout
        if self._bar.disable:
            print(line, file=stream, flush=True)
        else:
            tqdm.write(line, file=stream)  # above the bar

    def epoch_done(self, record: dict) -> None:
        """Prints the epoch's table row (the header before the first)."""
        if not self.enabled:
            return
        if not self._header_shown:
            self._print(table_header())
            self._header_shown = True
        self._print(table_row(record))

    def already_complete(self, epochs: int, workdir: str, metrics_path: str) -> None:
        """Says that the run was finished before this call (nothing to train)."""
        if self.enabled:
            self._print(f"the run in {workdir} is already complete: {epochs} epochs "
                        f"(final epoch {epochs - 1}); metrics in {metrics_path}")

    def close(self) -> None:
        self._bar.close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def summarize(records: Iterable[dict]) -> str:
    """The per-epoch table of ``records`` (header and one aligned row per epoch),
    as `Progress` prints it during a run."""
    return "\n".join([table_header()] + [table_row(r) for r in records])
