"""Data-parallel training with two gloo processes on the CPU, launched by torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import copy_subset
from ddpm.cli import run_info


def _torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "ddpm", "train", *args]
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
    from ddpm.cli import main

    assert main(["train", *_args(data, run, 6, "--resume", "--grad-accum", "2")]) == 0
    assert run_info(str(run))["step"] == 6
