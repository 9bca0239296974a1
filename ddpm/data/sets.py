"""Training data: image folders (flat or nested), class folders, .zip archives, Parquet files, CIFAR-10.

Images are decoded once, converted to RGB whatever their mode, resized so the short side is
the training size and cropped to a square (:mod:`ddpm.data.sources` lists the sources and
decodes them, in a pool of processes when asked). Training normally maps them from the data
cache (:mod:`ddpm.data.cache`: one uint8 file decoded once, shared by every process). Without
it, when the decoded set fits in memory (the usual case at 32-128 px: 50,000 images at 64 px
are 600 MB) it is kept as one uint8 array and batches are plain indexing, which no worker pool
can beat; larger folders are decoded lazily by DataLoader workers, once per epoch.

Batches come from :class:`BatchStream`, a pure function of ``(seed, step)``: the image order is
a fixed sequence of per-epoch permutations, cut into global batches, each rank taking its slice.
Resuming at step ``s`` (on any number of ranks) therefore sees exactly the images an
uninterrupted run would have seen, whether the pixels come from memory or from the cache.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..errors import DDPMError, first_line
from ..files.images import load_image
from .sources import DecodeSpec, Listing, decode_items, list_folder

__all__ = ["ImageSet", "data_identity", "same_images", "RaggedRows", "DecodedRows", "remove_empty_classes", "load_image_folder", "load_cifar10",
           "names_cifar10", "load_dataset", "decode_in_memory", "assemble_set", "listing_classes", "BatchStream",
           "batches"]

# Keep decoded data in memory up to this many bytes; above it, decode lazily in workers.
MEMORY_BUDGET = int(os.environ.get("DDPM_DATA_MEMORY", 6 * 2**30))


class RaggedRows:
    """Images of different shapes stored back to back in one flat uint8 buffer (the data cache's
    layout for ``--random-crop``, where each image keeps its resized long side).

    ``flat`` is uint8 [sum of h*w*3] (usually a read-only memory map), ``shapes`` int64 [N, 2]
    the (height, width) of each image in order. ``rows[i]`` is a view [h_i, w_i, 3]: nothing is
    copied until a batch is cropped and stacked.
    """

    def __init__(self, flat: np.ndarray, shapes: np.ndarray) -> None:
        self.flat = flat
        self.shapes = np.asarray(shapes, dtype=np.int64).reshape(-1, 2)
        sizes = self.shapes[:, 0] * self.shapes[:, 1] * 3
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self.offsets[-1] > len(flat):
            raise ValueError(f"{len(self.shapes)} images need {self.offsets[-1]} bytes; the buffer has {len(flat)}")

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> np.ndarray:
        i = int(index)
        if i < 0:
            i += len(self)
        h, w = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        return self.flat[start : start + h * w * 3].reshape(h, w, 3)


@dataclass
class ImageSet:
    """A decoded data set: ``images`` uint8 [N, H, W, 3] (or None when lazy), labels, class names."""

    paths: list[str]
    labels: np.ndarray | None  # int64 [N] or None for unconditional data
    classes: list[str] | None
    image_size: int
    # Pixels: one array [N, H, W, 3] (in memory, or a read-only memory map of the data cache),
    # or with random_crop a sequence of [H', W', 3] arrays that keep the long side (a list, or
    # RaggedRows over the cache); None means decode from ``paths`` on demand.
    images: np.ndarray | Sequence[np.ndarray] | None = None
    random_crop: bool = False
    cache_file: str | None = None  # the data cache file the pixels are mapped from, if any

    def __len__(self) -> int:
        return len(self.paths) if self.images is None else len(self.images)

    @property
    def conditional(self) -> bool:
        """Whether the set carries class labels."""
        return self.labels is not None

    def get(self, index: int) -> np.ndarray:
        """Pixels of image ``index``, [H, W, 3] uint8 (long side kept when random-cropping)."""
        if self.images is not None:
            return self.images[index]
        return load_image(self.paths[index], self.image_size, self.random_crop)


@dataclass
class DecodedRows:
    """Decoded images and what is known of the items they came from, before labels are made.

    ``names[i]`` (relative to the source; shown as ``prefix + name``) and ``groups[i]`` (class name
    or None) describe row ``i`` of ``images``. ``classes`` is the class order over every listed
    item, readable or not, so a class whose images all failed can be named. ``skipped`` holds
    ``(shown path, reason)`` of the unreadable items, ``listed`` the count of items tried.
    """

    names: list[str]
    groups: list[str | None]
    classes: list[str]
    skipped: list[tuple[str, str]]
    listed: int
    prefix: str
    where: str  # the source as messages name it
    images: np.ndarray | Sequence[np.ndarray] | None
    cache_file: str | None = None


def listing_classes(listing: Listing) -> list[str]:
    """A listing's classes in order: the source's own order when it has one, else the order in
    which they first appear (class folders sorted by name)."""
    if listing.class_order is not None:
        return list(listing.class_order)
    return list(dict.fromkeys(g for g in listing.groups if g is not None))


def decode_in_memory(listing: Listing, spec: DecodeSpec) -> DecodedRows:
    """Decode a listing into memory: one preallocated uint8 array [N, S, S, 3], a list of
    [H, W, 3] arrays with ``random_crop``, or (a folder above ``DDPM_DATA_MEMORY``) nothing, to
    be decoded again lazily. Raises :class:`DDPMError` at the first bad item when ``strict``."""
    n, s = len(listing), spec.image_size
    # Random crops keep the long side, so budget for up to twice the pixels.
    fits = n * s * s * 3 * (2 if spec.random_crop else 1) <= MEMORY_BUDGET
    if not fits and listing.kind != "folder":
        warnings.warn(f"{n} decoded images of {str(listing.root)!r} are more than DDPM_DATA_MEMORY allows; they are "
                      "kept in memory all the same (the data cache maps them from disk instead)", stacklevel=3)
    keep = fits or listing.kind != "folder"  # only a folder's files can be decoded again lazily
    # Decoded pixels go straight into one preallocated array (no list + stack at twice the memory).
    pixels = np.empty((n, s, s, 3), np.uint8) if keep and not spec.random_crop else None
    decoded: list[np.ndarray] = []
    good: list[int] = []
    bad: list[tuple[str, str]] = []
    for i, arr in decode_items(listing, spec, bad):
        if pixels is not None:
            pixels[len(good)] = arr
        elif keep:
            decoded.append(arr)
        good.append(i)
    images: np.ndarray | list[np.ndarray] | None = None
    if pixels is not None:
        images = pixels[: len(good)]
    elif keep:
        images = decoded
    return DecodedRows([listing.names[i] for i in good], [listing.groups[i] for i in good], listing_classes(listing),
                       bad, n, listing.prefix, str(listing.root), images)


def assemble_set(rows: DecodedRows, image_size: int, *, conditional: bool = False, random_crop: bool = False,
                 strict: bool = False, drop_empty_classes: bool = False) -> ImageSet:
    """The :class:`ImageSet` of decoded rows: warns once about skipped items (with ``strict``,
    the first is an error), makes labels from the groups with ``conditional``, and leaves out
    (``drop_empty_classes``, warned) or refuses classes none of whose images could be read.
    The one ending of every way a set is loaded, so each says the same things the same way."""
    if rows.skipped:
        if strict:
            raise DDPMError(f"cannot read image {rows.skipped[0][0]!r} ({rows.skipped[0][1]}); --strict stops at the "
                            "first bad file")
        names = ", ".join(f"{p} ({r})" for p, r in rows.skipped[:3])
        warnings.warn(f"skipped {len(rows.skipped)} unreadable image file(s) of {rows.listed}: {names}"
                      f"{' ...' if len(rows.skipped) > 3 else ''}; use --strict to make this an error", stacklevel=3)
    if not rows.names:
        raise DDPMError(f"none of the {rows.listed} image files under {rows.where!r} could be read")
    paths = [rows.prefix + n for n in rows.names]
    labels: np.ndarray | None = None
    classes: list[str] | None = None
    if conditional:
        outside = sum(g is None for g in rows.groups)
        if outside:
            raise DDPMError(f"{outside} of the {len(rows.names)} images in {rows.where!r} are in no class (it was "
                            "prepared without --conditional); prepare it again with --conditional, or drop --conditional")
        index = {c: i for i, c in enumerate(rows.classes)}
        # A class whose images all failed to decode would still be offered for sampling, from
        # an embedding that never saw an image.
        classes, labels, empty = remove_empty_classes(
            rows.classes, np.fromiter((index[g] for g in rows.groups), np.int64, len(rows.groups)))
        if empty and not drop_empty_classes:
            raise DDPMError(f"class folder(s) {_names(empty)} under {rows.where!r} have no readable images; fix "
                            "or remove them, or pass --drop-empty-classes to train without them")
        if empty:
            warnings.warn(f"dropped {len(empty)} class(es) with no readable images: {_names(empty)}", stacklevel=3)
        if len(classes) < 2:
            warnings.warn(f"only one class folder ({classes[0]!r}) under {rows.where}; guidance needs at least two",
                          stacklevel=3)
    return ImageSet(paths, labels, classes, image_size, rows.images, random_crop, rows.cache_file)


def load_image_folder(
    root: str | Path,
    image_size: int,
    *,
    conditional: bool = False,
    strict: bool = False,
    random_crop: bool = False,
    progress: bool = True,
    drop_empty_classes: bool = False,
    workers: int | None = 1,
) -> ImageSet:
    """Every image under ``root`` (any depth); with ``conditional``, ``root/<class>/...`` labels.

    Hidden files and folders (names starting with '.') are skipped; linked sub-folders are
    followed (except link loops). Unreadable files (truncated, zero bytes, not an image) are
    skipped with one warning that counts them and names the first few; with ``strict`` the first
    one is an error. A class whose images are all unreadable is a :class:`DDPMError`, or with
    ``drop_empty_classes`` a warning and the class left out. ``workers`` decoding processes
    (None: every core for large folders). Decodes into memory; see :mod:`ddpm.data.cache` for
    the cached way.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DDPMError(f"data path {str(root)!r} does not exist; expected a folder of images or 'cifar10'")
    if not root.is_dir():
        raise DDPMError(f"data path {str(root)!r} is a file; expected a folder of images or 'cifar10'")
    listing = list_folder(root, conditional)
    rows = decode_in_memory(listing, DecodeSpec(image_size, random_crop, strict, workers, progress))
    return assemble_set(rows, image_size, conditional=conditional, random_crop=random_crop, strict=strict,
                        drop_empty_classes=drop_empty_classes)


def data_identity(source: str, data: ImageSet) -> dict[str, Any]:
    """What identifies a training set, recorded in a run and checked when it resumes: ``path``
    (``source`` made absolute; ``cifar10`` as it is), ``images`` (the count) and ``names_sha256``
    (a digest of each image's name relative to ``source``, in the set's order: the same set moved
    or renamed keeps it, another set of as many images does not); ``names: "relative"`` marks
    that digest (runs recorded before it hashed each file's name and the folder holding it)."""
    path = source if names_cifar10(source) else str(Path(source).expanduser().resolve())
    return {"path": path, "images": len(data), "names_sha256": _names_sha256(source, data.paths),
            "names": "relative"}


def same_images(saved: dict[str, Any], source: str, data: ImageSet) -> bool:
    """Whether ``data`` (read from ``source``) holds the images of the identity ``saved`` (by
    :func:`data_identity`, or the older digest of file and folder names for runs that lack
    ``names``)."""
    if saved.get("names") == "relative":
        digest = _names_sha256(source, data.paths)
    else:
        h = hashlib.sha256()
        for p in data.paths:
            h.update("/".join(p.replace(os.sep, "/").rsplit("/", 2)[-2:]).encode("utf-8", "surrogateescape") + b"\n")
        digest = h.hexdigest()
    return saved.get("names_sha256") == digest


def _names_sha256(source: str, paths: Sequence[str]) -> str:
    """sha256 of the paths with the source's own location taken off: the folder (or ``.zip``)
    itself, else the folder holding it (a Parquet file's rows are named from there)."""
    prefix = ""
    if not names_cifar10(source):
        for root in (Path(source), Path(source).parent):
            candidate = str(root / "x")[:-1]
            if all(p.startswith(candidate) for p in paths):
                prefix = candidate
                break
    h = hashlib.sha256()
    for p in paths:
        h.update(p[len(prefix):].replace(os.sep, "/").encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()


def remove_empty_classes(classes: list[str], labels: np.ndarray) -> tuple[list[str], np.ndarray, list[str]]:
    """``(classes, labels, removed)``: the classes no label points at removed, labels (int64 [N])
    renumbered to match, and the names removed."""
    counts = np.bincount(labels, minlength=len(classes))
    keep = np.flatnonzero(counts > 0)
    if len(keep) == len(classes):
        return classes, labels, []
    remap = np.full(len(classes), -1, dtype=np.int64)
    remap[keep] = np.arange(len(keep))
    removed = [c for c, k in zip(classes, counts) if k == 0]
    return [classes[i] for i in keep], remap[labels], removed


def _names(items: Sequence[str], limit: int = 5) -> str:
    return ", ".join(repr(c) for c in items[:limit]) + (" ..." if len(items) > limit else "")


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar10(root: str | Path | None, image_size: int, *, train: bool = True, conditional: bool = True) -> ImageSet:
    """CIFAR-10 through torchvision: read from ``root`` if a copy is there, else download it.

    ``root`` defaults to ``$DDPM_CACHE/cifar10`` (``~/.cache/ddpm/cifar10``). Images are upsampled
    (bicubic) when ``image_size`` is larger than 32.
    """
    from torchvision.datasets import CIFAR10

    root = Path(root) if root else Path(os.environ.get("DDPM_CACHE", Path.home() / ".cache" / "ddpm")) / "cifar10"
    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError:
        try:
            ds = CIFAR10(str(root), train=train, download=True)
        except Exception as e:  # offline machines end here
            raise DDPMError(
                f"CIFAR-10 is not in {str(root)!r} and could not be downloaded ({first_line(e, 120)}); put torchvision's "
                "cifar-10-batches-py there (--data-root), or pass a folder of class sub-folders as --data"
            ) from None
    data = ds.data  # [N, 32, 32, 3] uint8
    if image_size != 32:
        x = torch.from_numpy(data).permute(0, 3, 1, 2).float()
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False,
                                            antialias=image_size < 32)
        data = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    labels = np.asarray(ds.targets, dtype=np.int64) if conditional else None
    paths = [f"cifar10:{'train' if train else 'test'}:{i}" for i in range(len(data))]
    return ImageSet(paths, labels, list(ds.classes) if conditional else None, image_size, data)


def names_cifar10(data: str) -> bool:
    """Whether a ``--data`` value means torchvision's CIFAR-10 training split rather than a folder
    (a folder that happens to be called ``cifar10`` in the working directory wins)."""
    return data.lower() == "cifar10" and not Path(data).exists()


def load_dataset(
    data: str,
    image_size: int,
    *,
    conditional: bool = False,
    strict: bool = False,
    random_crop: bool = False,
    data_root: str | None = None,
    progress: bool = True,
    drop_empty_classes: bool = False,
) -> ImageSet:
    """``data`` is a folder, a ``.zip`` of images, Parquet files, a file written by ``ddpm
    prepare-data`` (mapped, not decoded), or ``"cifar10"`` (torchvision's copy under
    ``data_root``). Decodes into memory without the data cache, in this process;
    :func:`ddpm.data.cache.open_training_set` is the cached, parallel way."""
    if names_cifar10(data):
        return load_cifar10(data_root, image_size, train=True, conditional=conditional)
    from .cache import CacheSettings, open_training_set  # local: a cycle, the cache module builds on this one

    return open_training_set(data, image_size, conditional=conditional, random_crop=random_crop, strict=strict,
                             drop_empty_classes=drop_empty_classes, cache=CacheSettings(enabled=False, workers=1),
                             progress=progress)


# ------------------------------------------------------------------------------------ batches
class BatchStream:
    """The deterministic order of training examples: ``(index, flip, crop)`` for every step.

    Epoch ``e`` visits all ``n`` examples in the permutation drawn from ``seed`` and ``e``; the
    stream of all epochs is cut into global batches of ``global_batch``, and rank ``r`` of
    ``world`` takes the ``r``-th contiguous slice of each. Flips and crop offsets are drawn from
    ``(seed, step)``. Nothing here holds state, so any step can be asked for directly.
    """

    def __init__(self, n: int, global_batch: int, seed: int, *, rank: int = 0, world: int = 1,
                 hflip: bool = True) -> None:
        if global_batch % world:
            raise DDPMError(f"global batch size {global_batch} is not divisible by {world} processes")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world, self.hflip = rank, world, hflip
        self._perm_epoch = -1
        self._perm: torch.Tensor | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        assert self._perm is not None
        return self._perm

    def indices(self, step: int) -> list[int]:
        """Example indices of this rank's share of global batch ``step``."""
        per_rank = self.global_batch // self.world
        start = step * self.global_batch + self.rank * per_rank
        out: list[int] = []
        pos = start
        while len(out) < per_rank:
            epoch, offset = divmod(pos, self.n)
            take = min(per_rank - len(out), self.n - offset)
            out.extend(self._permutation(epoch)[offset : offset + take].tolist())
            pos += take
        return out

    def epoch(self, step: int) -> float:
        """Epochs completed at the start of ``step`` (fractional)."""
        return step * self.global_batch / self.n

    def augment(self, step: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flip flags [count] (bool) and crop positions [count] in [0, 1) for this rank at ``step``."""
        g = torch.Generator().manual_seed(_mix(self.seed, step, self.rank, 0xF11B))
        u = torch.rand(2, count, generator=g)
        flips = (u[0] < 0.5) if self.hflip else torch.zeros(count, dtype=torch.bool)
        return flips, u[1]


def _mix(*values: int) -> int:
    """A 63-bit seed from several integers (SplitMix64 on a running hash), stable across runs."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def _crop(arr: np.ndarray, size: int, pos: float) -> np.ndarray:
    h, w = arr.shape[:2]
    if h == size and w == size:
        return arr
    if h > size:
        top = int(pos * (h - size + 1))
        return arr[top : top + size]
    left = int(pos * (w - size + 1))
    return arr[:, left : left + size]


def _collate(data: ImageSet, idx: list[int], flips: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images [b, 3, S, S] and labels [b] (or None) of the examples ``idx``: each cropped
    at ``pos`` (random-crop sets), flipped where ``flips`` says, and moved to channels-first.

    One pass per image straight into the batch (gather, crop, flip and transpose in a single
    strided copy of 12 KB at 64 px): four times the throughput of gathering first and flipping
    the whole batch with torch, and the same bytes.
    """
    size = data.image_size
    out = np.empty((len(idx), 3, size, size), np.uint8)
    fixed = isinstance(data.images, np.ndarray)  # in memory or memory-mapped, already square
    # A plain view of a memory map: indexing an np.memmap costs twice as much per row.
    images = np.asarray(data.images) if fixed else None
    for k, (i, flip, p) in enumerate(zip(idx, flips.tolist(), pos.tolist())):
        row = images[i] if images is not None else _crop(data.get(i), size, p)
        out[k] = (row[:, ::-1] if flip else row).transpose(2, 0, 1)
    y = torch.from_numpy(data.labels[np.asarray(idx)]) if data.labels is not None else None
    return torch.from_numpy(out), y


class _LazyBatches(torch.utils.data.Dataset):
    """Decodes one whole batch per item so DataLoader workers each build a batch in parallel."""

    def __init__(self, data: ImageSet, stream: BatchStream, start: int) -> None:
        self.data, self.stream, self.start = data, stream, start

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        step = self.start + k
        idx = self.stream.indices(step)
        flips, pos = self.stream.augment(step, len(idx))
        return _collate(self.data, idx, flips, pos)


def batches(data: ImageSet, stream: BatchStream, start_step: int = 0, *, workers: int = 0,
            pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Endless ``(uint8 images [b, 3, H, W], labels [b] or None)`` from ``start_step`` on.

    In-memory sets are batched in this process (indexing a tensor is faster than any worker
    pool); lazy sets use ``workers`` DataLoader processes, each decoding whole batches.
    """
    if data.images is not None or workers <= 0:
        step = start_step
        while True:
            idx = stream.indices(step)
            flips, pos = stream.augment(step, len(idx))
            x, y = _collate(data, idx, flips, pos)
            if pin_memory:
                x = x.pin_memory()
            yield x, y
            step += 1
    loader = torch.utils.data.DataLoader(
        _LazyBatches(data, stream, start_step), batch_size=None, shuffle=False, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=True, prefetch_factor=4,
        collate_fn=lambda b: b,
        # Without its own generator the loader draws worker seeds from the global RNG, which
        # would shift the training step's random draws after a resume.
        generator=torch.Generator().manual_seed(_mix(stream.seed, start_step, 0xDA7A)),
    )
    yield from loader


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range the diffusion model works in."""
    return x.float().div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255], rounding to nearest."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


