"""The decoded-data cache: decode a set once, on every core, into one file every process maps.

A folder, ``.zip`` or Parquet source (:mod:`ddpm.data.sources`) is decoded at the training
resolution into one file of raw uint8 pixels that :func:`open_training_set` memory-maps
read-only. Later starts, ``--resume``, every torchrun process on a node and the FID reference of
the same folder (:func:`open_reference_images`) map that one file: nothing is decoded again, the
page cache holds one copy per node, and sets larger than memory are read row by row as batches
gather them. Batches from a mapped set are bit-identical to batches from a set decoded into
memory: the same decoder made the pixels, in the same order.

File layout (one file, ``*.ddpmdata``)::

    0     64-byte prefix: b"DDPMDATA", format (u32), 0 (u32), header offset (u64),
          header length (u64), sha256 of the header (32 bytes)
    4096  pixels: N rows of uint8 [S, S, 3] back to back; with --random-crop each row is
          [h, w, 3] with min(h, w) = S (the resized long side kept, so crops are today's)
    ...   header: JSON (key, source, size, layout, names, class of each row, skipped files
          with reasons, row shapes for --random-crop, sha256 of sampled rows)

The header comes last because its row shapes are known only once decoding ends; the prefix is
written over the placeholder last of all. The file is written through
:func:`ddpm.files.atomic.atomic_write_with` (temporary file, fsync, rename), so a killed or
failed build leaves no file under the trusted name, and its temporary is removed by the next
build. On opening, the prefix, the exact file size, the header checksum and the hashes of
sampled rows are checked: a truncated, corrupted or other-version file is rebuilt, never used.

Automatic caches live in ``$DDPM_CACHE/data`` (default ``~/.cache/ddpm/data``), one file per
source, size and crop mode, named with its key: a sha256 of what determines the pixels (the
sorted file list with sizes and modification times, or member CRCs; the classes; the size; the
crop mode; this decoder's version and Pillow's). Two processes that would build the same file
take turns on an ``flock`` (released by the kernel if its holder dies): one builds, the other
waits and maps. A cache folder that cannot be written, or whose disk has less free space than
the file needs, falls back to decoding in memory with one warning; a disk that fills during a
build (a quota, another writer) stops it with one line and no file left.
:func:`prepare_data` (``ddpm prepare-data SRC OUT``) writes the same file to a chosen path.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from ..errors import DDPMError, first_line
from ..files.atomic import TEMP_SUFFIX, OutputWriteError, atomic_write_with, check_writable
from ..files.images import DECODER_VERSION
from .sets import (DecodedRows, ImageSet, RaggedRows, assemble_set, decode_in_memory, listing_classes, load_cifar10,
                   names_cifar10)
from .sources import DecodeSpec, Listing, decode_items, list_folder, list_source, resolve_workers

__all__ = ["CacheSettings", "DataFile", "ReferenceImages", "DATA_SUFFIX", "default_data_cache_dir", "open_training_set",
           "open_reference_images", "prepare_data", "read_data_file", "is_data_file", "prepared_rows", "cache_key",
           "describe_data_file", "estimate_bytes"]

DATA_SUFFIX = ".ddpmdata"
_MAGIC = b"DDPMDATA"
_FORMAT = 1  # raise when the layout or the header's meaning changes: older files are then rebuilt
_DATA_OFFSET = 4096  # pixels start page-aligned, so the memory map is too
_PREFIX = struct.Struct("<8sIIQQ32s")
_SAMPLED_ROWS = 64  # rows whose sha256 the header keeps, checked at every open (about 1 MB read at 64 px)
_WARNED: set[str] = set()  # cache folders already warned about in this process


class _Untrusted(Exception):
    """A data file that must not be used; the message says why, in a few words."""


class _NoRoom(DDPMError):
    """The disk holding a data file has less free space than the file needs: known before any
    decoding, so the automatic cache decodes in memory instead (``ddpm prepare-data`` stops)."""


@dataclass(frozen=True)
class CacheSettings:
    """Where and whether the decoded-data cache is kept, and how many processes decode.

    ``dir`` None means :func:`default_data_cache_dir`. ``enabled=False`` decodes into memory
    each start, as before the cache existed (``--no-data-cache``). ``workers`` is the number of
    decoding processes, None for one per core (``--workers``).
    """

    dir: Path | None = None
    enabled: bool = True
    workers: int | None = None


def default_data_cache_dir() -> Path:
    """``$DDPM_CACHE/data``, else ``~/.cache/ddpm/data`` (beside the FID statistics in ``fid``
    and CIFAR-10 in ``cifar10``, so one variable moves all of the project's caches)."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm").expanduser() / "data"


@dataclass
class DataFile:
    """A verified, memory-mapped data file: ``header`` (see the module docstring) and ``images``,
    a read-only uint8 memmap [N, S, S, 3], or :class:`RaggedRows` of [h, w, 3] with random crops."""

    path: Path
    header: dict[str, Any]
    images: np.ndarray | RaggedRows

    def __len__(self) -> int:
        return int(self.header["count"])

    def rows(self, prefix: str | None = None) -> DecodedRows:
        """The file's rows for :func:`ddpm.data.sets.assemble_set`; item paths are shown as
        ``prefix + name`` (default: the source as it was named when the file was built)."""
        h = self.header
        prefix = h["prefix"] if prefix is None else prefix
        return DecodedRows(h["names"], h["groups"], h["classes"], [(prefix + n, r) for n, r in h["skipped"]],
                           int(h["listed"]), prefix, h["source"], self.images, str(self.path))


# ------------------------------------------------------------------------------ reading files
def is_data_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts as a data file does (it may still fail to verify)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(_MAGIC)) == _MAGIC
    except OSError:  # a folder, a missing path, an unreadable file: not a data file
        return False


def read_data_file(path: str | os.PathLike, key: str | None = None) -> DataFile:
    """Open and verify a data file; raises ``_Untrusted`` (a few words why) when it is truncated,
    corrupted, of another format, or (``key`` given) built from other data."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_PREFIX.size)
            if len(head) < _PREFIX.size:
                raise _Untrusted("it is truncated")
            magic, fmt, _, offset, length, digest = _PREFIX.unpack(head)
            if magic != _MAGIC:
                raise _Untrusted("it is not a ddpm data file")
            if fmt != _FORMAT:
                raise _Untrusted(f"it has format {fmt}, this ddpm reads format {_FORMAT}")
            if offset < _DATA_OFFSET or offset + length != size:
                raise _Untrusted(f"it is truncated or extended ({size} bytes, its header says {offset + length})")
            f.seek(offset)
            blob = f.read(length)
    except OSError as e:
        raise _Untrusted(f"it cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(blob).digest() != digest:
        raise _Untrusted("its header checksum does not match")
    try:
        header = json.loads(blob)
        if key is not None and header.get("key") != key:
            raise _Untrusted("it was built from other data")
        images = _map_pixels(path, header, offset - _DATA_OFFSET)
        for row, expected in header["row_hashes"].items():
            if hashlib.sha256(np.ascontiguousarray(images[int(row)])).hexdigest() != expected:
                raise _Untrusted(f"image row {row} does not match its hash")
    except (ValueError, KeyError, TypeError, IndexError, OSError) as e:  # a header of another shape
        raise _Untrusted(f"its header cannot be used ({first_line(e)})") from None
    return DataFile(path, header, images)


def _map_pixels(path: Path, header: dict[str, Any], pixel_bytes: int) -> np.ndarray | RaggedRows:
    count, s = int(header["count"]), int(header["image_size"])
    if header["pixel_bytes"] != pixel_bytes or len(header["names"]) != count:
        raise _Untrusted("its header does not describe its pixels")
    if header["layout"] == "fixed":
        if count * s * s * 3 != pixel_bytes:
            raise _Untrusted("its size does not match its image count")
        if count == 0:
            return np.zeros((0, s, s, 3), np.uint8)
        return np.memmap(path, np.uint8, "r", offset=_DATA_OFFSET, shape=(count, s, s, 3))
    shapes = np.asarray(header["shapes"], dtype=np.int64).reshape(-1, 2)
    if len(shapes) != count or int((shapes[:, 0] * shapes[:, 1] * 3).sum()) != pixel_bytes:
        raise _Untrusted("its row shapes do not match its size")
    flat = np.memmap(path, np.uint8, "r", offset=_DATA_OFFSET, shape=(pixel_bytes,)) if pixel_bytes else \
        np.zeros(0, np.uint8)
    return RaggedRows(flat, shapes)


# ------------------------------------------------------------------------------ writing files
def cache_key(listing: Listing, spec: DecodeSpec) -> str:
    """sha256 (hex) of everything that determines a data file's contents: the listing's digest
    (names, sizes, times or CRCs), the class of every item, the size, the crop mode, and the
    versions of the file format, the decoder and Pillow."""
    import PIL

    groups = hashlib.sha256("\0".join("\1" if g is None else g for g in listing.groups)
                            .encode("utf-8", "surrogateescape")).hexdigest()
    return hashlib.sha256(json.dumps({
        "format": _FORMAT, "decoder": DECODER_VERSION, "pillow": PIL.__version__, "kind": listing.kind,
        "listing": listing.digest, "groups": groups, "classes": listing_classes(listing),
        "image_size": spec.image_size, "random_crop": spec.random_crop}, sort_keys=True).encode()).hexdigest()


def estimate_bytes(count: int, image_size: int, random_crop: bool = False) -> int:
    """Bytes a data file of ``count`` images takes: exact for centre crops; for random crops an
    estimate for 4:3 photographs (the long side kept makes each a third larger)."""
    row = image_size * image_size * 3
    return _DATA_OFFSET + count * (row * 4 // 3 if random_crop else row)


def _write_data(f: BinaryIO, listing: Listing, spec: DecodeSpec, key: str) -> None:
    """Decode ``listing`` into the open file ``f`` in the layout of the module docstring."""
    f.write(bytes(_DATA_OFFSET))
    bad: list[tuple[str, str]] = []
    names, groups, shapes, hashes = [], [], [], {}
    written = 0
    stride = max(1, len(listing) // _SAMPLED_ROWS)
    for i, arr in decode_items(listing, spec, bad):
        row = np.ascontiguousarray(arr, dtype=np.uint8)
        if len(names) % stride == 0:
            hashes[str(len(names))] = hashlib.sha256(row).hexdigest()
        f.write(row)  # type: ignore[arg-type]  (any contiguous buffer)
        written += row.nbytes
        names.append(listing.names[i])
        groups.append(listing.groups[i])
        if spec.random_crop:
            shapes.append(row.shape[:2])
    prefix_len = len(listing.prefix)
    header = {
        "format": _FORMAT, "key": key, "kind": listing.kind, "source": str(listing.root), "prefix": listing.prefix,
        "image_size": spec.image_size, "random_crop": spec.random_crop,
        "layout": "ragged" if spec.random_crop else "fixed", "count": len(names), "listed": len(listing),
        "names": names, "groups": groups, "classes": listing_classes(listing),
        "skipped": [(p[prefix_len:], r) for p, r in bad], "shapes": [list(map(int, s)) for s in shapes],
        "pixel_bytes": written, "row_hashes": hashes, "listing": listing.digest, "decoder": DECODER_VERSION,
        "pillow": _pillow_version(), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    blob = json.dumps(header, separators=(",", ":")).encode()
    f.write(blob)
    f.seek(0)
    f.write(_PREFIX.pack(_MAGIC, _FORMAT, 0, _DATA_OFFSET + written, len(blob), hashlib.sha256(blob).digest()))
    f.seek(0, os.SEEK_END)


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def _build(listing: Listing, spec: DecodeSpec, path: Path, key: str) -> DataFile:
    """Decode ``listing`` into ``path`` atomically and map the result. Raises :class:`DDPMError`
    (one line, nothing left behind) when the disk is too small or fills, or at a bad image
    with ``spec.strict``."""
    need = estimate_bytes(len(listing), spec.image_size, spec.random_crop)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and not spec.random_crop and need > free:
        raise _NoRoom(f"data cache: {path} needs {_size(need)} and {path.parent} has {_size(free)} free; free space "
                      "there, choose another --data-cache DIR, or pass --no-data-cache")
    workers = resolve_workers(spec.workers, len(listing))
    if spec.progress:  # quiet commands (--quiet, --no-progress, library calls) print nothing routine
        print(f"data cache: decoding {len(listing)} images of {listing.root} at {spec.image_size}x{spec.image_size} "
              f"with {workers} process(es) into {path} (about {_size(need)})", flush=True)
    start = time.perf_counter()
    try:
        atomic_write_with(path, lambda f: _write_data(f, listing, spec, key))
    except OutputWriteError as e:
        raise DDPMError(f"data cache: cannot write {path} ({e.strerror}); nothing was left there. Free space, "
                        "choose another --data-cache DIR, or pass --no-data-cache") from None
    try:
        found = read_data_file(path, key)
    except _Untrusted as e:  # written a moment ago: only a failing disk gets here
        raise DDPMError(f"data cache: {path} failed its check right after it was written ({e})") from None
    if spec.progress:
        print(f"data cache: wrote {len(found)} images to {path} ({_size(path.stat().st_size)}) in "
              f"{time.perf_counter() - start:.1f} s", flush=True)
    return found


def _size(n: float) -> str:
    """``n`` bytes in decimal units: "512 bytes", "12.3 KB", "2.5 GB"."""
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


# ------------------------------------------------------------------------- locking and names
@contextlib.contextmanager
def _exclusive(lock_path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing): one process builds
    ``what`` while the others wait. The kernel releases it when its holder exits or is killed,
    so no stale lock outlives a crash. Where there is no ``fcntl`` (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"data cache: another process is building {what}; waiting for it", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            # A file system without flock (some network mounts): building unlocked stays correct,
            # since the file appears by an atomic rename; two builders only cost double the work.
            warnings.warn(f"cannot lock {str(lock_path)!r} ({e.strerror or e}); building {what} without a lock",
                          stacklevel=3)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _remove_temp_files(folder: Path, name_glob: str) -> None:
    """Remove temporaries a killed build of ``name_glob`` left (``.NAME.<random>.tmp``); only
    called while holding that file's lock, so no live build owns them."""
    for stale in folder.glob(f".{name_glob}.*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _stem(listing: Listing, spec: DecodeSpec) -> str:
    """The part of a cache file name that names its source, size and crop mode (the key follows)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", listing.root.name).strip("_.")[:40] or "data"
    where = hashlib.sha256(os.fsencode(str(listing.root.resolve()))).hexdigest()[:10]
    return f"{slug}-{where}-{spec.image_size}{'r' if spec.random_crop else 'c'}"


def _warn_once(folder: Path, message: str) -> None:
    if str(folder) not in _WARNED:
        _WARNED.add(str(folder))
        warnings.warn(message, stacklevel=4)


def _older_versions(folder: Path, stem: str, current: Path) -> list[Path]:
    return [p for p in folder.glob(f"{glob.escape(stem)}-*{DATA_SUFFIX}") if p != current]


def _say_changed(older: list[Path], listing: Listing) -> None:
    """One line saying why a source that was cached is decoded again."""
    try:
        old = read_data_file(older[0]).header
    except _Untrusted:
        return
    if old.get("listing") == listing.digest:
        why = f"ddpm's decoder or Pillow changed since {older[0].name} was built"
    else:
        why = f"{listing.root} changed since it was cached ({old['listed']} files then, {len(listing)} now)"
    print(f"data cache: {why}; decoding it again", flush=True)


# ------------------------------------------------------------------------------ the cache
def _open_cached(path: Path, key: str, *, quiet: bool = False) -> DataFile | None:
    """The verified file at ``path``, or None when there is none or it must not be trusted
    (said in one warning unless ``quiet``)."""
    if not path.is_file():
        return None
    try:
        return read_data_file(path, key)
    except _Untrusted as e:
        if not quiet:
            warnings.warn(f"data cache file {str(path)!r} is unusable ({e}); decoding the images again", stacklevel=4)
        return None


def cached_rows(listing: Listing, spec: DecodeSpec, settings: CacheSettings, *,
                build: bool = True) -> DecodedRows | None:
    """The rows of ``listing`` from the cache, decoding them into it first when needed (unless
    ``build`` is False: then None when no cache file holds them yet); None (after one warning per
    folder) when the cache folder cannot be written, so the caller decodes into memory. Raises
    :class:`DDPMError` when a build fails (disk full, a bad image with ``spec.strict``)."""
    folder = Path(settings.dir).expanduser() if settings.dir is not None else default_data_cache_dir()
    key, stem = cache_key(listing, spec), _stem(listing, spec)
    path = folder / f"{stem}-{key[:16]}{DATA_SUFFIX}"
    found = _open_cached(path, key)
    if found is not None and spec.progress:
        print(f"data cache: mapped {len(found)} images from {path}", flush=True)
    if found is None and not build:
        return None
    with contextlib.ExitStack() as held:
        if found is None:
            try:
                check_writable(folder, "data cache")
                folder.mkdir(parents=True, exist_ok=True)
                held.enter_context(_exclusive(folder / f".{stem}.lock", str(path)))
            except (DDPMError, OSError) as e:
                _warn_once(folder, f"cannot use the data cache folder {str(folder)!r} ({first_line(e)}); decoding "
                                   "in memory instead (--data-cache DIR picks a writable folder, --no-data-cache "
                                   "skips it)")
                return None
            # Another process may have built it while this one waited for the lock.
            found = _open_cached(path, key, quiet=True)
        if found is None:
            _remove_temp_files(folder, f"{glob.escape(stem)}-*{DATA_SUFFIX}")
            older = _older_versions(folder, stem, path)
            if older:
                _say_changed(older, listing)
            try:
                found = _build(listing, spec, path, key)
            except _NoRoom as e:  # nothing decoded yet: training goes on as it did before the cache
                _warn_once(folder, f"{e}; decoding in memory instead")
                return None
            for p in older:  # processes still mapping an old file keep its pages until they exit
                with contextlib.suppress(OSError):
                    p.unlink()
    rows = found.rows(listing.prefix)
    rows.where = str(listing.root)  # messages name the source as it was given this time
    return rows



def prepared_rows(path: Path, image_size: int, random_crop: bool) -> DecodedRows:
    """The rows of a file written by :func:`prepare_data`, checked to hold ``image_size`` images
    in the crop mode asked for. Raises :class:`DDPMError` naming the command that makes one that
    fits, or when the file fails its checks."""
    try:
        found = read_data_file(path)
    except _Untrusted as e:
        raise DDPMError(f"cannot use the data file {str(path)!r}: {e}; write it again with ddpm prepare-data") from None
    h = found.header
    if h["image_size"] != image_size or bool(h["random_crop"]) != bool(random_crop):
        def mode(s: int, crop: bool) -> str:
            return f"{s}x{s} images ({'long side kept for --random-crop' if crop else 'centre crop'})"

        raise DDPMError(f"{str(path)!r} holds {mode(h['image_size'], h['random_crop'])}; this run needs "
                        f"{mode(image_size, random_crop)}. Prepare one with ddpm prepare-data {h['source']} OUT "
                        f"--image-size {image_size}{' --random-crop' if random_crop else ''}")
    return found.rows()


def open_training_set(
    source: str | os.PathLike,
    image_size: int,
    *,
    conditional: bool = False,
    random_crop: bool = False,
    strict: bool = False,
    drop_empty_classes: bool = False,
    cache: CacheSettings | None = None,
    progress: bool = True,
) -> ImageSet:
    """The training set of ``source`` at ``image_size``, mapped from the data cache.

    ``source`` is a folder of images, a ``.zip`` of images, a Parquet file or folder of them, a
    file written by :func:`prepare_data` (mapped as it is), or ``"cifar10"`` (torchvision's copy in
    its default place; :func:`ddpm.data.sets.load_dataset` takes another). The cache is built on
    first use (decoded by ``cache.workers`` processes) and mapped afterwards; with
    ``cache.enabled`` False, or a cache folder that cannot be written (one warning), the set is
    decoded into memory as :func:`ddpm.data.sets.load_image_folder` does. Either way the set
    holds the same paths, labels, classes and pixels, so :class:`ddpm.data.sets.BatchStream`
    batches are identical. Raises :class:`DDPMError` for unusable data, a failed cache build (a
    full disk), and with ``strict`` for any unreadable image.
    """
    cache = cache or CacheSettings()
    if names_cifar10(str(source)):
        return load_cifar10(None, image_size, train=True, conditional=conditional)
    path = Path(source).expanduser()
    if is_data_file(path):
        rows = prepared_rows(path, image_size, random_crop)
    else:
        listing = list_source(path, conditional)
        spec = DecodeSpec(image_size, random_crop, strict, cache.workers, progress)
        rows = cached_rows(listing, spec, cache) if cache.enabled else None
        if rows is None:
            rows = decode_in_memory(listing, spec)
    return assemble_set(rows, image_size, conditional=conditional, random_crop=random_crop, strict=strict,
                        drop_empty_classes=drop_empty_classes)


# ------------------------------------------------------------------------------ references
@dataclass
class ReferenceImages:
    """A reference folder's pixels from the data cache: ``images`` uint8 [M, S, S, 3] (a
    read-only memory map), ``paths`` the M decoded files (str, in scan order), ``skipped`` the
    ``(path, reason)`` of the unreadable ones and ``listed`` how many files the scan found."""

    images: np.ndarray
    paths: list[str]
    skipped: list[tuple[str, str]]
    listed: int
    cache_file: str

    def rows_for(self, files: Sequence[str | os.PathLike]) -> np.ndarray:
        """int64 [len(files)]: the row of ``images`` holding each file, -1 for an unreadable
        (skipped) one. Raises KeyError for a file the cache does not know (it would be a bug:
        the cache lists a folder exactly as :func:`ddpm.files.images.scan_images` does)."""
        row_of = {p: i for i, p in enumerate(self.paths)}
        row_of.update((p, -1) for p, _ in self.skipped)
        return np.fromiter((row_of[os.fspath(f)] for f in files), np.int64, len(files))


def open_reference_images(folder: str | os.PathLike, image_size: int, *, cache: CacheSettings | None = None,
                          progress: bool = True, build: bool = True) -> ReferenceImages | None:
    """The pixels of every image under ``folder`` at ``image_size`` (short side resized, centre
    crop: the training decode), from the same cache file a training run on that folder maps.

    Returns None when the cache is disabled, its folder cannot be written (one warning), or
    ``build`` is False and no cache file holds the folder yet (a caller that needs a small subset
    of a large folder decodes the subset rather than the whole): the caller then decodes as
    before. Raises :class:`DDPMError` for a folder without images or a failed build."""
    cache = cache or CacheSettings()
    if not cache.enabled:
        return None
    listing = list_folder(Path(folder).expanduser(), conditional=False)
    rows = cached_rows(listing, DecodeSpec(image_size, False, False, cache.workers, progress), cache, build=build)
    if rows is None:
        return None
    assert isinstance(rows.images, np.ndarray) and rows.cache_file is not None
    return ReferenceImages(rows.images, [rows.prefix + n for n in rows.names], rows.skipped, rows.listed,
                           rows.cache_file)


# --------------------------------------------------------------------------- prepare-data
def prepare_data(source: str | os.PathLike, out: str | os.PathLike, spec: DecodeSpec, *, conditional: bool = False,
                 force: bool = False) -> tuple[DataFile, bool]:
    """Decode ``source`` into the data file ``out`` (``ddpm prepare-data``); returns the mapped
    file and whether it was written (False: ``out`` already held exactly this data, and
    ``force`` was not given). ``--data OUT`` then trains from it on any machine, without the
    source. Raises :class:`DDPMError` for unusable data, an ``out`` that is a folder or another
    kind of file, and a failed build."""
    out = Path(out).expanduser()
    src = Path(source).expanduser()
    if is_data_file(src):
        raise DDPMError(f"{str(src)!r} is already a data file; pass it to ddpm train --data as it is")
    if out.is_dir():
        raise DDPMError(f"OUT {str(out)!r} is a folder; expected a file name, e.g. {out / 'data-64.ddpmdata'}")
    if out.exists() and not is_data_file(out):
        raise DDPMError(f"OUT {str(out)!r} exists and is not a ddpm data file; choose another name")
    check_writable(out, "OUT", is_file=True)
    listing = list_source(src.resolve(), conditional)
    key = cache_key(listing, spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock", str(out)):
        if not force:
            with contextlib.suppress(_Untrusted, OSError):
                found = read_data_file(out, key)
                return found, False
        _remove_temp_files(out.parent, glob.escape(out.name))
        return _build(listing, spec, out, key), True


def describe_data_file(found: DataFile) -> list[str]:
    """Lines that say what a data file holds: images, size, classes, source, skipped files."""
    h = found.header
    s, n = h["image_size"], h["count"]
    crop = "long side kept, for --random-crop" if h["random_crop"] else "centre crop"
    classes = sorted(set(g for g in h["groups"] if g is not None), key=h["classes"].index)
    lines = [f"{found.path}: {n} images at {s}x{s} ({crop}), {_size(found.path.stat().st_size)}"]
    if classes and all(g is not None for g in h["groups"]):
        shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
        lines.append(f"  {len(classes)} classes (for --conditional): {shown}")
    else:
        lines.append("  no classes for every image: unconditional training only")
    lines.append(f"  from {h['kind']} {h['source']}: {h['listed']} files listed, {len(h['skipped'])} unreadable "
                 f"skipped{': ' + ', '.join(p for p, _ in h['skipped'][:3]) if h['skipped'] else ''}")
    lines.append(f"  decoded {h['created']} with Pillow {h['pillow']} (decoder {h['decoder']}, format {_FORMAT})")
    return lines
