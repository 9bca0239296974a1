"""Image files: the one folder scan and the one decoder, shared by training data
(:mod:`ddpm.data`) and scoring references (:mod:`ddpm.scoring`), so a reference image is decoded
exactly as a training image is."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import DDPMError

__all__ = ["IMAGE_EXTENSIONS", "DECODER_VERSION", "load_image", "to_rgb", "is_hidden", "has_image_extension",
           "scan_images", "scan_image_files", "count_hidden_images", "count_linked_images", "class_name", "class_folders"]

# GIF and multi-page TIFF files give their first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Part of the data cache's key (ddpm.data.cache): raise it whenever load_image's pixels change
# for the same file, so no cache decoded by the old code is mapped as if it were the new.
DECODER_VERSION = 1


def load_image(path: str | Path | BinaryIO, size: int, random_crop: bool = False) -> np.ndarray:
    """Decode ``path`` (a file name, or an open binary file such as an archive member's bytes in
    a ``BytesIO``) to an RGB uint8 array [size, size, 3] (short side resized, then cropped).

    Every PIL mode becomes RGB: palette and grayscale are expanded, alpha is composited on
    white (transparent pixels often hold black), CMYK is converted, and 16/32-bit images are
    scaled down to 8 bits instead of being clipped to white. EXIF orientation is applied.
    With ``random_crop`` the result keeps the long side (resized) so a random square can be
    cut per batch; see :func:`crop`. Raises ``OSError``/``ValueError`` for unreadable files.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(path) as img:
            # JPEG can decode at 1/2, 1/4, 1/8 scale almost for free; ask for no less than 2x the target.
            img.draft("RGB", (2 * size, 2 * size))
            img.load()
            img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
    for w in caught:  # Pillow's warnings do not say which file they are about: ours do
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "an image")
        warnings.warn(f"{name}: {w.message}" if issubclass(w.category, Image.DecompressionBombWarning) else w.message,
                      w.category, stacklevel=2)
    w, h = img.size
    if w < 1 or h < 1:
        raise ValueError("image has no pixels")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        # Box-filtered (antialiased) reduction, bicubic enlargement: no aliasing either way.
        img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None if scale > 1 else 3.0)
    arr = np.asarray(img, dtype=np.uint8)
    if random_crop:
        return arr
    top, left = (nh - size) // 2, (nw - size) // 2
    return np.ascontiguousarray(arr[top : top + size, left : left + size])


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: 16/32-bit scaled (not clipped), alpha composited on white."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(img).astype(np.float64)
        # 16-bit PNGs span 0..65535; 32-bit integer or float images are rescaled by their own range.
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        if img.mode == "F" or a.max() > 65535:
            lo, hi = float(a.min()), float(a.max())
            a, top = a - lo, max(hi - lo, 1e-12)
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img



def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden: it starts with '.' (``.ipynb_checkpoints``,
    ``.DS_Store``, macOS's ``._photo.jpg`` AppleDouble files). Hidden entries hold copies and
    metadata, never data, so every scan of images and classes skips them."""
    return name.startswith(".")


_IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)


def has_image_extension(name: str) -> bool:
    """Whether a file name ends in one of :data:`IMAGE_EXTENSIONS` (any letter case), as
    ``Path(name).suffix`` reads it (``.jpg`` alone is a hidden name, not an extension)."""
    dot = name.rfind(".")
    return 0 < dot < len(name) - 1 and name[dot:].lower() in _IMAGE_SUFFIXES


def scan_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` at any depth, sorted; hidden files and folders are skipped.

    Symbolic links to folders are followed, except a link back into a folder above it (a loop),
    which is skipped with one warning naming it. A sub-folder that cannot be listed is a
    warning naming it, not a silent loss of its images. This is the one scan used for training
    data, class folders and evaluation references.
    """
    return [Path(p) for p, _, _ in scan_image_files(root)]


def scan_image_files(root: str | Path) -> list[tuple[str, int, int]]:
    """``(path, size in bytes, modification time in ns)`` of every file :func:`scan_images`
    returns, in its order, the path as the string ``str()`` of that Path gives. The stat costs
    nothing extra (the scan has to stat each file to know it is one) and the data cache keys on
    it; strings instead of Paths make the scan of 100,000 files take a fraction of a second."""
    unreadable: list[str] = []
    loops: list[str] = []
    found = _walk_images(Path(root), unreadable, loops)
    if unreadable:
        warnings.warn(f"could not list {len(unreadable)} folder(s), their images are skipped: "
                      f"{', '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''}", stacklevel=3)
    if loops:
        warnings.warn(f"skipped {len(loops)} symbolic link(s) to a folder above them (a link loop): "
                      f"{', '.join(loops[:3])}{' ...' if len(loops) > 3 else ''}", stacklevel=3)
    return found


def _listed(folder: str, unreadable: list[str]) -> Iterator[os.DirEntry]:
    """The visible entries of ``folder`` sorted by name; none (and a note) if it cannot be listed."""
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not is_hidden(e.name)]
    except OSError as e:
        unreadable.append(f"{e.filename} ({e.strerror})")
        return iter(())
    entries.sort(key=lambda e: os.path.normcase(e.name))
    return iter(entries)


def _walk_images(root: Path, unreadable: list[str], loops: list[str]) -> list[tuple[str, int, int]]:
    """Depth-first walk of ``root`` that follows folder links, with its loop check: a folder
    whose (device, inode) is already on the path from ``root`` down to it is not entered.
    Folders that cannot be listed go to ``unreadable``, skipped links to ``loops``.

    Each folder's entries are visited in name order and a sub-folder's images where its name
    falls, so the result comes out in Path order (part by part, the data order of every run so
    far) without a sort. Paths are spelled as ``str(Path(root) / ...)`` would spell them, by
    string concatenation: a Path per file would cost more than the scan itself.
    """
    try:
        top = os.stat(root)
    except OSError as e:
        unreadable.append(f"{e.filename} ({e.strerror})")
        return []
    shown = str(root / "x")[:-1]  # "" for ".", "data/" for "data/", "/" for "/"
    found: list[tuple[str, int, int]] = []
    # (entries left to visit, how they are spelled, (device, inode) of the folder and those above)
    stack = [(_listed(os.fspath(root), unreadable), shown, frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        entries, prefix, above = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        name = entry.name
        try:
            # is_dir and stat follow links: a linked folder is a folder, a linked file a file.
            if entry.is_dir():
                st = entry.stat()
                node = (st.st_dev, st.st_ino)
                if node in above:
                    loops.append(prefix + name)
                else:
                    stack.append((_listed(entry.path, unreadable), prefix + name + os.sep, above | {node}))
            elif has_image_extension(name):
                st = entry.stat()
                if stat.S_ISREG(st.st_mode):
                    found.append((prefix + name, st.st_size, st.st_mtime_ns))
        except OSError:  # a broken link or a file removed meanwhile: not a file, as Path.is_file says
            continue
    return found


def count_hidden_images(root: str | Path) -> int:
    """Image files under ``root`` that :func:`scan_images` skips as hidden (their own name or a
    folder above them starts with '.'); 0 when ``root`` is not a folder. Earlier versions counted
    them as data, so a run started then needs them to explain its image count."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return 0
    count = 0
    for folder, _, names in os.walk(root):
        rel_hidden = any(is_hidden(part) for part in Path(folder).relative_to(root).parts)
        count += sum(1 for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS and (rel_hidden or is_hidden(n))
                     and (Path(folder) / n).is_file())
    return count


def count_linked_images(root: str | Path) -> int:
    """Image files under ``root`` that :func:`scan_images` reaches only through a symbolic link
    to a folder; 0 when ``root`` is not a folder. Earlier versions did not follow such links, so
    a run started then needs them to explain its image count."""
    root = Path(root).expanduser()
    if not root.is_dir():
        return 0
    direct = 0
    for folder, dirs, names in os.walk(root):  # followlinks=False: what those versions saw
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        direct += sum(1 for n in names if not is_hidden(n) and has_image_extension(n)
                      and os.path.isfile(os.path.join(folder, n)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scan's own warnings were given when the data was read
        total = len(scan_image_files(root))
    return max(0, total - direct)


def class_name(folder_name: str) -> str:
    """A class folder's name as printable text: bytes that are not UTF-8 (a folder unzipped from
    a Windows archive, ``b"caf\\xe9"``) become backslash escapes (``caf\\xe9``), so the name can
    be printed, stored in JSON and typed as ``--class 'caf\\xe9'``. UTF-8 names are unchanged."""
    return os.fsencode(folder_name).decode("utf-8", "backslashreplace")


def class_folders(root: Path) -> list[tuple[str, Path]]:
    """``(class name, folder)`` for every visible sub-folder of ``root``, sorted by folder name.

    Raises :class:`DDPMError` when two folders give the same printable name.
    """
    dirs = sorted(d for d in root.iterdir() if d.is_dir() and not is_hidden(d.name))
    named = [(class_name(d.name), d) for d in dirs]
    seen: dict[str, Path] = {}
    for name, d in named:
        if name in seen:
            raise DDPMError(f"class folders {str(seen[name])!r} and {str(d)!r} both read as class {name!r}; "
                            "rename one of them")
        seen[name] = d
    return named
