"""Data loading: every image mode becomes RGB, bad files are skipped once with a count, batch order."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.data.sets import BatchStream, batches, load_image_folder
from ddpm.files.images import load_image
from ddpm.errors import DDPMError


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


def test_modes_become_rgb(tmp_path: Path) -> None:
    grey = _save(Image.fromarray(np.full((20, 30), 100, np.uint8), "L"), tmp_path / "grey.png")
    rgba_arr = np.zeros((20, 20, 4), np.uint8)
    rgba_arr[..., 3] = 0  # fully transparent black: must come out white, not black
    rgba = _save(Image.fromarray(rgba_arr, "RGBA"), tmp_path / "rgba.png")
    pal = _save(Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).convert("P"), tmp_path / "pal.png")
    cmyk = _save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")  # red
    a16 = np.full((16, 16), 32768, np.uint16)  # mid-grey in 16 bits
    deep = _save(Image.fromarray(a16), tmp_path / "deep.png")

    g = load_image(grey, 8)
    assert g.shape == (8, 8, 3) and g.dtype == np.uint8 and abs(int(g.mean()) - 100) <= 1
    assert load_image(rgba, 8).min() == 255
    assert abs(int(load_image(pal, 8).mean()) - 200) <= 2
    red = load_image(cmyk, 8).reshape(-1, 3).mean(0)
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    d = load_image(deep, 8)
    assert abs(int(d.mean()) - 128) <= 1, "16-bit images must be scaled to 8 bits, not clipped to white"


def test_resize_and_centre_crop(tmp_path: Path) -> None:
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # the centre square is white, the sides black
    p = _save(Image.fromarray(arr), tmp_path / "wide.png")
    out = load_image(p, 20)
    assert out.shape == (20, 20, 3)
    assert out.mean() > 240


def _bad_folder(root: Path) -> Path:
    for i in range(3):
        _save(Image.fromarray(np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)),
              root / f"good{i}.jpg")
    _save(Image.fromarray(np.full((24, 24, 4), 128, np.uint8), "RGBA"), root / "alpha.png")
    _save(Image.fromarray(np.full((24, 24), 60000, np.uint16)), root / "sixteen.png")
    _save(Image.fromarray(np.full((24, 24), 30, np.uint8), "L"), root / "grey.jpg")
    (root / "notes.png").write_text("this is not an image")
    (root / "empty.jpg").write_bytes(b"")
    full = (root / "good0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    return root


def test_bad_files_skipped_with_one_warning(tmp_path: Path) -> None:
    root = _bad_folder(tmp_path / "mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_folder(root, 16, progress=False)
    msgs = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "skipped 3 unreadable image file(s) of 9" in msgs[0]
    assert "notes.png" in msgs[0]
    assert len(data) == 6
    assert data.images.shape == (6, 16, 16, 3)


def test_strict_fails_on_bad_file(tmp_path: Path) -> None:
    root = _bad_folder(tmp_path / "mixed")
    with pytest.raises(DDPMError, match="cannot read image .*--strict"):
        load_image_folder(root, 16, strict=True, progress=False)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DDPMError, match="does not exist"):
        load_image_folder(tmp_path / "nope", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DDPMError, match="no images found"):
        load_image_folder(tmp_path / "empty", 16)
    flat = tmp_path / "flat"
    _save(Image.new("RGB", (8, 8)), flat / "a.png")
    with pytest.raises(DDPMError, match="--conditional needs class sub-folders"):
        load_image_folder(flat, 16, conditional=True)


def test_class_folders(cifar10_dir: Path, tmp_path: Path) -> None:
    from conftest import copy_subset

    root = copy_subset(cifar10_dir / "train", tmp_path / "c", ["ship", "airplane", "cat"], 5)
    data = load_image_folder(root, 32, conditional=True, progress=False)
    assert data.classes == ["airplane", "cat", "ship"]  # sorted, like torchvision's ImageFolder
    assert sorted(np.bincount(data.labels).tolist()) == [5, 5, 5]


def test_batch_stream_covers_each_epoch_and_ranks_partition() -> None:
    n, gb = 10, 4
    s = BatchStream(n, gb, seed=3)
    first = [i for step in range(5) for i in s.indices(step)]  # 20 = two epochs
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:]) == list(range(10))
    assert s.indices(7) == BatchStream(n, gb, seed=3).indices(7), "a step's batch must not depend on history"
    r0, r1 = BatchStream(n, gb, 3, rank=0, world=2), BatchStream(n, gb, 3, rank=1, world=2)
    for step in range(6):
        assert r0.indices(step) + r1.indices(step) == s.indices(step)
    with pytest.raises(DDPMError, match="not divisible"):
        BatchStream(n, 5, 0, world=2)


def test_batches_shapes_and_flips(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 3), np.uint8)
    arr[:, :4] = 255  # left half white
    for i in range(4):
        _save(Image.fromarray(arr), tmp_path / "f" / f"{i}.png")
    data = load_image_folder(tmp_path / "f", 8, progress=False)
    it = batches(data, BatchStream(len(data), 4, seed=0))
    seen_flipped = seen_plain = False
    for _ in range(10):
        x, y = next(it)
        assert x.shape == (4, 3, 8, 8) and x.dtype.is_floating_point is False and y is None
        left = x[:, 0, :, :4].float().mean((1, 2))
        seen_flipped |= bool((left == 0).any())
        seen_plain |= bool((left == 255).any())
    assert seen_flipped and seen_plain


def test_gif_and_tiff_folders_are_read(tmp_path: Path) -> None:
    frames = [Image.fromarray(np.full((12, 12, 3), v, np.uint8)).convert("P") for v in (40, 220)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])  # first frame is used
    _save(Image.fromarray(np.full((12, 12), 50000, np.uint16)), tmp_path / "deep.tif")
    _save(Image.fromarray(np.full((12, 12, 3), 90, np.uint8)), tmp_path / "plain.TIFF")
    data = load_image_folder(tmp_path, 8, progress=False)
    assert len(data) == 3
    means = sorted(int(round(float(data.get(i).mean()))) for i in range(3))
    assert abs(means[0] - 40) <= 2 and abs(means[1] - 90) <= 1 and abs(means[2] - round(50000 / 65535 * 255)) <= 1
