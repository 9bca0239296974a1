"""Faults real users hit (issue 11, items 4-9): each is a one-line error before any work, or a
warning and a result, never a traceback and never silently wrong data.

File-system and output-encoding behaviour runs in real subprocesses (``python -m ddpm``). Tests
may run as root, where chmod does not stop writes: there a regular file standing in the path is
the unwritable location, and only the read-only-folder variant is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.scoring import evaluate
from ddpm.runtime.policy import resolve_runtime
from ddpm.cli.app import main
from ddpm.data.sets import load_image_folder
from ddpm.errors import DDPMError
from ddpm.train import TrainConfig, train
from conftest import FakeExtractor

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}


# ------------------------------------------------------------------------------------ helpers
def _images(folder: Path, n: int, rgb=(200, 40, 30), size: int = 8, start: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        arr = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


def _truncated(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return folder


def _tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="tiny", image_size=16, steps=1, batch_size=4, lr=1e-3,
                warmup=1, log_every=1, sample_every=0, save_every=0, sample_n=2, sample_steps=3, timesteps=20,
                progress=False, tensorboard=False, precision="fp32", device="cpu", workers=0)
    base.update(kw)
    return TrainConfig(**base)


def _ddpm(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True, timeout=300,
                          env=env or ENV, cwd=cwd)


def _one_line_error(res: subprocess.CompletedProcess, *expected: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _unwritable(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A folder that cannot be written, and the path the error must name."""
    if kind == "readonly":
        if IS_ROOT:
            pytest.skip("running as root: chmod 0o555 does not stop root's writes (the 'file' variant covers it)")
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro, str(ro)
    blocker = tmp_path / "afile"
    blocker.write_text("a regular file where a folder is needed")
    return blocker, str(blocker)


@pytest.fixture(scope="module")
def cond_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cond")
    _images(root / "cat", 3, (200, 40, 30))
    _images(root / "dog", 3, (30, 60, 200))
    return root


@pytest.fixture(scope="module")
def run20(cond_data: Path, tmp_path_factory) -> Path:
    """A conditional run trained one step with T = 20 diffusion steps."""
    run = tmp_path_factory.mktemp("runs") / "run20"
    train(_tiny(cond_data, run, conditional=True))
    return run


class NoReferenceWork:
    """An extractor whose creation means the reference statistics were started."""

    def __init__(self, *a, **k) -> None:
        raise AssertionError("reference work started before the settings were checked")


# ---------------------------------------------------- 4. output locations checked before work
@pytest.mark.parametrize("kind", ["readonly", "file"])
def test_train_unwritable_out_is_one_line_before_decoding(tmp_path: Path, kind: str) -> None:
    data = _images(tmp_path / "data", 2)
    _truncated(data, 1)  # decoding would warn about it: the error must come first, alone
    blocked, named = _unwritable(tmp_path, kind)
    _one_line_error(_ddpm("train", "--data", str(data), "--out", str(blocked / "run"), "--model", "tiny",
                          "--steps", "1"), "--out", named)
    assert not (blocked.is_dir() and (blocked / "run").exists())


@pytest.mark.parametrize("kind", ["readonly", "file"])
def test_sample_unwritable_out_or_individual_before_sampling(run20: Path, tmp_path: Path, kind: str) -> None:
    blocked, named = _unwritable(tmp_path, kind)
    _one_line_error(_ddpm("sample", "--run", str(run20), "--out", str(blocked / "g.png"), "--n", "1",
                          "--device", "cpu"), "--out", named)
    grid = tmp_path / "grid.png"
    _one_line_error(_ddpm("sample", "--run", str(run20), "--out", str(grid), "--n", "1", "--device", "cpu",
                          "--individual", str(blocked / "each")), "--individual", named)
    assert not grid.exists()  # nothing half-done: the grid was not written before the failure


def test_eval_and_demo_unwritable_out_before_work(run20: Path, cond_data: Path, tmp_path: Path) -> None:
    blocked, named = _unwritable(tmp_path, "file")
    _one_line_error(_ddpm("eval", "--run", str(run20), "--ref", str(cond_data), "--n", "2", "--device", "cpu",
                          "--out", str(blocked / "r.json"), "--no-cache", "--quiet"), "--out", named)
    _one_line_error(_ddpm("demo", "--out", str(blocked / "demo"), "--steps", "1", "--device", "cpu"),
                    "--out", named)


# ---------------------------------------------------------- 5. an unwritable cache is not fatal
def test_fid_with_unwritable_cache_warns_once_and_prints_fid(tmp_path: Path) -> None:
    from ddpm.scoring.inception import InceptionWeightsError, weights_path

    try:
        weights_path()
    except InceptionWeightsError as e:
        pytest.skip(str(e))
    a = _images(tmp_path / "a", 2, (200, 40, 30))
    b = _images(tmp_path / "b", 2, (30, 60, 200))
    home, _ = _unwritable(tmp_path, "readonly" if not IS_ROOT else "file")  # a read-only home (a file as root)
    env = {**ENV, "HOME": str(home)}
    env.pop("DDPM_CACHE", None)
    res = _ddpm("fid", str(a), str(b), "--device", "cpu", "--quiet", env=env)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.startswith("FID: ")
    warned = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(warned) == 1 and warned[0].startswith("warning: cannot write the cache folder"), res.stderr


def test_probe_and_statistics_caches_degrade_to_a_warning(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(evaluate, "FeatureExtractor", FakeExtractor)
    ref = tmp_path / "ref"
    _images(ref / "red", 12, (200, 40, 30))
    _images(ref / "blue", 12, (30, 60, 200))
    blocked, _ = _unwritable(tmp_path, "file")
    with pytest.warns(UserWarning, match="cannot write the cache folder") as record:
        fs = evaluate.reference_stats(ref, image_size=8, progress=False,
                                      settings=evaluate.ReferenceSettings(cache_dir=blocked / "cache"))
        probe = evaluate.reference_probe(fs, cache_dir=blocked / "cache")
    assert len([w for w in record if "cannot write the cache" in str(w.message)]) == 1  # once per folder
    assert fs.n == 24 and not fs.cached and fs.cache_path is None
    assert probe.predict(fs.features.astype(np.float64)).shape == (24,)


# ---------------------------------------------------------------- 6. hidden files are skipped
def _with_hidden_copies(folder: Path) -> None:
    ckpt = folder / ".ipynb_checkpoints"
    ckpt.mkdir()
    for f in sorted(folder.glob("*.png")):
        (ckpt / f"{f.stem}-checkpoint.png").write_bytes(f.read_bytes())
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "._000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")


def test_hidden_files_and_folders_are_not_training_data(tmp_path: Path) -> None:
    flat = _images(tmp_path / "flat", 3)
    _with_hidden_copies(flat)
    cond = tmp_path / "cond"
    _images(cond / "cat", 3)
    _images(cond / "dog", 2)
    _with_hidden_copies(cond / "cat")
    _with_hidden_copies(cond)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an AppleDouble file read as a broken image would warn
        ds = load_image_folder(flat, 8, progress=False)
        cs = load_image_folder(cond, 8, conditional=True, progress=False)
    assert len(ds) == 3 and all(".ipynb" not in p for p in ds.paths)
    assert len(cs) == 5 and cs.classes == ["cat", "dog"] and np.bincount(cs.labels).tolist() == [3, 2]


def test_resume_after_a_hidden_folder_appears(tmp_path: Path) -> None:
    data = _images(tmp_path / "data", 3)
    run = tmp_path / "run"
    train(_tiny(data, run, steps=1))
    _with_hidden_copies(data)  # Jupyter saved checkpoint copies while the run was paused
    train(_tiny(data, run, steps=2, resume=True))
    assert json.loads((run / "config.json").read_text())["num_images"] == 3


def test_hidden_files_are_not_reference_images_or_classes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(evaluate, "FeatureExtractor", FakeExtractor)
    ref = tmp_path / "ref"
    _images(ref / "red", 3, (200, 40, 30))
    _images(ref / "blue", 3, (30, 60, 200))
    _with_hidden_copies(ref / "red")
    _images(ref / ".ipynb_checkpoints", 2)  # would have become a third class
    (ref / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fs = evaluate.reference_stats(ref, image_size=8, settings=evaluate.ReferenceSettings(use_cache=False),
                                      progress=False)
    assert fs.n == 6 and fs.classes == ["blue", "red"]
    flat = _images(tmp_path / "flat", 3)
    _with_hidden_copies(flat)
    r = evaluate.fid_folders(flat, flat, resolve_runtime("cpu", progress=False),
                             settings=evaluate.ReferenceSettings(use_cache=False))
    assert r["n_a"] == r["n_b"] == 3


# ------------------------------------------------------- 7. a class with no readable images
def test_empty_class_is_an_error_or_dropped_on_request(tmp_path: Path, capsys) -> None:
    data = tmp_path / "data"
    _images(data / "cat", 3)
    _truncated(data / "dog", 2)
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(DDPMError, match="'dog'.*--drop-empty-classes"):
        load_image_folder(data, 8, conditional=True, progress=False)
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--conditional", "--model", "tiny", "--image-size", "16",
            "--steps", "1", "--batch-size", "4", "--timesteps", "20", "--sample-steps", "3", "--sample-n", "2",
            "--no-progress", "--no-tensorboard", "--device", "cpu", "--precision", "fp32", "--workers", "0"]
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "'dog'" in err and not run.exists()
    with pytest.warns(UserWarning) as record:
        assert main(args + ["--drop-empty-classes"]) == 0
    assert any("dropped 1 class(es) with no readable images: 'dog'" in str(w.message) for w in record)
    assert json.loads((run / "config.json").read_text())["classes"] == ["cat"]
    capsys.readouterr()
    assert main(["sample", "--run", str(run), "--class", "dog", "--n", "1", "--out", str(tmp_path / "d.png"),
                 "--device", "cpu"]) == 2
    assert "unknown class 'dog'" in capsys.readouterr().err and not (tmp_path / "d.png").exists()


def test_reference_class_with_no_readable_images_is_left_out(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(evaluate, "FeatureExtractor", FakeExtractor)
    ref = tmp_path / "ref"
    _images(ref / "red", 3, (200, 40, 30))
    _images(ref / "blue", 3, (30, 60, 200))
    _truncated(ref / "green", 2)
    with pytest.warns(UserWarning) as record:
        fs = evaluate.reference_stats(ref, image_size=8, settings=evaluate.ReferenceSettings(use_cache=False),
                                      progress=False)
    assert any("'green'" in str(w.message) for w in record)
    assert fs.classes == ["blue", "red"] and np.bincount(fs.labels).tolist() == [3, 3]


# ------------------------------------------------------------ 8. class names that are not UTF-8
def test_non_utf8_class_folder_trains_prints_and_samples(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _images(data / "cat", 2)
    try:
        os.mkdir(os.path.join(os.fsencode(data), b"caf\xe9"))
    except OSError as e:  # file systems that insist on UTF-8 names cannot hold the fault
        pytest.skip(f"cannot create a non-UTF-8 folder name here: {e}")
    _images(Path(os.fsdecode(os.path.join(os.fsencode(data), b"caf\xe9"))), 2, (30, 60, 200))
    run = tmp_path / "run"
    calls = [
        ["train", "--data", str(data), "--out", str(run), "--conditional", "--model", "tiny", "--image-size", "16",
         "--steps", "1", "--batch-size", "4", "--timesteps", "20", "--sample-steps", "3", "--sample-n", "2",
         "--no-progress", "--no-tensorboard", "--device", "cpu", "--precision", "fp32", "--workers", "0"],
        ["info", str(run)],
        ["sample", "--run", str(run), "--class", "caf\\xe9", "--n", "1", "--out", str(tmp_path / "a.png"),
         "--device", "cpu", "--steps", "2"],
        ["sample", "--run", str(run), "--class", "0", "--n", "1", "--out", str(tmp_path / "b.png"),
         "--device", "cpu", "--steps", "2"],
    ]
    # One interpreter for all calls; its stdout is the real, strictly UTF-8 one (PYTHONIOENCODING).
    script = ("import sys, json\nfrom ddpm.cli.app import main\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    rc = main(args)\n"
              "    print('rc', rc, flush=True)\n"
              "    assert rc == 0, args\n"
              "main(['sample', '--run', sys.argv[2], '--class', sys.argv[3], '--n', '1', '--out', sys.argv[4],"
              " '--device', 'cpu', '--steps', '2'])\n")
    res = subprocess.run([os.fsencode(sys.executable), b"-c", script.encode(), json.dumps(calls).encode(),
                          os.fsencode(run), b"caf\xe9", os.fsencode(tmp_path / "c.png")],
                         capture_output=True, env=ENV, timeout=300)
    out, err = res.stdout.decode("utf-8"), res.stderr.decode("utf-8", "replace")
    assert res.returncode == 0 and "Traceback" not in err, err
    assert "classes: caf\\xe9, cat" in out  # train's data line and info both show the escape
    assert "classes:    caf\\xe9, cat" in out
    # the escaped name, the index and the raw bytes all name the class, printed escaped
    assert out.count("of caf\\xe9") == 3 and "of caf\\xe9" in out.splitlines()[-1]
    config = (run / "config.json").read_bytes()
    assert json.loads(config.decode("ascii"))["classes"] == ["caf\\xe9", "cat"]
    from ddpm.run.checkpoint import latest_checkpoint, load_checkpoint

    assert load_checkpoint(latest_checkpoint(run), only=("model",))[1]["classes"] == ["caf\\xe9", "cat"]
    for name in ("a.png", "b.png", "c.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ 9. steps above the run's T
def test_eval_steps_above_T_fail_before_reference_work(run20: Path, cond_data: Path, tmp_path: Path,
                                                       monkeypatch, capsys) -> None:
    monkeypatch.setattr(evaluate, "FeatureExtractor", NoReferenceWork)
    common = ["--run", str(run20), "--ref", str(cond_data), "--n", "2", "--device", "cpu", "--no-cache", "--quiet",
              "--out", str(tmp_path / "r.json")]
    assert main(["eval", *common, "--steps", "21"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --steps 21 exceeds this run's 20 diffusion steps; use at most 20"
    assert main(["eval", *common, "--sweep", "--sweep-steps", "10", "50"]) == 2
    assert "--sweep-steps 50 exceeds this run's 20 diffusion steps" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    # sample says the same, in the same words (one function decides)
    assert main(["sample", "--run", str(run20), "--steps", "21", "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == err
    # a default count larger than T is capped, as for sample (dpm-solver's 20 on a 10-step run)
    from ddpm.core.samplers import resolve_steps

    assert resolve_steps("dpm-solver", None, 10) == 10 and resolve_steps("ancestral", None, 20) == 20


def test_default_sweep_drops_steps_above_T_and_says_so(run20: Path, cond_data: Path, tmp_path: Path,
                                                       monkeypatch) -> None:
    monkeypatch.setattr(evaluate, "FeatureExtractor", FakeExtractor)
    with pytest.warns(UserWarning, match="sweep steps 50, 100 exceed this run's 20 diffusion steps"):
        rep = evaluate.sampler_sweep(run20, cond_data, n=4, grid=evaluate.SweepGrid(samplers=["ddim"]),
                                     runtime=resolve_runtime("cpu", progress=False), out=tmp_path / "sweep.json",
                                     settings=evaluate.ReferenceSettings(use_cache=False, kid_subsets=2))
    assert [r["steps"] for r in rep["results"]] == [10, 20]
    with pytest.warns(UserWarning, match="sweeping 5"):
        assert evaluate.sweep_steps(None, 5) == [5]  # none left: the full chain
