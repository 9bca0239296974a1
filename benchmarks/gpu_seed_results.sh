#!/usr/bin/env bash
# The two headline results on one GPU, for a fixed budget each: trains configs/landscapes-64.toml
# (unconditional) and configs/cifar10-64-cfg.toml (classifier-free guidance) for MINUTES of
# training each, one after the other, then writes from each run's EMA weights, with the default
# sampler, the grids the README shows and the FID (landscapes: against the training photographs;
# CIFAR-10: against the test images, with the linear probe's class accuracy of guided samples).
#
#   bash benchmarks/gpu_seed_results.sh --landscapes DIR --cifar DIR --out DIR [options]
#
#   --landscapes DIR   folder of landscape photographs (any size; resized to 64x64)
#   --cifar DIR        CIFAR-10 as class folders: DIR/train/<class>/*, DIR/test/<class>/*
#   --out DIR          where the two run folders, grids, eval JSON and summary.txt go
#   --minutes M        training minutes per config (default 5)
#   --n N              samples for each FID (default 5000; the FID of few samples is biased up)
#   --device D         cuda (default), cuda:N or cpu
#   --train-args "..." extra `ddpm train` flags for both runs, e.g. "--model tiny --batch-size 8"
#                      (how the CPU check below shrinks the job)
#
# A run cut short is resumed by the same line (training time counts over resumes); a finished one
# is not trained again, only sampled and scored. Check it on a CPU in a minute or two:
#   bash benchmarks/gpu_seed_results.sh --landscapes L --cifar C --out /tmp/g --minutes 0.2 --n 20 \
#        --device cpu --train-args "--model tiny --batch-size 4 --save-every 0 --sample-every 0"
set -euo pipefail

minutes=5 n=5000 device=cuda train_args="" land="" cifar="" out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --landscapes) land=$2; shift 2 ;;
    --cifar) cifar=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --n) n=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --train-args) train_args=$2; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_seed_results.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
for pair in "--landscapes:$land" "--cifar:$cifar" "--out:$out"; do
  [[ -n "${pair#*:}" ]] || { echo "gpu_seed_results.sh: ${pair%%:*} is required (see --help)" >&2; exit 2; }
done
[[ -d "$land" ]] || { echo "gpu_seed_results.sh: --landscapes $land is not a folder" >&2; exit 2; }
[[ -d "$cifar/train" && -d "$cifar/test" ]] || {
  echo "gpu_seed_results.sh: --cifar $cifar must hold train/ and test/ class folders" >&2; exit 2; }

here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
summary="$out/summary.txt"
{ echo "# gpu_seed_results.sh, $(date -u +%Y-%m-%dT%H:%MZ), $minutes min per config, n=$n, device $device"
  python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$summary"

train() {  # name config data
  local resume=()
  # a run that used its whole budget is done (a resume would be refused); one cut short continues
  [[ -f "$out/$1.trained" ]] && return 0
  [[ -f "$out/$1/config.json" ]] && resume=(--resume)
  # shellcheck disable=SC2086  # train_args is a list of flags on purpose
  ddpm train --config "$here/configs/$2" --data "$3" --out "$out/$1" --time-limit "$minutes" \
    --device "$device" --no-progress "${resume[@]}" $train_args
  touch "$out/$1.trained"
}

# landscapes: unconditional grid and FID against the training photographs
train land landscapes-64.toml "$land"
ddpm sample --run "$out/land" --n 64 --device "$device" --out "$out/landscapes.png"
ddpm eval --run "$out/land" --ref "$land" --n "$n" --device "$device" --no-pr --quiet --out "$out/land_eval.json"

# CIFAR-10: guided ship and airplane grid, FID and class accuracy against the test images
train cifar cifar10-64-cfg.toml "$cifar/train"
ddpm sample --run "$out/cifar" --class ship airplane --n 8 --guidance 3 --device "$device" \
  --out "$out/cifar_ship_airplane.png"
ddpm eval --run "$out/cifar" --ref "$cifar/test" --n "$n" --guidance 3 --device "$device" --no-pr --quiet \
  --out "$out/cifar_eval.json"

python - "$out" >> "$summary" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, ref in (("land", "the training photographs"), ("cifar", "the CIFAR-10 test images")):
    ev = json.loads((out / f"{name}_eval.json").read_text())
    tc = json.loads((out / name / "config.json").read_text())["train"]
    line = f"{name}: step {ev['step']}, FID {ev['fid']:.2f} of {ev['n']} samples against {ref}"
    acc = ev.get("class_accuracy")
    if acc:
        per = acc["per_class"]
        line += (f"; class accuracy at guidance 3: overall {acc['overall']:.3f}, ship {per.get('ship', float('nan')):.3f},"
                 f" airplane {per.get('airplane', float('nan')):.3f}")
    print(f"{line} | model {tc['model']}, batch {tc['batch_size']}, {ev['sampler']} {ev['steps']} steps")
EOF
cat "$summary"
