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
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Iterable, Optional

import logging

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CHECKPOINT_SUBDIR = "checkpoints"
TRASH_SUBDIR = "_deleted"  # retention renames old steps here, then they are removed
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


logging.getLogger("absl").addFilter(_DropReadOnlyNotices())


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or does not match the run reading it."""


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
        """The newest complete checkpoint's epoch (None: none).

        Raises:
          CheckpointError: the newest step directory is incomplete (a retention
            deletion leaves only older ones so): resuming from an older step would
            collide with it, and it is never deleted automatically.
        """
        epochs = self.epochs()
        latest = epochs[-1] if epochs else None
        newer = [e for e in self.incomplete_epochs() if latest is None or e > latest]
        if newer:
            step_dir = os.path.join(self.directory, str(newer[-1]))
            missing = [m for m in _STEP_MARKERS if not os.path.isfile(os.path.join(step_dir, m))]
            raise CheckpointError(
                f"the newest checkpoint {step_dir} is incomplete (missing {', '.join(missing)}); "
                f"it is not deleted automatically: move it out of {self.directory} to resume "
                f"from epoch {latest}" if latest is not None else
                f"the newest checkpoint {step_dir} is incomplete (missing {', '.join(missing)}) "
                f"and no complete one exists; it is not deleted automatically")
        return latest

    def _empty_trash(self) -> None:
        """Removes the steps retention has moved to ``_deleted/`` (already unlisted)."""
        trash = os.path.join(self.directory, TRASH_SUBDIR)
        if os.path.isdir(trash):
            for name in os.listdir(trash):
                shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

    # -------------------------------------------------------------------- save
    def save(self, epoch: int, params, batch_stats, opt_state, meta: dict) -> None:
        """Saves the state after ``epoch`` completed epochs (async by default)."""
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        # The previous save (and the retention renames it triggered) is finished
        # before the trash is emptied; orbax waits for it anyway before saving.
        self._manager.wait_until_finished()
        self._empty_trash()
        self._manager.save(epoch, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(variables),
            opt_state=ocp.args.StandardSave(_leaves_dict(opt_state)),
            meta=ocp.args.JsonSave(meta),
        ), force=True)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        if not self._read_only:
            self._empty_trash()

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
        treedef = jax.tree.structure(opt_state_like)
        return jax.tree.unflatten(treedef, [restored[k] for k in sorted(restored)])

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


def _abstract(tree, sharding):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)
