"""Output files: where they may go, and the one way the package writes them.

Every command that writes files (train, sample, eval, demo) calls :func:`check_writable` for
each of its outputs first, so a read-only folder or a regular file standing where a folder must
be is a one-line error at once, not a traceback after minutes of decoding or sampling.

Every file the package writes (checkpoints, JSON, PNG and GIF images, caches, CSV logs) then
goes through one atomic writer: a temporary ``.NAME.<random>.tmp`` in the destination folder,
flushed and ``fsync``-ed, renamed over ``NAME`` with ``os.replace``. Readers, and a machine that
loses power, see the old file or the new one, never half of one; a failed write leaves neither
a partial file nor its temporary behind. Files get the permissions a plain ``open()`` gives
under the process umask (0644 with the usual 022), not ``mkstemp``'s private 0600. The
helpers are :func:`atomic_write_bytes`, :func:`atomic_write_text`, :func:`atomic_write_json`,
:func:`atomic_write_with` (a writer given the open file: ``np.savez``, PIL's ``Image.save``,
matplotlib's ``savefig``) and :func:`atomic_write_to` (a writer given a file name:
safetensors' ``save_file``). This module imports nothing else of the package but its errors,
so any module can use it.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable

from ..errors import DDPMError

__all__ = ["check_writable", "OutputWriteError", "atomic_write_bytes", "atomic_write_text", "atomic_write_json",
           "atomic_write_with", "atomic_write_to", "process_umask", "remove_temp_files"]

TEMP_SUFFIX = ".tmp"


class OutputWriteError(DDPMError, OSError):
    """A file could not be written: a full disk, a quota, permissions, a read-only file system.

    It is a :class:`DDPMError`, so the command line prints it as one line, and an ``OSError``
    carrying the original ``errno`` and ``strerror``, so callers that add context (such as
    :func:`ddpm.run.folder.run_write_errors`, or a cache that only warns) still catch it.
    """

    def __str__(self) -> str:
        return f"cannot write {self.filename!r}: {self.strerror}"


def _write_error(error: OSError, path: Path) -> OutputWriteError:
    if isinstance(error, OutputWriteError):
        return error
    reason = error.strerror or str(error) or type(error).__name__
    out = OutputWriteError(error.errno, reason, str(path)) if error.errno is not None else OutputWriteError(reason)
    # OSError(message) alone sets neither attribute, and __str__ and callers read both.
    out.strerror, out.filename = reason, str(path)
    return out


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


# ------------------------------------------------------------------------------ atomic writes
def process_umask() -> int:
    """The process's umask, the bits a plain ``open()`` or ``mkdir()`` takes away from a new
    file's or folder's permissions."""
    # Linux reports it; the portable trick (set it, restore it) leaves the umask at 0 for a
    # moment, and a file another thread creates then (TensorBoard's writer) is world-writable.
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """An open descriptor and path of a new, empty ``folder/.name.<random>.tmp``."""
    # os.open with mode 0o666 lets the kernel apply the umask (and any default ACL) exactly as
    # for a plain open(); mkstemp would give 0600 and need a chmod computed from the umask.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(6)}{TEMP_SUFFIX}"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name for {name!r} in {str(folder)!r}")


def _sync_folder(folder: Path) -> None:
    # The rename is only durable once the folder's entry is on disk; best effort, since some
    # systems (Windows) and file systems cannot open or sync a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str | os.PathLike, writer: Callable[[BinaryIO], None] | None = None,
                  named_writer: Callable[[Path], None] | None = None) -> Path:
    """The one writer: temp file beside ``path``, write, fsync, rename over ``path``.

    Exactly one of ``writer`` (given the open temporary file) and ``named_writer`` (given its
    path, for writers that open the file themselves) is called. OSErrors become
    :class:`OutputWriteError`; any failure removes the temporary file and leaves ``path`` as it was.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path.parent, path.name)
        if named_writer is None:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
        else:
            mode = stat.S_IMODE(os.fstat(fd).st_mode)
            os.close(fd)
            named_writer(tmp)
            # The file may be a new one: safetensors 0.8 writes its own temporary file, 0600,
            # and renames it over ours. So give it our file's permissions back, and sync it by name.
            os.chmod(tmp, mode)
            # read-only: a umask without the owner's write bit (0o222) leaves no write access
            sync_fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(sync_fd)
            finally:
                os.close(sync_fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if e.errno is None and not isinstance(e, OutputWriteError):
            raise  # the writer's own failure (e.g. PIL's "encoder error"), not the file system's
        raise _write_error(e, path) from e
    finally:
        if tmp is not None:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:  # e.g. the folder went read-only; remove_temp_files gets it later
                pass
    _sync_folder(path.parent)
    return path


def atomic_write_with(path: str | os.PathLike, writer: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` by calling ``writer(f)`` on an open binary file, atomically; returns ``path``.

    For writers that take a file object: ``np.savez(f, ...)``, PIL's ``img.save(f, format="PNG")``,
    matplotlib's ``fig.savefig(f, format="png")`` (pass the format: the file name is a temporary
    one). Missing folders are created. Raises :class:`OutputWriteError` (a ``DDPMError`` and an
    ``OSError``) when the file system refuses the write; whatever ``writer`` raises otherwise
    passes through. After any failure ``path`` is unchanged and no temporary file remains.
    """
    return _atomic_write(path, writer=writer)


def atomic_write_to(path: str | os.PathLike, writer: Callable[[Path], None]) -> Path:
    """Write ``path`` by calling ``writer(tmp)`` with the name of a temporary file beside it that
    the writer opens and fills itself (safetensors' ``save_file``), atomically; returns ``path``.

    Errors and guarantees as :func:`atomic_write_with`.
    """
    return _atomic_write(path, named_writer=writer)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``. Errors as :func:`atomic_write_with`."""
    return _atomic_write(path, writer=lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (encoded, newlines as given); returns ``path``.
    Errors as :func:`atomic_write_with`."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> Path:
    """Write ``obj`` to ``path`` as indented JSON with a final newline, atomically; returns ``path``.

    ``sort_keys=False`` keeps the dict order (reports meant to be read top to bottom). Raises
    ``TypeError``/``ValueError`` for an object JSON cannot hold (before anything is written),
    otherwise errors as :func:`atomic_write_with`.
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def remove_temp_files(*folders: str | os.PathLike) -> None:
    """Delete the temporary files (``.NAME.*.tmp``) that atomic writes left in ``folders`` when a
    process was killed mid-write; a checkpoint's is as big as the checkpoint. Folders that do not
    exist are skipped and files that cannot be removed are left; nothing is raised. Only safe
    while no other process writes there (see :func:`ddpm.run.folder.lock_run_folder`)."""
    for folder in folders:
        folder = Path(folder)
        if folder.is_dir():
            for stale in folder.glob(f".*{TEMP_SUFFIX}"):
                try:
                    stale.unlink(missing_ok=True)
                except OSError:  # left for the next start; it blocks nothing
                    pass
