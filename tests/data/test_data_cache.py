"""The decoded-data cache: mapped sets equal decoded ones bit for bit, for folders, zips and
Parquet files; every bad input (corrupt cache, unwritable folder, full disk, kill -9, two
builders, link loops, non-image members) is one line and loses nothing."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpm.data.cache as cache_mod
import ddpm.files.atomic as atomic_mod
from ddpm.data.cache import (DATA_SUFFIX, CacheSettings, open_reference_images, open_training_set, prepare_data,
                             read_data_file)
from ddpm.data.sets import BatchStream, ImageSet, batches, load_dataset, load_image_folder
from ddpm.data.sources import DecodeSpec
from ddpm.errors import DDPMError
from ddpm.files.images import scan_images

ROOT = Path(__file__).resolve().parents[2]
SIZE = 8


def _photo(path: Path, seed: int, shape: tuple[int, int]) -> Path:
    """A small random picture, non-square so crops matter (JPEG or PNG by the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)).save(path)
    return path


def _folder(root: Path, *, bad: bool = True) -> Path:
    """Two class folders of mixed shapes and formats, one unreadable file in each when ``bad``."""
    shapes = [(12, 20), (20, 12), (16, 16), (10, 27), (14, 11)]
    for c, name in enumerate(["zebra", "apple"]):  # classes sort by name, not creation order
        for i, shape in enumerate(shapes):
            _photo(root / name / f"{i:02d}{'.png' if i % 2 else '.jpg'}", 10 * c + i, shape)
    if bad:
        (root / "apple" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
        (root / "zebra" / "empty.png").write_bytes(b"")
    return root


def _settings(tmp_path: Path, workers: int = 1) -> CacheSettings:
    return CacheSettings(tmp_path / "cache", workers=workers)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _same_batches(a: ImageSet, b: ImageSet, steps: int = 6) -> None:
    """Identical batches (pixels, flips, crops, labels) for two ranks of a stream, and after a resume."""
    assert len(a) == len(b)
    for rank in (0, 1):
        ia = batches(a, BatchStream(len(a), 4, seed=7, rank=rank, world=2))
        ib = batches(b, BatchStream(len(b), 4, seed=7, rank=rank, world=2), 0)
        for _ in range(steps):
            (xa, ya), (xb, yb) = next(ia), next(ib)
            assert xa.dtype == xb.dtype == torch.uint8 and torch.equal(xa, xb)
            assert (ya is None and yb is None) or torch.equal(ya, yb)
    resumed_a = next(batches(a, BatchStream(len(a), 4, seed=7), 5))
    resumed_b = next(batches(b, BatchStream(len(b), 4, seed=7), 5))
    assert torch.equal(resumed_a[0], resumed_b[0])


def _forbid_decoding(monkeypatch) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("decoded although the cache holds this data")

    monkeypatch.setattr(cache_mod, "decode_items", refuse)
    monkeypatch.setattr(cache_mod, "decode_in_memory", refuse)


def _cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{DATA_SUFFIX}")) if folder.is_dir() else []


# ---------------------------------------------------------------- 1. bit-identical to decoding
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("random_crop", [False, True])
def test_folder_cache_equals_in_memory_decode(tmp_path: Path, monkeypatch, conditional: bool,
                                              random_crop: bool) -> None:
    root = _folder(tmp_path / "data")
    _photo(root / "loose.jpg", 99, (9, 13))  # outside any class: in the set only unconditionally
    kw = dict(conditional=conditional, random_crop=random_crop)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file"):
        today = load_image_folder(root, SIZE, progress=False, **kw)
    with pytest.warns(UserWarning, match="skipped 2 unreadable image file") as built_warnings:
        built = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False, **kw)
    _forbid_decoding(monkeypatch)
    with pytest.warns(UserWarning) as mapped_warnings:
        mapped = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False, **kw)
    # The same one-line warning, word for word, at every start.
    assert [str(w.message) for w in mapped_warnings] == [str(w.message) for w in built_warnings]
    for cached in (built, mapped):
        assert cached.paths == today.paths and cached.classes == today.classes
        assert (cached.labels is None) == (today.labels is None)
        if today.labels is not None:
            assert np.array_equal(cached.labels, today.labels)
        assert cached.cache_file is not None and cached.random_crop == random_crop
        for i in range(len(today)):
            assert np.array_equal(cached.get(i), today.get(i))
        _same_batches(today, cached)
    assert len(today) == (10 if conditional else 11)
    if not random_crop:
        assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
    else:
        assert {mapped.get(i).shape for i in range(len(mapped))} > {(SIZE, SIZE, 3)}  # long sides kept


def _zip_of(folder: Path, out: Path, labels: dict[str, int] | None = None) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(f, f.relative_to(folder).as_posix())
        zf.writestr("__MACOSX/zebra/._00.jpg", b"\x00\x05\x16\x07AppleDouble")  # hidden: never an image
        zf.writestr("README.txt", "not an image, not listed")
        if labels is not None:
            zf.writestr("dataset.json", json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    return out


def _parquet_of(folder: Path, out_dir: Path, *, class_label: bool = True) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    files = scan_images(folder)
    classes = sorted({f.parent.name for f in files})
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    half = len(files) // 2
    out_dir.mkdir(parents=True)
    for part, chunk in enumerate([files[:half], files[half:]]):  # two files, several row groups each
        table = pa.table({
            "image": pa.array([{"bytes": f.read_bytes(), "path": f.name} for f in chunk], type=struct),
            "label": pa.array([classes.index(f.parent.name) for f in chunk], pa.int64())})
        if class_label:
            features = {"image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}
            table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        pq.write_table(table, out_dir / f"train-{part:05d}-of-00002.parquet", row_group_size=3)
    return out_dir


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("random_crop", [False, True])
def test_zip_and_parquet_give_the_folders_set(tmp_path: Path, conditional: bool, random_crop: bool) -> None:
    root = _folder(tmp_path / "data", bad=False)
    folder_set = load_image_folder(root, SIZE, conditional=conditional, random_crop=random_crop, progress=False)
    names = [Path(p).relative_to(root).as_posix() for p in folder_set.paths]
    # EDM's labels: integers, here the reverse of the folder order, so they must come from the json
    edm = _zip_of(root, tmp_path / "edm.zip", {n: 0 if n.startswith("zebra") else 1 for n in names})
    plain = _zip_of(root, tmp_path / "plain.zip")
    parquet = _parquet_of(root, tmp_path / "hf")
    kw = dict(conditional=conditional, random_crop=random_crop, progress=False)
    for source in (plain, edm, parquet):
        cached = open_training_set(source, SIZE, cache=_settings(tmp_path), **kw)
        in_memory = open_training_set(source, SIZE, cache=CacheSettings(enabled=False), **kw)
        assert cached.cache_file is not None and in_memory.cache_file is None
        _same_batches(in_memory, cached)
        _same_batches(load_dataset(str(source), SIZE, **kw), cached)
        if source != edm or not conditional:  # EDM's labels differ from the folder's on purpose
            _same_batches(folder_set, cached)
        for i in range(len(folder_set)):
            assert np.array_equal(cached.get(i), folder_set.get(i))
        if conditional and source == edm:
            assert cached.classes == ["0", "1"] and cached.labels.tolist() == [1] * 5 + [0] * 5
        elif conditional:
            assert cached.classes == ["apple", "zebra"] and np.array_equal(cached.labels, folder_set.labels)
    assert open_training_set(plain, SIZE, cache=_settings(tmp_path), **kw).paths[0] == str(plain / names[0])


def _previous_collate(data: ImageSet, idx: list[int], flips: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The batch formula of every run started before the data cache (gather, then a torch flip)."""
    from ddpm.data.sets import _crop

    if isinstance(data.images, np.ndarray):
        x = torch.from_numpy(np.array(data.images[np.asarray(idx)]))
    else:
        x = torch.from_numpy(np.stack([_crop(data.get(i), data.image_size, float(p)) for i, p in zip(idx, pos)]))
    x = x.permute(0, 3, 1, 2)
    return torch.where(flips[:, None, None, None], x.flip(-1), x).contiguous()


@pytest.mark.parametrize("random_crop", [False, True])
def test_batches_are_the_ones_earlier_runs_saw(tmp_path: Path, random_crop: bool) -> None:
    root = _folder(tmp_path / "data", bad=False)
    data = open_training_set(root, SIZE, random_crop=random_crop, cache=_settings(tmp_path), progress=False)
    stream = BatchStream(len(data), 6, seed=3)
    it = batches(data, stream, 2)
    for step in range(2, 8):
        idx = stream.indices(step)
        flips, pos = stream.augment(step, len(idx))
        assert torch.equal(next(it)[0], _previous_collate(data, idx, flips, pos)), step


def test_decoding_pool_writes_the_same_file_as_one_process(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data")
    a = _quiet(open_training_set, root, SIZE, cache=_settings(tmp_path / "one", workers=1), progress=False)
    b = _quiet(open_training_set, root, SIZE, cache=_settings(tmp_path / "two", workers=2), progress=False)
    assert Path(a.cache_file).name == Path(b.cache_file).name  # same key
    assert np.array_equal(np.asarray(a.images), np.asarray(b.images)) and a.paths == b.paths


# ------------------------------------------------------------------------- 2. keys and reuse
def test_unchanged_folder_is_mapped_and_a_changed_one_decoded_again(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _folder(tmp_path / "data", bad=False)
    first = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    with monkeypatch.context() as m:
        _forbid_decoding(m)
        again = open_training_set(str(root) + "/", SIZE, cache=_settings(tmp_path), progress=False)
        assert again.cache_file == first.cache_file
    capsys.readouterr()
    _photo(root / "zebra" / "new.jpg", 123, (16, 16))
    changed = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    out = capsys.readouterr().out
    assert "changed since it was cached (10 files then, 11 now); decoding it again" in out
    assert len(changed) == 11 and _cache_files(tmp_path / "cache") == [Path(changed.cache_file)]
    os.utime(root / "zebra" / "new.jpg", ns=(0, 0))  # same files, a modification time changed
    assert open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False).cache_file != changed.cache_file
    # Another size or crop mode is another file; both stay.
    open_training_set(root, SIZE * 2, cache=_settings(tmp_path), progress=False)
    assert len(_cache_files(tmp_path / "cache")) == 2


def test_a_folder_and_its_reference_share_one_file(tmp_path: Path, monkeypatch) -> None:
    root = _folder(tmp_path / "ref")
    assert open_reference_images(root, SIZE, cache=_settings(tmp_path), build=False) is None  # nothing cached yet
    trained = _quiet(open_training_set, root, SIZE, cache=_settings(tmp_path), progress=False)
    _forbid_decoding(monkeypatch)
    ref = open_reference_images(root, SIZE, cache=_settings(tmp_path), progress=False)
    assert ref is not None and ref.cache_file == trained.cache_file and ref.listed == 12
    files = scan_images(root)  # what ddpm.scoring lists
    rows = ref.rows_for(files)
    assert (rows == -1).sum() == 2 and sorted(rows[rows >= 0].tolist()) == list(range(10))
    for f, r in zip(files, rows):
        if r >= 0:
            assert np.array_equal(ref.images[r], trained.get(trained.paths.index(str(f))))
    assert open_reference_images(root, SIZE, cache=CacheSettings(enabled=False)) is None


def test_larger_than_memory_set_trains_from_the_map_without_decoding(tmp_path: Path, monkeypatch) -> None:
    root = _folder(tmp_path / "data", bad=False)
    monkeypatch.setattr("ddpm.data.sets.MEMORY_BUDGET", 100)  # far below the set's 1,920 bytes
    assert load_image_folder(root, SIZE, progress=False).images is None  # without the cache: decoded per epoch
    cached = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    assert isinstance(cached.images, np.memmap)

    def no_decode(*_a, **_k):
        raise AssertionError("an image was decoded during training")

    monkeypatch.setattr("ddpm.data.sets.load_image", no_decode)
    it = batches(cached, BatchStream(len(cached), 4, seed=0), workers=2)  # no worker pool for a mapped set
    assert all(next(it)[0].shape == (4, 3, SIZE, SIZE) for _ in range(8))


# --------------------------------------------------------------------- 3. bad cache files
def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["truncated", "header", "row", "format", "garbage"])
def test_damaged_cache_file_is_rebuilt_never_used(tmp_path: Path, damage: str) -> None:
    root = _folder(tmp_path / "data", bad=False)
    good = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    path = Path(good.cache_file)
    expected = np.array(good.images)
    size = path.stat().st_size
    if damage == "truncated":
        os.truncate(path, size - 100)
    elif damage == "header":
        _flip(path, size - 20)  # inside the JSON header
    elif damage == "row":
        _flip(path, 4096 + 5)  # row 0 is always a sampled row
    elif damage == "format":
        _flip(path, 8)  # the format number
    else:
        path.write_bytes(os.urandom(size))
    with pytest.warns(UserWarning, match=r"data cache file .* is unusable \(.*\); decoding the images again"):
        rebuilt = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    assert np.array_equal(np.asarray(rebuilt.images), expected)
    read_data_file(path)  # the rebuilt file verifies


def test_unwritable_cache_folder_decodes_in_memory_with_one_warning(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", bad=False)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    settings = CacheSettings(blocker / "cache", workers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = open_training_set(root, SIZE, cache=settings, progress=False)
        second = open_training_set(root, SIZE, cache=settings, progress=False)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "cannot use the data cache folder" in msgs[0] and "decoding in memory" in msgs[0]
    assert first.cache_file is None and not isinstance(first.images, np.memmap)
    assert np.array_equal(first.images, load_image_folder(root, SIZE, progress=False).images)
    assert np.array_equal(second.images, first.images)


def test_full_disk_stops_with_one_line_and_leaves_nothing_no_room_decodes_in_memory(tmp_path: Path, monkeypatch) -> None:
    root = _folder(tmp_path / "data", bad=False)

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(atomic_mod.os, "fsync", full)
        with pytest.raises(DDPMError, match=r"cannot write .*No space left on device.*nothing was left") as e:
            open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    assert "\n" not in str(e.value)
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
    # Known before decoding: not enough room at all. The automatic cache steps aside (one
    # warning, the set decoded in memory as before the cache); prepare-data, asked for a file, stops.
    with monkeypatch.context() as m:
        m.setattr(cache_mod.shutil, "disk_usage", lambda _p: type("U", (), {"free": 1000})())
        with pytest.warns(UserWarning, match=r"needs 6\.0 KB and .* has 1\.0 KB free; .*; decoding in memory instead"):
            data = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
        assert data.cache_file is None
        assert np.array_equal(data.images, load_image_folder(root, SIZE, progress=False).images)
        with pytest.raises(DDPMError, match=r"needs 6\.0 KB and .* has 1\.0 KB free; free space there"):
            prepare_data(root, tmp_path / "out.ddpmdata", DecodeSpec(SIZE, False, False, 1, False))
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []


_SLOW_BUILD = """
import sys, time
from pathlib import Path
import ddpm.data.sources as sources
decode = sources.decode_payload
def slow(*a, **k):
    time.sleep(0.15)
    return decode(*a, **k)
sources.decode_payload = slow
from ddpm.data.cache import CacheSettings, open_training_set
s = open_training_set(sys.argv[1], int(sys.argv[3]), cache=CacheSettings(Path(sys.argv[2]), workers=1), progress=False)
print("built", len(s), s.cache_file, flush=True)
"""


def _slow_builder(root: Path, cache: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _SLOW_BUILD, str(root), str(cache), str(SIZE)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_temp_file(cache: Path, proc: subprocess.Popen, timeout: float = 120.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        temps = list(cache.glob(".*.tmp")) if cache.is_dir() else []
        if temps:
            return temps[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the build never started")


def test_kill_9_during_a_build_then_the_same_command(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", bad=False)
    for i in range(30):  # enough slow images that the build is surely under way when killed
        _photo(root / "apple" / f"extra{i:02d}.jpg", 100 + i, (12, 12))
    cache = tmp_path / "cache"
    proc = _slow_builder(root, cache)
    temp = _wait_for_temp_file(cache, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert temp.exists() and _cache_files(cache) == []  # half a file, under no trusted name
    data = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    assert len(data) == 40 and [p.name for p in cache.glob(".*.tmp")] == []
    assert np.array_equal(np.asarray(data.images), load_image_folder(root, SIZE, progress=False).images)


def test_two_processes_one_builds_the_other_waits_and_maps(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _folder(tmp_path / "data", bad=False)
    for i in range(20):
        _photo(root / "apple" / f"extra{i:02d}.jpg", 100 + i, (12, 12))
    cache = tmp_path / "cache"
    proc = _slow_builder(root, cache)
    _wait_for_temp_file(cache, proc)  # it holds the lock now
    _forbid_decoding(monkeypatch)
    data = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "another process is building" in capsys.readouterr().out
    assert f"built 30 {data.cache_file}" in out and len(_cache_files(cache)) == 1


# ------------------------------------------------------------------------ 4. bad source data
def test_linked_sub_folders_are_used_and_link_loops_skipped(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _photo(root / "real" / "a.jpg", 1, (10, 10))
    elsewhere = _photo(tmp_path / "elsewhere" / "deep" / "b.png", 2, (10, 10)).parent.parent
    try:
        (root / "linked").symlink_to(elsewhere, target_is_directory=True)
        (root / "real" / "loop").symlink_to(root, target_is_directory=True)  # back up: a loop
    except (OSError, NotImplementedError):
        pytest.skip("this file system cannot make symbolic links")
    with pytest.warns(UserWarning, match=r"skipped 1 symbolic link\(s\) to a folder above them .*loop"):
        files = scan_images(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["linked/deep/b.png", "real/a.jpg"]
    with pytest.warns(UserWarning, match="link loop"):
        data = open_training_set(root, SIZE, cache=_settings(tmp_path), progress=False)
    assert len(data) == 2


def test_non_image_members_and_rows_are_skipped_or_stop_strict(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    good = _photo(tmp_path / "src" / "good.png", 1, (10, 12)).read_bytes()
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("good.png", good)
        zf.writestr("notes.png", b"this is not an image")
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"image": pa.array([good, b"garbage", None], pa.binary())}), folder / "x.parquet")
    for source, skipped in ((archive, "notes.png (cannot identify image file)"),
                            (folder, "x.parquet:1 (cannot identify image file)")):
        with pytest.warns(UserWarning, match=r"skipped \d unreadable image file\(s\) of \d: .*" + re.escape(skipped)):
            data = open_training_set(source, SIZE, cache=_settings(tmp_path), progress=False)
        assert len(data) == 1
        # A strict run stops at it, whether the cache already holds the set or not.
        with pytest.raises(DDPMError, match=r"cannot read image .*--strict stops at the first bad file"):
            open_training_set(source, SIZE, strict=True, cache=_settings(tmp_path), progress=False)
        with pytest.raises(DDPMError, match=r"--strict"):
            open_training_set(source, SIZE, strict=True, cache=_settings(tmp_path / "fresh"), progress=False)
    assert _cache_files(tmp_path / "fresh" / "cache") == []  # a strict build that stopped left no file


def test_bad_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DDPMError, match="does not exist"):
        open_training_set(tmp_path / "nope", SIZE, cache=_settings(tmp_path))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DDPMError, match="is a file; expected a folder of images, a .zip"):
        open_training_set(tmp_path / "notes.txt", SIZE, cache=_settings(tmp_path))
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(DDPMError, match="cannot read the archive"):
        open_training_set(tmp_path / "broken.zip", SIZE, cache=_settings(tmp_path))
    loose = _zip_of(_folder(tmp_path / "flat_src", bad=False) / "apple", tmp_path / "flat.zip")
    with pytest.raises(DDPMError, match="--conditional needs class folders inside"):
        open_training_set(loose, SIZE, conditional=True, cache=_settings(tmp_path))
    unlabelled = _parquet_of(_folder(tmp_path / "p_src", bad=False), tmp_path / "p", class_label=False)
    data = open_training_set(unlabelled, SIZE, conditional=True, cache=_settings(tmp_path), progress=False)
    assert data.classes == ["0", "1"]  # integer labels without names: named by their values


# ------------------------------------------------------------------------ 5. prepare-data
def _prepare_cli(*argv: str) -> int:
    from ddpm.cli.prepare_data import register

    parser = argparse.ArgumentParser(prog="ddpm")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["prepare-data", *argv])
    return args.func(args)


def test_prepare_data_then_train_from_the_file(tmp_path: Path, monkeypatch, capsys) -> None:
    root = _folder(tmp_path / "data")
    out = tmp_path / "prepared" / "data-8.ddpmdata"
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        today = load_image_folder(root, SIZE, conditional=True, random_crop=True, progress=False)
    assert _prepare_cli(str(root), str(out), "--image-size", str(SIZE), "--random-crop", "--workers", "1",
                        "--quiet") == 0
    printed = capsys.readouterr().out
    assert f"{out}: 10 images at 8x8 (long side kept, for --random-crop)" in printed
    assert "2 classes (for --conditional): apple, zebra" in printed and "2 unreadable skipped" in printed
    _prepare_cli(str(root), str(out), "--image-size", str(SIZE), "--random-crop", "--quiet")
    assert "already holds this data" in capsys.readouterr().out
    _forbid_decoding(monkeypatch)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        mapped = open_training_set(out, SIZE, conditional=True, random_crop=True, progress=False)
    assert mapped.classes == today.classes and mapped.paths == [str(root.resolve() / Path(p).relative_to(root))
                                                                for p in today.paths]
    _same_batches(today, mapped)
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):  # the uncached loader maps it too
        _same_batches(today, load_dataset(str(out), SIZE, conditional=True, random_crop=True, progress=False))
    with pytest.raises(DDPMError, match=r"holds 8x8 images .*this run needs 16x16 .*--image-size 16 --random-crop"):
        open_training_set(out, 16, random_crop=True, progress=False)
    with pytest.raises(DDPMError, match="is a folder; expected a file name"):
        prepare_data(root, tmp_path, DecodeSpec(SIZE))
    with pytest.raises(DDPMError, match="exists and is not a ddpm data file"):
        prepare_data(root, root / "apple" / "00.jpg", DecodeSpec(SIZE))


def test_prepared_without_classes_refuses_conditional_training(tmp_path: Path) -> None:
    root = _folder(tmp_path / "data", bad=False)
    _photo(root / "loose.jpg", 5, (10, 10))
    out = tmp_path / "all.ddpmdata"
    prepare_data(root, out, DecodeSpec(SIZE, progress=False))
    assert len(open_training_set(out, SIZE, progress=False)) == 11
    with pytest.raises(DDPMError, match=r"1 of the 11 images .* are in no class .*prepare it again with --conditional"):
        open_training_set(out, SIZE, conditional=True, progress=False)
