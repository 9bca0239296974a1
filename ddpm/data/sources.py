"""Where training images come from, and the one way they are decoded.

Three kinds of source become the same list of items (:class:`Listing`):

* a folder of images (flat, nested, or class sub-folders), scanned by
  :func:`ddpm.files.images.scan_image_files` in its sorted path order;
* a ``.zip`` of images, EDM's ``dataset_tool.py`` layout: members in sorted name order, labels
  from its ``dataset.json`` (``{"labels": [["00000/img00000000.png", 6], ...]}``) when present,
  else from top-level folders inside the archive as for a folder;
* Parquet files (one file, or a folder of them), the layout of Hugging Face Hub image data sets:
  an image column of encoded bytes (binary, or Hugging Face's ``struct<bytes, path>``) and an
  optional integer or string label column (class names from Hugging Face's ``ClassLabel``
  metadata when present), read with pyarrow.

Each item has a name (its path relative to the source: ``cat/001.jpg``, a zip member, or
``train-00000.parquet:17`` for row 17) and a group, the class it would have under
``--conditional`` (None for an item outside any class). :func:`decode_items` decodes a listing
in order, in a pool of processes when asked, through :func:`ddpm.files.images.load_image`, so
every source gives exactly the pixels the same image file gives in a folder. Unreadable items
are counted and skipped, or with ``strict`` stop the decode at the first.

Pool workers are started by a fork server that has this module loaded (see
:func:`_pool_context`), so each starts as a cheap fork even in a process that runs threads.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import zipfile
import zlib
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DDPMError, first_line
from ..files.images import (IMAGE_EXTENSIONS, class_folders, class_name, has_image_extension, is_hidden, load_image,
                            scan_image_files, scan_images)

__all__ = ["Listing", "DecodeSpec", "Unreadable", "list_source", "list_folder", "list_zip", "list_parquet",
           "iter_payloads", "decode_payload", "decode_items", "resolve_workers", "DECODE_ERRORS",
           "PARQUET_EXTENSIONS"]

# What an unreadable image raises inside load_image (PIL, truncated files, zero-byte files).
DECODE_ERRORS = (OSError, ValueError, Image.DecompressionBombError, SyntaxError)
# What reading a zip member can raise besides OSError: bad CRC, unsupported compression, encryption.
_MEMBER_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError)
PARQUET_EXTENSIONS = (".parquet",)
_IMAGE_COLUMNS = ("image", "img", "images", "picture", "png", "jpg")
_LABEL_COLUMNS = ("label", "labels", "class", "fine_label", "target")
# Below this many items a process pool costs more to start than it saves.
_POOL_MIN_ITEMS = 256
_CHUNK = 32  # images per pool task: large enough to amortise pickling, small enough to keep all cores busy



class Unreadable(NamedTuple):
    """A payload that could not even be read (a zip member with a bad CRC, a null Parquet cell)."""

    reason: str


@dataclass
class Listing:
    """The items of a source, in training order, and what identifies their bytes.

    ``names`` are relative to ``root`` (``root`` itself for a folder or zip; the folder of the
    Parquet files). ``groups[i]`` is item ``i``'s class name or None. ``class_order`` is the order
    classes take when known from the source (EDM's integer labels, a ``ClassLabel``'s names);
    None means the order in which groups first appear in the listing (class folders sorted by
    name). ``digest`` is a sha256 over the names, sizes and modification times (or CRCs) of the
    items: two listings with equal digests hold the same bytes. ``refs`` tell
    :func:`iter_payloads` where each item's bytes are (kind-specific).
    """

    kind: str  # "folder" | "zip" | "parquet"
    root: Path
    names: list[str]
    groups: list[str | None]
    digest: str
    class_order: list[str] | None = None
    refs: list[Any] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)  # parquet: files, row counts, columns

    def __len__(self) -> int:
        return len(self.names)

    @property
    def prefix(self) -> str:
        """What joins a name into the path shown for it: ``prefix + names[i]``."""
        return path_prefix(self.root if self.kind != "parquet" else self.extra["base"])

    def shown(self, i: int) -> str:
        """Item ``i`` as a path to show a user (and to store as :attr:`ImageSet.paths`)."""
        return self.prefix + self.names[i]


def path_prefix(root: str | os.PathLike) -> str:
    """``str(Path(root) / name) == path_prefix(root) + name`` for every relative ``name``
    (string concatenation, so a million paths are joined in milliseconds)."""
    return str(Path(root) / "x")[:-1]


def _digest(rows: Iterable[Iterable[Any]]) -> str:
    """sha256 (hex) of rows of values: one line per row, values separated by NUL (which no file
    name holds, so the encoding is unambiguous), hashed in one call."""
    text = "".join("\0".join(map(str, row)) + "\n" for row in rows)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


# ------------------------------------------------------------------------------------ listing
def list_source(source: str | os.PathLike, conditional: bool = False) -> Listing:
    """The listing of a folder, ``.zip`` or Parquet source (see the module docstring).

    A folder with no image files but with ``.parquet`` files is a Parquet source. Raises
    :class:`DDPMError` for a missing path, a file of another type, a source with no images, and
    (``conditional``) a source without classes.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise DDPMError(f"data path {str(root)!r} does not exist; expected a folder of images, a .zip of images, "
                        "Parquet files or 'cifar10'")
    suffix = root.suffix.lower()
    if root.is_file():
        if suffix == ".zip":
            return list_zip(root, conditional)
        if suffix in PARQUET_EXTENSIONS:
            return list_parquet(root, conditional)
        raise DDPMError(f"data path {str(root)!r} is a file; expected a folder of images, a .zip of images, "
                        "a .parquet file, a file written by 'ddpm prepare-data' or 'cifar10'")
    try:
        return list_folder(root, conditional)
    except DDPMError:
        # A folder of Parquet files and no images: a Hugging Face data set's layout.
        if _parquet_files(root) and not scan_images(root):
            return list_parquet(root, conditional)
        raise


def list_folder(root: Path, conditional: bool = False) -> Listing:
    """Every image under ``root`` (any depth) or, with ``conditional``, under its class folders
    ``root/<class>/...`` (images directly in ``root`` are then not part of the set). Raises
    :class:`DDPMError` when there are no images, or no class folders with images."""
    prefix = path_prefix(root)
    if conditional:
        class_dirs = class_folders(root)
        per_class = [(name, scan_image_files(d)) for name, d in class_dirs]
        per_class = [(name, files) for name, files in per_class if files]
        if not per_class:
            loose = len(scan_images(root))
            raise DDPMError(
                f"--conditional needs class sub-folders (root/<class>/*.jpg) but {str(root)!r} has "
                f"{len(class_dirs)} sub-folders with images and {loose} images in all; drop --conditional "
                "to train unconditionally")
        files = [f for _, fs in per_class for f in fs]
    else:
        files = scan_image_files(root)
    if not files:
        raise DDPMError(f"no images found under {str(root)!r}; expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
    names = [p[len(prefix):] for p, _, _ in files]
    # A class is the top-level folder an image sits in, named as class_folders names it.
    named: dict[str, str] = {}
    groups = [named.get(top) or named.setdefault(top, class_name(top)) if rest else None
              for top, _, rest in (n.partition(os.sep) for n in names)]
    digest = _digest((n, size, mtime) for n, (_, size, mtime) in zip(names, files))
    return Listing("folder", root, names, groups, digest, refs=[p for p, _, _ in files])  # path strings


def _member_sort_key(name: str) -> list[str]:
    return name.split("/")  # part by part, as folder paths are sorted


def list_zip(path: Path, conditional: bool = False) -> Listing:
    """The images in a ``.zip`` (hidden members and folders skipped), in sorted name order.

    Labels come from the archive's ``dataset.json`` (EDM's layout) when it has any, else from
    top-level folders inside the archive; with ``conditional`` and no ``dataset.json``, members
    outside a folder are not part of the set. Raises :class:`DDPMError` for an unreadable
    archive, one without images, or (``conditional``) without labels for every image.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and has_image_extension(i.filename)
                     and not any(is_hidden(part) for part in i.filename.split("/"))]
            labels = _edm_labels(zf, path)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DDPMError(f"cannot read the archive {str(path)!r} ({first_line(e, 120)}); expected a .zip of images") from None
    infos.sort(key=lambda i: _member_sort_key(i.filename))
    if labels is not None:
        groups = [labels.get(i.filename) for i in infos]
        missing = [i.filename for i, g in zip(infos, groups) if g is None]
        if conditional and missing:
            raise DDPMError(f"dataset.json in {str(path)!r} has no label for {len(missing)} image(s), e.g. "
                            f"{missing[0]!r}; label every image or drop --conditional")
        order = sorted({g for g in groups if g is not None}, key=_label_sort_key)
    else:
        groups = [class_name(i.filename.split("/", 1)[0]) if "/" in i.filename else None for i in infos]
        if conditional:
            infos = [i for i, g in zip(infos, groups) if g is not None]
            groups = [g for g in groups if g is not None]
            if not infos:
                raise DDPMError(f"--conditional needs class folders inside {str(path)!r} (<class>/*.jpg) or EDM's "
                                "dataset.json labels; drop --conditional to train unconditionally")
        order = None
    if not infos:
        raise DDPMError(f"no images found in {str(path)!r}; expected members ending in {', '.join(IMAGE_EXTENSIONS)}")
    names = [i.filename for i in infos]
    if os.sep != "/":
        names = [n.replace("/", os.sep) for n in names]
    digest = _digest((n, i.file_size, i.CRC) for n, i in zip(names, infos))
    return Listing("zip", path, names, groups, digest, class_order=order, refs=infos)


def _label_sort_key(label: str) -> tuple:
    # Integer labels in numeric order ("2" before "10"), any others after them by name.
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def _edm_labels(zf: zipfile.ZipFile, path: Path) -> dict[str, str] | None:
    """``{member name: label}`` from EDM's ``dataset.json``; None when it is absent or has none."""
    try:
        info = zf.getinfo("dataset.json")
    except KeyError:
        return None
    try:
        raw = json.loads(zf.read(info)).get("labels")
    except (ValueError, AttributeError, *_MEMBER_ERRORS) as e:
        raise DDPMError(f"cannot read dataset.json in {str(path)!r} ({first_line(e, 120)}); expected "
                        '{"labels": [["name.png", 0], ...]}') from None
    if raw is None:
        return None
    out: dict[str, str] = {}
    for entry in raw if isinstance(raw, list) else []:
        name, label = (entry[0], entry[1]) if isinstance(entry, list) and len(entry) == 2 else (None, None)
        if not isinstance(name, str) or not isinstance(label, (int, str)) or isinstance(label, bool):
            raise DDPMError(f"dataset.json in {str(path)!r} has a label entry {str(entry)[:60]!r}; expected "
                            "[name, integer or string class]")
        out[name] = str(label)
    return out


def _parquet_files(root: Path) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        files.extend(Path(folder) / n for n in names
                     if not is_hidden(n) and os.path.splitext(n)[1].lower() in PARQUET_EXTENSIONS)
    return sorted(files)


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DDPMError("reading Parquet files needs pyarrow; install it with pip install 'ddpm[parquet]'") from None
    return pa, pq


def list_parquet(root: Path, conditional: bool = False) -> Listing:
    """Every row of the Parquet file ``root``, or of every ``.parquet`` file under the folder
    ``root`` (sorted by path), as one item. Raises :class:`DDPMError` for files pyarrow cannot
    read, files without an image column or with different columns, and (``conditional``) for
    files without a label column or rows without a label."""
    pa, pq = _pyarrow()
    files = [root] if root.is_file() else _parquet_files(root)
    base = root.parent if root.is_file() else root
    if not files:
        raise DDPMError(f"no images or Parquet files found under {str(root)!r}")
    columns, rows, stats, labels = None, [], [], []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
            cols = _parquet_columns(pf.schema_arrow, f) if columns is None else columns
            _check_schema(pf.schema_arrow, cols, f)
            rows.append(pf.metadata.num_rows)
            stats.append(f.stat())
            labels.extend(pf.read(columns=[cols["label"]]).column(0).to_pylist() if cols["label"] else
                          [None] * pf.metadata.num_rows)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise DDPMError(f"cannot read the Parquet file {str(f)!r} ({first_line(e, 120)})") from None
        columns = cols
    assert columns is not None
    groups, order = _parquet_groups(labels, columns.get("names"))
    if conditional and not columns["label"]:
        raise DDPMError(f"--conditional needs a label column in the Parquet files under {str(root)!r} (an integer "
                        f"or string column named {', '.join(_LABEL_COLUMNS)}); drop --conditional")
    unlabelled = sum(g is None for g in groups)
    if conditional and unlabelled:
        raise DDPMError(f"{unlabelled} row(s) of the Parquet files under {str(root)!r} have no label (null or -1); "
                        "remove them or drop --conditional")
    rel = [str(f)[len(path_prefix(base)):] for f in files]
    names = [f"{r}:{i}" for r, n in zip(rel, rows) for i in range(n)]
    if not names:
        raise DDPMError(f"the Parquet files under {str(root)!r} have no rows")
    digest = _digest([(r, n, st.st_size, st.st_mtime_ns, columns["image"], columns["label"])
                      for r, n, st in zip(rel, rows, stats)])
    return Listing("parquet", root, names, groups, digest, class_order=order,
                   extra={"base": base, "files": files, "rows": rows, "image": columns["image"],
                          "struct": columns["struct"]})


def _parquet_columns(schema, path: Path) -> dict[str, Any]:
    """Which column holds the images (and whether it is Hugging Face's struct), which the labels,
    and the class names a ``ClassLabel`` gives them."""
    import pyarrow as pa

    def is_bytes(t) -> bool:
        return pa.types.is_binary(t) or pa.types.is_large_binary(t)

    image_cols = [f for f in schema if is_bytes(f.type) or (pa.types.is_struct(f.type) and any(
        sub.name == "bytes" and is_bytes(sub.type) for sub in f.type))]
    if not image_cols:
        raise DDPMError(f"the Parquet file {str(path)!r} has no image column (binary, or a struct with a 'bytes' "
                        f"field as Hugging Face data sets write); its columns are {', '.join(schema.names)}")
    image = next((f for name in _IMAGE_COLUMNS for f in image_cols if f.name == name), image_cols[0])
    label = next((schema.field(n) for n in _LABEL_COLUMNS if n in schema.names and (
        pa.types.is_integer(schema.field(n).type) or pa.types.is_string(schema.field(n).type))), None)
    names = None
    if label is not None and schema.metadata and b"huggingface" in schema.metadata:
        try:
            feature = json.loads(schema.metadata[b"huggingface"])["info"]["features"][label.name]
            names = [str(n) for n in feature["names"]] if feature.get("_type") == "ClassLabel" else None
        except (ValueError, KeyError, TypeError):
            names = None  # metadata of another shape: fall back to the label values themselves
    return {"image": image.name, "struct": pa.types.is_struct(image.type), "label": label.name if label else None,
            "names": names, "image_type": str(image.type)}


def _check_schema(schema, columns: dict[str, Any], path: Path) -> None:
    names = schema.names
    if columns["image"] not in names or str(schema.field(columns["image"]).type) != columns["image_type"] or (
            columns["label"] and columns["label"] not in names):
        raise DDPMError(f"the Parquet file {str(path)!r} does not have the columns of the first file "
                        f"({columns['image']!r}{', ' + repr(columns['label']) if columns['label'] else ''})")


def _parquet_groups(labels: list, class_names: list[str] | None) -> tuple[list[str | None], list[str] | None]:
    """Class name per row (None for null or -1, Hugging Face's "no label") and the class order."""
    groups: list[str | None] = []
    for v in labels:
        if v is None or v == -1:
            groups.append(None)
        elif class_names is not None and isinstance(v, int) and 0 <= v < len(class_names):
            groups.append(class_names[v])
        else:
            groups.append(str(v))
    present = set(g for g in groups if g is not None)
    if class_names is not None and present <= set(class_names):
        return groups, [c for c in class_names if c in present]
    return groups, sorted(present, key=_label_sort_key)


# ----------------------------------------------------------------------------------- payloads
def iter_payloads(listing: Listing) -> Iterator[str | bytes | Unreadable]:
    """What to decode for each item, in listing order: a file path (folders: the pool workers
    read the files themselves, in parallel), the encoded bytes (zip members and Parquet cells,
    read here in one pass), or :class:`Unreadable` when even the bytes cannot be had."""
    if listing.kind == "folder":
        yield from listing.refs
    elif listing.kind == "zip":
        with zipfile.ZipFile(listing.root) as zf:
            for info in listing.refs:
                try:
                    yield zf.read(info)
                except _MEMBER_ERRORS as e:
                    yield Unreadable(first_line(e, 120))
    else:
        yield from _parquet_payloads(listing)


def _parquet_payloads(listing: Listing) -> Iterator[bytes | Unreadable]:
    pa, pq = _pyarrow()
    import pyarrow.compute as pc

    for f, rows in zip(listing.extra["files"], listing.extra["rows"]):
        try:
            pf = pq.ParquetFile(f)
        except (OSError, ValueError, pa.ArrowException) as e:
            yield from [Unreadable(first_line(e, 120))] * rows
            continue
        for g in range(pf.num_row_groups):
            count = pf.metadata.row_group(g).num_rows
            try:
                col = pf.read_row_group(g, columns=[listing.extra["image"]]).column(0)
                cells = (pc.struct_field(col, "bytes") if listing.extra["struct"] else col).to_pylist()
            except (OSError, ValueError, pa.ArrowException) as e:
                yield from [Unreadable(first_line(e, 120))] * count
                continue
            yield from (c if c is not None else Unreadable("no image bytes in this row") for c in cells)


def decode_payload(payload: str | bytes, size: int, random_crop: bool = False) -> np.ndarray:
    """uint8 [size, size, 3] (with ``random_crop``, [H, W, 3] with the short side ``size``) from a
    file path or encoded bytes; raises what :func:`ddpm.files.images.load_image` raises."""
    if isinstance(payload, bytes):
        return load_image(io.BytesIO(payload), size, random_crop)
    return load_image(payload, size, random_crop)


def _decode_chunk(payloads: Sequence[str | bytes | Unreadable], size: int,
                  random_crop: bool) -> list[np.ndarray | str]:
    """Decode each payload; a failure becomes its one-line reason (a str) in its place. Runs in
    the pool workers, so it must stay a module-level function."""
    out: list[np.ndarray | str] = []
    for p in payloads:
        if isinstance(p, Unreadable):
            out.append(p.reason)
            continue
        try:
            out.append(decode_payload(p, size, random_crop))
        except UnidentifiedImageError:
            # PIL names the file, which for bytes is "<_io.BytesIO object at 0x...>": noise that
            # would also differ from run to run.
            out.append("cannot identify image file" if isinstance(p, bytes) else f"cannot identify image file {p!r}")
        except DECODE_ERRORS as e:
            out.append(first_line(e, 120))
    return out


# ----------------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class DecodeSpec:
    """How to decode a listing: at ``image_size`` (short side; with ``random_crop`` the long side
    is kept), with ``workers`` processes (None: one per core for large sets; 0 or 1: in this
    process), stopping at the first unreadable item when ``strict``, with a progress bar."""

    image_size: int
    random_crop: bool = False
    strict: bool = False
    workers: int | None = 1
    progress: bool = True


def resolve_workers(workers: int | None, count: int) -> int:
    """Decoding processes for ``count`` items: ``workers`` when given (at least 1), else the
    cores this process may use, or 1 for a set too small to repay starting a pool."""
    if workers is not None:
        return max(1, int(workers))
    if count < _POOL_MIN_ITEMS:
        return 1
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def decode_items(listing: Listing, spec: DecodeSpec, bad: list[tuple[str, str]]) -> Iterator[tuple[int, np.ndarray]]:
    """``(item index, uint8 pixels [H, W, 3])`` for every readable item, in listing order.

    Unreadable items are appended to ``bad`` as ``(shown path, reason)``; with ``spec.strict``
    the first one raises :class:`DDPMError` instead. Decoding runs in ``spec.workers`` processes
    (see :func:`resolve_workers`) with at most a few chunks in flight, so memory stays bounded
    whatever the set's size.
    """
    n = len(listing)
    workers = resolve_workers(spec.workers, n)
    bar = _bar(n, spec.progress)
    payloads = iter_payloads(listing)
    if workers <= 1:
        results = ((i, _decode_chunk([p], spec.image_size, spec.random_crop)[0]) for i, p in enumerate(payloads))
    else:
        results = _pool_results(payloads, spec, workers, n)
    try:
        for i, result in results:
            if isinstance(result, str):
                if spec.strict:
                    raise DDPMError(f"cannot read image {listing.shown(i)!r} ({result}); --strict stops at the "
                                    "first bad file")
                bad.append((listing.shown(i), result))
            else:
                yield i, result
            if bar is not None:
                bar.update(1)
    finally:
        # Closed here, not when collected: the pool stops and the archive is closed at once.
        results.close()
        payloads.close()
        if bar is not None:
            bar.close()


def _pool_results(payloads: Iterator, spec: DecodeSpec, workers: int, n: int) -> Iterator[tuple[int, Any]]:
    """Decode in a process pool, yielding results in order; at most ``2 * workers`` chunks are
    in flight (a zip's or Parquet file's bytes are read here, and must not pile up in memory)."""
    chunk = max(1, min(_CHUNK, -(-n // (workers * 4))))
    window: deque[tuple[int, Future]] = deque()
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context())
    try:
        start = 0
        for part in _chunks(payloads, chunk):
            window.append((start, pool.submit(_decode_chunk, part, spec.image_size, spec.random_crop)))
            start += len(part)
            while len(window) >= 2 * workers:
                first, fut = window.popleft()
                yield from enumerate(fut.result(), first)
        while window:
            first, fut = window.popleft()
            yield from enumerate(fut.result(), first)
    finally:
        # An error, --strict or Ctrl-C: drop the queued chunks instead of decoding them.
        pool.shutdown(wait=True, cancel_futures=True)


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    part: list = []
    for item in items:
        part.append(item)
        if len(part) == size:
            yield part
            part = []
    if part:
        yield part


def _pool_context() -> multiprocessing.context.BaseContext:
    """How pool workers start: from a fork server that preloads this module, so each worker is
    a cheap fork of a clean, single-threaded process (forking this one is unsafe once torch or
    CUDA run threads here; importing torch makes one); where there is none, spawn. The server
    starts once per process, in about the time an import of torch takes."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        # '__main__' is the default preload: without it every worker would import the main
        # module (for the ddpm command: all of torch) itself.
        ctx.set_forkserver_preload(["__main__", __name__])
        return ctx
    return multiprocessing.get_context("spawn")


def _bar(total: int, enabled: bool):
    if not enabled or total < 200:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="decoding images", unit="img", leave=False, dynamic_ncols=True)
