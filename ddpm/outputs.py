"""Output locations, checked before any work: the one place that decides whether a path can be written.

Every command that writes files (train, sample, eval, demo) calls :func:`check_writable` for
each of its outputs first, so a read-only folder or a regular file standing where a folder must
be is a one-line error at once, not a traceback after minutes of decoding or sampling.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import DDPMError

__all__ = ["check_writable"]


def check_writable(path: str | os.PathLike, what: str, *, is_file: bool = False) -> Path:
    """Raise :class:`DDPMError` unless ``path`` can be created or written; returns it as a Path.

    ``path`` is a folder (``is_file=False``) or a file to write. Folders that do not exist yet
    are fine if the nearest existing one above them is writable: that is where they will be
    made. Nothing is created or changed here. ``what`` names the location in the message,
    e.g. ``"--out"``. Errors: a regular file where a folder is needed (anywhere in the path),
    a folder where a file is needed, and a folder that is read-only (permissions or a
    read-only file system).
    """
    p = Path(path).expanduser()
    shown = f"{what} {str(path)!r}"
    if is_file and p.is_dir():
        raise DDPMError(f"cannot write {shown}: it is a folder; expected a file name")
    folder = p.parent if is_file else p
    # The nearest existing ancestor is where new folders get created, so it must be a writable folder.
    anchor = folder
    while True:
        try:
            st = anchor.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            if anchor.parent == anchor:
                raise DDPMError(f"cannot write {shown}: no part of the path exists") from None
            anchor = anchor.parent
        except OSError as e:
            raise DDPMError(f"cannot write {shown}: cannot access {str(anchor)!r} ({e.strerror})") from None
    if not stat.S_ISDIR(st.st_mode):
        where = "it is" if anchor == p else f"{str(anchor)!r} is"
        raise DDPMError(f"cannot write {shown}: {where} a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        reason = "read-only file system" if _read_only_fs(anchor) else "permission denied"
        where = "the folder" if anchor == folder else repr(str(anchor))
        raise DDPMError(f"cannot write {shown}: {where} is not writable ({reason}); choose another location")
    return p


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
