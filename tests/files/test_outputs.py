"""ddpm.files.atomic: the one way the package writes files (atomic, fsync-ed, umask permissions)."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.run import checkpoint
from ddpm.scoring import evaluate
from ddpm.sample import pictures
from ddpm.scoring import metrics
from ddpm.files import atomic as outputs
from ddpm.errors import DDPMError
from ddpm.files.atomic import (OutputWriteError, atomic_write_bytes, atomic_write_json, atomic_write_text,
                          atomic_write_to, atomic_write_with, process_umask, remove_temp_files)

UMASK = 0o027  # not the usual 022: a mode hard-coded as 0644 would fail


@pytest.fixture
def umask():
    """Run the test under :data:`UMASK`, restoring the process's own after it."""
    old = os.umask(UMASK)
    yield UMASK
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def _every_kind_of_file(out: Path) -> list[Path]:
    """Write one file of each kind the package makes, through the package's own writers."""
    from ddpm.train import monitor as train

    written = [checkpoint.save_checkpoint(out / "run", 1, {"model": {}}, {"model": {"w": torch.ones(3)}, "step": 1})]
    atomic_write_json(out / "run" / "config.json", {"a": 1})
    written.append(out / "run" / "config.json")
    evaluate.write_json(out / "eval" / "report.json", {"fid": 1.5})
    written.append(out / "eval" / "report.json")
    rows = [{"guidance": None, "sampler": s, "nfe": k, "fid": 10.0 / k} for s in ("ddim", "heun") for k in (2, 4)]
    evaluate.plot_sweep({"results": rows, "n": 8, "run": "run", "step": 1}, out / "eval" / "sweep.png")
    written.append(out / "eval" / "sweep.png")
    pictures.save_png(np.zeros((6, 6, 3), np.uint8), out / "grid.png")
    written.append(out / "grid.png")
    pictures.save_gif([np.zeros((6, 6, 3), np.uint8), np.full((6, 6, 3), 255, np.uint8)], out / "chain.gif")
    written.append(out / "chain.gif")
    fs = evaluate.FeatureSet(mu=np.zeros(4), sigma=np.eye(4), features=np.zeros((2, 4), np.float32), labels=None,
                             classes=None, source="test", key="k")
    evaluate._save_featureset(fs, out / "cache" / "stats.npz")  # the FID statistics cache
    written.append(out / "cache" / "stats.npz")
    metrics.LinearProbe(np.zeros((2, 4)), np.zeros(2), np.zeros(4), np.ones(4), ["a", "b"]).save(out / "cache" / "probe.npz")
    written.append(out / "cache" / "probe.npz")
    train._plot_curve(out / "run" / "loss.png", [(1, 1.0), (2, 0.5)], "loss")
    written.append(out / "run" / "loss.png")
    log = train._Logger(out / "run", tensorboard=False, resume_step=0)
    log.log({"step": 1, "loss": 0.5})  # appended: the file keeps the mode it was made with
    written.append(out / "run" / "metrics.csv")
    train._append(out / "run" / "appended.csv", b"step\n1\n")  # an append that creates its file
    written.append(out / "run" / "appended.csv")
    return written


def test_every_kind_of_file_gets_plain_open_permissions(tmp_path, umask):
    written = _every_kind_of_file(tmp_path)
    for p in written:
        assert p.stat().st_size > 0, p
        assert _mode(p) == 0o666 & ~umask, f"{p.name}: {oct(_mode(p))}"
    assert _leftovers(tmp_path) == []
    # The kinds read back as what they are.
    assert checkpoint.load_checkpoint(written[0])[0] == 1
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "eval" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "chain.gif").read_bytes()[:6] == b"GIF89a"
    with np.load(tmp_path / "cache" / "stats.npz", allow_pickle=False) as z:
        assert z["sigma"].shape == (4, 4)


def test_process_umask_reads_without_changing_it(umask):
    assert process_umask() == umask
    assert os.umask(umask) == umask  # still set


def test_a_failing_writer_leaves_no_file_and_no_temp(tmp_path):
    def half_then_fail(f):
        f.write(b"half a file")
        raise ValueError("the writer broke")

    new = tmp_path / "new.bin"
    with pytest.raises(ValueError, match="the writer broke"):  # not a file-system error: passed on as it is
        atomic_write_with(new, half_then_fail)
    assert not new.exists() and list(tmp_path.iterdir()) == []

    old = tmp_path / "old.bin"
    old.write_bytes(b"old content")
    with pytest.raises(ValueError):
        atomic_write_with(old, half_then_fail)
    assert old.read_bytes() == b"old content" and _leftovers(tmp_path) == []

    def interrupted(f):
        f.write(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write_with(old, interrupted)
    assert old.read_bytes() == b"old content" and _leftovers(tmp_path) == []


def test_a_full_disk_is_a_one_line_error_that_is_still_an_oserror(tmp_path):
    def full(f):
        f.write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "out.json"
    target.write_text("{}\n")
    with pytest.raises(OutputWriteError) as info:
        atomic_write_with(target, full)
    e = info.value
    assert isinstance(e, DDPMError) and isinstance(e, OSError) and e.errno == errno.ENOSPC
    assert str(e) == f"cannot write {str(target)!r}: {os.strerror(errno.ENOSPC)}"
    assert target.read_text() == "{}\n" and _leftovers(tmp_path) == []

    # A folder where the file should go: the rename fails, with the same kind of message.
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputWriteError, match="cannot write .*folder"):
        atomic_write_bytes(tmp_path / "folder", b"data")
    assert _leftovers(tmp_path) == [] and (tmp_path / "folder").is_dir()


def test_a_failed_checkpoint_keeps_the_earlier_one_and_leaves_no_temp(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    run = tmp_path / "run"
    first = checkpoint.save_checkpoint(run, 1, {}, {"w": torch.ones(2)})
    before = first.read_bytes()

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # part of a file, then the disk is full
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"
                              " ... (os error 28)")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        checkpoint.save_checkpoint(run, 2, {}, {"w": torch.zeros(2)})
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, DDPMError)
    assert checkpoint.list_checkpoints(run) == [first] and first.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", st.st_ino, stat.S_ISDIR(st.st_mode)))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def check(path: Path) -> None:
        ino = path.stat().st_ino
        synced = [i for i, e in enumerate(events) if e == ("fsync", ino, False)]
        renamed = [i for i, e in enumerate(events) if e == ("replace", ino)]
        assert synced and renamed and synced[0] < renamed[0], (path.name, events)
        events.clear()

    check(atomic_write_bytes(tmp_path / "a.bin", b"bytes"))
    check(atomic_write_text(tmp_path / "a.txt", "text"))
    check(atomic_write_with(tmp_path / "a.npz", lambda f: np.savez(f, x=np.arange(3))))
    check(atomic_write_to(tmp_path / "named.bin", lambda tmp: tmp.write_bytes(b"by name")))
    check(checkpoint.save_checkpoint(tmp_path / "run", 1, {}, {"w": torch.ones(2)}))
    pictures.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "g.png")
    check(tmp_path / "g.png")


def test_temp_files_are_named_for_their_file_and_swept_by_remove_temp_files(tmp_path, monkeypatch):
    seen: list[str] = []
    atomic_write_with(tmp_path / "data.json", lambda f: seen.extend(p.name for p in tmp_path.iterdir()))
    assert len(seen) == 1 and seen[0].startswith(".data.json.") and seen[0].endswith(".tmp")

    (tmp_path / ".ckpt.safetensors.ab12.tmp").write_bytes(b"\0" * 10)  # left by a killed write
    remove_temp_files(tmp_path, tmp_path / "missing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def test_json_keeps_or_sorts_keys(tmp_path):
    atomic_write_json(tmp_path / "sorted.json", {"b": 1, "a": 2})
    evaluate.write_json(tmp_path / "report.json", {"b": 1, "a": 2})  # reports keep their order
    assert (tmp_path / "sorted.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    assert (tmp_path / "report.json").read_text() == '{\n  "b": 1,\n  "a": 2\n}\n'
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists() and _leftovers(tmp_path) == []


def test_outputs_imports_nothing_else_of_the_package():
    src = Path(outputs.__file__).read_text()
    imports = [line for line in src.splitlines() if line.startswith(("from .", "import ddpm", "from ddpm"))]
    assert imports == ["from ..errors import DDPMError"]


def test_a_umask_without_the_owner_write_bit_still_writes_read_only_files(tmp_path):
    # The by-name path (safetensors) syncs the finished temp file: read access must be enough.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)  # folders made before: 0o222 would make them 0555
    old = os.umask(0o222)
    try:
        ckpt = checkpoint.save_checkpoint(tmp_path / "run", 1, {}, {"w": torch.ones(2)})
        png = tmp_path / "g.png"
        pictures.save_png(np.zeros((4, 4, 3), np.uint8), png)
    finally:
        os.umask(old)
    assert _mode(ckpt) == 0o444 and _mode(png) == 0o444
    assert checkpoint.load_checkpoint(ckpt)[2]["w"].tolist() == [1.0, 1.0]  # (root could write anyway)


def test_a_writer_failing_on_its_own_is_not_reported_as_a_disk_error(tmp_path):
    # PIL's encoders raise OSError("encoder error -2"), no errno: the cause is the data, not the disk.
    def encoder_fails(f):
        f.write(b"partial")
        raise OSError("encoder error -2")

    with pytest.raises(OSError, match="encoder error") as info:
        atomic_write_with(tmp_path / "x.png", encoder_fails)
    assert not isinstance(info.value, OutputWriteError)
    assert list(tmp_path.iterdir()) == []
