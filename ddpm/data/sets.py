"""Training data: image folders (flat or nested), class folders, CIFAR-10.

Images are decoded once, converted to RGB whatever their mode, resized so the short side is
the training size and cropped to a square. When the decoded set fits in memory (the usual case
at 32-128 px: 50,000 images at 64 px are 600 MB) it is kept as one uint8 tensor and batches are
plain indexing, which no worker pool can beat; larger sets are decoded lazily by DataLoader
workers, once per epoch.

Batches come from :class:`BatchStream`, a pure function of ``(seed, step)``: the image order is
a fixed sequence of per-epoch permutations, cut into global batches, each rank taking its slice.
Resuming at step ``s`` (on any number of ranks) therefore sees exactly the images an
uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from ..errors import DDPMError
from ..files.images import IMAGE_EXTENSIONS, class_folders, is_hidden, load_image, scan_images

__all__ = ["ImageSet", "remove_empty_classes", "load_image_folder", "load_cifar10", "names_cifar10",
           "load_dataset", "BatchStream", "batches"]

# Keep decoded data in memory up to this many bytes; above it, decode lazily in workers.
MEMORY_BUDGET = int(os.environ.get("DDPM_DATA_MEMORY", 6 * 2**30))


@dataclass
class ImageSet:
    """A decoded data set: ``images`` uint8 [N, H, W, 3] (or None when lazy), labels, class names."""

    paths: list[str]
    labels: np.ndarray | None  # int64 [N] or None for unconditional data
    classes: list[str] | None
    image_size: int
    # In-memory pixels: one array [N, H, W, 3], or with random_crop a list of [H', W', 3] arrays
    # that keep the long side; None means decode from ``paths`` on demand.
    images: np.ndarray | list[np.ndarray] | None = None
    random_crop: bool = False

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


def load_image_folder(
    root: str | Path,
    image_size: int,
    *,
    conditional: bool = False,
    strict: bool = False,
    random_crop: bool = False,
    progress: bool = True,
    drop_empty_classes: bool = False,
) -> ImageSet:
    """Every image under ``root`` (any depth); with ``conditional``, ``root/<class>/...`` labels.

    Hidden files and folders (names starting with '.') are skipped. Unreadable files (truncated,
    zero bytes, not an image) are skipped with one warning that counts them and names the first
    few; with ``strict`` the first one is an error. A class whose images are all unreadable is a
    :class:`DDPMError`, or with ``drop_empty_classes`` a warning and the class left out.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DDPMError(f"data path {str(root)!r} does not exist; expected a folder of images or 'cifar10'")
    if not root.is_dir():
        raise DDPMError(f"data path {str(root)!r} is a file; expected a folder of images or 'cifar10'")
    if conditional:
        class_dirs = class_folders(root)
        per_class = [(name, scan_images(d)) for name, d in class_dirs]
        per_class = [(name, files) for name, files in per_class if files]
        if not per_class:
            loose = len(scan_images(root))
            raise DDPMError(
                f"--conditional needs class sub-folders (root/<class>/*.jpg) but {str(root)!r} has "
                f"{len(class_dirs)} sub-folders with images and {loose} images in all; drop --conditional "
                "to train unconditionally"
            )
        classes = [name for name, _ in per_class]
        files = [f for _, fs in per_class for f in fs]
        labels = np.array([i for i, (_, fs) in enumerate(per_class) for _ in fs], dtype=np.int64)
    else:
        files = scan_images(root)
        classes, labels = None, None
    if not files:
        raise DDPMError(
            f"no images found under {str(root)!r}; expected files ending in {', '.join(IMAGE_EXTENSIONS)}"
        )

    # Random crops keep the long side, so budget for up to twice the pixels.
    keep_in_memory = len(files) * image_size * image_size * 3 * (2 if random_crop else 1) <= MEMORY_BUDGET
    # Decoded pixels go straight into one preallocated array (no list + stack at twice the memory).
    pixels = np.empty((len(files), image_size, image_size, 3), np.uint8) if keep_in_memory and not random_crop else None
    decoded: list[np.ndarray] = []
    good: list[int] = []
    bad: list[tuple[Path, str]] = []
    it = _progress(files, progress, "decoding images")
    for i, f in enumerate(it):
        try:
            arr = load_image(f, image_size, random_crop)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            if strict:
                raise DDPMError(f"cannot read image {str(f)!r} ({_reason(e)}); --strict stops at the first bad file")
            bad.append((f, _reason(e)))
            continue
        if pixels is not None:
            pixels[len(good)] = arr
        elif keep_in_memory:
            decoded.append(arr)
        good.append(i)
    if bad:
        names = ", ".join(f"{p} ({r})" for p, r in bad[:3])
        warnings.warn(
            f"skipped {len(bad)} unreadable image file(s) of {len(files)}: {names}"
            f"{' ...' if len(bad) > 3 else ''}; use --strict to make this an error",
            stacklevel=2,
        )
    if not good:
        raise DDPMError(f"none of the {len(files)} image files under {str(root)!r} could be read")
    paths = [str(files[i]) for i in good]
    if labels is not None:
        # A class whose images all failed to decode would still be offered for sampling, from
        # an embedding that never saw an image.
        classes, labels, empty = remove_empty_classes(classes, labels[good])
        if empty and not drop_empty_classes:
            raise DDPMError(f"class folder(s) {_names(empty)} under {str(root)!r} have no readable images; fix "
                            "or remove them, or pass --drop-empty-classes to train without them")
        if empty:
            warnings.warn(f"dropped {len(empty)} class(es) with no readable images: {_names(empty)}", stacklevel=2)
        if len(classes) < 2:
            warnings.warn(f"only one class folder ({classes[0]!r}) under {root}; guidance needs at least two",
                          stacklevel=2)
    images: np.ndarray | list[np.ndarray] | None = None
    if pixels is not None:
        images = pixels[: len(good)]
    elif keep_in_memory:
        images = decoded
    return ImageSet(paths, labels, classes, image_size, images, random_crop)


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


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return msg[:120]


def _progress(items: Sequence, enabled: bool, desc: str):
    if not enabled or len(items) < 200:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", leave=False, dynamic_ncols=True)


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
                f"CIFAR-10 is not in {str(root)!r} and could not be downloaded ({_reason(e)}); put torchvision's "
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
    """``data`` is a folder path or ``"cifar10"`` (torchvision's copy under ``data_root``)."""
    if names_cifar10(data):
        return load_cifar10(data_root, image_size, train=True, conditional=conditional)
    return load_image_folder(data, image_size, conditional=conditional, strict=strict, random_crop=random_crop,
                             progress=progress, drop_empty_classes=drop_empty_classes)


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
    if isinstance(data.images, np.ndarray):
        x = torch.from_numpy(data.images[np.asarray(idx)])  # [b, H, W, 3]
    else:
        x = torch.from_numpy(np.stack([_crop(data.get(i), data.image_size, float(p)) for i, p in zip(idx, pos)]))
    x = x.permute(0, 3, 1, 2)  # [b, 3, H, W] uint8
    x = torch.where(flips[:, None, None, None], x.flip(-1), x)
    y = torch.from_numpy(data.labels[np.asarray(idx)]) if data.labels is not None else None
    return x.contiguous(), y


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


