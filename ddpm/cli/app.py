"""The ``ddpm`` command line: argument parsing and printing only; the work is in the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import DDPMError, StoppedEarly
from ..files.atomic import check_writable
from ..run.checkpoint import latest_checkpoint, load_run, run_info
from ..run.config import RunConfig
from ..run.folder import RunFolder
from ..runtime.processes import Dist, from_rank_0, lost_peer, process_group
from ..sample.engine import check_request, generate
from ..sample.pictures import (ChainRecorder, chain_frames, check_animate_every, check_interpolation_n,
                               check_sweep_scales, default_animate_every, guidance_sweep, interpolate, make_grid,
                               save_gif, save_png)
from .. import __version__
from ..interop.diffusers import EXPORT_META, export_diffusers, import_diffusers
from . import evaluate as evaluate_commands
from . import distill, prepare_data
from ..train import LEGACY_RECIPE, MACHINE_LOCAL, TrainConfig, config_from_dict, field_type, train
from .demo import run_demo
from .common import (EXIT_INTERRUPTED, EXIT_OK, EXIT_STOPPED, EXIT_USER_ERROR, PRECISION_HELP, Formatter,
                     add_sampling_arguments, command_runtime, sample_spec)

# Help for every training option; the flags themselves come from TrainConfig's fields so the
# two can never drift apart (a test checks that every field has help here).
TRAIN_HELP: dict[str, str] = {
    "data": "folder of images (nested or flat, any format PIL reads), a .zip of images, Parquet files, a file "
            "written by 'ddpm prepare-data', or 'cifar10'",
    "out": "run folder for config, checkpoints, logs and sample grids",
    "conditional": "class-conditional training from class sub-folders (root/<class>/*.jpg), for guidance",
    "image_size": "training resolution in pixels (unset: the model preset's)",
    "model": "UNet preset: ddpm-cifar10 (35.7M, the paper's), ddpm-64, small, tiny; 'imported' (set by "
             "'ddpm import') takes the architecture and schedule from the --resume run",
    "base_channels": "override the preset's base width (unset: keep it)",
    "dropout": "override the preset's dropout (unset: keep it)",
    "schedule": "noise schedule: linear (Ho et al. 2020), cosine (Nichol & Dhariwal 2021) or sigmoid (Jabri et al. 2022)",
    "logsnr_shift": "add this to every step's log-SNR (Hoogeboom et al. 2023); 2*ln(32/size) keeps a 32px "
                    "schedule's noisiness at a larger size, e.g. -1.39 at 64x64",
    "zero_terminal_snr": "rescale the schedule so its last step is pure noise (Lin et al. 2023; needs v or x0)",
    "loss_weighting": "weight of each noise level in the loss: uniform (Ho et al. 2020) or min-snr (Hang et al. 2023)",
    "min_snr_gamma": "gamma of --loss-weighting min-snr: the cap on the signal-to-noise ratio used as weight",
    "t_sampling": "how training noise levels are drawn: uniform over t (Ho et al. 2020) or lognormal, a normal "
                  "density over log-SNR (EDM's log-normal sigma, Karras et al. 2022)",
    "t_logsnr_mean": "mean log-SNR of --t-sampling lognormal (EDM: 2.4)",
    "t_logsnr_std": "standard deviation of the log-SNR of --t-sampling lognormal (EDM: 2.4)",
    "lr_schedule": "learning rate after warm-up: constant, or cosine / linear decay to 0 at --steps or at "
                   "--time-limit, whichever comes first",
    "ema_rampup": "EDM's EMA: half-life = this fraction of the images seen so far (0 = fixed --ema-decay)",
    "ema_halflife_kimg": "cap on the EMA half-life with --ema-rampup, in thousands of images",
    "timesteps": "number of diffusion steps T",
    "prediction": "network target: eps (Ho et al. 2020), v (Salimans & Ho 2022) or x0",
    "steps": "optimiser steps in all; a resumed run continues up to this",
    "batch_size": "GLOBAL batch size: summed over all processes and --grad-accum micro-batches",
    "grad_accum": "micro-batches per step on each process (gradient accumulation)",
    "lr": "AdamW learning rate (unset: the preset's measured rate at its measured batch, 1e-3 at 32 for tiny and "
          "small, 2e-4 at 128 for ddpm-cifar10 and ddpm-64, times sqrt(batch / that batch) for a smaller global "
          "batch; printed at start and saved in the run)",
    "warmup": "linear learning-rate warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the global gradient norm to this (0 = off)",
    "ema_decay": "EMA decay of the sampling weights (warm-up (1+n)/(10+n) included); unused with --ema-rampup",
    "p_uncond": "probability of replacing a label by the null class, per sample (guidance training)",
    "seed": "random seed: initialisation, data order, noise",
    "hflip": "random horizontal flips",
    "random_crop": "random instead of centre crops of non-square images",
    "strict": "stop at the first unreadable image instead of skipping it with a warning",
    "drop_empty_classes": "train without class folders none of whose images can be read (a warning names them); "
                          "without this flag such a folder is an error",
    "data_root": "where torchvision's CIFAR-10 lives or is downloaded to, for --data cifar10",
    "precision": PRECISION_HELP,
    "compile": "torch.compile the training network (unset: on for CUDA GPUs with Triton, off on CPUs; the compile "
               "time is reported apart from training time; a compile that fails falls back to eager with a warning)",
    "channels_last": "NHWC memory layout for convolutions",
    "grad_checkpoint": "activation checkpointing: less memory, about a third more compute",
    "device": "cpu, cuda or cuda:N; auto = cuda when available",
    "workers": "processes decoding images: the decoded-data cache's first build (unset: one per core) and sets "
               "decoded lazily (unset: up to 4)",
    "data_cache": "folder of the decoded-data cache: images are decoded once, on every core, into one file that "
                  "every later start, resume and torchrun process maps (unset: $DDPM_CACHE/data or "
                  "~/.cache/ddpm/data)",
    "no_data_cache": "decode the images into memory at every start instead (no cache file)",
    "log_every": "steps between log entries (CSV, TensorBoard, progress bar)",
    "sample_every": "steps between EMA sample grids in RUN/samples (0 = only at the end)",
    "save_every": "steps between checkpoints (0 = only at the end)",
    "keep": "how many recent checkpoints to keep",
    "sample_n": "images in each sample grid (conditional: split over the classes)",
    "sample_steps": "DPM-Solver++ steps for the sample grids",
    "sample_guidance": "guidance scale for conditional sample grids (and for the samples of --eval-every)",
    "eval_every": "steps between FID and KID evaluations of EMA samples, logged to metrics.csv, TensorBoard and "
                  "RUN/fid.png (0 = none); under torchrun rank 0 evaluates while the others wait",
    "eval_n": "samples per evaluation (DPM-Solver++, 20 steps, EMA weights). FID from few samples is biased "
              "upward; the log prints the floor, the FID of as many real images",
    "eval_ref": "reference of --eval-every: a folder of images, cifar10 (test split), cifar10:train, or a .npz "
                "of statistics; empty = the training images (statistics cached as for 'ddpm eval')",
    "time_limit": "stop after this many minutes of training, counted over all resumes of the run, saving a "
                  "checkpoint (0 = no limit); with a decaying --lr-schedule the rate reaches 0 then",
    "resume": "continue the run in --out from its newest checkpoint (bit-exact on CPU); where there is none "
              "yet, start the run, so a requeued job can repeat one command line",
    "progress": "show a progress bar",
    "tensorboard": "also log to TensorBoard (when installed)",
    "objective": "diffusion (denoising score matching, Ho et al. 2020) or consistency (ECT tuning, Geng et al. "
                 "2024; 'ddpm distill' sets it with the rest of a tuning run's options)",
    "init_from": "a checkpoint whose EMA weights a new run starts from (same model settings); 'ddpm distill' "
                 "sets it to the teacher's newest",
}


def _add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on a folder of images or CIFAR-10", formatter_class=Formatter,
        description="Train a DDPM. Single process: 'ddpm train ...'; several GPUs or processes: "
                    "'torchrun --nproc_per_node N -m ddpm train ...' (--batch-size stays the global batch).",
    )
    p.add_argument("--config", metavar="FILE.toml", help="read options from a TOML file (keys as the flags, "
                   "with - or _); flags on the command line win", default=None)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        helptext = TRAIN_HELP[f.name]
        kind = field_type(f.name)
        if kind is bool and f.name.startswith("no_"):  # already a negation: --no-data-cache, not --no-no-...
            p.add_argument(flag, action="store_true", default=f.default, help=helptext)
        elif kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=helptext)
        else:
            p.add_argument(flag, type=kind, default=f.default, help=helptext, required=False,
                           metavar=f.name.upper())
    p.set_defaults(func=_cmd_train)


def _load_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise DDPMError(f"config file {path!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise DDPMError(f"config file {path!r} is not valid TOML: {e}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    return EXIT_OK if train(TrainConfig(**values)).finished else EXIT_STOPPED


# ---------------------------------------------------------------------------------- sample
def _add_sample_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="sample an image grid from a trained run", formatter_class=Formatter)
    p.add_argument("--run", required=True, help="run folder written by 'ddpm train'")
    p.add_argument("--n", type=int, default=None,
                   help=f"number of images (default {DEFAULT_N['grid']}; per class when --class is given); with "
                        f"--guidance-sweep rows per class (default {DEFAULT_N['sweep']}); with --interpolate images in "
                        f"the row, ends included (default {DEFAULT_N['interpolate']})")
    p.add_argument("--out", required=True, help="grid PNG to write")
    p.add_argument("--class", dest="classes", nargs="+", default=None, metavar="NAME",
                   help="class names (or indices) to sample, one grid row each; conditional runs only")
    add_sampling_arguments(p, guidance=3.0)
    p.add_argument("--individual", metavar="DIR", default=None, help="also write each image as DIR/NNNNN.png")
    p.add_argument("--nrow", type=int, default=0, help="images per grid row (0 = square, or --n with --class)")
    p.add_argument("--animate", metavar="OUT.gif", default=None,
                   help="also write the sampling chain as an animated GIF: one tile per image, x_t on the left and "
                        "the model's prediction of x0 on the right")
    p.add_argument("--animate-every", type=int, default=None, metavar="K",
                   help="a GIF frame every K sampler steps, and one at the last (default: steps / 50 rounded up, so "
                        "20 dpm-solver steps give 20 frames and 1000 ancestral steps 50)")
    p.add_argument("--guidance-sweep", type=float, nargs="+", default=None, metavar="S",
                   help="write --out as one grid: a row per class (those of --class, or all), a column per guidance "
                        "scale S, each row from one starting noise; conditional runs only; replaces --guidance")
    p.add_argument("--interpolate", action="store_true",
                   help="write --out as one row of --n images along a spherical interpolation (slerp) between the "
                        "starting noises of --seed and --seed + 1, ends included; with a deterministic sampler "
                        "(dpm-solver, ddim --eta 0) the ends are the images 'ddpm sample --n 1' gives for those seeds")
    p.set_defaults(func=_cmd_sample)


# --n when it is not given, by what --out holds: a plain grid, a guidance sweep (rows per class),
# an interpolation (images in the row).
DEFAULT_N = {"grid": 16, "sweep": 1, "interpolate": 8}


def _cmd_sample(args: argparse.Namespace) -> int:
    # Under torchrun each process draws its block of image indices and rank 0 writes them all.
    with process_group(args.device, meet_at_exit=False) as d:
        return _sample(args, d)


def _sample(args: argparse.Namespace, d: Dist) -> int:
    mode = _check_sample_args(args, d)
    n_arg = DEFAULT_N[mode] if args.n is None else args.n
    spec = sample_spec(args)
    runtime = command_runtime(args, d)
    # Every rank samples rank 0's newest checkpoint, even if a training run writes a newer one meanwhile.
    run = load_run(args.run, runtime.device,
                   checkpoint=from_rank_0(latest_checkpoint(args.run), d) if d.world > 1 else None)
    if args.sampler is None:  # the run's own: the consistency sampler for a distilled run
        spec = spec.with_(sampler=run.config.default_sampler)
    spec = spec.for_run(run.schedule.T)
    idx = [run.class_index(c) for c in args.classes] if args.classes else []
    # before any tensor of n labels exists: an --n that cannot fit is one line, not an allocation failure
    check_request(run, n_arg * max(1, len(idx)) * (len(args.guidance_sweep) if mode == "sweep" else 1), spec.seed)
    recorder = ChainRecorder(args.animate_every or default_animate_every(spec.steps), spec.steps) if args.animate else None
    done = (f"{spec.sampler}, step {run.step}{', EMA' if spec.use_ema else ''}, {runtime.describe()}"
            + (f", {d.world} processes" if d.world > 1 else ""))
    if mode == "sweep":
        rows = idx or list(range(len(run.classes or [])))  # guidance_sweep refuses an unconditional run
        labels = torch.tensor(rows).repeat_interleave(n_arg)
        images = guidance_sweep(run, args.guidance_sweep, labels, spec, runtime)
        nrow = len(args.guidance_sweep)
        what = (f"{len(labels)} rows ({', '.join(run.classes[i] for i in rows)}"
                + (f", {n_arg} each" if n_arg > 1 else "") + f") x guidance {', '.join(f'{g:g}' for g in args.guidance_sweep)}")
    elif mode == "interpolate":
        images = interpolate(run, n_arg, spec, runtime, labels=torch.tensor(idx * n_arg) if idx else None,
                             callback=recorder)
        nrow = n_arg
        what = (f"{n_arg} images along a slerp from the noise of seed {spec.seed} to seed {spec.seed + 1}"
                + (f", {run.classes[idx[0]]}" if idx else ""))
    else:
        labels = torch.tensor(idx).repeat_interleave(n_arg) if idx else None
        nrow = args.nrow or (n_arg if idx else max(1, int(math.ceil(math.sqrt(n_arg)))))
        images = generate(run, n_arg * max(1, len(idx)), spec, runtime, d, labels=labels, callback=recorder)
        if images is None:  # a rank other than 0: its images went to rank 0, which writes
            return 0
        # The run's own names (an index or raw bytes on the command line name the same class).
        what = f"{len(images)} images" + (f" of {', '.join(run.classes[i] for i in idx)}" if idx else "")
    _write_samples(args, images, nrow, f"wrote {args.out} ({what}, {done})")
    if recorder is not None:
        frames = chain_frames(recorder.chain(images), nrow=nrow)
        save_gif(frames, args.animate)
        print(f"wrote {args.animate} ({len(frames)} frames, one every {recorder.every} of {spec.steps} steps; "
              "each tile: x_t | predicted x0)")
    return 0


def _check_sample_args(args: argparse.Namespace, d: Dist) -> str:
    """Every option of ``ddpm sample`` that can be checked before the run is loaded; returns what
    --out holds: ``grid``, ``sweep`` or ``interpolate``."""
    if args.guidance_sweep is not None and args.interpolate:
        raise DDPMError("--guidance-sweep and --interpolate each make their own --out grid; choose one")
    mode = "sweep" if args.guidance_sweep is not None else ("interpolate" if args.interpolate else "grid")
    n_arg = DEFAULT_N[mode] if args.n is None else args.n
    if n_arg < 1:
        raise DDPMError(f"--n must be at least 1, got {n_arg}")
    if mode == "interpolate":
        check_interpolation_n(n_arg)
    if mode == "interpolate" and args.classes and len(args.classes) > 1:
        raise DDPMError(f"--interpolate draws one row of one class; got {len(args.classes)} --class names")
    if mode == "sweep":
        check_sweep_scales(args.guidance_sweep)
    if mode != "grid" and args.nrow:
        raise DDPMError(f"--nrow does not apply to --{'guidance-sweep' if mode == 'sweep' else 'interpolate'}, "
                        "whose layout is fixed")
    if args.animate is not None and mode == "sweep":
        raise DDPMError("--animate records one sampling chain and --guidance-sweep runs one per scale; use one of them")
    if args.animate is None and args.animate_every is not None:
        raise DDPMError("--animate-every sets the frames of --animate OUT.gif, which is not given")
    if args.animate_every is not None:
        check_animate_every(args.animate_every)
    sample_spec(args)  # sampler options (steps, seed, batch size, guidance, eta) fail here, before any work
    _check_sample_outputs(args)
    if d.world > 1 and (mode != "grid" or args.animate is not None):
        what = "--animate" if args.animate is not None else f"--{'guidance-sweep' if mode == 'sweep' else 'interpolate'}"
        raise DDPMError(f"{what} runs in one process; under torchrun 'ddpm sample' splits plain grids and "
                        "--individual images over the processes")
    return mode


def _check_sample_outputs(args: argparse.Namespace) -> None:
    if not args.out.lower().endswith(".png"):
        raise DDPMError(f"--out {args.out!r} must be a .png file")
    if args.animate is not None and not args.animate.lower().endswith(".gif"):
        raise DDPMError(f"--animate {args.animate!r} must be a .gif file")
    if args.nrow < 0:
        raise DDPMError(f"--nrow must be >= 0, got {args.nrow}")
    check_writable(args.out, "--out", is_file=True)
    if args.animate is not None:
        check_writable(args.animate, "--animate", is_file=True)
    if args.individual:
        check_writable(args.individual, "--individual")


def _write_samples(args: argparse.Namespace, images: torch.Tensor, nrow: int, line: str) -> None:
    save_png(make_grid(images, nrow=nrow), args.out)
    if args.individual:
        out_dir = Path(args.individual)
        for i, img in enumerate(images):
            save_png(img.permute(1, 2, 0).numpy(), out_dir / f"{i:05d}.png")
    print(line)


# ------------------------------------------------------------------------------------ info
def _add_info_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a run: step, config, classes, weight hashes", formatter_class=Formatter)
    p.add_argument("run", help="run folder written by 'ddpm train'")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    info = run_info(args.run)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    cfg = info["config"]
    print(f"run:        {info['run']}")
    print(f"checkpoint: {info['checkpoint']}")
    print(f"step:       {info['step']}")
    print(f"model:      {cfg['train'].get('model')} ({info['params'] / 1e6:.2f}M parameters, "
          f"{info['image_size']}x{info['image_size']}, predicts {info['prediction']})")
    print(f"schedule:   {info['schedule']}")
    print(f"classes:    {', '.join(info['classes']) if info['classes'] else '(unconditional)'}")
    if cfg["train"].get("objective") == "consistency":
        print(f"consistency model (ddpm distill), tuned from {cfg['train'].get('init_from')}; samples with "
              "--sampler consistency by default")
    print(f"model sha256: {info['model_sha256']}")
    print(f"ema sha256:   {info['ema_sha256']}")
    return 0


# ------------------------------------------------------------------------------------ demo
def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train a small class-conditional model on handwritten digits, then sample",
                       formatter_class=Formatter)
    p.add_argument("--out", default="runs/demo", help="run folder (the digit images are unpacked to OUT/digits)")
    p.add_argument("--steps", type=int, default=800, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto = cuda when available")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, steps=args.steps, seed=args.seed, device=args.device)
    return 0


# ---------------------------------------------------------------------------- export / import
def _add_interop_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run as a diffusers DDPMPipeline folder (UNet2DModel + DDPMScheduler)",
        formatter_class=Formatter,
        description="Write RUN's newest checkpoint as DIR/unet (UNet2DModel, safetensors), DIR/scheduler "
                    "(DDPMScheduler with the run's betas and prediction type) and DIR/model_index.json, so that "
                    "diffusers' DDPMPipeline.from_pretrained(DIR) loads it offline.\nClass-conditional runs get "
                    "num_class_embeds = classes + 1 (the last is the null class); DDPMPipeline cannot pass labels, "
                    "so call the UNet with class_labels yourself.")
    p.add_argument("run", help="run folder written by 'ddpm train' or 'ddpm import'")
    p.add_argument("out", metavar="DIR", help="folder to create (must not exist, or be empty)")
    p.add_argument("--format", default="diffusers", choices=["diffusers"], help="output format")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "import", help="make a run folder from a diffusers UNet2DModel folder in the DDPM architecture",
        formatter_class=Formatter,
        description="Read a diffusers UNet2DModel (the original DDPM layout, e.g. a local copy of "
                    "google/ddpm-cifar10-32) and its scheduler config, and write a run folder that 'ddpm sample', "
                    "'ddpm info', 'ddpm eval' and 'ddpm train --resume' accept.\nOnly safetensors weights are read; "
                    "a .bin pickle is refused with the command that converts it.")
    p.add_argument("src", metavar="DIR", help="a DDPMPipeline folder (DIR/unet, DIR/scheduler) or a UNet2DModel folder "
                                              "(config.json + diffusion_pytorch_model.safetensors)")
    p.add_argument("--out", required=True, help="run folder to create (must not exist, or be empty)")
    p.add_argument("--scheduler", metavar="FILE", default=None,
                   help="scheduler_config.json to use; unset: the one in DIR/scheduler/ or beside the UNet")
    p.set_defaults(func=_cmd_import)


def _cmd_export(args: argparse.Namespace) -> int:
    out = export_diffusers(args.run, args.out, use_ema=not args.no_ema)
    meta = json.loads((out / EXPORT_META).read_text())
    print(f"wrote {out} (UNet2DModel with the {'EMA' if meta['weights'] == 'ema' else 'raw'} weights of step "
          f"{meta['step']}, DDPMScheduler predicting {meta['prediction']}); load it with "
          f"diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
    if meta.get("classes"):
        n = len(meta["classes"])
        print(f"class-conditional: call the UNet with class_labels 0..{n - 1} ({n} = unconditional); "
              "DDPMPipeline passes no labels")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    out = import_diffusers(args.src, args.out, scheduler=args.scheduler)
    cfg = RunConfig.read(RunFolder(out))
    size, kind = cfg.image_size, cfg.schedule.to_dict()["kind"]
    classes = f", {len(cfg.classes)} classes" if cfg.classes else ""
    print(f"wrote run {out} ({size}x{size}, predicts {cfg.prediction}, {kind} schedule{classes}); "
          f"sample with: ddpm sample --run {out} --out grid.png")
    return 0


# ------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    """The full ``ddpm`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ddpm", formatter_class=Formatter,
        description="Denoising diffusion probabilistic models: train on image folders, sample, evaluate.")
    parser.add_argument("--version", action="version", version=f"ddpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(sub)
    _add_sample_parser(sub)
    _add_info_parser(sub)
    _add_demo_parser(sub)
    _add_interop_parsers(sub)
    evaluate_commands.register(sub)
    prepare_data.register(sub)
    distill.register(sub)
    return parser


def _train_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Defaults for ``ddpm train`` from, in rising priority: the built-in defaults, the run's own
    config.json (with --resume, so ``ddpm train --out RUN --resume --steps N`` is enough), a
    --config TOML file; flags given on the command line win over all of them."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--out")
    pre.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False)
    known, _ = pre.parse_known_args(argv)
    defaults: dict[str, Any] = {}
    if known.resume and known.out and RunFolder(known.out).config_path.is_file():
        saved = RunConfig.read(RunFolder(known.out)).train
        # A run saved before an option existed was trained as the option's legacy value says.
        defaults.update({k: v for k, v in LEGACY_RECIPE.items() if k not in saved})
        # Where this machine keeps its data cache and how many cores decode are its own choice:
        # a run started with --no-data-cache on one machine resumes with the cache on another.
        defaults.update({k: v for k, v in saved.items() if k not in ("resume", "out", *MACHINE_LOCAL)})
    if known.config:
        defaults.update({k.replace("-", "_"): v for k, v in _load_toml(known.config).items()})
    if defaults:
        config_from_dict(defaults)  # unknown keys and wrong types are errors, not silently ignored
        train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
        train_parser.set_defaults(**defaults)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> str:
    return f"warning: {message}\n"


def _escape_unprintable_output() -> None:
    # A path or name the terminal's encoding cannot show (a non-UTF-8 folder name, a strict
    # PYTHONIOENCODING) is printed with backslash escapes instead of ending the command.
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        except (AttributeError, ValueError):  # replaced streams (pytest's capture) keep their own
            pass


class _QuietWhenReaderLeaves:
    """Standard output that stops printing, quietly, once its reader has gone (``ddpm info RUN |
    head -1``), as Unix tools do, instead of a BrokenPipeError traceback; the command's work goes
    on and its exit status says how that went. Everything else is the wrapped stream's."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.gone = stream, False

    def _leave(self) -> None:
        # The reader is gone: later writes, and the interpreter's last flush, go nowhere.
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # a stream without a file (pytest's capture)
            pass

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self.stream.write(text)
            except BrokenPipeError:
                self._leave()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self._leave()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ddpm`` and ``python -m ddpm``; returns the exit status."""
    warnings.formatwarning = _one_line_warning
    _escape_unprintable_output()
    out = _QuietWhenReaderLeaves(sys.stdout)
    sys.stdout = out
    try:
        code = _main(argv)
    finally:
        out.flush()
        sys.stdout = out.stream
    if argv is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun process whose work is done and whose group is destroyed ends here, skipping
        # the interpreter's teardown: there, a gloo transport thread still winding down could
        # abort the process ("terminate called without an active exception", exit -6) after
        # every file and line was written, seen under load in about one torchrun run in ten.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        # `torchrun ... -m ddpm -- sample --run R --n 8`: torchrun's own parser stops reading at
        # "--" and passes it on. Without it, it takes --run and --n for ambiguous abbreviations of
        # its own options (--run-path, --nnodes, ...) and refuses the line.
        argv = argv[1:]
    parser = build_parser()
    try:
        if argv[:1] == ["train"]:
            _train_defaults(parser, argv[1:])
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except DDPMError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except StoppedEarly:  # the command said why and how to continue
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        # Under torchrun, a collective that fails because another process ended is not a bug of
        # this one (training says more, naming its checkpoint: ddpm.train.loop).
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and lost_peer(e):
            print(f"error: rank {os.environ.get('RANK', '?')}: lost contact with another process of this command "
                  "(it ended or was killed); run the command again", file=sys.stderr)
            return EXIT_STOPPED
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
