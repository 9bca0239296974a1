"""Few-step samples by consistency tuning (``ddpm distill``), measured against the teacher's own
samplers: FID/KID of ``--n`` samples against the CIFAR-10 test subset, seconds per image, and the
tuning time, in one sequence on one machine.

The teacher is a run folder (``--teacher``), or is trained here for ``--train-minutes`` with
today's defaults of ``ddpm train`` (``--model``, ``--batch-size``; ``--conditional`` for a
class-conditional run). It is tuned with ``ddpm distill``'s defaults for ``--tune-minutes``
(default: half the teacher's recorded training time, the issue's budget), or taken as it is from
``--student`` (a run ``ddpm distill`` wrote), then scored:

* the tuned model with the ``consistency`` sampler at ``--student-steps`` (1, 2, 4), and at 2 steps
  with each intermediate noise level of ``--mid-sigmas`` in place of the sampler's own (a sweep of
  :data:`ddpm.core.samplers.CONSISTENCY_SIGMAS`);
* the teacher with DPM-Solver++ at 2, 4, 10, 20 steps and the ancestral chain at 250
  (``--teacher-samplers``).

Every sampler draws the same ``--n`` images (seed ``--seed``, batch 100, fp32) and they are scored
as ``ddpm eval`` scores. A conditional teacher is sampled unconditionally (guidance 0) for FID and
at ``--guidance`` for class accuracy (a linear probe on Inception features fitted on the reference
set). Results are rewritten to ``--out`` after each sampler, so an interrupted sequence keeps what
it measured; grids of the first 64 images land in ``--work`` and one side-by-side figure in
``--figure``.

    python benchmarks/distill.py --teacher RUN --out distill.json --figure docs/figures/distill.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import SAMPLING_PRECISION, unpack_cifar  # noqa: E402
from ddpm.files.atomic import atomic_write_text  # noqa: E402


def train_seconds(checkpoint: Path) -> float:
    """The seconds of training a checkpoint records (its run's clock, set-up and sampling left out)."""
    from ddpm.run.checkpoint import load_checkpoint

    return float(load_checkpoint(checkpoint, "cpu", only=("train_seconds",))[2].get("train_seconds", 0.0))


TEACHER_SAMPLERS = ["dpm-solver:20", "dpm-solver:2", "dpm-solver:4", "dpm-solver:10", "ancestral:250"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--teacher", default=None, help="a trained run folder (unset: train one here)")
    p.add_argument("--train-minutes", type=float, default=20.0, help="the teacher's training, when trained here")
    p.add_argument("--model", default="small", help="the teacher's preset, when trained here")
    p.add_argument("--batch-size", type=int, default=32, help="the teacher's batch, when trained here")
    p.add_argument("--conditional", action="store_true", help="train the teacher with class labels")
    p.add_argument("--tune-minutes", type=float, default=None,
                   help="minutes of consistency tuning (unset: half the teacher's recorded training time)")
    p.add_argument("--tune-lr", type=float, default=None, help="the tuning's learning rate (unset: ddpm distill's)")
    p.add_argument("--student", default=None, help="an already tuned run to score (unset: tune the teacher here)")
    p.add_argument("--student-steps", type=int, nargs="*", default=[2, 1, 4])
    p.add_argument("--mid-sigmas", type=float, nargs="*", default=[], metavar="SIGMA",
                   help="also score 2 tuned steps re-noising to each of these EDM sigmas")
    p.add_argument("--teacher-samplers", nargs="*", default=TEACHER_SAMPLERS, metavar="SAMPLER:STEPS")
    p.add_argument("--n", type=int, default=1000, help="samples per sampler for FID/KID")
    p.add_argument("--ref-n", type=int, default=5000, help="test images used as the reference")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale for class accuracy (conditional)")
    p.add_argument("--n-guided", type=int, default=200, help="samples for class accuracy (conditional)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "ddpm" / "distill"))
    p.add_argument("--out", default=None, help="JSON results, rewritten after each sampler")
    p.add_argument("--figure", default=None, help="a PNG of the grids side by side")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cifar = unpack_cifar(work)

    from ddpm.cli.distill import distill_config
    from ddpm.core.samplers import CONSISTENCY_SIGMAS
    from ddpm.run.checkpoint import load_run
    from ddpm.runtime.policy import resolve_runtime
    from ddpm.sample.engine import generate
    from ddpm.sample.pictures import make_grid, save_png
    from ddpm.sample.spec import SampleSpec
    from ddpm.scoring.evaluate import Reference, ReferenceSettings
    from ddpm.train import TrainConfig, train

    results: dict = {"settings": vars(args), "torch": torch.__version__, "machine": os.uname().machine,
                     "date": time.strftime("%Y-%m-%d"), "samplers": {}}

    def save() -> None:
        if args.out:
            atomic_write_text(args.out, json.dumps(results, indent=2, default=float) + "\n")

    # ---------------------------------------------------------------- the teacher
    if args.teacher is None:
        teacher_dir = work / "teacher"
        shutil.rmtree(teacher_dir, ignore_errors=True)
        print(f"== teacher: training {args.model} for {args.train_minutes} min", flush=True)
        t0 = time.perf_counter()
        train(TrainConfig(data=str(cifar / "train"), out=str(teacher_dir), conditional=args.conditional,
                          model=args.model, steps=10**9, batch_size=args.batch_size, seed=args.seed,
                          time_limit=args.train_minutes, sample_every=0, save_every=0, log_every=50,
                          progress=False, tensorboard=False, device="cpu"))
        print(f"   {time.perf_counter() - t0:.0f} s", flush=True)
    else:
        teacher_dir = Path(args.teacher)
    teacher = load_run(teacher_dir)
    teacher_s = train_seconds(teacher.checkpoint)
    results["teacher"] = {"run": str(teacher_dir), "steps": teacher.step, "train_s": teacher_s,
                          "model": teacher.config.train.get("model"), "conditional": teacher.conditional}

    # ---------------------------------------------------------------- the tuning
    if args.student is not None:
        student = load_run(args.student)
        if not student.config.consistency:
            p.error(f"--student {args.student} is not a run written by ddpm distill")
        results["tuning"] = {"run": args.student}
    else:
        tune_minutes = args.tune_minutes if args.tune_minutes is not None else teacher_s / 60 / 2
        if not tune_minutes > 0:
            p.error("the teacher records no training time; give --tune-minutes")
        student_dir = work / "student"
        shutil.rmtree(student_dir, ignore_errors=True)
        print(f"== tuning for {tune_minutes:.2f} min", flush=True)
        t0 = time.perf_counter()
        train(distill_config(teacher_dir, student_dir, minutes=tune_minutes, lr=args.tune_lr, progress=False,
                             tensorboard=False, sample_every=0, save_every=0, log_every=25, device="cpu"))
        student = load_run(student_dir)
        results["tuning"] = {"wall_s": time.perf_counter() - t0}
    tune_s = train_seconds(student.checkpoint)
    results["tuning"].update(steps=student.step, train_s=tune_s, lr=student.config.train["lr"],
                             fraction_of_teacher_time=tune_s / teacher_s if teacher_s else None)
    print(f"   {student.step} steps, {results['tuning']['train_s']:.0f} s", flush=True)
    save()

    # ---------------------------------------------------------------- scoring
    runtime = resolve_runtime("cpu", SAMPLING_PRECISION, progress=False)
    classes = sorted(d.name for d in (cifar / "train").iterdir() if d.is_dir())
    reference = Reference.build(cifar / "test", None, runtime, settings=ReferenceSettings(max_images=args.ref_n),
                                classes=classes)
    results["reference"] = f"{reference.stats.n} CIFAR-10 test-subset images (JPEG)"
    labels = torch.zeros(args.n, dtype=torch.long) if teacher.conditional else None  # guidance 0
    grids: list[tuple[str, torch.Tensor]] = []

    def measure(key: str, run, sampler: str, steps: int) -> None:
        spec = SampleSpec(sampler, steps, guidance=0.0, seed=args.seed, batch_size=100)
        t1 = time.perf_counter()
        images = generate(run, args.n, spec, runtime, labels=labels)
        sample_s = time.perf_counter() - t1
        r = reference.score(images)
        entry = {"fid": r["fid"], "kid_mean": r["kid_mean"], "kid_std": r["kid_std"], "n": args.n, "nfe": steps,
                 "sample_s": sample_s, "s_per_image": sample_s / args.n}
        if teacher.conditional:
            g_labels = torch.arange(args.n_guided) % len(classes)
            g_spec = SampleSpec(sampler, steps, guidance=args.guidance, seed=args.seed + 1, batch_size=100)
            g_images = generate(run, args.n_guided, g_spec, runtime, labels=g_labels)
            entry["class_accuracy"] = reference.score(g_images, g_labels)["class_accuracy"]["overall"]
            entry["guidance"] = args.guidance
        results["samplers"][key] = entry
        grids.append((key, images[:64]))
        save_png(make_grid(images[:64], nrow=8), work / f"grid_{key.replace(':', '_')}.png")
        save()
        acc = f", class accuracy {entry['class_accuracy']:.3f}" if "class_accuracy" in entry else ""
        print(f"  {key}: FID {entry['fid']:.2f}, KID {entry['kid_mean'] * 1e3:.1f}x1e-3, "
              f"{entry['s_per_image'] * 1e3:.1f} ms/image{acc}", flush=True)

    for steps in args.student_steps:
        measure(f"tuned consistency:{steps}", student, "consistency", steps)
    own = CONSISTENCY_SIGMAS[2]
    try:
        for level in args.mid_sigmas:
            # The sampler reads its levels from this table at each call: the sweep swaps the
            # 2-step entry, and puts it back whatever happens.
            CONSISTENCY_SIGMAS[2] = (level,)
            measure(f"tuned consistency:2@{level:g}", student, "consistency", 2)
    finally:
        CONSISTENCY_SIGMAS[2] = own
    for label in args.teacher_samplers:
        name, _, st = label.partition(":")
        measure(f"teacher {label}", teacher, name, int(st))

    if args.figure and grids:
        # One column per sampler, the same 16 seeds in each, 4x4.
        tiles = torch.stack([torch.from_numpy(make_grid(g[:16], nrow=4)).permute(2, 0, 1) for _, g in grids])
        save_png(make_grid(tiles, nrow=len(grids), padding=8), args.figure)
        results["figure"] = {"path": args.figure, "columns": [k for k, _ in grids]}
        save()

    base = results["samplers"].get("teacher dpm-solver:20", {}).get("fid")
    print(f"\nteacher {results['teacher']['steps']} steps in {teacher_s:.0f} s; tuning "
          f"{results['tuning']['steps']} steps in {results['tuning']['train_s']:.0f} s")
    print(f"{'sampler':<28} {'FID':>8} {'x teacher-20':>12} {'KID x1e-3':>10} {'ms/image':>9}")
    for key, e in results["samplers"].items():
        ratio = f"{e['fid'] / base:12.2f}" if base else f"{'':>12}"
        print(f"{key:<28} {e['fid']:8.2f} {ratio} {e['kid_mean'] * 1e3:10.1f} {e['s_per_image'] * 1e3:9.1f}")


if __name__ == "__main__":
    main()
