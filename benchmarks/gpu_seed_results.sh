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
#   --cifar-minutes M  training minutes of the CIFAR-10 run (default: --minutes)
#   --train-args "..." extra `ddpm train` flags for both runs, e.g. "--model tiny --batch-size 8"
#                      (how the CPU check below shrinks the job)
#   --sample-batch B   images per sampling and per Inception batch (default 64; a GPU takes 500)
#   --curve-every S    also score the CIFAR-10 run every S steps during training (--eval-every,
#                      --curve-n samples against the test images): RUN/fid.png, FID against images seen
#   --curve-n N        samples per point of that curve (default 1000)
#   --only NAME        land or cifar: train and score that config alone (a lease too short for both)
#   --no-fid           no Inception: write each run's --n samples as PNGs in a tar instead
#                      (land_samples.tar; cifar_samples.tar, guided at 3, --n / 10 per class
#                      rounded up), to be scored elsewhere with `ddpm fid`
#
# A run cut short is resumed by the same line (training time counts over resumes); a finished one
# is not trained again, only sampled and scored. Check it on a CPU in a minute or two:
#   bash benchmarks/gpu_seed_results.sh --landscapes L --cifar C --out /tmp/g --minutes 0.2 --n 20 \
#        --device cpu --train-args "--model tiny --batch-size 4 --save-every 0 --sample-every 0"
set -euo pipefail

minutes=5 cifar_minutes="" n=5000 device=cuda train_args="" land="" cifar="" out="" batch=64 curve=0 curve_n=1000 fid=1 only=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --landscapes) land=$2; shift 2 ;;
    --cifar) cifar=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --minutes) minutes=$2; shift 2 ;;
    --cifar-minutes) cifar_minutes=$2; shift 2 ;;
    --sample-batch) batch=$2; shift 2 ;;
    --curve-every) curve=$2; shift 2 ;;
    --curve-n) curve_n=$2; shift 2 ;;
    --no-fid) fid=0; shift ;;
    --only) only=$2; shift 2 ;;
    --n) n=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --train-args) train_args=$2; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "gpu_seed_results.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ -z "$only" || "$only" == land || "$only" == cifar ]] || {
  echo "gpu_seed_results.sh: --only $only: expected land or cifar" >&2; exit 2; }
need=()
[[ "$only" != cifar ]] && need+=("--landscapes:$land")
[[ "$only" != land ]] && need+=("--cifar:$cifar")
need+=("--out:$out")
for pair in "${need[@]}"; do
  [[ -n "${pair#*:}" ]] || { echo "gpu_seed_results.sh: ${pair%%:*} is required (see --help)" >&2; exit 2; }
done
[[ "$only" == cifar || -d "$land" ]] || { echo "gpu_seed_results.sh: --landscapes $land is not a folder" >&2; exit 2; }
[[ "$only" == land || ( -d "$cifar/train" && -d "$cifar/test" ) ]] || {
  echo "gpu_seed_results.sh: --cifar $cifar must hold train/ and test/ class folders" >&2; exit 2; }

mapfile -t classes < <([[ "$only" == land ]] || ls "$cifar/train")
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
summary="$out/summary.txt"
{ echo "# gpu_seed_results.sh, $(date -u +%Y-%m-%dT%H:%MZ), training minutes: landscapes $minutes, CIFAR-10 ${cifar_minutes:-$minutes}${only:+ (--only $only)}, n=$n, device $device"
  python3 -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$summary"

train() {  # name config data minutes [extra flags...]
  local resume=() name=$1 config=$2 data=$3 mins=$4
  shift 4
  # a run that used its whole budget is done (a resume would be refused); one cut short continues
  [[ -f "$out/$name.trained" ]] && return 0
  [[ -f "$out/$name/config.json" ]] && resume=(--resume)
  # shellcheck disable=SC2086  # train_args is a list of flags on purpose
  # Exit code 3 is a run stopped by its --time-limit: the budget this script gives it, so done.
  ddpm train --config "$here/configs/$config" --data "$data" --out "$out/$name" --time-limit "$mins" \
    --device "$device" --no-progress "${resume[@]}" "$@" $train_args || [[ $? == 3 ]]
  touch "$out/$name.trained"
}

score() {  # name ref [eval flags...]: FID (and class accuracy) as NAME_eval.json, or the samples as a tar
  local name=$1 ref=$2
  shift 2
  if [[ $fid == 1 ]]; then
    ddpm eval --run "$out/$name" --ref "$ref" --n "$n" --device "$device" --batch-size "$batch" \
      --feature-batch-size "$batch" --no-pr --quiet --out "$out/${name}_eval.json" "$@"
  else
    # the samples the FID would have scored: for CIFAR-10 the same share of every class, guided
    local count=(--n "$n")
    [[ $name == cifar ]] && count=(--class "${classes[@]}" --n $(( (n + ${#classes[@]} - 1) / ${#classes[@]} )))
    rm -rf "$out/${name}_samples"
    ddpm sample --run "$out/$name" "${count[@]}" --device "$device" --batch-size "$batch" "$@" \
      --individual "$out/${name}_samples" --out "$out/${name}_samples_grid.png"
    tar -cf "$out/${name}_samples.tar" -C "$out" "${name}_samples"
  fi
}

# landscapes: unconditional grid and FID against the training photographs
if [[ "$only" != cifar ]]; then
  train land landscapes-64.toml "$land" "$minutes"
  ddpm sample --run "$out/land" --n 64 --device "$device" --batch-size "$batch" --out "$out/landscapes.png"
  score land "$land"
fi

# CIFAR-10: guided ship and airplane grid, FID and class accuracy against the test images
if [[ "$only" != land ]]; then
  curve_flags=()
  [[ $curve -gt 0 && $fid == 1 ]] && curve_flags=(--eval-every "$curve" --eval-n "$curve_n" --eval-ref "$cifar/test")
  train cifar cifar10-64-cfg.toml "$cifar/train" "${cifar_minutes:-$minutes}" "${curve_flags[@]}"
  ddpm sample --run "$out/cifar" --class ship airplane --n 8 --guidance 3 --device "$device" --batch-size "$batch" \
    --out "$out/cifar_ship_airplane.png"
  score cifar "$cifar/test" --guidance 3
  [[ -f "$out/cifar/fid.png" ]] && cp "$out/cifar/fid.png" "$out/cifar_fid_curve.png"
fi

[[ $fid == 1 ]] || { echo "no FID (--no-fid): samples in $out/{land,cifar}_samples.tar" >> "$summary"; cat "$summary"; exit 0; }
python3 - "$out" >> "$summary" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name, ref in (("land", "the training photographs"), ("cifar", "the CIFAR-10 test images")):
    if not (out / f"{name}_eval.json").is_file():  # --only the other one
        continue
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
