"""Whether a run's ``workdir`` can be used, checked before anything is written.

`check_usable` turns the workdir faults that otherwise surface deep inside a run
(an orbax thread traceback, a ``FileExistsError`` from ``os.makedirs``, a
``PermissionError`` while writing ``config.json``) into one `WorkdirError` that
names the path and the problem:

* the workdir is an existing file, or lies under one;
* the workdir (or the directory it would be created in, or its ``checkpoints/``,
  ``config.json``, ``metrics.jsonl``) is not writable: a read-only file system or
  missing permissions.

Nothing is created or written: the check only looks (``os.stat``/``os.access``;
``os.access`` reports ``EROFS`` for a read-only mount also to root).

A full disk is found later, when a write fails; the checkpointer reports it as a
`CheckpointWriteError` (a `WorkdirError`) naming the epoch it could not save and
the newest intact one (`sam_jax.train.checkpoint`).
"""
from __future__ import annotations

import errno
import os


class WorkdirError(OSError):
    """The run's workdir cannot be used: not a directory, not writable, or full.

    An ``OSError`` (with ``errno`` set: ``ENOTDIR``, ``EROFS``/``EACCES``,
    ``ENOSPC``); the message names the path and says what to do.
    """

    def __init__(self, code: int, message: str, path: str | None = None):
        super().__init__(code, message)
        self.path = path

    def __str__(self) -> str:  # the message alone, no "[Errno N]" prefix
        return str(self.strerror)


def _read_only_reason(path: str) -> str:
    try:
        st = os.statvfs(path)
        if st.f_flag & getattr(os, "ST_RDONLY", 1):
            return "a read-only file system"
    except OSError:
        pass
    return "no write permission"


def check_usable(workdir: str) -> str:
    """Raises `WorkdirError` unless ``workdir`` can hold a run; returns its absolute path.

    Args:
      workdir: the run directory (may not exist yet; its nearest existing
        ancestor must then be a writable directory).

    Raises:
      WorkdirError: ``errno.ENOTDIR`` when the workdir or one of its ancestors is
        a file; ``errno.EROFS`` / ``errno.EACCES`` when it (or the directory it
        would be created in, or an existing ``checkpoints/``, ``config.json`` or
        ``metrics.jsonl`` in it) is not writable.
    """
    path = os.path.abspath(os.path.expanduser(str(workdir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(errno.ENOTDIR, f"--workdir {path} is an existing file, not a "
                           "directory; choose a directory (it is created if missing)", path)
    ancestor = path
    while not os.path.exists(ancestor):
        parent = os.path.dirname(ancestor)
        if parent == ancestor:
            break
        ancestor = parent
    if os.path.exists(ancestor) and not os.path.isdir(ancestor):
        raise WorkdirError(errno.ENOTDIR, f"--workdir {path} lies under {ancestor}, which is "
                           "a file, not a directory; choose another --workdir", path)
    if ancestor != path:  # the workdir will be created inside ``ancestor``
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise WorkdirError(
                errno.EROFS if "read-only" in _read_only_reason(ancestor) else errno.EACCES,
                f"--workdir {path} cannot be created: {ancestor} is not writable "
                f"({_read_only_reason(ancestor)}); choose a writable --workdir", path)
        return path
    targets = [path] + [os.path.join(path, name)
                        for name in ("checkpoints", "config.json", "metrics.jsonl")]
    for target in targets:
        if os.path.exists(target) and not os.access(target, os.W_OK):
            reason = _read_only_reason(target)
            what = "the workdir" if target == path else os.path.basename(target)
            raise WorkdirError(
                errno.EROFS if "read-only" in reason else errno.EACCES,
                f"--workdir {path} is not writable ({what}: {reason}); "
                + ("a run resumed or rerun there writes config.json, metrics.jsonl and "
                   "checkpoints, also when it is finished: make it writable, or read "
                   "it with sam_jax.train.load_variables, which needs no write access"
                   if os.path.exists(os.path.join(path, "config.json")) else
                   "a run writes config.json, metrics.jsonl and checkpoints/ there: "
                   "choose a writable --workdir"), path)
    return path
