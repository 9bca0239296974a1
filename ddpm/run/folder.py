"""Who may write a run folder, and what the user is told when writing one fails.

One process at a time writes a run folder: :func:`lock_run_folder` takes an exclusive lock
on ``RUN/.lock`` for as long as the writer lives. The kernel drops the lock when the process
ends in any way, kill -9 included, so a lock left by a dead process is simply free: no PID
files to judge stale. The holder's PID is written into the file only for the message the next
process prints.

The lock is a POSIX record lock (``fcntl.lockf``), not ``flock``: an ``flock`` is shared with
every child forked while it is held (data loader workers), so a killed trainer's folder would
stay locked until its orphaned workers noticed and exited; record locks belong to the process
alone. They do not exclude the same process, so a registry does that.

:func:`run_write_errors` turns an ``OSError`` while writing a run's files (disk full, quota,
permissions) into a one-line :class:`DDPMError` that names the newest intact checkpoint and
says how to continue.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import time
import warnings
from pathlib import Path
from dataclasses import dataclass
from typing import ContextManager, Iterator

from ..errors import DDPMError
from ..files.atomic import check_writable, remove_temp_files

try:
    import fcntl
except ImportError:  # Windows: no POSIX locks; run folders go unguarded there
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RunFolder", "lock_run_folder", "lock_if_inside", "run_write_errors", "write_failure_message",
           "list_checkpoints", "latest_checkpoint"]

LOCK_NAME = ".lock"
CKPT_RE = re.compile(r"^ckpt_(\d+)\.safetensors$")
_HELD: set[str] = set()  # run folders this process holds (record locks never conflict within one)


# The fixed paths of a run folder, by RunFolder attribute.
_RUN_PATHS = {"config_path": "config.json", "checkpoints_dir": "checkpoints", "samples_dir": "samples",
              "eval_dir": "eval", "metrics_path": "metrics.csv", "tensorboard_dir": "tensorboard",
              "fid_floor_path": "fid_floor.json"}


@dataclass(frozen=True, init=False)
class RunFolder:
    """Every path of a run folder, its lock and its write errors, in one place.

    A run folder holds ``config.json`` (:class:`ddpm.run.config.RunConfig`), ``checkpoints/``
    (``ckpt_<step>.safetensors``), ``samples/`` (a grid per ``--sample-every``), ``eval/``
    (``ddpm eval``'s results), ``metrics.csv``, ``tensorboard/``, the curves ``loss.png`` and
    ``fid.png``, ``fid_floor.json`` and the lock file ``.lock``.
    """

    path: Path
    config_path: Path
    checkpoints_dir: Path
    samples_dir: Path
    eval_dir: Path
    metrics_path: Path
    tensorboard_dir: Path
    fid_floor_path: Path

    def __init__(self, path: str | os.PathLike) -> None:
        root = Path(path)
        object.__setattr__(self, "path", root)
        for name, relative in _RUN_PATHS.items():
            object.__setattr__(self, name, root / relative)

    def curve_path(self, name: str) -> Path:
        """A curve the trainer draws: ``loss`` or ``fid`` -> ``RUN/loss.png``, ``RUN/fid.png``."""
        return self.path / f"{name}.png"

    def grid_path(self, step: int) -> Path:
        """The sample grid of training step ``step``."""
        return self.samples_dir / f"step_{step:09d}.png"

    def checkpoint_path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is written."""
        return self.checkpoints_dir / f"ckpt_{step:09d}.safetensors"

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint files, oldest first."""
        return list_checkpoints(self.path)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint, or None."""
        return latest_checkpoint(self.path)

    def check_writable(self, what: str = "--out") -> None:
        """Raise a one-line :class:`DDPMError` naming ``what`` unless the folder, its checkpoints
        and its samples can be written (checked before minutes of work)."""
        for folder in (self.path, self.checkpoints_dir, self.samples_dir):
            check_writable(folder, what)

    def remove_temp_files(self) -> None:
        """Remove the temporary files of writes a killed process left behind."""
        remove_temp_files(self.path, self.checkpoints_dir, self.samples_dir)

    def lock(self, *, create: bool = True, advice: str = "wait for it to finish or choose another --out"
             ) -> ContextManager[None]:
        """:func:`lock_run_folder` of this folder."""
        return lock_run_folder(self.path, create=create, advice=advice)

    def write_errors(self, what: str) -> ContextManager[None]:
        """:func:`run_write_errors` for a write of ``what`` into this folder."""
        return run_write_errors(self.path, what)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first (temporary files of interrupted writes ignored)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _holder_pid(fd: int, wait_s: float = 1.0) -> str:
    """The PID the lock's holder wrote, or '' if it has not written one within ``wait_s`` seconds.

    A holder writes its PID just after it wins the lock, so a process that loses the race
    by microseconds reads an empty file; waiting a moment names the holder all the same.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        except OSError:
            return ""
        if text.isdigit():
            return text
        if time.monotonic() >= deadline:
            return ""
        time.sleep(0.01)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a releasing holder unlinks it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def lock_run_folder(run_dir: str | Path, *, create: bool = True,
                    advice: str = "wait for it to finish or choose another folder") -> Iterator[None]:
    """Hold the run folder ``run_dir`` exclusively for the ``with`` block.

    ``create``: make the folder (and its parents) first; folders made here are removed again
    on release if nothing else was written into them. Without it a missing folder is not
    locked (there is nothing to protect; the caller reports the missing run).

    Raises :class:`DDPMError` "run folder RUN in use by process N; <advice>" when another
    process (or this one, in another ``with``) holds it, or when the folder cannot be created.
    Where locks are not supported (some network file systems, Windows) the block runs
    unlocked after a warning.
    """
    run_dir = Path(run_dir)
    made: list[Path] = []
    if create:
        missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DDPMError(f"cannot create run folder {str(run_dir)!r}: {e.strerror or e}") from None
        made = missing  # innermost first, the order to remove them in
    elif not run_dir.is_dir():
        yield
        return
    path = run_dir / LOCK_NAME
    key = str(run_dir.resolve())
    if key in _HELD:
        raise DDPMError(f"run folder {str(run_dir)!r} in use by this process ({os.getpid()}); {advice}")
    fd = -1
    unsupported = "no POSIX locks on this system"
    try:
        while fcntl is not None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise DDPMError(f"cannot create the lock file {str(path)!r} of the run folder: "
                                f"{e.strerror or e}") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                held_elsewhere = e.errno in (errno.EACCES, errno.EAGAIN)
                pid = _holder_pid(fd) if held_elsewhere else ""
                os.close(fd)
                fd = -1  # the file is the holder's: leave it be
                if held_elsewhere:
                    holder = f"process {pid}" if pid else "another process"
                    raise DDPMError(f"run folder {str(run_dir)!r} in use by {holder}; {advice}") from None
                unsupported = e.strerror or str(e)  # e.g. a network file system without locks
                break
            # The previous holder unlinks the file while it still holds it; a lock won on that
            # unlinked file guards nothing, so open the path afresh.
            if _same_file(fd, path):
                break
            os.close(fd)
            fd = -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        else:
            warnings.warn(f"cannot lock run folder {str(run_dir)!r} ({unsupported}); make sure no other "
                          "process writes into it", stacklevel=3)
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        if fd >= 0:
            # Unlink while still holding the lock; a waiter that opened the old file notices
            # (_same_file) and retries on a new one.
            with contextlib.suppress(OSError):
                path.unlink()
            os.close(fd)
        for folder in made:
            try:
                folder.rmdir()  # only if empty: whatever was written stays
            except OSError:
                break


def lock_if_inside(run_dir: str | Path, path: str | Path, *, advice: str) -> ContextManager[None]:
    """:func:`lock_run_folder` of an existing ``run_dir`` when writing ``path`` writes into it
    (``ddpm eval``'s default result file does); no lock for a path elsewhere."""
    run, target = Path(run_dir).resolve(), Path(path).resolve()
    if target == run or run in target.parents:
        return lock_run_folder(run_dir, create=False, advice=advice)
    return contextlib.nullcontext()


def write_failure_message(run_dir: str | Path, what: str, error: OSError) -> str:
    """The one line for a failed write of ``what`` into ``run_dir``: the cause, the newest
    intact checkpoint (checkpoints are written atomically, so every listed one is whole), and
    how to continue."""
    run_dir = Path(run_dir)
    reason = error.strerror or str(error) or type(error).__name__
    try:
        newest = latest_checkpoint(run_dir)
    except OSError:
        newest = None
    if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        fix = "Free some disk space (or raise the quota or file-size limit)"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "Make the run folder writable"
    else:
        fix = "Fix the cause"
    if newest is not None:
        return (f"cannot write {what} in run folder {str(run_dir)!r}: {reason}; the newest intact checkpoint is "
                f"{str(newest)!r}. {fix}, then run the same command with --resume to continue from it")
    return (f"cannot write {what} in run folder {str(run_dir)!r}: {reason}; no checkpoint had been written yet. "
            f"{fix}, then run the same command with --resume to start again")


@contextlib.contextmanager
def run_write_errors(run_dir: str | Path, what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised in the block, a write of ``what`` (e.g. "checkpoint",
    "metrics.csv") into ``run_dir``, into a one-line :class:`DDPMError`
    (see :func:`write_failure_message`)."""
    try:
        yield
    except OSError as e:
        raise DDPMError(write_failure_message(run_dir, what, e)) from None
