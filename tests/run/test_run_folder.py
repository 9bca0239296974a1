"""The run folder survives what clusters do to jobs: kill -9 and requeue with the same command
line, two jobs started on one folder, a full disk. Every test drives real ``python -m ddpm``
processes on a tiny model and a few 16x16 images."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import copy_subset

from ddpm.train.monitor import _Logger

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def cats(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_subset(cifar10_dir / "train" / "cat", tmp_path_factory.mktemp("cats"), None, 16)


def _line(data: Path, out: Path, steps: int = 6, save_every: int = 2, *extra: str) -> list[str]:
    """A requeued job's one command line: always --resume."""
    return [sys.executable, "-m", "ddpm", "train", "--data", str(data), "--out", str(out), "--model", "tiny",
            "--image-size", "16", "--steps", str(steps), "--batch-size", "4", "--save-every", str(save_every),
            "--log-every", "1", "--sample-every", "0", "--sample-n", "2", "--sample-steps", "2", "--no-progress",
            "--no-tensorboard", "--precision", "fp32", "--device", "cpu", "--workers", "0", "--resume", *extra]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, **kw)


def _in_one_process(commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """``(exit status, stdout, stderr)`` of each ``ddpm`` command line, all run through ddpm's
    main() in one fresh interpreter (one torch import instead of one per command)."""
    script = ("import contextlib, io, json, sys\nfrom ddpm.cli.app import main\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    out, err = io.StringIO(), io.StringIO()\n"
              "    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):\n"
              "        rc = main(args)\n"
              "    print(json.dumps([rc, out.getvalue(), err.getvalue()]))\n")
    res = _run([sys.executable, "-c", script, json.dumps(commands)])
    assert res.returncode == 0, res.stderr
    results = [tuple(json.loads(line)) for line in res.stdout.strip().splitlines()]
    assert len(results) == len(commands), res.stdout
    return results  # type: ignore[return-value]


def _one_line_error(res: subprocess.CompletedProcess, *expected: str) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def _tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"ckpt_{step:09d}.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def _metric_steps(run: Path) -> list[int]:
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",")[:5] == ["step", "loss", "lr", "images_per_s", "epoch"]
    return [int(float(line.split(",")[0])) for line in lines[1:]]


def _wait_for(condition, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + 240
    while not condition():
        assert proc.poll() is None, f"training ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def reference(cats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run of the same command line, to compare with."""
    run = tmp_path_factory.mktemp("reference") / "run"
    res = _run(_line(cats, run, 9, 3))
    assert res.returncode == 0, res.stderr
    return run


# ---------------------------------------------------------------------- 1. one command line
def test_resume_starts_a_new_run_where_nothing_was_saved_yet(cats: Path, reference: Path, tmp_path: Path) -> None:
    # What a process killed before its first checkpoint leaves: the config, metrics rows of steps
    # that will be redone (one cut short), a temporary checkpoint and a lock file of a dead PID.
    run = tmp_path / "killed-early"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text((reference / "config.json").read_text())
    (run / "metrics.csv").write_text("step,loss,lr,images_per_s,epoch\n1,0.5,1e-05,10.0,0.25\n2,0.4")
    (run / "checkpoints" / ".ckpt_000000003.safetensors.x1y2.tmp").write_bytes(b"\0" * 4096)
    (run / ".lock").write_text("999999\n")
    res = _run(_line(cats, run, 9, 3))
    assert res.returncode == 0, res.stderr
    assert "has no checkpoint yet, starting a new run" in res.stdout
    _assert_same_weights(_tensors(run, 9), _tensors(reference, 9))
    assert _metric_steps(run) == list(range(1, 10))
    assert not list(run.rglob("*.tmp")) and not (run / ".lock").exists()

    # No folder at all, and an empty one: the same line starts the run.
    runs = [tmp_path / "new" / "run", tmp_path / "empty"]
    runs[1].mkdir()
    for run, (rc, out, err) in zip(runs, _in_one_process([_line(cats, run, 1, 1)[3:] for run in runs])):
        assert rc == 0, err
        assert "starting a new run" in out and (run / "checkpoints" / "ckpt_000000001.safetensors").is_file()


def test_kill_9_and_restart_with_the_same_line_gives_the_uninterrupted_weights(
        cats: Path, reference: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = _line(cats, run, 9, 3)
    # Kill 1: as soon as the run's config exists, before its first checkpoint.
    # Kill 2: after metrics rows beyond the newest checkpoint (step 3) were written.
    moments = [("config.json", lambda: (run / "config.json").is_file()),
               ("step 4 logged", lambda: (run / "metrics.csv").is_file() and 4 in _metric_steps_safe(run))]
    for what, condition in moments:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        try:
            _wait_for(condition, proc, what)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert (run / "metrics.csv").is_file()
    res = _run(cmd)
    assert res.returncode == 0, res.stderr
    _assert_same_weights(_tensors(run, 9), _tensors(reference, 9))
    assert _metric_steps(run) == list(range(1, 10))  # rows of redone steps are not duplicated


def _metric_steps_safe(run: Path) -> list[int]:
    try:
        return _metric_steps(run)
    except (ValueError, IndexError, AssertionError, OSError):  # caught mid-write
        return []


# ---------------------------------------------------------------------- 2. one writer per run
def test_two_trainings_in_one_run_folder(cats: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = _line(cats, run, 100_000, 1000)
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for _ in range(2)]
    try:
        deadline = time.monotonic() + 120
        while all(p.poll() is None for p in procs):
            assert time.monotonic() < deadline, "neither training stopped"
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        _, err = loser.communicate()
        res = subprocess.CompletedProcess(loser.args, loser.returncode, "", err)
        _one_line_error(res, f"run folder {str(run)!r} in use by process {winner.pid}")
        assert winner.poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.communicate()


HOLDER = """
import os, sys, time
from ddpm.run.folder import lock_run_folder
with lock_run_folder(sys.argv[1]):
    child = os.fork()
    if child == 0:  # outlives its parent for a while, as data loader workers do
        time.sleep(120)
        os._exit(0)
    print(child, flush=True)
    time.sleep(120)
"""


def test_eval_is_refused_and_a_killed_holder_frees_the_folder_at_once(cats: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    child = 0
    try:
        child = int(holder.stdout.readline())  # type: ignore[union-attr]
        # ddpm eval writing its result into the run is refused like a second training...
        ev = _run([sys.executable, "-m", "ddpm", "eval", "--run", str(run), "--ref", str(cats), "--n", "2",
                   "--device", "cpu", "--quiet"])
        _one_line_error(ev, f"run folder {str(run)!r} in use by process {holder.pid}", "--out")
        # ...and the lock dies with its holder, even while the holder's forked child lives on.
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)
        res = _run(_line(cats, run, 1, 1))
        assert res.returncode == 0, res.stderr
        assert not (run / ".lock").exists()
    finally:
        if child:  # first: it holds the holder's stdout open
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        if holder.poll() is None:
            holder.kill()
        holder.communicate()


# ---------------------------------------------------------------------- 3. a full disk
def _file_size_limit(limit: int):
    def apply() -> None:
        # Python ignores SIGXFSZ, so writing past the limit raises OSError EFBIG, as a full disk would.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_while_saving_is_one_line_naming_the_intact_checkpoint(cats: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _run(_line(cats, run, 2, 2)).returncode == 0
    first = run / "checkpoints" / "ckpt_000000002.safetensors"
    size = first.stat().st_size

    # The checkpoint of step 4 does not fit.
    res = _run(_line(cats, run, 4, 2), preexec_fn=_file_size_limit(size // 2))
    err = _one_line_error(res, str(run), str(first), "--resume", "checkpoint")
    assert "Traceback" not in res.stderr and "space" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name]  # no temporary file

    # metrics.csv fills the disk in the middle of a row: the row is taken back whole.
    # (Rows in today's columns as the csv module writes them, so that keeping them at resume
    # rewrites the same bytes and the failure is the append of step 3's row, not that rewrite.)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_Logger.FIELDS)
    writer.writeheader()
    writer.writerows({"step": float(s), "loss": 0.5, "lr": 0.001, "images_per_s": 10.0, "epoch": 0.25,
                      "ema_decay": 0.9, "grad_norm": 1.5} for s in (1, 2) for _ in range(100))
    (run / "metrics.csv").write_bytes(buf.getvalue().encode())
    before = (run / "metrics.csv").read_bytes()
    res = _run(_line(cats, run, 4, 2), preexec_fn=_file_size_limit(len(before) + 20))
    _one_line_error(res, "metrics.csv", str(first), "--resume")
    assert (run / "metrics.csv").read_bytes() == before

    # Space freed, the same line continues.
    res = _run(_line(cats, run, 4, 2))
    assert res.returncode == 0, res.stderr
    assert _metric_steps(run)[-2:] == [3, 4]


def test_any_run_file_that_cannot_be_written_is_one_line(cats: Path, tmp_path: Path) -> None:
    cases = []
    named = {"config.json": "config.json", "metrics.csv": "metrics.csv", "loss.png": "loss.png",
             "samples/step_000000001.png": "a sample grid"}
    for blocked, what in named.items():
        run = tmp_path / ("run-" + blocked.replace("/", "-"))
        (run / blocked).mkdir(parents=True)  # a folder where the file must go: EISDIR
        cases.append((what, run, _line(cats, run, 1, 1, "--sample-every", "1")[3:]))
    for (what, run, _), (rc, _, err) in zip(cases, _in_one_process([args for _, _, args in cases])):
        _one_line_error(subprocess.CompletedProcess([], rc, "", err), f"cannot write {what} in run folder {str(run)!r}",
                        "--resume")
