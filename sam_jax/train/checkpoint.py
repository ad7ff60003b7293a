"""Orbax checkpoints of a run, one per saved epoch.

A checkpoint's step number is the number of *completed* global epochs, so "the
checkpoint at epoch t" is the state a run starts epoch t from (what a branched
SGD→SAM run with ``init_step=t`` loads). Each holds three items:

* ``variables``: ``{"params", "batch_stats"?}``;
* ``opt_state``: the optimizer state's leaves (``{"00000": leaf, ...}``), restored
  into the structure of the optimizer that reads it, and only when the leaf count,
  shapes and dtypes match it;
* ``meta`` (JSON): epoch, global step, the phase and optimizer the state belongs to,
  cumulative gradient evaluations and wall time, the package version.

The data position needs no saving: the order of batches is a pure function of
(seed, epoch) and the dropout key of (seed, global step).

Retention never deletes a step in place: orbax first renames the step directory
into ``checkpoints/_deleted/`` (one atomic rename, ``todelete_subdir``) and this
class empties that folder before the next save and on close, so a kill during a
deletion leaves either a listed intact step or an unlisted one in the trash. The
listings (`Checkpointer.epochs`, `latest_epoch`) also skip a step directory that
lacks any of its completion markers (``_CHECKPOINT_METADATA``, ``commit_success.txt``
and each item's metadata), e.g. one half deleted in place by an older version.

Corruption. Every save records a SHA-256 digest of each saved array in ``meta``
(``meta["checksums"]``, committed atomically with the arrays), because orbax has
no checksum of its own: a flipped byte in an array's data reads back as a silently
different number. Every restore compares the arrays it read with the digests, and
`latest_epoch` checks the newest steps this way (a full read: meta, variables and
optimizer state) before offering one. A corrupt newest step is *moved aside* into
``checkpoints/corrupt/<epoch>`` (one rename; never deleted: retention only sees
listed steps), a `CorruptCheckpointWarning` names it and the error, and the run
resumes from the newest intact step; its next saves cannot collide with the corrupt
step. Read-only openers (``init_from``, `load_variables`) skip it the same way
without moving it.

Write failures (disk full, read-only file system) surface as one
`CheckpointWriteError` naming the epoch that could not be saved and the newest
intact checkpoint; orbax's background-thread tracebacks are not printed.
"""
from __future__ import annotations

import atexit
import errno
import hashlib
import logging
import os
import shutil
import warnings
import weakref
from typing import Any, Iterable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from sam_jax.train.workdir import WorkdirError

CHECKPOINT_SUBDIR = "checkpoints"
TRASH_SUBDIR = "_deleted"  # retention renames old steps here, then they are removed
CORRUPT_SUBDIR = "corrupt"  # corrupt steps are moved here (never deleted automatically)
CHECKSUM_KEY = "checksums"  # meta field: {"variables": {path: sha256}, "opt_state": ...}
# Files every complete step directory holds (relative to the step directory).
_STEP_MARKERS = ("_CHECKPOINT_METADATA", "commit_success.txt", "meta/metadata",
                 "variables/_METADATA", "variables/manifest.ocdbt",
                 "opt_state/_METADATA", "opt_state/manifest.ocdbt")


class _DropReadOnlyNotices(logging.Filter):
    """Drops orbax's warnings that a read-only manager is read-only.

    Branched runs open their source run's checkpoints read-only, so an experiment
    with many branches would otherwise print these notices dozens of times.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "read only" not in record.getMessage() and "read_only=True" not in record.getMessage()


class _DropBackgroundSaveTracebacks(logging.Filter):
    """Drops orbax's ERROR records of a failed background thread (with tracebacks).

    The same exception is re-raised by ``wait_until_finished``, where `Checkpointer`
    turns a write failure into one `CheckpointWriteError` line (and re-raises any
    other error as is); orbax would otherwise log the traceback of each failed
    thread (about seven of them for a full disk).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or "orbax" not in (record.pathname or ""):
            return True
        message = record.getMessage()
        return not (record.exc_info or "[thread=" in message or "thread" in message.lower())


class _DropUnretrievedReadErrors(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for tensorstore errors.

    A corrupt checkpoint fails several of orbax's concurrent reads. The first error
    reaches `Checkpointer`, which reports it as one line (a `CorruptCheckpointWarning`,
    or a `CheckpointError` when no intact step is left); the sibling reads' errors
    would otherwise be printed with tracebacks whenever their tasks are
    garbage-collected, timing-dependent noise after the report. Only errors that
    carry a ``tensorstore_spec`` (tensorstore's own messages) are dropped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith("Task exception was never retrieved"):
            return True
        error = record.exc_info[1] if record.exc_info else None
        return not (error is not None and "tensorstore_spec" in str(error))


logging.getLogger("absl").addFilter(_DropReadOnlyNotices())
logging.getLogger("absl").addFilter(_DropBackgroundSaveTracebacks())
logging.getLogger("asyncio").addFilter(_DropUnretrievedReadErrors())
# A save that fails (disk full) leaves orbax's pending write coroutines unawaited; when
# they are garbage-collected Python warns, after the one-line CheckpointWriteError.
warnings.filterwarnings("ignore", category=RuntimeWarning,
                        message=r"coroutine 'async_serialize_from_host\.<locals>\.write_fragment' "
                                r"was never awaited")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the run reading it."""


class CheckpointWriteError(WorkdirError):
    """A checkpoint could not be written (disk full, read-only file system, ...).

    An ``OSError`` (a `sam_jax.train.workdir.WorkdirError`) with the failed write's
    ``errno``; the message names the epoch that was not saved and the newest intact
    checkpoint, which the failed save leaves untouched (orbax writes into a
    temporary directory and renames it only when complete).
    """


class CorruptCheckpointWarning(UserWarning):
    """The newest checkpoint is corrupt; the run falls back to an older intact one."""


# Every Checkpointer still open, closed at interpreter exit (a run that
# raised before closing its manager otherwise ends with orbax's
# "RuntimeError: Event loop is closed" from a thread torn down during shutdown).
_OPEN: "weakref.WeakSet[Checkpointer]" = weakref.WeakSet()


@atexit.register
def _close_open_checkpointers() -> None:
    for ckpt in list(_OPEN):
        try:
            ckpt.close()
        except BaseException:  # noqa: BLE001 - exiting anyway; the error was reported
            pass


def _path_str(path) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def _digest(x) -> str:
    arr = np.ascontiguousarray(np.asarray(jax.device_get(x)))
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()[:32]


def tree_digests(tree) -> dict:
    """``{leaf path: sha256 (128 bits, hex) of dtype, shape and bytes}`` of a pytree."""
    return {_path_str(path): _digest(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _is_disk_error(err: BaseException) -> Optional[int]:
    """The errno of a write failure in ``err`` or its causes (None: not one)."""
    seen = 0
    while err is not None and seen < 10:
        code = getattr(err, "errno", None)
        if isinstance(err, OSError) and code in (errno.ENOSPC, errno.EROFS, errno.EACCES,
                                                 errno.EDQUOT, errno.EIO, errno.EPERM):
            return code
        text = str(err)
        if "No space left" in text or "RESOURCE_EXHAUSTED" in text:
            return errno.ENOSPC
        if "Read-only file system" in text:
            return errno.EROFS
        if "Permission denied" in text:
            return errno.EACCES
        err = err.__cause__ or err.__context__
        seen += 1
    return None


def checkpoint_dir(path: str) -> str:
    """The orbax directory of a run: ``path/checkpoints`` if it exists, else ``path``."""
    path = os.path.abspath(os.path.expanduser(path))
    sub = os.path.join(path, CHECKPOINT_SUBDIR)
    return sub if os.path.isdir(sub) else path


def _leaves_dict(tree) -> dict:
    return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def _describe(tree) -> list[tuple]:
    return [(tuple(x.shape), str(np.dtype(x.dtype))) for x in jax.tree.leaves(tree)]


class Checkpointer:
    """A run's orbax ``CheckpointManager`` with this package's keep policy.

    Args:
      directory: the orbax directory (created unless ``read_only``).
      keep_last: keep the latest N checkpoints (None: all).
      keep_every: also keep every N-th epoch (None: none).
      keep_epochs: epochs always kept (the phase boundaries, so that other runs can
        branch from them).
      async_save: write in a background thread (``wait`` before reading).
      read_only: open another run's checkpoints for ``init_from``.
    """

    def __init__(self, directory: str, *, keep_last: Optional[int] = 2,
                 keep_every: Optional[int] = None, keep_epochs: Iterable[int] = (),
                 async_save: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        if read_only and not os.path.isdir(self.directory):
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        keep = [policies.LatestN(n=keep_last)]
        if keep_every:
            keep.append(policies.EveryNSteps(interval_steps=keep_every))
        if keep_epochs:
            keep.append(policies.CustomSteps(steps=sorted(set(keep_epochs))))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            read_only=read_only,
            save_interval_steps=0 if read_only else 1,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            todelete_subdir=None if read_only else TRASH_SUBDIR,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"variables": ocp.StandardCheckpointHandler(),
                           "opt_state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})
        self._read_only = read_only
        self._async = async_save
        self._pending: Optional[int] = None  # epoch of a save not yet known to be complete
        self._failed: Optional[CheckpointWriteError] = None
        self._closed = False
        self._verified: dict[int, Optional[str]] = {}  # epoch -> problem (None: intact)
        self.skipped_corrupt: list[tuple[int, str]] = []  # (epoch, why) found by latest_epoch
        _OPEN.add(self)
        if not read_only:
            self._empty_trash()

    # ----------------------------------------------------------------- queries
    def _complete(self, epoch: int) -> bool:
        step_dir = os.path.join(self.directory, str(epoch))
        return all(os.path.isfile(os.path.join(step_dir, m)) for m in _STEP_MARKERS)

    def incomplete_epochs(self) -> list[int]:
        """Step directories orbax lists that lack a completion marker (skipped)."""
        return sorted(e for e in self._manager.all_steps() if not self._complete(e))

    def epochs(self) -> list[int]:
        """Epochs (completed-epoch counts) with a complete checkpoint, ascending.

        A step directory missing any completion marker (half deleted, or half
        written outside orbax's atomic commit) is not listed.
        """
        return sorted(e for e in self._manager.all_steps() if self._complete(e))

    def latest_epoch(self) -> Optional[int]:
        """The newest complete *and intact* checkpoint's epoch (None: none).

        The newest steps are read in full and checked against the digests recorded
        at save time (`verify`). A corrupt one is skipped with a
        `CorruptCheckpointWarning` naming its epoch and the error; a writable
        checkpointer also moves it aside into ``checkpoints/corrupt/`` (never
        deleted), so the resumed run's saves and retention cannot collide with it.
        The skipped steps are listed in ``self.skipped_corrupt``.

        An incomplete step directory newer than the newest complete one (a completion
        marker missing) is skipped and set aside the same way.

        Raises:
          CheckpointError: every checkpoint is corrupt or incomplete (they are kept,
            moved aside).
        """
        epochs = self.epochs()
        latest = epochs[-1] if epochs else None
        # An incomplete step newer than every complete one (a write or deletion
        # damaged outside orbax's atomic commit) is set aside like a corrupt one:
        # resuming from an older step must not collide with it, and it is kept.
        for epoch in sorted(e for e in self.incomplete_epochs() if latest is None or e > latest):
            step_dir = os.path.join(self.directory, str(epoch))
            missing = [m for m in _STEP_MARKERS if not os.path.isfile(os.path.join(step_dir, m))]
            self._set_aside(epoch, f"the step directory is incomplete (missing "
                                   f"{', '.join(missing)})", older=epochs)
        set_aside = self.corrupt_epochs()
        if latest is None and set_aside:
            raise CheckpointError(
                f"{self.directory} holds no intact checkpoint, only corrupt ones set aside "
                f"in {os.path.join(self.directory, CORRUPT_SUBDIR)} (epochs {set_aside}); "
                "refusing to train from scratch over this run's history: use a new "
                "--workdir, or remove that folder to start this one anew")
        skipped = []
        for epoch in reversed(epochs):
            problem = self.verify(epoch)
            if problem is None:
                break
            skipped.append((epoch, problem))
            self._set_aside(epoch, problem, older=[e for e in epochs if e < epoch])
        else:
            epoch = None
        if skipped and epoch is None:
            where = (f"moved to {os.path.join(self.directory, CORRUPT_SUBDIR)}"
                     if not self._read_only else "left in place")
            raise CheckpointError(
                f"every checkpoint in {self.directory} is corrupt (epochs "
                f"{[e for e, _ in skipped]}; {where}, not deleted): "
                + "; ".join(f"epoch {e}: {why}" for e, why in skipped)
                + ". Use a new --workdir to train from scratch")
        return epoch

    def corrupt_epochs(self) -> list[int]:
        """Epochs of the corrupt steps set aside in ``checkpoints/corrupt/``."""
        folder = os.path.join(self.directory, CORRUPT_SUBDIR)
        if not os.path.isdir(folder):
            return []
        return sorted({int(name.split(".")[0]) for name in os.listdir(folder)
                       if name.split(".")[0].isdigit()})

    def verify(self, epoch: int) -> Optional[str]:
        """None when the checkpoint at ``epoch`` reads back intact, else what is wrong.

        Reads its meta, variables and optimizer state in full (not into a model:
        the saved structure as is) and compares every array with the SHA-256
        digests its save recorded (checkpoints written before the digests existed
        are only read). Cached per epoch.
        """
        if epoch in self._verified:
            return self._verified[epoch]
        try:
            meta = dict(self._manager.restore(
                epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
            recorded = meta.get(CHECKSUM_KEY) or {}
            metadata = self._manager.item_metadata(epoch)
            for item in ("variables", "opt_state"):
                if metadata[item] is None:
                    raise CheckpointError(f"no {item!r} item")
                # onto one host device: the saved sharding may name devices this
                # process does not have (another device count is not corruption)
                restored = self._manager.restore(epoch, args=ocp.args.Composite(
                    **{item: ocp.args.StandardRestore(_host_target(metadata[item]))}))[item]
                _compare_digests(item, restored, recorded.get(item))
            problem = None
        except Exception as err:  # noqa: BLE001 - orbax raises many types; report them
            problem = _one_line(err)
        self._verified[epoch] = problem
        return problem

    def _set_aside(self, epoch: int, problem: str, older: list[int]) -> None:
        step_dir = os.path.join(self.directory, str(epoch))
        fallback = f"epoch {older[-1]}" if older else "no older checkpoint"
        moved = ""
        if not self._read_only:
            corrupt = os.path.join(self.directory, CORRUPT_SUBDIR)
            os.makedirs(corrupt, exist_ok=True)
            target, n = os.path.join(corrupt, str(epoch)), 1
            while os.path.exists(target):
                target, n = os.path.join(corrupt, f"{epoch}.{n}"), n + 1
            os.rename(step_dir, target)
            self._manager.reload()
            moved = f"; moved to {target} (kept for inspection, never deleted automatically)"
        self.skipped_corrupt.append((epoch, problem))
        warnings.warn(
            f"CORRUPT CHECKPOINT: the checkpoint at epoch {epoch} ({step_dir}) is corrupt "
            f"and is skipped: {problem}{moved}; falling back to {fallback}",
            CorruptCheckpointWarning, stacklevel=3)

    def _empty_trash(self) -> None:
        """Removes the steps retention has moved to ``_deleted/`` (already unlisted)."""
        trash = os.path.join(self.directory, TRASH_SUBDIR)
        if os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

    # -------------------------------------------------------------------- save
    def save(self, epoch: int, params, batch_stats, opt_state, meta: dict) -> None:
        """Saves the state after ``epoch`` completed epochs (async by default).

        ``meta`` gets the SHA-256 digest of every saved array (``meta["checksums"]``).

        Raises:
          CheckpointWriteError: this save, or the previous asynchronous one, could
            not be written (disk full, read-only file system); earlier checkpoints
            are intact.
        """
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        leaves = _leaves_dict(opt_state)
        meta = {**meta, CHECKSUM_KEY: {"variables": tree_digests(variables),
                                       "opt_state": tree_digests(leaves)}}
        # The previous save (and the retention renames it triggered) is finished
        # before the trash is emptied; orbax waits for it anyway before saving.
        self.wait()
        self._empty_trash()
        self._pending = epoch
        try:
            self._manager.save(epoch, args=ocp.args.Composite(
                variables=ocp.args.StandardSave(variables),
                opt_state=ocp.args.StandardSave(leaves),
                meta=ocp.args.JsonSave(meta),
            ), force=True)
        except Exception as err:
            self._raise_write_error(err)
        if not self._async:
            self.wait()

    def wait(self) -> None:
        """Waits for the pending asynchronous save.

        Raises:
          CheckpointWriteError: it failed (named epoch; earlier ones intact).
        """
        if self._failed is not None:
            raise self._failed
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            self._raise_write_error(err)
        self._pending = None

    def _raise_write_error(self, err: BaseException):
        code = _is_disk_error(err)
        if code is None:
            raise err
        epoch = self._pending
        try:
            intact = [e for e in self.epochs() if e != epoch]
        except Exception:  # noqa: BLE001
            intact = []
        what = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only",
                errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                errno.EIO: "an I/O error"}.get(code, os.strerror(code))
        self._failed = CheckpointWriteError(
            code, f"could not save the checkpoint of epoch {epoch} in {self.directory}: "
            f"{what} ([Errno {code}] {os.strerror(code)}); "
            + (f"the newest intact checkpoint is epoch {intact[-1]} (a rerun of the same "
               f"command resumes from it once there is room)" if intact else
               "no checkpoint of this run is intact yet"), self.directory)
        self._failed.__cause__ = None
        raise self._failed from None

    def close(self) -> None:
        """Finishes the pending save and closes orbax's manager (idempotent).

        Raises:
          CheckpointWriteError: the pending save failed and that was not yet
            raised (a failure already raised is not raised again).
        """
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        already = self._failed is not None
        error = None
        try:
            if not already:
                try:
                    self.wait()
                except CheckpointWriteError as err:
                    error = err
            try:
                self._manager.close()
            except Exception as err:  # noqa: BLE001
                if error is None and not already and _is_disk_error(err) is None:
                    raise
        finally:
            if not self._read_only:
                self._empty_trash()
        if error is not None:
            raise error from None

    # ----------------------------------------------------------------- restore
    def _require(self, epoch: int) -> None:
        if epoch not in self.epochs():
            incomplete = self.incomplete_epochs()
            note = (f"; incomplete step directories skipped: {incomplete}"
                    if incomplete else "")
            raise CheckpointError(
                f"no checkpoint at epoch {epoch} in {self.directory} "
                f"(available epochs: {self.epochs() or 'none'}{note})")

    def restore_meta(self, epoch: int) -> dict:
        self._require(epoch)
        try:
            return dict(self._manager.restore(
                epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as err:  # orbax raises many types; name the file
            raise CheckpointError(f"checkpoint at epoch {epoch} in {self.directory} is "
                                  f"unreadable (corrupt?): {type(err).__name__}: {err}") from err

    def restore_variables(self, epoch: int, params_like, batch_stats_like, sharding=None):
        """Restores ``(params, batch_stats)`` into the structure of the ``*_like`` trees.

        Raises:
          CheckpointError: missing epoch, a model mismatch (names the first
            differing parameter), or an unreadable checkpoint.
        """
        self._require(epoch)
        target = {"params": params_like}
        if batch_stats_like:
            target["batch_stats"] = batch_stats_like
        self._check_matches(epoch, "variables", target)
        restored = self._restore_item(epoch, "variables", _abstract(target, sharding))
        self._check_digests(epoch, "variables", restored)
        return restored["params"], restored.get("batch_stats", {})

    def opt_state_matches(self, epoch: int, opt_state_like) -> bool:
        """Whether the saved optimizer state has the leaves of ``opt_state_like``."""
        try:
            saved = self._manager.item_metadata(epoch)["opt_state"]
        except Exception as err:
            raise CheckpointError(f"checkpoint at epoch {epoch} in {self.directory} is "
                                  f"unreadable (corrupt?): {err}") from err
        if saved is None:
            return False
        saved_desc = [(tuple(saved[k].shape), str(np.dtype(saved[k].dtype))) for k in sorted(saved)]
        return saved_desc == _describe(opt_state_like)

    def restore_opt_state(self, epoch: int, opt_state_like, sharding=None):
        """Restores the optimizer state into the structure of ``opt_state_like``."""
        if not self.opt_state_matches(epoch, opt_state_like):
            raise CheckpointError(f"the optimizer state at epoch {epoch} in {self.directory} "
                                  "does not match the current optimizer")
        leaves_like = _leaves_dict(opt_state_like)
        restored = self._restore_item(epoch, "opt_state", _abstract(leaves_like, sharding))
        self._check_digests(epoch, "opt_state", restored)
        treedef = jax.tree.structure(opt_state_like)
        return jax.tree.unflatten(treedef, [restored[k] for k in sorted(restored)])

    def _check_digests(self, epoch: int, item: str, restored) -> None:
        recorded = (self.restore_meta(epoch).get(CHECKSUM_KEY) or {}).get(item)
        try:
            _compare_digests(item, restored, recorded)
        except CheckpointError as err:
            raise CheckpointError(f"checkpoint at epoch {epoch} in {self.directory} is "
                                  f"corrupt: {err}") from None

    def _restore_item(self, epoch: int, item: str, abstract_target) -> Any:
        try:
            restored = self._manager.restore(epoch, args=ocp.args.Composite(
                **{item: ocp.args.StandardRestore(abstract_target)}))
        except Exception as err:
            raise CheckpointError(f"checkpoint at epoch {epoch} in {self.directory} is "
                                  f"unreadable (corrupt?): {type(err).__name__}: {err}") from err
        return restored[item]

    def _check_matches(self, epoch: int, item: str, target) -> None:
        try:
            saved = self._manager.item_metadata(epoch)[item]
        except Exception as err:
            raise CheckpointError(f"checkpoint at epoch {epoch} in {self.directory} is "
                                  f"unreadable (corrupt?): {type(err).__name__}: {err}") from err
        if saved is None:
            raise CheckpointError(f"checkpoint at epoch {epoch} in {self.directory} has no "
                                  f"{item!r} item (corrupt?)")
        saved_paths = {jax.tree_util.keystr(p): tuple(x.shape)
                       for p, x in jax.tree_util.tree_leaves_with_path(saved)}
        want_paths = {jax.tree_util.keystr(p): tuple(x.shape)
                      for p, x in jax.tree_util.tree_leaves_with_path(target)}
        for path in sorted(set(saved_paths) | set(want_paths)):
            if saved_paths.get(path) != want_paths.get(path):
                raise CheckpointError(
                    f"checkpoint at epoch {epoch} in {self.directory} does not match the "
                    f"model: {item}{path} has shape {saved_paths.get(path, 'missing')} in the "
                    f"checkpoint and {want_paths.get(path, 'missing')} in the model "
                    "(a different model, width or dataset?)")


def _compare_digests(item: str, restored, recorded: Optional[dict]) -> None:
    """CheckpointError naming the first array whose digest differs from ``recorded``."""
    if not recorded:
        return  # written before digests were recorded: nothing to compare
    got = tree_digests(restored)
    if set(got) != set(recorded):
        raise CheckpointError(f"{item} holds arrays {sorted(got)[:4]}..., the save recorded "
                              f"{sorted(recorded)[:4]}...")
    for path in sorted(recorded):
        if got[path] != recorded[path]:
            raise CheckpointError(
                f"{item}/{path}: its bytes differ from the SHA-256 digest recorded at save "
                "time (a changed byte on disk)")


def _root_message(err: BaseException) -> str:
    """The innermost cause's message (one line)."""
    seen = 0
    while (err.__cause__ or err.__context__) is not None and seen < 10:
        err = err.__cause__ or err.__context__
        seen += 1
    return _one_line(err)


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    if len(text) > limit:
        text = text[:limit] + " ..."
    return f"{type(err).__name__}: {text}"


def _host_target(metadata_tree):
    """Abstract arrays of a saved item's metadata, on one CPU device."""
    device = jax.local_devices(backend="cpu")[0]  # addressable in every process
    sharding = jax.sharding.SingleDeviceSharding(device)
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(m.dtype), sharding=sharding),
        metadata_tree)


def _abstract(tree, sharding):
    """Restore targets like ``tree``'s leaves; placed by ``sharding``, else like the
    leaf (a jax.Array's own sharding), else on the default device: never by the
    sharding saved in the checkpoint, which may name devices this process lacks
    (a run saved on 4 devices loads in a 1-device process)."""
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def target(x):
        place = sharding
        if place is None and isinstance(x, jax.Array):
            place = x.sharding
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=place or default)

    return jax.tree.map(target, tree)
