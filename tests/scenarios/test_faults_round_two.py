"""Faults users of other trainers reported, replayed against ours (issue 25): each ends in one
line and a documented exit code, never a traceback, and loses nothing.

Process behaviour (pipes, signals, exit codes, working directories) runs in real subprocesses
(``python -m ddpm``), as a user or a scheduler meets it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli.app import EXIT_STOPPED, EXIT_USER_ERROR

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
TINY = ["--model", "tiny", "--image-size", "16", "--batch-size", "4", "--lr", "1e-3", "--warmup", "1",
        "--timesteps", "20", "--sample-every", "0", "--sample-steps", "2", "--sample-n", "2", "--no-progress",
        "--no-tensorboard", "--precision", "fp32", "--device", "cpu", "--workers", "0"]


def _images(folder: Path, n: int, seed: int, size: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def _ddpm(*args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True, timeout=300,
                          env=ENV, cwd=cwd, **kw)


def _one_line(res: subprocess.CompletedProcess, code: int, *expected: str) -> str:
    err = res.stderr.strip()
    assert res.returncode == code, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults2")
    _images(root / "data", 8, seed=0)
    res = _ddpm("train", "--data", "data", "--out", "runs/r", "--steps", "2", *TINY, cwd=root)
    assert res.returncode == 0, res.stderr
    return root / "runs" / "r"


# ------------------------------------------------- 1. a resumed run keeps its own data
def test_resume_from_another_directory_trains_on_the_run_s_own_data(run: Path, tmp_path: Path) -> None:
    proj = run.parents[1]
    other = tmp_path / "other"
    _images(other / "data", 8, seed=1)  # as many different images, under the same relative name
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["data"] == str(proj / "data")  # stored absolute, whatever was typed
    res = _ddpm("train", "--out", str(run), "--resume", "--steps", "3", cwd=other)
    assert res.returncode == 0, res.stderr
    assert "data: 8 images" in res.stdout and str(proj / "data") in json.loads((run / "config.json").read_text())["train"]["data"]


def test_resume_on_a_folder_with_other_files_names_both(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    _images(copy, 8, seed=2)
    for i, p in enumerate(sorted(copy.iterdir())):
        p.rename(copy / f"x{i:03d}.png")  # the same count, other files
    res = _ddpm("train", "--data", str(copy), "--out", str(run), "--resume", "--steps", "9", cwd=tmp_path)
    _one_line(res, EXIT_USER_ERROR, str(copy), "its images are not those this run began with")


def test_the_same_folder_moved_and_renamed_resumes_and_other_files_do_not(tmp_path: Path) -> None:
    """The data's identity is its file names relative to the folder: a flat folder renamed (a
    copy on scratch space, say) is the same data; an older run's digest (file and folder names)
    is still read as it was written."""
    from ddpm.train import TrainConfig, train

    first = _images(tmp_path / "data", 8, seed=5)
    common = dict(out=str(tmp_path / "r"), model="tiny", image_size=16, batch_size=4, timesteps=20, sample_every=0,
                  sample_n=2, sample_steps=2, progress=False, tensorboard=False, precision="fp32", device="cpu",
                  workers=0)
    train(TrainConfig(data=str(first), steps=1, **common))
    moved = first.rename(tmp_path / "scratch-copy")
    train(TrainConfig(data=str(moved), steps=2, resume=True, **common))
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["data"]["path"] == str(moved) and saved["data"]["names"] == "relative"
    # as a run of the previous version recorded it: "parent/name" of each file, no "names" key
    import hashlib

    old = hashlib.sha256("".join(f"scratch-copy/{p.name}\n" for p in sorted(moved.iterdir())).encode()).hexdigest()
    saved["data"] = {"path": saved["data"]["path"], "images": 8, "names_sha256": old}
    from ddpm.run.config import RunConfig
    from ddpm.data.cache import open_training_set
    from ddpm.data.sets import same_images

    data = open_training_set(moved, 16, progress=False)
    assert same_images(RunConfig.from_dict(saved, "x").data, str(moved), data)
    other = _images(tmp_path / "other" / "scratch-copy", 8, seed=6)  # the same folder name, other files
    for i, p in enumerate(sorted(other.iterdir())):
        p.rename(other / f"y{i:03d}.png")
    assert not same_images(RunConfig.from_dict(saved, "x").data, str(other), open_training_set(other, 16,
                                                                                                progress=False))


def test_a_run_begun_before_linked_folders_were_followed_is_told_why(tmp_path: Path) -> None:
    data = _images(tmp_path / "data", 4, seed=8)
    res = _ddpm("train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY, "--steps", "1")
    assert res.returncode == 0, res.stderr
    elsewhere = _images(tmp_path / "elsewhere", 2, seed=9)
    try:
        (data / "more").symlink_to(elsewhere, target_is_directory=True)
    except (OSError, NotImplementedError):
        pytest.skip("this file system cannot make symbolic links")
    res = _ddpm("train", "--out", str(tmp_path / "r"), "--resume", "--steps", "2")
    _one_line(res, EXIT_USER_ERROR, "did not follow symbolic links to folders", "2 image(s)",
              "move the linked folders out of --data")


def test_no_data_cache_is_this_machine_s_choice_not_the_run_s(tmp_path: Path) -> None:
    """--no-data-cache (and --data-cache, --workers) are not taken from the run on --resume."""
    data, cache = _images(tmp_path / "data", 4, seed=10), tmp_path / "cache"
    env = {**ENV, "DDPM_CACHE": str(cache)}
    run = subprocess.run([sys.executable, "-m", "ddpm", "train", "--data", str(data), "--out", str(tmp_path / "r"),
                          *TINY, "--steps", "1", "--no-data-cache"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert not (cache / "data").exists()
    resumed = subprocess.run([sys.executable, "-m", "ddpm", "train", "--out", str(tmp_path / "r"), "--resume",
                              "--steps", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert list((cache / "data").glob("*.ddpmdata"))  # the resume used (and built) the cache
    assert json.loads((tmp_path / "r" / "config.json").read_text())["train"]["no_data_cache"] is False


# ------------------------------------------------------- 3. a reader that leaves early
@pytest.mark.parametrize("args", [["info", "{run}"], ["info", "{run}", "--json"],
                                  ["sample", "--run", "{run}", "--n", "2", "--steps", "2", "--out", "{tmp}/s.png",
                                   "--device", "cpu"]])
def test_a_closed_pipe_stops_printing_quietly(run: Path, tmp_path: Path, args: list[str]) -> None:
    argv = [a.format(run=run, tmp=tmp_path) for a in args]
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    proc.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err
    if args[0] == "sample":
        assert (tmp_path / "s.png").is_file()  # the work was done


# ------------------------------------------------- 4. a count of 0 is a line, not a crash
@pytest.mark.parametrize("flag, value", [("--grad-accum", "0"), ("--batch-size", "0"), ("--grad-accum", "-2")])
def test_zero_and_negative_counts_are_one_line(tmp_path: Path, flag: str, value: str) -> None:
    _images(tmp_path / "d", 4, seed=3)
    res = _ddpm("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *TINY, flag, value)
    _one_line(res, EXIT_USER_ERROR, flag)
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------- 6. exit codes
def test_time_limit_stop_exits_with_the_resumable_code(tmp_path: Path) -> None:
    _images(tmp_path / "d", 8, seed=4)
    res = _ddpm("train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *TINY, "--steps", "100000",
                "--time-limit", "0.001", "--save-every", "0")
    assert res.returncode == EXIT_STOPPED, res.stderr
    assert "continue with --resume" in res.stdout and list((tmp_path / "r" / "checkpoints").iterdir())


def test_sigterm_stops_training_and_the_demo_without_sampling(tmp_path: Path) -> None:
    from ddpm.cli.demo import write_digits

    write_digits(tmp_path / "demo" / "digits")  # written here, so the demo reaches training at once
    proc = subprocess.Popen([sys.executable, "-m", "ddpm", "demo", "--out", str(tmp_path / "demo"), "--steps", "100000",
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 600  # a loaded CI machine is slow to start torch and map the data
    log = tmp_path / "demo" / "run" / "metrics.csv"
    # Training steps run once the log has a row (the log file itself is made before the loop,
    # and so before its SIGTERM handler: a signal then ends the process, exit -15).
    while not (log.exists() and len(log.read_text().splitlines()) > 1) and time.time() < deadline:
        time.sleep(0.5)
    assert log.exists() and len(log.read_text().splitlines()) > 1, "the demo did not start training in 10 minutes"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_STOPPED, (out, err)
    assert "stopped by SIGTERM" in out and "sampling" not in out and not (tmp_path / "demo" / "demo_grid.png").exists()
    assert "Traceback" not in err


_SLOW_DECODE_TRAIN = """
import sys, time
import ddpm.data.sources as sources
decode = sources.decode_payload
def slow(*a, **k):
    time.sleep(0.2)
    return decode(*a, **k)
sources.decode_payload = slow
from ddpm.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_decoding_the_data_stops_at_once_and_leaves_nothing(tmp_path: Path) -> None:
    """A scheduler's SIGTERM during set-up (here: the data cache being built, one image every
    0.2 s) ends the command in a moment with the resumable code, one line, no traceback, no
    half-written cache file or run; the same command then starts the run."""
    _images(tmp_path / "d", 60, seed=7)
    cache = tmp_path / "cache"
    args = ["train", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r"), *TINY, "--steps", "1",
            "--data-cache", str(cache)]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_DECODE_TRAIN, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 300
    while not (cache.is_dir() and list(cache.glob(".*.tmp"))) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(cache.glob(".*.tmp")), ("the build never started", proc.communicate())
    proc.send_signal(signal.SIGTERM)
    start = time.time()
    out, err = proc.communicate(timeout=120)
    assert time.time() - start < 30  # not after the remaining ~10 s of decoding plus training
    assert proc.returncode == EXIT_STOPPED, (out, err)
    assert "Traceback" not in err and err.strip().splitlines() == [
        "stopped by SIGTERM before training began; nothing was left half-written; run the same command again to "
        "start (or continue) the run"]
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
    assert not (tmp_path / "r" / "config.json").exists() and not (tmp_path / "r" / "checkpoints").exists()
    res = _ddpm(*args)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["ckpt_000000001.safetensors"]


# ---------------------------------------------------------- 8. non-finite numbers
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_guidance_or_eta_is_refused(run: Path, tmp_path: Path, value: str) -> None:
    for flag in ("--guidance", "--eta"):
        res = _ddpm("sample", "--run", str(run), "--n", "1", "--out", str(tmp_path / "g.png"), f"{flag}={value}")
        _one_line(res, EXIT_USER_ERROR, flag, "finite")
    assert not (tmp_path / "g.png").exists()


# ------------------------------------------------ 2. out of memory: one line with the remedies
def test_out_of_memory_in_training_is_one_line_and_loses_nothing(run: Path, monkeypatch, capsys) -> None:
    import ddpm.train.loop
    from ddpm.cli.app import main

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 85899345920 bytes. "
                           "Error code 12 (Cannot allocate memory)")

    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    monkeypatch.setattr(ddpm.train.loop, "train_step", no_memory)
    assert main(["train", "--out", str(run), "--resume", "--steps", "50", "--no-progress"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory on this machine" in err and "80.0 GiB" in err
    assert "--batch-size" in err and "--grad-accum" in err and "--grad-checkpoint" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_out_of_memory_on_a_gpu_while_sampling_names_the_batch(run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    import torch

    import ddpm.sample.engine
    from ddpm.cli.app import main

    def no_gpu_memory(*args, **kwargs):  # what CUDA's allocator raises
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(ddpm.sample.engine, "_sample_batch", no_gpu_memory)
    out = tmp_path / "oom.png"
    assert main(["sample", "--run", str(run), "--n", "8", "--batch-size", "8", "--out", str(out)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory on the GPU" in err and "2.00 GiB" in err
    assert "a batch of 8 images of 16x16" in err and "--batch-size" in err and not out.exists()


def test_out_of_memory_in_an_inception_pass_names_the_feature_batch(tmp_path: Path, monkeypatch, capsys) -> None:
    """FID's reference and sample passes: one line naming the Inception batch and its flag; no
    statistics file is left half-made in the cache."""
    import conftest
    import ddpm.scoring.evaluate as evaluate
    from ddpm.cli.app import main

    class NoMemoryExtractor(conftest.FakeExtractor):
        def __call__(self, batch):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 21474836480 bytes. "
                               "Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(evaluate, "FeatureExtractor", NoMemoryExtractor)
    a, b = _images(tmp_path / "a", 6, seed=1), _images(tmp_path / "b", 6, seed=2)
    cache = tmp_path / "stats"
    assert main(["fid", str(a), str(b), "--batch-size", "6", "--device", "cpu", "--cache-dir", str(cache), "--quiet"]) == \
        EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "out of memory on this machine in an Inception pass of 6 images" in err, err
    assert "20.0 GiB" in err and "--feature-batch-size" in err and "--batch-size" in err
    assert not cache.exists() or [p for p in cache.rglob("*") if p.is_file() and p.suffix == ".npz"] == []


@pytest.mark.skipif(not hasattr(__import__("os"), "fork") or sys.platform != "linux", reason="RLIMIT_AS is Linux's")
def test_a_real_memory_limit_while_sampling_is_one_line(run: Path, tmp_path: Path) -> None:
    """Not simulated: the process runs under an address-space limit (as a cluster's memory cap)
    and asks for a batch whose activations cannot fit; PyTorch's own allocator error becomes the
    one line naming the batch, and no image is written."""
    import resource

    probe = subprocess.run([sys.executable, "-c", "import ddpm.cli.app, torch\n"
                            "print([l for l in open('/proc/self/status') if l.startswith('VmPeak')][0].split()[1])"],
                           capture_output=True, text=True, env=ENV, timeout=300)
    limit = int(probe.stdout.strip()) * 1024 + 3 * 2**30  # the imports' own address space, plus 3 GiB

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    out = tmp_path / "big.png"
    res = subprocess.run([sys.executable, "-m", "ddpm", "sample", "--run", str(run), "--n", "40000", "--batch-size",
                          "40000", "--steps", "1", "--out", str(out), "--device", "cpu", "--precision", "fp32"],
                         capture_output=True, text=True, env=ENV, timeout=300, preexec_fn=cap)
    _one_line(res, EXIT_USER_ERROR, "out of memory on this machine in sampling a batch of 40000 images of 16x16",
              "--batch-size")
    assert not out.exists()


# ------------------------------------------------- 7. messages that name the real cause
def test_a_decompression_bomb_warning_names_its_file(tmp_path: Path) -> None:
    import warnings

    from PIL import Image as PILImage

    from ddpm.files.images import load_image

    path = tmp_path / "huge.png"
    PILImage.new("RGB", (64, 64)).save(path)
    limit = PILImage.MAX_IMAGE_PIXELS
    PILImage.MAX_IMAGE_PIXELS = 64 * 64 - 1  # this small image now counts as a (mild) bomb
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_image(path, 8)
    finally:
        PILImage.MAX_IMAGE_PIXELS = limit
    bombs = [w for w in caught if issubclass(w.category, PILImage.DecompressionBombWarning)]
    assert bombs and all(str(path) in str(w.message) for w in bombs)


def test_renamed_class_folders_are_named_on_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for name in ("cat", "dog"):
        _images(data / name, 4, seed=len(name))
    args = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--conditional", *TINY]
    assert _ddpm(*args, "--steps", "1").returncode == 0
    (data / "dog").rename(data / "puppy")
    res = _ddpm(*args, "--steps", "2", "--resume")
    _one_line(res, EXIT_USER_ERROR, "gone: dog", "new: puppy")
