"""The options of a training run: :class:`TrainConfig`, what each means, which values are allowed,
which may change when a run is resumed, and the learning rate they give each step.

Everything here reads a config; nothing builds a model or touches a run folder, so the command
line, TOML files, saved runs and the trainer all check options the same way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..core.losses import PREDICTIONS, T_SAMPLINGS, WEIGHTINGS
from ..core.samplers import CONSISTENCY_SIGMAS, MAX_SEED
from ..core.schedule import SCHEDULES
from ..core.unet import PRESETS
from ..data.sets import names_cifar10
from ..errors import DDPMError
from ..scoring import evaluate

__all__ = ["TrainConfig", "LR_SCHEDULES", "IMPORTED", "GRID_SEED_OFFSET", "LEGACY_RECIPE", "RESUMABLE", "MACHINE_LOCAL", "LR_REFERENCE", "default_lr", "OBJECTIVES", "run_progress",
           "OPTIONAL_FIELDS", "legacy_keep_values", "validate", "eval_reference", "check_resume_compatible",
           "lr_at", "field_type", "config_from_dict"]

LR_SCHEDULES = ("constant", "cosine", "linear")
# TrainConfig.model of a run written by 'ddpm import': no preset names its architecture, so the
# network and the schedule are the ones in the run's config.json.
IMPORTED = "imported"
# The sample grids' images are seeded --seed + this (ddpm.core.samplers.image_seed), apart from the
# in-training FID's, which are those of `ddpm eval --seed SEED` so that its curve can be checked.
GRID_SEED_OFFSET = 12345


@dataclass
class TrainConfig:
    """Every option of a training run; the command line's flags are exactly these fields."""

    data: str = ""  # folder of images, or "cifar10"
    out: str = "runs/ddpm"  # run folder: config, checkpoints, logs, grids
    conditional: bool = False  # class-conditional from class sub-folders (classifier-free guidance)
    image_size: int | None = None  # training resolution in pixels; None = the model preset's
    model: str = "ddpm-cifar10"  # UNet preset (see ddpm.PRESETS)
    base_channels: int | None = None  # override the preset's width; None = keep it
    dropout: float | None = None  # override the preset's dropout; None = keep it
    schedule: str = "sigmoid"  # linear (DDPM), cosine (improved DDPM) or sigmoid (Jabri et al. 2022)
    logsnr_shift: float = 0.0  # add this to every step's log-SNR (simple diffusion); negative = noisier
    zero_terminal_snr: bool = False  # rescale the schedule so its last step is pure noise (v or x0 only)
    timesteps: int = 1000  # T, the number of diffusion steps
    prediction: str = "v"  # network target: eps (the paper), v or x0
    loss_weighting: str = "uniform"  # uniform (the paper) or min-snr (Hang et al. 2023)
    min_snr_gamma: float = 5.0  # gamma of min-snr
    t_sampling: str = "lognormal"  # training noise levels: uniform over t, or lognormal over log-SNR
    t_logsnr_mean: float = 2.4  # mean of the lognormal density's log-SNR
    t_logsnr_std: float = 2.4  # its standard deviation
    steps: int = 100_000  # optimiser steps in all (a resumed run continues up to this)
    batch_size: int = 64  # global batch size: summed over all processes and accumulation steps
    grad_accum: int = 1  # split each process's batch into this many micro-batches
    lr: float | None = None  # AdamW learning rate; None = default_lr(model, batch_size), printed and saved
    warmup: int = 100  # linear learning-rate warm-up steps (the paper used 5000)
    lr_schedule: str = "cosine"  # after warm-up: constant, or cosine / linear decay to 0 at the run's end
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)
    ema_decay: float = 0.9999  # EMA decay (with warm-up (1+n)/(10+n)); used when ema_rampup is 0
    ema_rampup: float = 0.05  # > 0: EDM's EMA, half-life = this fraction of the images seen so far...
    ema_halflife_kimg: float = 500.0  # ...capped at this many thousand images
    p_uncond: float = 0.1  # probability of dropping a label to the null class, per sample
    seed: int = 0  # seeds data order, noise and initialisation
    hflip: bool = True  # random horizontal flips
    random_crop: bool = False  # random instead of centre crops of non-square images
    strict: bool = False  # stop at the first unreadable image instead of skipping it
    drop_empty_classes: bool = False  # leave out class folders with no readable image (else an error)
    data_root: str = ""  # where torchvision's CIFAR-10 copy lives (for --data cifar10)
    precision: str = "auto"  # fp32 or bf16 (autocast); auto = bf16 where the device runs it well
    compile: bool | None = None  # torch.compile the network; None = on for CUDA with Triton, off on CPUs
    channels_last: bool = True  # NHWC memory layout for convolutions
    grad_checkpoint: bool = False  # recompute activations in the backward pass to save memory
    device: str = "auto"  # cpu, cuda, cuda:N; auto = cuda if available
    workers: int | None = None  # processes decoding images (the cache build, lazy sets); None = auto
    data_cache: str = ""  # folder of the decoded-data cache; "" = $DDPM_CACHE/data
    no_data_cache: bool = False  # decode into memory at every start instead of mapping the cache
    log_every: int = 50  # steps between log lines / CSV rows
    sample_every: int = 2000  # steps between EMA sample grids (0 = only at the end)
    save_every: int = 2000  # steps between checkpoints (0 = only at the end)
    keep: int = 3  # checkpoints to keep
    sample_n: int = 64  # images in each sample grid (per class: sample_n // classes, at least 1)
    sample_steps: int = 25  # DPM-Solver++ steps for the sample grids
    sample_guidance: float = 3.0  # guidance scale for conditional sample grids
    # FID during training. Runs saved before these options existed resume with the defaults,
    # which mean what those runs did (no evaluation), so they need no LEGACY_RECIPE entry.
    eval_every: int = 0  # steps between FID/KID evaluations of EMA samples (0 = none)
    eval_n: int = 500  # samples per evaluation: few enough for a CPU, so FID is biased upward (see the floor)
    eval_ref: str = ""  # their reference: a folder, cifar10 or a .npz; "" = the training images
    time_limit: float = 0.0  # stop (and save) after this many minutes of training in all, resumes included; 0 = none
    resume: bool = False  # continue from the newest checkpoint in --out
    # diffusion (denoising score matching) or consistency (ECT tuning: ddpm distill sets it)
    objective: str = "diffusion"
    init_from: str = ""  # a checkpoint whose EMA weights a new run starts from (ddpm distill: the teacher's)
    progress: bool = True  # show a progress bar
    tensorboard: bool = True  # also log to TensorBoard when it is installed

    def __post_init__(self) -> None:
        # Runs and TOML files written before None meant "keep the preset's value" said it with
        # 0 (image_size, base_channels) or a negative number (dropout, workers): they still do.
        for name, value in legacy_keep_values(asdict(self)).items():
            setattr(self, name, value)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of all options."""
        return [f.name for f in fields(cls)]


# What the recipe options meant before they existed: a run saved without one of these keys was
# trained this way, and resumes and samples this way whatever today's defaults are.
# (prediction, schedule and warmup predate them and were always saved.)
LEGACY_RECIPE: dict[str, Any] = {
    "logsnr_shift": 0.0, "zero_terminal_snr": False, "loss_weighting": "uniform", "min_snr_gamma": 5.0,
    "t_sampling": "uniform", "t_logsnr_mean": 2.4, "t_logsnr_std": 2.4, "lr_schedule": "constant",
    "ema_rampup": 0.0, "ema_halflife_kimg": 500.0, "objective": "diffusion", "init_from": "",
}

OBJECTIVES = ("diffusion", "consistency")


def legacy_keep_values(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (TrainConfig fields, e.g. a saved run's ``train`` options) with the old spellings
    of "keep the preset's value" (``image_size`` or ``base_channels`` 0, a negative ``dropout`` or
    ``workers``) as None, the one spelling since 2026-12-05; other entries unchanged."""
    out = dict(values)
    for name, old in (("image_size", lambda v: v == 0), ("base_channels", lambda v: v == 0),
                      ("dropout", lambda v: v < 0), ("workers", lambda v: v < 0)):
        v = out.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and old(v):
            out[name] = None
    return out


def validate(cfg: TrainConfig, world: int) -> None:
    """Check ``cfg`` before anything is loaded or written, for a run of ``world`` processes.

    Raises :class:`DDPMError` naming the first bad option: an unknown choice, a number out of its
    range or not finite, a global batch that does not split over ``world`` x ``--grad-accum``;
    with ``--eval-every``, an unusable ``--eval-ref`` or missing Inception weights.
    """
    if not cfg.data:
        raise DDPMError("no training data given; pass --data PATH (a folder of images) or --data cifar10")
    if cfg.model == IMPORTED and not cfg.resume:
        raise DDPMError(f"--model {IMPORTED} continues a run written by 'ddpm import'; pass --resume and that run as --out")
    if cfg.model not in PRESETS and cfg.model != IMPORTED:
        raise DDPMError(f"unknown model preset {cfg.model!r}; expected one of {', '.join(PRESETS)}")
    choices = [("prediction", PREDICTIONS), ("schedule", SCHEDULES), ("loss_weighting", WEIGHTINGS),
               ("t_sampling", T_SAMPLINGS), ("lr_schedule", LR_SCHEDULES)]
    for name, allowed in choices:
        if name == "schedule" and cfg.model == IMPORTED:
            continue  # an imported run's schedule is its own, not one of the named ones
        if getattr(cfg, name) not in allowed:
            raise DDPMError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}; expected one of {', '.join(allowed)}")
    if cfg.objective not in OBJECTIVES:
        raise DDPMError(f"unknown --objective {cfg.objective!r}; expected one of {', '.join(OBJECTIVES)}")
    # Read only when a run begins: a resumed run no longer needs its teacher's file.
    if cfg.init_from and not cfg.resume and not Path(cfg.init_from).expanduser().is_file():
        raise DDPMError(f"--init-from {cfg.init_from!r} is not a checkpoint file; expected RUN/checkpoints/ckpt_*.safetensors")
    if cfg.zero_terminal_snr and cfg.prediction == "eps":
        raise DDPMError("--zero-terminal-snr needs --prediction v or x0 (eps carries no information at zero SNR)")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise DDPMError(f"unknown precision {cfg.precision!r}; expected auto, fp32 or bf16")
    numbers = {"lr": cfg.lr, "weight-decay": cfg.weight_decay, "grad-clip": cfg.grad_clip, "ema-decay": cfg.ema_decay,
               "p-uncond": cfg.p_uncond, "sample-guidance": cfg.sample_guidance, "time-limit": cfg.time_limit,
               "logsnr-shift": cfg.logsnr_shift, "min-snr-gamma": cfg.min_snr_gamma, "t-logsnr-mean": cfg.t_logsnr_mean,
               "t-logsnr-std": cfg.t_logsnr_std, "ema-rampup": cfg.ema_rampup, "ema-halflife-kimg": cfg.ema_halflife_kimg}
    for name, value in numbers.items():
        if value is not None and not math.isfinite(value):
            raise DDPMError(f"--{name} must be a finite number, got {value}")
    # Each check runs only when those before it passed: a later check may use an earlier value
    # (the batch split divides by --grad-accum), which must not fail in any other way first.
    checks = [
        (lambda: 1 <= cfg.sample_steps <= cfg.timesteps,
         f"--sample-steps must be between 1 and --timesteps ({cfg.timesteps}), got {cfg.sample_steps}"),
        (lambda: cfg.objective != "consistency" or cfg.sample_steps <= max(CONSISTENCY_SIGMAS),
         f"--sample-steps of a consistency run must be 1 to {max(CONSISTENCY_SIGMAS)}, got {cfg.sample_steps}"),
        (lambda: cfg.sample_n >= 1, f"--sample-n must be at least 1, got {cfg.sample_n}"),
        (lambda: cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        # the grids sample with seed + GRID_SEED_OFFSET, which generate() takes up to MAX_SEED
        (lambda: 0 <= cfg.seed <= MAX_SEED - GRID_SEED_OFFSET,
         f"--seed must be from 0 to {MAX_SEED - GRID_SEED_OFFSET}, got {cfg.seed}"),
        (lambda: cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (lambda: cfg.grad_accum >= 1, f"--grad-accum must be at least 1, got {cfg.grad_accum}"),
        (lambda: cfg.lr is None or cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (lambda: cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (lambda: 0.0 <= cfg.ema_decay <= 1.0, f"--ema-decay must be in [0, 1], got {cfg.ema_decay}"),
        (lambda: 0.0 <= cfg.ema_rampup <= 1.0, f"--ema-rampup must be in [0, 1], got {cfg.ema_rampup}"),
        (lambda: cfg.ema_halflife_kimg > 0, f"--ema-halflife-kimg must be positive, got {cfg.ema_halflife_kimg}"),
        (lambda: cfg.min_snr_gamma > 0, f"--min-snr-gamma must be positive, got {cfg.min_snr_gamma}"),
        (lambda: cfg.t_logsnr_std > 0, f"--t-logsnr-std must be positive, got {cfg.t_logsnr_std}"),
        (lambda: 0.0 <= cfg.p_uncond < 1.0, f"--p-uncond must be in [0, 1), got {cfg.p_uncond}"),
        (lambda: cfg.timesteps >= 2, f"--timesteps must be at least 2, got {cfg.timesteps}"),
        (lambda: cfg.image_size is None or cfg.image_size > 0, f"--image-size must be positive, got {cfg.image_size}"),
        (lambda: cfg.keep >= 1, f"--keep must be at least 1, got {cfg.keep}"),
        (lambda: cfg.time_limit >= 0, f"--time-limit must be >= 0 minutes, got {cfg.time_limit}"),
        (lambda: cfg.log_every >= 1, f"--log-every must be at least 1, got {cfg.log_every}"),
        (lambda: cfg.sample_every >= 0 and cfg.save_every >= 0, "--sample-every and --save-every must be >= 0"),
        (lambda: cfg.eval_every >= 0, f"--eval-every must be >= 0 steps (0 = no evaluation), got {cfg.eval_every}"),
        (lambda: cfg.eval_n >= 2, f"--eval-n must be at least 2 for FID statistics, got {cfg.eval_n}"),
        (lambda: cfg.batch_size % (world * cfg.grad_accum) == 0,
         f"--batch-size {cfg.batch_size} (global) must be divisible by processes x --grad-accum = "
         f"{world} x {cfg.grad_accum}"),
    ]
    for ok, msg in checks:
        if not ok():
            raise DDPMError(msg)
    if cfg.eval_every > 0:
        evaluate.check_reference(eval_reference(cfg), "--eval-ref")
        evaluate.FeatureExtractor(None, "cpu")  # the Inception weights: missing ones are an error now, not at the first evaluation


def eval_reference(cfg: TrainConfig) -> str:
    """The reference set of --eval-every's FID: --eval-ref, else the training images themselves
    (torchvision's CIFAR-10 training split for --data cifar10)."""
    if cfg.eval_ref:
        return cfg.eval_ref
    return "cifar10:train" if names_cifar10(cfg.data) else cfg.data


# Options that may change when resuming (they don't alter what was learned so far).
RESUMABLE = frozenset({"steps", "out", "resume", "progress", "log_every", "sample_every", "save_every", "keep", "sample_n",
              "sample_steps", "sample_guidance", "device", "workers", "tensorboard", "compile", "strict", "time_limit",
              "data_cache", "no_data_cache",
              # Checked on its own: the identity of the images (RunConfig.data), not the path's spelling.
              "data",
              "eval_every", "eval_n", "eval_ref",
              # Read once, when a run begins: where its starting weights came from.
              "init_from",
              # The class list it produces is compared on its own when resuming.
              "drop_empty_classes",
              # These change how a step is computed, not what it optimises. grad_checkpoint keeps a
              # resume bit-exact; grad_accum (the random draws are split over micro-batches) and
              # channels_last (other kernels) continue the same run, but not bit-identically.
              "grad_accum", "grad_checkpoint", "channels_last"})


# The learning rate each preset was measured at, with the global batch of that measurement:
# tiny and small by the recipe ablation of docs/benchmarks.md (the winner: lr 1e-3 at batch 32,
# FID 0.64x lucidrains' after 20 CPU-minutes), ddpm-cifar10 by Ho et al. 2020 (2e-4 at batch 128,
# FID 3.17), ddpm-64 by the H200 headline runs (2e-4 at batch 128).
LR_REFERENCE: dict[str, tuple[float, int]] = {"tiny": (1e-3, 32), "small": (1e-3, 32), "ddpm-cifar10": (2e-4, 128),
                                             "ddpm-64": (2e-4, 128)}


def default_lr(model: str, batch_size: int) -> float:
    """The learning rate ``ddpm train`` uses when ``--lr`` is not given: the preset's measured
    rate (:data:`LR_REFERENCE`) at its measured global batch, scaled by ``sqrt(batch /
    reference batch)`` for a smaller global batch (Adam's square-root rule: Malladi et al. 2022,
    "On the SDEs and scaling rules for adaptive gradient algorithms"), and never raised above the
    measured rate for a larger one (nothing here measured it higher). An imported network, or a
    preset without a reference, takes ddpm-cifar10's. ``batch_size`` is the global batch in images."""
    lr, reference_batch = LR_REFERENCE.get(model, LR_REFERENCE["ddpm-cifar10"])
    return lr * min(1.0, math.sqrt(batch_size / reference_batch))


# Options of the machine a command runs on, not of the run: a resume takes them from its own
# command line (or their defaults), never from the run's config.json.
MACHINE_LOCAL = ("data_cache", "no_data_cache", "workers")


def check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig) -> None:
    """Check that ``cfg`` continues the run whose saved training options are ``saved`` (the
    ``train`` of its :class:`~ddpm.run.config.RunConfig`): every option outside :data:`RESUMABLE`
    as it was saved. Raises :class:`DDPMError` listing the changed ones."""
    # A run saved before a recipe option existed was trained with the option's legacy value.
    old = legacy_keep_values({**LEGACY_RECIPE, **saved})
    changed = [k for k, v in asdict(cfg).items() if k not in RESUMABLE and k in old and old[k] != v]
    if changed:
        desc = ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise DDPMError(f"cannot resume with changed settings ({desc}); use the original values or a new --out")


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Learning rate of optimiser step ``step`` (0-based) after ``elapsed_s`` seconds of training.

    A linear warm-up over ``cfg.warmup`` steps (the DDPM paper), times a decay after it:
    ``constant`` (the paper), ``cosine`` (Loshchilov & Hutter 2017) or ``linear``, both reaching
    0 at the end of the run. The end is ``cfg.steps``, or ``cfg.time_limit`` minutes when that
    comes first: progress is ``max(step / steps, elapsed / time_limit)``, so a run bounded by
    wall-clock time anneals to 0 as its time runs out.
    """
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup > 0 else 1.0
    if cfg.lr_schedule == "constant":
        return cfg.lr * warm
    progress = run_progress(step, cfg, elapsed_s)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    return cfg.lr * warm * decay


def run_progress(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """How far the run is, in [0, 1]: ``max(step / steps, elapsed / time_limit)`` (the time only
    with --time-limit), so a run bounded by wall-clock time reaches 1 as its time runs out.
    Drives the learning-rate decay and the stages of consistency tuning."""
    progress = step / cfg.steps
    if cfg.time_limit > 0:
        progress = max(progress, elapsed_s / (60.0 * cfg.time_limit))
    return min(max(progress, 0.0), 1.0)


# Options whose None means "keep the model preset's value" ("auto" for workers and compile,
# default_lr for lr).
OPTIONAL_FIELDS = ("image_size", "base_channels", "dropout", "workers", "lr", "compile")


def field_type(name: str) -> type:
    """The Python type of TrainConfig field ``name`` (for ``int | None``: int), as the command
    line and TOML files give it."""
    annotation = {f.name: f.type for f in fields(TrainConfig)}[name]
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return {"int": int, "float": float, "str": str, "bool": bool}[text.replace(" | None", "")]


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a dict (a TOML file, a saved run); unknown keys or values of
    the wrong type are an error naming the key."""
    types = {f.name: field_type(f.name) for f in fields(TrainConfig)}
    norm = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(norm) - set(types))
    if unknown:
        raise DDPMError(f"unknown training option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(types))}")
    for k, v in norm.items():
        want = types[k]
        if v is None and k in OPTIONAL_FIELDS:  # a saved run's "keep the preset's value"
            continue
        ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool))
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            norm[k], ok = float(v), True
        if not ok:
            raise DDPMError(f"option {k!r} must be {want.__name__}, got {v!r}")
    return TrainConfig(**norm)
