"""Training speed on a CPU that is also used for other things: thread count and OpenMP wait policy.

A user's laptop or a shared server runs other programs beside ``ddpm train``. PyTorch's OpenMP
threads spin while they wait for each other (``OMP_WAIT_POLICY=ACTIVE`` behaviour), so when one of
them is descheduled by another process the others burn their time slices spinning, and a step can
take several times longer than a fair share of the cores would allow.

This script runs the real trainer (``ddpm.cli.main`` with ``train`` arguments, ``small`` preset, batch 32, 32x32) under
each runtime setting, once alone and once beside a single-threaded busy job (a pure Python loop, as
an editor, a browser tab or another script would be), and reports training images/s from the run's
own ``metrics.csv`` (median of the logged intervals after warm-up) and the busy job's progress, so
that a setting that starves the other job is visible too. Settings run one after another, never
in parallel; nothing else may run on the machine meanwhile.

    python benchmarks/contention.py --data CIFAR10/train --steps 60 --json contention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm.files.atomic import atomic_write_text  # noqa: E402

# name -> environment for the training process; "unset" removes the variable
SETTINGS: dict[str, dict[str, str]] = {
    "torch default (all cores, OpenMP spin-wait)": {"OMP_WAIT_POLICY": "unset", "OMP_NUM_THREADS": "unset"},
    "all cores, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "unset"},
    "cores - 1 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "cores-1"},
}

_BUSY = """
import signal, sys, time
n = 0
t0 = time.perf_counter()
def stop(*_):
    print(n / (time.perf_counter() - t0), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    n += 1
"""


def _env(setting: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for key, value in setting.items():
        if value == "unset":
            env.pop(key, None)
        elif value == "cores-1":
            env[key] = str(max(1, (os.cpu_count() or 2) - 1))
        else:
            env[key] = value
    return env


def _train(data: str, steps: int, env: dict[str, str], log_every: int) -> float:
    """Runs the trainer; returns the median images/s of the intervals after the first two."""
    with tempfile.TemporaryDirectory() as tmp:
        # through ddpm.cli.main from "python -c", not the ddpm command, which would make an unset
        # OMP_WAIT_POLICY PASSIVE (its default): the first setting is torch's own default
        cmd = [sys.executable, "-c", "import sys; from ddpm.cli.app import main; sys.exit(main(sys.argv[1:]))",
               "train", "--data", data, "--out", f"{tmp}/run", "--model", "small",
               "--batch-size", "32", "--image-size", "32", "--steps", str(steps), "--log-every", str(log_every),
               "--sample-every", "0", "--save-every", "0", "--no-progress", "--no-tensorboard"]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        rows = (Path(tmp) / "run" / "metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        col = header.index("images_per_s")
        rates = [float(r.split(",")[col]) for r in rows[1:] if r.split(",")[col]]
        return statistics.median(rates[2:] if len(rates) > 3 else rates)


def _busy_alone(seconds: float) -> float:
    proc = subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.PIPE, text=True)
    time.sleep(seconds)
    proc.terminate()
    return float(proc.communicate()[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="a folder of training images (e.g. the CIFAR-10 subset's train/)")
    p.add_argument("--steps", type=int, default=60, help="training steps per measurement")
    p.add_argument("--log-every", type=int, default=10, help="steps per logged images/s interval")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args()

    results: dict = {"cpu_count": os.cpu_count(), "steps": args.steps, "settings": {}}
    busy_alone = _busy_alone(10.0)
    results["busy_job_alone_iter_per_s"] = busy_alone
    print(f"busy job alone: {busy_alone / 1e6:.1f} M iterations/s")
    for name, setting in SETTINGS.items():
        env = _env(setting)
        alone = _train(args.data, args.steps, env, args.log_every)
        busy = subprocess.Popen([sys.executable, "-c", _BUSY], stdout=subprocess.PIPE, text=True)
        try:
            loaded = _train(args.data, args.steps, env, args.log_every)
        finally:
            busy.terminate()
            busy_rate = float(busy.communicate()[0])
        results["settings"][name] = {"env": setting, "alone_images_per_s": alone, "loaded_images_per_s": loaded,
                                     "busy_job_share": busy_rate / busy_alone}
        print(f"{name:<45} alone {alone:6.1f} img/s   beside a busy thread {loaded:6.1f} img/s "
              f"({loaded / alone:.0%} of alone; the busy job kept {busy_rate / busy_alone:.0%} of its speed)",
              flush=True)
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
