"""Quality over training: FID (and, for conditional runs, the linear probe's class accuracy of
guided samples) of a run's kept checkpoints, against the images seen, as JSON and a PNG.

Each point is ``ddpm eval --checkpoint CKPT`` (``ddpm.scoring.evaluate.evaluate_run``): the same
samples (per-image seeds), sampler and reference for every checkpoint, so the curve follows the
weights alone. FID from a few hundred samples is biased upward, the more so the fewer: compare
points of one curve, not its values with FIDs of other sample counts.

    python benchmarks/training_curve.py --run runs/cifar-cpu --ref ~/cifar10/test --n 300 \\
        --guidance 3 --checkpoints 4 --plot docs/img/curve.png --json runs/curve.json

``--checkpoints K`` scores K checkpoints spread evenly over those kept (the newest always
included); ``--final-n`` scores the newest with more samples as well (its FID printed beside).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm.run.checkpoint import list_checkpoints  # noqa: E402
from ddpm.errors import DDPMError  # noqa: E402
from ddpm.run.config import RunConfig  # noqa: E402
from ddpm.run.folder import RunFolder  # noqa: E402
from ddpm.runtime.policy import resolve_runtime  # noqa: E402
from ddpm.sample.spec import SampleSpec  # noqa: E402
from ddpm.scoring.evaluate import ReferenceSettings, evaluate_run, format_summary  # noqa: E402
from ddpm.files.atomic import atomic_write_json, atomic_write_with  # noqa: E402


def pick(paths: list[Path], k: int) -> list[Path]:
    """``k`` of ``paths`` (oldest first) spread evenly, the newest always among them."""
    if k >= len(paths):
        return list(paths)
    idx = sorted({round(i * (len(paths) - 1) / (k - 1)) for i in range(k)}) if k > 1 else [len(paths) - 1]
    return [paths[i] for i in idx]


def curve(run: str, ref: str, *, n: int, guidance: float, k: int, device: str, seed: int,
          batch_size: int) -> list[dict[str, Any]]:
    """One row per chosen checkpoint: step, images seen, FID, KID and class accuracy (or None)."""
    batch = int(RunConfig.read(RunFolder(run)).train["batch_size"])
    paths = list_checkpoints(run)
    if not paths:
        raise DDPMError(f"run folder {run!r} has no checkpoints")
    rows = []
    for path in pick(paths, k):
        t0 = time.perf_counter()
        r = evaluate_run(run, ref, n, SampleSpec(guidance=guidance, seed=seed, batch_size=batch_size),
                         resolve_runtime(device, progress=False), settings=ReferenceSettings(precision_recall=False),
                         checkpoint=path)
        acc = r.get("class_accuracy") or {}
        row = {"step": r["step"], "images_seen": r["step"] * batch, "checkpoint": str(path), "n": n,
               "fid": r["fid"], "kid": r.get("kid_mean"), "accuracy": acc.get("overall"),
               "per_class": acc.get("per_class"), "real_holdout": acc.get("real_holdout"),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        extra = f", class accuracy {row['accuracy']:.3f}" if row["accuracy"] is not None else ""
        print(f"step {row['step']:>7} ({row['images_seen'] / 1e3:.0f}k images): FID {row['fid']:.2f}{extra} "
              f"({row['seconds']:.0f} s)", flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: str, title: str, classes: list[str]) -> None:
    """FID against images seen, and (conditional runs) class accuracy of ``classes`` and of all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = [r["images_seen"] / 1e3 for r in rows]
    conditional = rows[0]["accuracy"] is not None
    fig, axes = plt.subplots(1, 2 if conditional else 1, figsize=(10 if conditional else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(seen, [r["fid"] for r in rows], "o-")
    ax.set_xlabel("images seen (thousands)")
    ax.set_ylabel(f"FID ({rows[0]['n']} samples)")
    ax.grid(alpha=0.3)
    if conditional:
        ax = axes[0][1]
        ax.plot(seen, [r["accuracy"] for r in rows], "o-", label="all classes")
        for name in classes:
            ax.plot(seen, [r["per_class"].get(name) for r in rows], "o--", label=name)
        if rows[-1]["real_holdout"] is not None:
            ax.axhline(rows[-1]["real_holdout"], color="grey", lw=1, ls=":", label="real test images")
        ax.set_xlabel("images seen (thousands)")
        ax.set_ylabel("linear-probe class accuracy")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run folder written by 'ddpm train'")
    p.add_argument("--ref", required=True, help="reference images, as for 'ddpm eval --ref'")
    p.add_argument("--n", type=int, default=300, help="samples per checkpoint")
    p.add_argument("--final-n", type=int, default=0, help="also score the newest checkpoint with this many samples")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance scale of conditional runs")
    p.add_argument("--checkpoints", type=int, default=4, help="how many kept checkpoints to score")
    p.add_argument("--classes", nargs="*", default=[], help="classes whose accuracy is drawn on their own")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100, help="images sampled at once")
    p.add_argument("--plot", required=True, metavar="FILE.png")
    p.add_argument("--json", metavar="FILE.json", default=None)
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    try:
        if args.n < 2 or args.checkpoints < 1:
            raise DDPMError(f"--n must be at least 2 and --checkpoints at least 1, got {args.n} and {args.checkpoints}")
        rows = curve(args.run, args.ref, n=args.n, guidance=args.guidance, k=args.checkpoints, device=args.device,
                     seed=args.seed, batch_size=args.batch_size)
        report: dict[str, Any] = {"run": args.run, "ref": args.ref, "guidance": args.guidance, "points": rows}
        if args.final_n:
            final = evaluate_run(args.run, args.ref, args.final_n,
                                 SampleSpec(guidance=args.guidance, seed=args.seed, batch_size=args.batch_size),
                                 resolve_runtime(args.device, progress=False),
                                 settings=ReferenceSettings(precision_recall=False))
            print(format_summary(final))
            report["final"] = final
        title = args.title or f"{args.run}: {args.n} samples per point" + (
            f", guidance {args.guidance:g}" if rows[0]["accuracy"] is not None else "")
        plot(rows, args.plot, title, args.classes)
        if args.json:
            atomic_write_json(args.json, report, sort_keys=False)
        print(f"wrote {args.plot}" + (f" and {args.json}" if args.json else ""))
    except DDPMError as e:
        print(f"training_curve.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
