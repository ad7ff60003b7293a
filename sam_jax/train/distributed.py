"""Multi-process (multi-host) training with ``jax.distributed``.

JAX's multi-controller runtime runs one Python process per host (per GPU, or per
TPU VM); every process runs the same program, sees all devices of the job in
``jax.devices()`` and owns its ``jax.local_devices()``. The engine's data mesh
(`sam_jax.train.parallel.make_mesh`) spans all of them, so the compiled steps are
the single-process ones; what changes is only what each process does on the host:

* **initialization**: `initialize` (``jax.distributed.initialize``; on CPU with the
  gloo collectives) before anything touches a device. On GPU clusters (SLURM,
  Open MPI, ...) and TPU pod slices JAX detects the coordinator, the process count
  and this process's id from the environment; on CPU (or anywhere else) pass them.
* **data**: every process holds the dataset and computes the same shuffle order from
  ``(seed, epoch)`` (the datasets are deterministic), but reads, augments and
  converts only the rows of its own devices' shards (``Dataset.batches(rows=...)``
  with `sam_jax.train.parallel.process_rows`; the augmentation's random draws are
  still made for the whole batch, so every row is augmented as in a single-process
  run) and hands them to ``jax.make_array_from_process_local_data``
  (`put_local_rows`); each device receives exactly the rows it gets in a
  single-process run with the same mesh.
* **host reads**: the train/eval steps return replicated outputs and the state is
  replicated, which every process can read (``jax.device_get``); `host_value` reads
  any global array (``process_allgather`` where it is not replicated).
* **files**: only process 0 writes ``config.json`` and ``metrics.jsonl`` and prints
  (`is_primary`, `metrics_log`, `write_config`); every process calls the orbax
  checkpointer together (orbax decides which process writes which shard and
  synchronizes the processes around the commit). The workdir must be on a file
  system every process sees (here: one local disk).

Run a training job on several processes with `main` (the train CLI behind the
multi-process flags)::

    python -m sam_jax.train.multihost --coordinator-address HOST:PORT \\
        --num-processes N --process-id I [--local-cpu-devices K] -- <train flags>

(``sam_jax.train.multihost`` only calls `main`; running this module with ``-m``
works too but makes Python warn, since the package imports it first.)

or set ``SAM_JAX_COORDINATOR_ADDRESS``/``SAM_JAX_NUM_PROCESSES``/
``SAM_JAX_PROCESS_ID`` (JAX's own ``JAX_COORDINATOR_ADDRESS`` also works).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

from sam_jax._placement import put_global
from sam_jax.train import logging as train_logging

ENV_COORDINATOR = "SAM_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SAM_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SAM_JAX_PROCESS_ID"


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def set_local_cpu_devices(count: int) -> None:
    """Simulates ``count`` CPU devices in this process (before the backend starts)."""
    jax.config.update("jax_num_cpu_devices", int(count))


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               local_device_ids: Optional[Sequence[int]] = None,
               cpu_collectives: str = "gloo",
               initialization_timeout: int = 300) -> None:
    """``jax.distributed.initialize`` with this package's defaults.

    Call it first, before any JAX computation (it must precede the backend's
    start). Arguments left None come from ``SAM_JAX_COORDINATOR_ADDRESS``,
    ``SAM_JAX_NUM_PROCESSES``, ``SAM_JAX_PROCESS_ID``, then from JAX's own cluster
    auto-detection (``JAX_COORDINATOR_ADDRESS``, SLURM, Open MPI, TPU pod
    metadata, ...).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator service
        (every process passes the same one).
      num_processes: processes in the job.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local devices this process drives (default: all).
      cpu_collectives: the CPU backend's cross-process collectives (``"gloo"``; the
        CPU backend has none without it). Ignored by GPU/TPU backends.
      initialization_timeout: seconds to wait for all processes to connect.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)


def shutdown() -> None:
    """``jax.distributed.shutdown`` (waits for the other processes)."""
    jax.distributed.shutdown()


def is_multiprocess() -> bool:
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes the run's files and prints (process 0)."""
    return jax.process_index() == 0


# ------------------------------------------------------------------------ data
def local_rows(sharding, global_shape: tuple) -> slice:
    """The contiguous rows of a ``P("data")``-sharded array this process's devices hold.

    Raises:
      ValueError: this process's shards are not one contiguous block of rows (a
        mesh whose device order interleaves processes).
    """
    spans = set()
    for index in sharding.addressable_devices_indices_map(tuple(global_shape)).values():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        spans.add((start, stop))
    spans = sorted(spans)
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        if start != stop:
            raise ValueError(f"this process's batch shards {spans} are not contiguous; build "
                             "the mesh in jax.devices() order (sam_jax.train.parallel.make_mesh)")
    return slice(spans[0][0], spans[-1][1])


def put_process_batch(batch: dict, mesh) -> dict:
    """A global batch sharded on the ``data`` axis, fed from this process's rows only.

    ``batch`` is the global batch (every process computes the same one); each
    process copies only the rows of its addressable devices' shards
    (`sam_jax._placement.put_global`), so the host-to-device copy per process is
    its share of the batch.
    """
    from sam_jax.train import parallel

    return put_global(batch, parallel.batch_sharded(mesh))


def put_local_rows(local_batch: dict, mesh, global_batch_size: int) -> dict:
    """A global batch sharded on the ``data`` axis from this process's rows.

    ``local_batch`` holds only the rows ``local_rows`` names (e.g. from
    ``Dataset.batches(rows=...)``), so no process materializes the others' rows.
    """
    from sam_jax.train import parallel

    sharding = parallel.batch_sharded(mesh)
    rows = local_rows(sharding, (global_batch_size,))

    def put(x):
        x = np.asarray(x)
        if x.shape[0] != rows.stop - rows.start:
            raise ValueError(f"this process's batch has {x.shape[0]} rows; its devices hold "
                             f"rows {rows.start}:{rows.stop} of {global_batch_size}")
        return jax.make_array_from_process_local_data(sharding, x,
                                                      (global_batch_size, *x.shape[1:]))

    return jax.tree.map(put, local_batch)


def put_replicated(tree, mesh):
    """``tree`` replicated over the (global) mesh.

    Leaves already on the mesh stay; a process-local array (e.g. restored from a
    checkpoint onto this process's first device, the same value in every process)
    is rebuilt from its local value (`sam_jax._placement.put_global`).
    """
    from sam_jax.train import parallel

    return put_global(tree, parallel.replicated(mesh))


# ------------------------------------------------------------------ host reads
def host_value(x) -> np.ndarray:
    """A global array's value on the host of every process.

    Replicated or fully addressable arrays are read directly; others are gathered
    (``multihost_utils.process_allgather``, a collective: every process must call
    it).
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def sync(name: str) -> None:
    """A barrier across processes (no-op in a single process)."""
    if is_multiprocess():
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------- files
class _ReadOnlyMetricsLog(train_logging.MetricsLog):
    """`MetricsLog` of a non-primary process: keeps the records, writes nothing."""

    def __init__(self, workdir: str, keep_before_epoch: Optional[int] = None,
                 resumed: bool = False):
        self.path = os.path.join(workdir, train_logging.METRICS_FILE)
        kept = []
        if keep_before_epoch is not None:
            kept = [r for r in train_logging.read_metrics(workdir) if r["epoch"] < keep_before_epoch]
        self.records = kept

    def append(self, record: dict) -> None:
        self.records.append({k: train_logging._jsonable(v) for k, v in record.items()})


def metrics_log(workdir: str, keep_before_epoch: Optional[int] = None,
                resumed: bool = False) -> train_logging.MetricsLog:
    """The run's `MetricsLog` on process 0; elsewhere one that writes nothing."""
    cls = train_logging.MetricsLog if is_primary() else _ReadOnlyMetricsLog
    return cls(workdir, keep_before_epoch=keep_before_epoch, resumed=resumed)


def write_config(workdir: str, config_dict: dict, extra: Optional[dict] = None) -> str:
    """`sam_jax.train.logging.write_config` on process 0 (with the process count);
    elsewhere only the path."""
    if not is_primary():
        return os.path.join(workdir, train_logging.CONFIG_FILE)
    extra = dict(extra or {})
    if is_multiprocess():
        extra["num_processes"] = jax.process_count()
    return train_logging.write_config(workdir, config_dict, extra)


# ------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sam_jax.train.multihost",
        description="Run `python -m sam_jax.train` as one process of a multi-process "
                    "JAX job: the same command on every host, differing only in "
                    "--process-id. Flags after `--` go to the train CLI.")
    parser.add_argument("--coordinator-address", default=None,
                        help=f"host:port of process 0 (env {ENV_COORDINATOR}; default: JAX's "
                             "cluster auto-detection)")
    parser.add_argument("--num-processes", type=int, default=None,
                        help=f"processes in the job (env {ENV_NUM_PROCESSES})")
    parser.add_argument("--process-id", type=int, default=None,
                        help=f"this process's index (env {ENV_PROCESS_ID})")
    parser.add_argument("--local-cpu-devices", type=int, default=None,
                        help="simulate this many CPU devices per process (CPU tests)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        ours, train_argv = argv[:cut], argv[cut + 1:]
    else:
        ours, train_argv = argv, []
    args = build_parser().parse_args(ours)
    if args.local_cpu_devices is not None:
        set_local_cpu_devices(args.local_cpu_devices)
    initialize(args.coordinator_address, args.num_processes, args.process_id)
    import contextlib

    from sam_jax.train import cli

    try:
        if is_primary():
            return cli.main(train_argv)
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            return cli.main(train_argv)  # errors still reach stderr
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(main())
