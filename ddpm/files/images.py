"""Image files: the one folder scan and the one decoder, shared by training data
(:mod:`ddpm.data`) and scoring references (:mod:`ddpm.scoring`), so a reference image is decoded
exactly as a training image is."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ..errors import DDPMError

__all__ = ["IMAGE_EXTENSIONS", "load_image", "to_rgb", "is_hidden", "scan_images", "count_hidden_images",
           "class_name", "class_folders"]

# GIF and multi-page TIFF files give their first frame.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str | Path, size: int, random_crop: bool = False) -> np.ndarray:
    """Decode ``path`` to an RGB uint8 array [size, size, 3] (short side resized, then cropped).

    Every PIL mode becomes RGB: palette and grayscale are expanded, alpha is composited on
    white (transparent pixels often hold black), CMYK is converted, and 16/32-bit images are
    scaled down to 8 bits instead of being clipped to white. EXIF orientation is applied.
    With ``random_crop`` the result keeps the long side (resized) so a random square can be
    cut per batch; see :func:`crop`. Raises ``OSError``/``ValueError`` for unreadable files.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with Image.open(path) as img:
        # JPEG can decode at 1/2, 1/4, 1/8 scale almost for free; ask for no less than 2x the target.
        img.draft("RGB", (2 * size, 2 * size))
        img.load()
        img = ImageOps.exif_transpose(img)
        img = to_rgb(img)
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


def scan_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` at any depth, sorted; hidden files and folders are skipped.

    Symbolic links to folders are not followed (as ``Path.rglob`` does not). A sub-folder that
    cannot be listed is a warning naming it, not a silent loss of its images. This is the one
    scan used for training data, class folders and evaluation references.
    """
    root = Path(root)
    unreadable: list[str] = []

    def note(e: OSError) -> None:
        unreadable.append(f"{e.filename} ({e.strerror})")

    found: list[Path] = []
    for folder, dirs, names in os.walk(root, onerror=note):
        dirs[:] = [d for d in dirs if not is_hidden(d)]  # pruned in place: os.walk skips them
        base = Path(folder)
        found.extend(base / n for n in names if not is_hidden(n) and Path(n).suffix.lower() in IMAGE_EXTENSIONS)
    if unreadable:
        warnings.warn(f"could not list {len(unreadable)} folder(s), their images are skipped: "
                      f"{', '.join(unreadable[:3])}{' ...' if len(unreadable) > 3 else ''}", stacklevel=2)
    # Path order (part by part), as before: the data order of existing runs must not change.
    return sorted(p for p in found if p.is_file())


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
