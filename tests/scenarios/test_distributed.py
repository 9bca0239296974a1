"""torchrun with two gloo processes on the CPU: data-parallel training, and sampling and
evaluation split over the processes by image index."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_subset
from ddpm.cli.app import run_info


def _torchrun(nproc: int, *args: str, timeout: int = 600, command: str = "train") -> subprocess.CompletedProcess:
    # "--": torchrun's parser would take sample's --run and --n for abbreviations of its own options
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddpm", "--", command, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _failure(res: subprocess.CompletedProcess) -> str:
    """The head of stderr holds a crashed rank's own last words; the tail, torchrun's summary."""
    err = res.stderr
    return err if len(err) <= 6000 else err[:3000] + "\n[...]\n" + err[-3000:]


def _args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--conditional", "--model", "tiny", "--image-size", "16",
            "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--warmup", "2", "--log-every", "1",
            "--sample-every", "0", "--save-every", "0", "--sample-n", "3", "--sample-steps", "2", "--no-progress",
            "--no-tensorboard", "--precision", "fp32", "--device", "cpu", *extra]


@pytest.mark.slow
def test_two_gloo_ranks_train_identically_and_resume(cifar10_dir: Path, tmp_path: Path) -> None:
    data = copy_subset(cifar10_dir / "train", tmp_path / "data", ["ship", "truck", "frog"], 8)
    run = tmp_path / "run"
    res = _torchrun(2, *_args(data, run, 3))
    assert res.returncode == 0, _failure(res)
    out = res.stdout
    assert "2 processes" in out and "8 global = 2 process(es) x 1 micro-batch(es) x 4 images" in out
    assert "all 2 processes hold identical model and EMA weights" in out
    # rank 0 alone printed and wrote: one data line, one checkpoint
    assert out.count("data: ") == 1
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_000000003.safetensors"]

    # resume the same run on two ranks
    res = _torchrun(2, *_args(data, run, 5, "--resume"))
    assert res.returncode == 0, _failure(res)
    assert "resumed from" in res.stdout
    assert run_info(str(run))["step"] == 5

    # and on one process (a different world size), with gradient accumulation making up the
    # same global batch of 8
    from ddpm.cli.app import main

    assert main(["train", *_args(data, run, 6, "--resume", "--grad-accum", "2")]) == 0
    assert run_info(str(run))["step"] == 6


@pytest.mark.slow
def test_a_grid_rank_0_cannot_write_stops_every_rank_with_its_message(tmp_path: Path) -> None:
    """Rank 0 alone draws the sample grids; the other ranks wait for it there (so all leave the
    same seconds out of their training clocks) and stop with it when it cannot write one."""
    data = _class_folders(tmp_path / "data", ["a", "b"], 8)
    run = tmp_path / "run"
    (run / "samples" / "step_000000002.png").mkdir(parents=True)  # a folder where the grid must go
    res = _torchrun(2, *_args(data, run, 4, "--sample-every", "2"), timeout=300)
    assert res.returncode != 0
    assert f"cannot write a sample grid in run folder {str(run)!r}" in res.stderr, _failure(res)
    assert "step 3" not in res.stdout and not (run / "samples" / "step_000000004.png").exists()


def _rank_pid(agent: int, rank: int, timeout: float = 300.0) -> int:
    """The process id of torchrun's worker ``rank`` (a child of the agent ``agent``)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
            try:
                env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env:
                return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} appeared")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks through /proc (Linux)")
def test_a_rank_killed_mid_run_leaves_one_line_on_the_survivor_and_resumes(tmp_path: Path) -> None:
    """kill -9 of one of two ranks after a checkpoint: the survivor says in one line that it lost
    contact, names the newest checkpoint and how to go on (no gloo traceback from backward()),
    exits with the resumable code; the same command then continues the run from that checkpoint."""
    import signal
    import time

    data = _class_folders(tmp_path / "data", ["a", "b"], 8)
    run = tmp_path / "run"
    args = _args(data, run, 100000, "--save-every", "3", "--resume")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddpm", "--",
           "train", *args]
    agent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    victim = _rank_pid(agent.pid, 1)
    deadline = time.monotonic() + 300
    while not list(run.glob("checkpoints/ckpt_*.safetensors")):
        assert time.monotonic() < deadline and agent.poll() is None, agent.communicate()
        time.sleep(0.1)
    os.kill(victim, signal.SIGKILL)
    out, err = agent.communicate(timeout=300)
    newest = sorted(run.glob("checkpoints/ckpt_*.safetensors"))[-1].name
    lines = [line for line in err.splitlines() if "lost contact" in line]
    assert lines == [f"rank 0: lost contact with another process of this run (it ended or was killed; this one was "
                     f"sent SIGTERM too); the newest checkpoint is {newest}; resume with the same command"] or lines == [
        f"rank 0: lost contact with another process of this run (it ended or was killed); the newest checkpoint is "
        f"{newest}; resume with the same command"], err[-4000:]
    # torchrun itself reports the killed worker; rank 0 adds no traceback of its own
    assert "backward" not in err and "Connection reset" not in err and "ProcessGroupGloo" not in err, err[-4000:]
    step = int(newest.split("_")[1].split(".")[0])
    res = _torchrun(2, *_args(data, run, step + 2, "--save-every", "3", "--resume"))
    assert res.returncode == 0, _failure(res)
    assert f"resumed from {run / 'checkpoints' / newest} at step {step}" in res.stdout
    assert run_info(str(run))["step"] == step + 2


def _class_folders(root: Path, classes: list[str], per_class: int) -> Path:
    """Small RGB images in one folder per class, a base colour per class plus pixel noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.array([60 + 70 * c, 200 - 60 * c, 120])
            pixels = np.clip(base + rng.normal(0, 25, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


@pytest.mark.slow
def test_two_gloo_ranks_sample_and_score_the_images_of_one_process(tmp_path: Path) -> None:
    """'ddpm sample' and 'ddpm eval' under torchrun split the images over the ranks by index and
    rank 0 writes them: the same PNG files, the same FID as one process (at --batch-size 1 the
    network sees the same inputs; 3 images over 2 ranks is an uneven split, 1 + 2)."""
    import json

    from ddpm.cli.app import main
    from ddpm.train import TrainConfig, train

    data = _class_folders(tmp_path / "data", ["a", "b", "c"], 4)
    run = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(run), conditional=True, model="tiny", image_size=16, steps=2,
                      batch_size=4, timesteps=20, sample_every=0, save_every=0, sample_n=3, sample_steps=2,
                      progress=False, tensorboard=False, precision="fp32", device="cpu", workers=0))
    common = ["--run", str(run), "--class", "a", "b", "c", "--n", "1", "--steps", "3", "--guidance", "2",
              "--batch-size", "1", "--device", "cpu", "--precision", "fp32"]
    assert main(["sample", *common, "--out", str(tmp_path / "one.png"), "--individual", str(tmp_path / "one")]) == 0
    res = _torchrun(2, *common, "--out", str(tmp_path / "two.png"), "--individual", str(tmp_path / "two"),
                    command="sample")
    assert res.returncode == 0, _failure(res)
    assert res.stdout.count("wrote ") == 1 and "2 processes" in res.stdout  # rank 0 alone wrote and printed
    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"] == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in names:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()

    refused = _torchrun(2, *common, "--out", str(tmp_path / "x.png"), "--guidance-sweep", "1", "3", command="sample")
    assert refused.returncode != 0 and "--guidance-sweep runs in one process" in refused.stderr

    from ddpm.scoring.inception import InceptionWeightsError, weights_path

    try:
        weights_path()
    except InceptionWeightsError as e:
        pytest.skip(f"the evaluation half needs the Inception weights: {e}")
    scoring = ["--run", str(run), "--ref", str(data), "--n", "3", "--steps", "3", "--guidance", "2", "--batch-size", "1",
               "--device", "cpu", "--precision", "fp32", "--no-pr", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    assert main(["eval", *scoring, "--out", str(tmp_path / "one.json")]) == 0
    res = _torchrun(2, *scoring, "--out", str(tmp_path / "two.json"), command="eval")
    assert res.returncode == 0, _failure(res)
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    # The images are the same bits (above); torchrun runs each rank with OMP_NUM_THREADS=1, so
    # Inception's float sums and the matrix square root may round differently in the last digits.
    assert one["n"] == two["n"] == 3 and one["fid"] == pytest.approx(two["fid"], rel=1e-6)
    assert one["class_accuracy"] == two["class_accuracy"]


def test_shards_cover_every_image_index_once_in_order() -> None:
    """The blocks of image indices the ranks draw: all of 0..n-1, in rank order, sizes within one."""
    from ddpm.runtime.processes import Dist, shard

    for n in (0, 1, 2, 3, 7, 64):
        for world in (1, 2, 3, 8):
            blocks = [shard(n, Dist(rank, world)) for rank in range(world)]
            assert [i for block in blocks for i in block] == list(range(n)), (n, world)
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
