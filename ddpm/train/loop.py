"""Training: one readable function, ``train(config)``, and its config dataclass.

The loop, top to bottom: load data; build model, EMA, optimiser; resume if asked; then for
each step draw a batch, compute the per-sample denoising loss, step the optimiser, update the
EMA; every so often log, draw a sample grid and write a checkpoint.

Reproducibility: every random draw of step ``s`` (batch order, flips, timesteps, noise, label
dropout, dropout masks) is seeded from ``(seed, s, rank)``, and checkpoints hold the model,
EMA and optimiser state exactly, so a run resumed at step ``s`` continues bit-identically on
the CPU, whatever happened to the process in between.

Distributed: under ``torchrun`` the model is wrapped in DistributedDataParallel, each rank
takes its slice of every global batch, and rank 0 alone writes files and prints.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from .. import __version__
from ..runtime import accounting
from ..run.checkpoint import Sampleable, latest_checkpoint, load_checkpoint, save_checkpoint
from ..data.sets import BatchStream, ImageSet, _mix, batches, load_dataset, to_model_range
from ..files.images import count_hidden_images
from ..runtime.processes import Dist, any_rank, process_group
from ..core.ema import EMA, edm_ema_decay
from ..errors import DDPMError
from ..sample.engine import generate, make_grid, save_png
from ..core.losses import PREDICTIONS, T_SAMPLINGS, WEIGHTINGS, diffusion_loss, timestep_probabilities
from ..files.atomic import atomic_write_json, atomic_write_text, atomic_write_with, check_writable, remove_temp_files
from ..runtime.policy import Runtime, load_optimizer_state, make_optimizer, prepare_model, resolve_runtime
from ..run.folder import lock_run_folder, run_write_errors
from ..core.samplers import MAX_SEED
from ..core.schedule import SCHEDULES, Schedule
from ..core.unet import PRESETS, UNet, UNetConfig, count_parameters

__all__ = ["TrainConfig", "train", "train_step", "t_probabilities_for", "lr_at", "LR_SCHEDULES", "LEGACY_RECIPE", "IMPORTED"]

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
    lr: float = 2e-4  # AdamW learning rate (the paper's CIFAR-10 value)
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
    compile: bool = False  # torch.compile the model
    channels_last: bool = True  # NHWC memory layout for convolutions
    grad_checkpoint: bool = False  # recompute activations in the backward pass to save memory
    device: str = "auto"  # cpu, cuda, cuda:N; auto = cuda if available
    workers: int | None = None  # data loader processes for lazily decoded sets; None = auto
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
    "ema_rampup": 0.0, "ema_halflife_kimg": 500.0,
}


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


# ----------------------------------------------------------------------------------- checks
def _validate(cfg: TrainConfig, d: Dist) -> None:
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
    if cfg.zero_terminal_snr and cfg.prediction == "eps":
        raise DDPMError("--zero-terminal-snr needs --prediction v or x0 (eps carries no information at zero SNR)")
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise DDPMError(f"unknown precision {cfg.precision!r}; expected auto, fp32 or bf16")
    numbers = {"lr": cfg.lr, "weight-decay": cfg.weight_decay, "grad-clip": cfg.grad_clip, "ema-decay": cfg.ema_decay,
               "p-uncond": cfg.p_uncond, "sample-guidance": cfg.sample_guidance, "time-limit": cfg.time_limit,
               "logsnr-shift": cfg.logsnr_shift, "min-snr-gamma": cfg.min_snr_gamma, "t-logsnr-mean": cfg.t_logsnr_mean,
               "t-logsnr-std": cfg.t_logsnr_std, "ema-rampup": cfg.ema_rampup, "ema-halflife-kimg": cfg.ema_halflife_kimg}
    for name, value in numbers.items():
        if not math.isfinite(value):
            raise DDPMError(f"--{name} must be a finite number, got {value}")
    checks = [
        (1 <= cfg.sample_steps <= cfg.timesteps,
         f"--sample-steps must be between 1 and --timesteps ({cfg.timesteps}), got {cfg.sample_steps}"),
        (cfg.sample_n >= 1, f"--sample-n must be at least 1, got {cfg.sample_n}"),
        (cfg.steps >= 1, f"--steps must be at least 1, got {cfg.steps}"),
        # the grids sample with seed + GRID_SEED_OFFSET, which generate() takes up to MAX_SEED
        (0 <= cfg.seed <= MAX_SEED - GRID_SEED_OFFSET,
         f"--seed must be from 0 to {MAX_SEED - GRID_SEED_OFFSET}, got {cfg.seed}"),
        (cfg.batch_size >= 1, f"--batch-size must be at least 1, got {cfg.batch_size}"),
        (cfg.grad_accum >= 1, f"--grad-accum must be at least 1, got {cfg.grad_accum}"),
        (cfg.lr > 0, f"--lr must be positive, got {cfg.lr}"),
        (cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}"),
        (0.0 <= cfg.ema_decay <= 1.0, f"--ema-decay must be in [0, 1], got {cfg.ema_decay}"),
        (0.0 <= cfg.ema_rampup <= 1.0, f"--ema-rampup must be in [0, 1], got {cfg.ema_rampup}"),
        (cfg.ema_halflife_kimg > 0, f"--ema-halflife-kimg must be positive, got {cfg.ema_halflife_kimg}"),
        (cfg.min_snr_gamma > 0, f"--min-snr-gamma must be positive, got {cfg.min_snr_gamma}"),
        (cfg.t_logsnr_std > 0, f"--t-logsnr-std must be positive, got {cfg.t_logsnr_std}"),
        (0.0 <= cfg.p_uncond < 1.0, f"--p-uncond must be in [0, 1), got {cfg.p_uncond}"),
        (cfg.timesteps >= 2, f"--timesteps must be at least 2, got {cfg.timesteps}"),
        (cfg.image_size is None or cfg.image_size > 0, f"--image-size must be positive, got {cfg.image_size}"),
        (cfg.keep >= 1, f"--keep must be at least 1, got {cfg.keep}"),
        (cfg.time_limit >= 0, f"--time-limit must be >= 0 minutes, got {cfg.time_limit}"),
        (cfg.log_every >= 1, f"--log-every must be at least 1, got {cfg.log_every}"),
        (cfg.sample_every >= 0 and cfg.save_every >= 0, "--sample-every and --save-every must be >= 0"),
        (cfg.eval_every >= 0, f"--eval-every must be >= 0 steps (0 = no evaluation), got {cfg.eval_every}"),
        (cfg.eval_n >= 2, f"--eval-n must be at least 2 for FID statistics, got {cfg.eval_n}"),
        (cfg.batch_size % (d.world * cfg.grad_accum) == 0,
         f"--batch-size {cfg.batch_size} (global) must be divisible by processes x --grad-accum = "
         f"{d.world} x {cfg.grad_accum}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DDPMError(msg)
    if cfg.eval_every > 0:
        from ..scoring.evaluate import FeatureExtractor, check_reference

        check_reference(_eval_reference(cfg), "--eval-ref")
        FeatureExtractor(None, "cpu")  # the Inception weights: missing ones are an error now, not at the first evaluation


def _model_config(cfg: TrainConfig, classes: list[str] | None) -> UNetConfig:
    overrides: dict[str, Any] = {}
    for name in ("image_size", "base_channels", "dropout"):  # None: the preset's own
        if getattr(cfg, name) is not None:
            overrides[name] = getattr(cfg, name)
    overrides["num_classes"] = len(classes) if classes else None
    try:
        return UNetConfig.preset(cfg.model, **overrides)
    except ValueError as e:
        raise DDPMError(f"impossible model settings: {e}") from None


# ----------------------------------------------------------------------------- run config
def _run_config(cfg: TrainConfig, model_cfg: UNetConfig, schedule: Schedule, data: ImageSet) -> dict[str, Any]:
    """What a run folder needs to rebuild its model and schedule, with no flags."""
    return {
        "ddpm_version": __version__,
        "model": model_cfg.to_dict(),
        "schedule": schedule.to_dict(),
        "prediction": cfg.prediction,
        "classes": data.classes,
        "image_size": model_cfg.image_size,
        "num_images": len(data),
        "train": asdict(cfg),
    }


# Options that may change when resuming (they don't alter what was learned so far).
_RESUMABLE = {"steps", "out", "resume", "progress", "log_every", "sample_every", "save_every", "keep", "sample_n",
              "sample_steps", "sample_guidance", "device", "workers", "tensorboard", "compile", "strict", "time_limit",
              "eval_every", "eval_n", "eval_ref",
              # The class list it produces is compared on its own when resuming.
              "drop_empty_classes",
              # These change how a step is computed, not what it optimises. grad_checkpoint keeps a
              # resume bit-exact; grad_accum (the random draws are split over micro-batches) and
              # channels_last (other kernels) continue the same run, but not bit-identically.
              "grad_accum", "grad_checkpoint", "channels_last"}


def _imported_config(run_dir: Path) -> dict[str, Any]:
    """The config.json of a run written by 'ddpm import' (for ``--model imported``)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DDPMError(f"--model {IMPORTED} needs the config.json of a run written by 'ddpm import' in --out "
                        f"({str(path)!r}: {e})") from None
    if not isinstance(saved, dict) or "imported" not in saved or "model" not in saved or "schedule" not in saved:
        raise DDPMError(f"--model {IMPORTED} is for runs written by 'ddpm import', and {str(run_dir)!r} is not one; "
                        f"use a preset: {', '.join(PRESETS)}")
    return saved


def _check_resume_compatible(saved: dict[str, Any], cfg: TrainConfig) -> None:
    # A run saved before a recipe option existed was trained with the option's legacy value.
    old = legacy_keep_values({**LEGACY_RECIPE, **saved.get("train", {})})
    changed = [k for k, v in asdict(cfg).items() if k not in _RESUMABLE and k in old and old[k] != v]
    if changed:
        desc = ", ".join(f"--{k.replace('_', '-')} {old[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise DDPMError(f"cannot resume with changed settings ({desc}); use the original values or a new --out")


# -------------------------------------------------------------------------------- logging
class _Logger:
    """CSV + optional TensorBoard + curve PNGs (loss, and FID with --eval-every); only rank 0 makes one.

    Each logged row is appended to ``metrics.csv`` at once, so ``tail -f`` follows the run; the
    curves are redrawn when a checkpoint is written and after each evaluation.
    """

    FIELDS = ("step", "loss", "lr", "images_per_s", "epoch", "ema_decay", "grad_norm", "mfu", "fid", "kid")
    # Of a log interval: loss and grad_norm (the global L2 norm of the gradient before clipping)
    # are means over the interval; lr and ema_decay are those of its last step; images_per_s
    # counts training only; mfu is model FLOP/s (accounting.train_flops_per_image x images/s) over the
    # devices' data-sheet peak (accounting.peak_flops), left empty where that peak is unknown (CPUs).
    # TensorBoard gets the same numbers under the column names, and each sample grid as an image.
    # A row is one of two kinds, each with its own columns filled and the others left empty: a
    # log interval's (it has a loss) or an evaluation's (it has an FID, written by --eval-every).
    KINDS = ("loss", "fid")

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int) -> None:
        """Keep the rows of ``run_dir/metrics.csv`` up to ``resume_step`` (0 for a new run) and
        drop the rest. Raises :class:`DDPMError` when the file cannot be written."""
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, float]] = []
        self.fid_floor: float | None = None  # drawn as a line on fid.png when known
        with run_write_errors(run_dir, "metrics.csv"):
            if self.path.exists():
                self.rows = self._read(resume_step)
            import io

            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(self.rows)
            atomic_write_text(self.path, buf.getvalue())
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events of steps that will be redone (those of a process
                # killed after its last checkpoint), at step 0 too: a new run over a killed one.
                # Events of the resumed step itself stay: they were written with the weights of
                # its checkpoint, and the step's grid and evaluation are not redone.
                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)
            except Exception:  # tensorboard not installed: CSV and PNG still work
                self.tb = None

    def _read(self, up_to_step: int) -> list[dict[str, float]]:
        return self.read_rows(self.path, up_to_step)

    @classmethod
    def read_rows(cls, path: Path, up_to_step: int) -> list[dict[str, float]]:
        """The whole rows of metrics.csv ``path`` up to ``up_to_step``, in :attr:`FIELDS`."""
        # Rows past the resumed step came from steps that will be redone. A row that a killed
        # process or a full disk left cut short (or any unreadable one) is dropped, not fatal:
        # every row is appended whole with its line end, so a last line without one is cut short
        # (an evaluation's row comes after the checkpoint of its step, so the step alone can't tell).
        # Columns a file lacks (one written before they existed) are left out of its rows.
        import io

        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            text = f.read()
        if not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
        rows = []
        for r in csv.DictReader(io.StringIO(text, newline="")):
            try:
                row = {k: float(v) for k in cls.FIELDS if (v := r.get(k)) not in (None, "")}
            except (TypeError, ValueError):
                continue
            if "step" in row and any(k in row for k in cls.KINDS) and row["step"] <= up_to_step:
                rows.append(row)
        return rows

    def has_eval(self, step: int) -> bool:
        """Whether an evaluation row of ``step`` is logged."""
        return any(r["step"] == step and "fid" in r for r in self.rows)

    def log(self, row: dict[str, float]) -> None:
        """Append ``row`` to metrics.csv (and TensorBoard); a failed write takes back its partial row."""
        import io

        buf = io.StringIO()
        csv.DictWriter(buf, fieldnames=self.FIELDS).writerow(row)
        with run_write_errors(self.path.parent, "metrics.csv"):
            _append(self.path, buf.getvalue().encode())
        self.rows.append(row)
        for k, v in row.items():
            if k != "step":
                self._tb("add_scalar", k, v, int(row["step"]))

    def _tb(self, method: str, *args, **kwargs) -> None:
        # TensorBoard writes from a background thread and re-raises a stored OSError (a full
        # disk, a folder made read-only) on a later call; the log is a view of metrics.csv, so
        # training goes on without it rather than failing.
        if self.tb is None:
            return
        try:
            getattr(self.tb, method)(*args, **kwargs)
        except OSError as e:
            tb, self.tb = self.tb, None
            warnings.warn(f"cannot write the TensorBoard log in {self.path.parent / 'tensorboard'} ({e}); "
                          "continuing without it", stacklevel=2)
            try:
                tb.close()
            except OSError:
                pass

    def image(self, step: int, grid: np.ndarray) -> None:
        """Show a sample grid (HWC uint8, the PNG of RUN/samples) in TensorBoard's Images tab."""
        self._tb("add_image", "samples", grid, step, dataformats="HWC")

    def flush(self) -> None:
        self._tb("flush")
        run_dir = self.path.parent
        losses = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        if losses:
            _plot_curve(run_dir / "loss.png", losses, "loss (mean over log interval)")
        fids = [(r["step"], r["fid"]) for r in self.rows if "fid" in r]
        if fids:
            floor = None if self.fid_floor is None else (self.fid_floor, "floor: as many real images")
            _plot_curve(run_dir / "fid.png", fids, "FID of EMA samples", marker="o", line=floor)

    def close(self) -> None:
        self.flush()
        self._tb("close")


def _final_eval_logged(run_dir: Path, step: int) -> bool:
    """Whether RUN/metrics.csv has an evaluation row of ``step`` (an unreadable file counts as
    one: the logger reports it when the run goes on)."""
    try:
        return any(r["step"] == step and "fid" in r for r in _Logger.read_rows(run_dir / "metrics.csv", step))
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _plot_curve(path: Path, points: list[tuple[float, float]], ylabel: str, *, marker: str | None = None,
                line: tuple[float, str] | None = None) -> None:
    """Draw ``points`` (step, value) as a curve on a log y axis and write the PNG atomically;
    ``line`` is (value, label) of a dashed horizontal reference line. The run's curves
    (loss.png, fid.png) all come from here, so they look alike."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p[0] for p in points], [p[1] for p in points], lw=1, marker=marker, ms=3)
    if line is not None and math.isfinite(line[0]) and line[0] > 0:  # a log axis cannot show 0
        ax.axhline(line[0], ls="--", lw=1, color="grey", label=f"{line[1]} ({line[0]:.3g})")
        ax.legend(loc="best", fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if all(p[1] > 0 for p in points):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with run_write_errors(path.parent, path.name):
            atomic_write_with(path, lambda f: fig.savefig(f, format="png"))
    finally:
        plt.close(fig)


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` whole or not at all: a row cut short by a full disk would
    read back as a wrong number, so a failed write is truncated away before the error is raised."""
    # An append, not ddpm.files.atomic' atomic rewrite: that would copy the whole log per row and break
    # `tail -f`. The file is first made by atomic_write_text; O_CREAT with 0o666 gives umask permissions.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ the loop
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
    progress = step / cfg.steps
    if cfg.time_limit > 0:
        progress = max(progress, elapsed_s / (60.0 * cfg.time_limit))
    progress = min(max(progress, 0.0), 1.0)
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    return cfg.lr * warm * decay


def _sample_grid(sampleable: Sampleable, cfg: TrainConfig, runtime: Runtime, path: Path) -> np.ndarray:
    """Write a sample grid of the EMA weights to ``path`` and return it (HWC uint8): one row per
    class, guided by --sample-guidance, for conditional runs. Drawn by :func:`ddpm.sample.engine.generate` with
    DPM-Solver++ in --sample-steps steps from the same per-image seeds at every call, so the grids
    of a run differ by the weights alone."""
    classes = sampleable.classes
    if classes:
        per = max(1, cfg.sample_n // len(classes))
        labels: torch.Tensor | None = torch.arange(len(classes)).repeat_interleave(per)
        nrow = per
    else:
        labels, nrow = None, max(1, int(math.sqrt(cfg.sample_n)))
    n = len(labels) if labels is not None else cfg.sample_n
    images = generate(sampleable, n, labels=labels, sampler="dpm-solver", steps=cfg.sample_steps,
                      guidance=cfg.sample_guidance if classes else 1.0, seed=cfg.seed + GRID_SEED_OFFSET,
                      batch_size=n, device=runtime.device, precision=runtime.precision, progress=False)
    grid = make_grid(images, nrow=nrow)
    save_png(grid, path)
    return grid


def _train_flops_per_image(model_cfg: UNetConfig) -> float:
    """Model FLOPs of a training step per image (:func:`ddpm.runtime.accounting.train_flops_per_image`) for
    the UNet ``model_cfg``, counted on the meta device: no compute and no real weights touched."""
    from ..runtime.accounting import train_flops_per_image

    with torch.device("meta"):
        net = UNet(model_cfg)
        size = model_cfg.image_size
        inputs = [torch.zeros(1, model_cfg.in_channels, size, size), torch.zeros(1, dtype=torch.long)]
        if model_cfg.conditional:
            inputs.append(torch.zeros(1, dtype=torch.long))
    return train_flops_per_image(net, *inputs)


def _eval_reference(cfg: TrainConfig) -> str:
    """The reference set of --eval-every's FID: --eval-ref, else the training images themselves
    (torchvision's CIFAR-10 training split for --data cifar10)."""
    from ..data.sets import names_cifar10

    if cfg.eval_ref:
        return cfg.eval_ref
    return "cifar10:train" if names_cifar10(cfg.data) else cfg.data


class _TrainingEval:
    """FID and KID of EMA samples every --eval-every steps; made and called on rank 0 only.

    The reference is a :class:`ddpm.scoring.evaluate.Reference` (its statistics cached: computed once per
    reference and image size), scored as ``ddpm eval`` scores; the FID floor of --eval-n real
    images is computed once and kept in ``RUN/fid_floor.json``, so a resumed run reads it back. The samples are drawn by
    :func:`ddpm.sample.engine.generate` as ``ddpm eval --n N --seed SEED --guidance G`` draws them (the same
    per-image seeds, class labels, sampler and steps), the same at every evaluation and at any
    batch size, so the curve follows the weights, not the draw. (A run resumed from a version
    before 2026-12-05, which seeded these samples and the sample grids differently, changes draws
    once at the resume.) Nothing here touches the global RNG the training steps draw from.
    """

    FLOOR_FILE = "fid_floor.json"

    def __init__(self, cfg: TrainConfig, run_dir: Path, image_size: int, T: int, classes: list[str] | None,
                 batch: int, runtime: Runtime) -> None:
        from ..scoring import evaluate
        from ..core.samplers import resolve_steps

        device = runtime.device
        self.cfg, self.classes, self.batch, self.runtime = cfg, classes, batch, runtime
        self.ref_name = cfg.eval_ref or "the training images"
        # Unconditional scoring (no probe): the log line and metrics.csv carry FID and KID only.
        self.reference = evaluate.Reference.build(
            _eval_reference(cfg), image_size, device=device,
            settings=evaluate.ReferenceSettings(cifar_root=cfg.data_root or None), progress=cfg.progress)
        self.ref = self.reference.stats
        self.steps = resolve_steps("dpm-solver", None, T)  # 'ddpm sample's default: 20, at most T
        self.floor = self._floor(run_dir)

    def _floor(self, run_dir: Path) -> float | None:
        from ..scoring.evaluate import fid_floor, floor_is_lower_bound

        n = self.cfg.eval_n
        self.floor_lower_bound = floor_is_lower_bound(self.ref, n)
        method = (f"FID of {n} reference feature vectors drawn with replacement (seed 0) against the whole "
                  "reference's statistics: a lower bound, the reference has fewer than 2n images"
                  if self.floor_lower_bound else
                  f"FID of a fixed subset of {n} reference images (seed 0) against the statistics of the others")
        path = run_dir / self.FLOOR_FILE
        # The method is part of the key: a floor kept by an older version, made another way, is redone.
        key = {"reference_key": self.ref.key, "n": n, "method": method}
        try:
            saved = json.loads(path.read_text())
            if {k: saved.get(k) for k in key} == key:
                return saved["fid_floor"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass  # absent, unreadable or for another reference or n: compute it
        value = fid_floor(self.ref, n)
        with run_write_errors(run_dir, self.FLOOR_FILE):
            atomic_write_json(path, {**key, "fid_floor": value, "lower_bound": self.floor_lower_bound,
                                     "reference": self.ref.source})
        return value

    def _floor_words(self) -> str:
        return f"floor {self.floor:.2f}" + (" (a lower bound)" if self.floor_lower_bound else "")

    def describe(self) -> str:
        """The line printed once when a run with --eval-every starts."""
        n = self.cfg.eval_n
        how = (f"{n} EMA samples (DPM-Solver++, {self.steps} steps"
               + (f", guidance {self.cfg.sample_guidance:g}" if self.classes else "") + f") against {self.ref_name}")
        if self.floor is None:
            return (f"FID every {self.cfg.eval_every} steps: {how}. FID from {n} samples is biased upward; the reference "
                    "holds statistics only, so there is no floor to read it against (and no KID)")
        bound = (f"; a lower bound: the reference has fewer than {2 * n} images, so they were drawn from those "
                 "its statistics come from" if self.floor_lower_bound else "")
        return (f"FID every {self.cfg.eval_every} steps: {how}. FID from {n} samples is biased upward: {n} real images "
                f"score {self.floor:.2f} against the same reference (the floor, kept in {self.FLOOR_FILE}{bound})")

    def __call__(self, step: int, sampleable: Sampleable) -> dict[str, float]:
        """Sample --eval-n images of ``sampleable``'s EMA weights and score them: ``{"step",
        "fid"}`` plus ``"kid"`` (KID's mean over subsets) when the reference has features."""
        from ..scoring.evaluate import spread_labels

        cfg, n = self.cfg, self.cfg.eval_n
        labels = spread_labels(n, self.classes)  # as 'ddpm eval' spreads its samples over the classes
        images = generate(sampleable, n, labels=labels, sampler="dpm-solver", steps=self.steps,
                          guidance=cfg.sample_guidance if self.classes else 1.0, seed=cfg.seed,
                          batch_size=self.batch, device=self.runtime.device, precision=self.runtime.precision,
                          progress=False)
        scores = self.reference.score(images)
        row: dict[str, float] = {"step": step, "fid": scores["fid"]}
        if "kid_mean" in scores:
            row["kid"] = scores["kid_mean"]
        return row

    def line(self, row: dict[str, float], seconds: float) -> str:
        """The log line of one evaluation."""
        kid = f", KID {row['kid']:.4f}" if "kid" in row else ""
        floor = self._floor_words() if self.floor is not None else "no floor"
        return (f"step {int(row['step'])}: FID {row['fid']:.2f}{kid} ({self.cfg.eval_n} samples against {self.ref_name}, "
                f"{seconds:.0f} s; few samples bias FID upward, {floor})")


def train(cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None) -> Path:
    """Train a model as ``cfg`` says; returns the path of the final checkpoint.

    ``on_step(step, loss)`` is called on rank 0 after each logged interval (for tests and
    notebooks). Raises :class:`DDPMError` for bad settings or data, and when the loss stops
    being finite (the last good checkpoint is left as it was).
    """
    # On a clean exit the ranks meet once more: rank 0 draws the last grid alone, and without that
    # meeting the others tore the process group down under it (gloo then aborted rank 0 at exit).
    with process_group(cfg.device) as d, contextlib.ExitStack() as held:  # held: the run folder's lock
        return _train(cfg, d, on_step, held)


class _Clock:
    """A run's training time: the seconds of earlier sessions plus this one's, less the time spent
    drawing sample grids and evaluating (so --time-limit, the learning-rate schedule it drives and
    the saved ``train_seconds`` leave them out, and turning evaluation on does not shorten a
    time-limited run); and the training images/s since the last log line."""

    def __init__(self, train_seconds: float, step: int) -> None:
        self.before = train_seconds
        self.start = self.last = time.perf_counter()
        self.excluded = 0.0
        self.step_last = step

    def training_seconds(self) -> float:
        """Seconds of training in this run so far, resumed sessions included."""
        return self.before + time.perf_counter() - self.start - self.excluded

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (sampling, evaluating) out of the training time and of images/s."""
        self.excluded += seconds
        self.last += seconds

    def images_per_s(self, step: int, batch_size: int) -> float:
        """Training images per second since the previous call (or the start) at ``step``."""
        now = time.perf_counter()
        ips = (step - self.step_last) * batch_size / max(now - self.last, 1e-9)
        self.last, self.step_last = now, step
        return ips


class _Meter:
    """The step losses and gradient norms since the last log line, summed on the device so that
    no step waits for the device; read (and reset) only at log lines."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.grad_norm = torch.zeros((), device=device, dtype=torch.float64)
        self.count = 0
        self.ema_decay = 0.0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, ema_decay: float) -> None:
        """Count one step's :func:`train_step` result."""
        self.loss += loss
        self.grad_norm += grad_norm
        self.count += 1
        self.ema_decay = ema_decay

    def finite(self) -> bool:
        """Whether the losses summed since the last log line are finite."""
        return math.isfinite(float(self.loss))

    def read(self, d: Dist) -> tuple[float, float]:
        """Mean loss (averaged over the ranks) and mean gradient norm (the same on every rank
        under DDP) since the last read; resets the sums."""
        mean_loss = self.loss / max(self.count, 1)
        if d.world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= d.world
        out = float(mean_loss), float(self.grad_norm) / max(self.count, 1)
        self.loss.zero_()
        self.grad_norm.zero_()
        self.count = 0
        return out


def _non_finite(what: str, step: int, last_path: Path | None) -> DDPMError:
    """The error that stops a run whose loss or weights stopped being finite, naming what is safe."""
    return DDPMError(f"{what} by step {step}; stopped without saving ("
                     + (f"the last good checkpoint {last_path} is intact" if last_path else
                        "no checkpoint had been written yet")
                     + "). Try a lower --lr, --precision fp32 or --grad-clip 1")


def _load_data(cfg: TrainConfig, d: Dist, run_dir: Path, imported: dict[str, Any] | None) -> ImageSet:
    """The training images at the run's resolution (an imported network's, else --image-size or
    the preset's); rank 0 decodes first, then the others. Raises :class:`DDPMError` for a run
    folder inside the data and for unusable data."""
    if imported is not None:
        image_size = int(imported["model"]["image_size"])
    else:
        image_size = cfg.image_size or PRESETS[cfg.model].image_size
    data_path = Path(cfg.data).expanduser().resolve()
    if data_path.is_dir() and (run_dir.expanduser().resolve() == data_path or data_path in run_dir.expanduser().resolve().parents):
        raise DDPMError(f"--out {str(run_dir)!r} is inside --data {cfg.data!r}; the run's own sample grids would "
                        "become training images. Put the run folder elsewhere")
    # Rank 0 loads first (a CIFAR-10 download, one warning about bad files), then the others.
    if d.world > 1 and not d.main:
        warnings.filterwarnings("ignore", message="skipped")
        dist.barrier()
    data = load_dataset(cfg.data, image_size, conditional=cfg.conditional, strict=cfg.strict,
                        random_crop=cfg.random_crop, data_root=cfg.data_root or None, progress=cfg.progress and d.main,
                        drop_empty_classes=cfg.drop_empty_classes)
    if d.world > 1 and d.main:
        dist.barrier()
    return data


def _restore(resume_path: Path, cfg: TrainConfig, run_dir: Path, data: ImageSet, model_cfg: UNetConfig,
             model: UNet, ema: EMA, opt: torch.optim.Optimizer, device: torch.device) -> tuple[int, float]:
    """Load the checkpoint ``resume_path`` into ``model``, ``ema`` and ``opt`` after checking that
    it continues this run (same model, classes, data and the options that shape the run); returns
    its step and the seconds of training it records. Raises :class:`DDPMError` when it does not
    fit, or when the run has used its --time-limit."""
    saved_step, saved_config, state = load_checkpoint(resume_path, "cpu")
    if "imported" in saved_config and not saved_config.get("train", {}).get("data"):
        # The first training of an imported run: its saved training options are placeholders,
        # so all are free except the target the imported network predicts.
        if cfg.prediction != saved_config.get("prediction"):
            raise DDPMError(f"the imported network predicts {saved_config.get('prediction')!r}; "
                            f"--prediction {cfg.prediction} would need another network")
    else:
        _check_resume_compatible(saved_config, cfg)
    if saved_config.get("num_images") not in (None, len(data)):
        hidden = count_hidden_images(cfg.data) if cfg.data else 0
        if hidden and len(data) + hidden == saved_config["num_images"]:
            raise DDPMError(f"this run was started counting {hidden} hidden image file(s) under --data "
                            f"{cfg.data!r} (names starting with '.') that ddpm now skips, so its data order "
                            "cannot be continued; start a new --out")
        raise DDPMError(f"the data changed since this run began ({saved_config['num_images']} -> {len(data)} "
                        "images); restore it or start a new --out")
    if saved_config["model"] != model_cfg.to_dict() or saved_config.get("classes") != data.classes:
        raise DDPMError(f"the data or model no longer match the run in {str(run_dir)!r} "
                        "(different classes or model settings); use a new --out")
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    if "optimizer" in state:  # an imported run has none: AdamW starts afresh
        load_optimizer_state(opt, state["optimizer"], device)
    train_seconds = float(state.get("train_seconds", 0.0))
    if cfg.time_limit > 0 and train_seconds >= 60.0 * cfg.time_limit and saved_step < cfg.steps:
        raise DDPMError(f"the run in {str(run_dir)!r} has used its --time-limit of {cfg.time_limit:g} min "
                        f"({train_seconds / 60:.1f} min of training); pass a larger --time-limit to continue it")
    return saved_step, train_seconds


def _train(cfg: TrainConfig, d: Dist, on_step: Callable[[int, float], None] | None,
           held: contextlib.ExitStack) -> Path:
    _validate(cfg, d)
    # device and precision are decided here once; "bf16" where it would not run becomes fp32 (warned)
    runtime = resolve_runtime(cfg.device, cfg.precision, local_rank=d.local_rank, world=d.world,
                              channels_last=cfg.channels_last)
    device, precision = runtime.device, runtime.precision
    run_dir = Path(cfg.out)
    say = print if d.main else (lambda *a, **k: None)

    for folder in (run_dir, run_dir / "checkpoints", run_dir / "samples"):  # before minutes of decoding
        check_writable(folder, "--out")
    # Everything below reads or writes the run folder, so it is this process's from here on.
    held.enter_context(_hold_run_folder(run_dir, d, device))
    if d.main:
        remove_temp_files(run_dir, run_dir / "checkpoints", run_dir / "samples")

    # ---- resume: the saved run config wins for everything that shapes the model
    resume_path = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and resume_path is None:
        # A requeued job repeats its first command line: with nothing saved yet (no folder, or
        # one left by a process killed before its first checkpoint) that line starts the run.
        say(f"--resume: {str(run_dir)!r} has no checkpoint yet, starting a new run there")
    if not cfg.resume and latest_checkpoint(run_dir) is not None:
        raise DDPMError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or choose another --out")

    # ---- data
    imported = _imported_config(run_dir) if cfg.model == IMPORTED else None
    data = _load_data(cfg, d, run_dir, imported)
    say(f"data: {len(data)} images at {data.image_size}x{data.image_size}"
        + (f", {len(data.classes)} classes: {', '.join(data.classes)}" if data.classes else ", unconditional"))

    # ---- model, schedule, EMA, optimiser (identical on every rank: same seed)
    torch.manual_seed(cfg.seed)
    if imported is not None:
        model_cfg, schedule = UNetConfig.from_dict(imported["model"]), Schedule.from_dict(imported["schedule"])
    else:
        model_cfg = _model_config(cfg, data.classes)
        schedule = Schedule.from_name(cfg.schedule, cfg.timesteps, logsnr_shift=cfg.logsnr_shift,
                                      zero_terminal_snr=cfg.zero_terminal_snr)
    t_probabilities = t_probabilities_for(cfg, schedule)
    model = UNet(model_cfg)
    model.grad_checkpoint = cfg.grad_checkpoint
    prepare_model(model, device, channels_last=cfg.channels_last)
    ema = EMA(model, cfg.ema_decay)
    opt = make_optimizer(model.parameters(), device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    run_config = _run_config(cfg, model_cfg, schedule, data)
    # What the sample grids and the in-training FID sample from, as 'ddpm sample' samples a loaded
    # run: generate() uses the EMA network and leaves it (and the training network) as it was.
    sampleable = Sampleable(model=model, ema_model=ema.module, schedule=schedule, classes=data.classes,
                            prediction=cfg.prediction, image_size=model_cfg.image_size)
    if imported is not None:
        run_config["imported"] = imported["imported"]

    step = 0
    train_seconds = 0.0  # training wall-clock of earlier sessions of this run: --time-limit counts it
    if resume_path is not None:
        step, train_seconds = _restore(resume_path, cfg, run_dir, data, model_cfg, model, ema, opt, device)
        say(f"resumed from {resume_path} at step {step}")
    # A run killed after its last checkpoint but before that step's evaluation still owes it.
    final_eval_missing = cfg.eval_every > 0 and step == cfg.steps > 0 and not _final_eval_logged(run_dir, step)
    if step >= cfg.steps and not final_eval_missing:
        say(f"nothing to do: the run is at step {step} and --steps is {cfg.steps}")
        return resume_path  # type: ignore[return-value]

    if d.main:
        with run_write_errors(run_dir, "config.json"):
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(run_dir / "config.json", run_config)
    say(f"model: {cfg.model}, {count_parameters(model) / 1e6:.2f}M parameters, {runtime.describe()}"
        + (f", {d.world} processes" if d.world > 1 else ""))
    say(f"batch: {cfg.batch_size} global = {d.world} process(es) x {cfg.grad_accum} micro-batch(es) x "
        f"{cfg.batch_size // (d.world * cfg.grad_accum)} images")

    train_model: torch.nn.Module = model
    if d.world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        train_model = torch.compile(train_model)

    stream = BatchStream(len(data), cfg.batch_size, cfg.seed, rank=d.rank, world=d.world, hflip=cfg.hflip)
    workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
    it = batches(data, stream, step, workers=workers, pin_memory=device.type == "cuda")
    null_class = model_cfg.null_class
    micro = cfg.batch_size // (d.world * cfg.grad_accum)  # images per forward pass: the evaluator's batch

    # Rank 0 alone evaluates (the other ranks wait for it at the agreement after each evaluation);
    # the reference statistics are made before the first step, so a bad reference costs no training.
    evaluator: _TrainingEval | None = None
    if cfg.eval_every > 0:
        ref_error: DDPMError | None = None
        if d.main:
            try:
                evaluator = _TrainingEval(cfg, run_dir, model_cfg.image_size, schedule.T, data.classes, micro, runtime)
            except DDPMError as e:
                ref_error = e
        if any_rank(ref_error is not None, d, device):
            raise ref_error or DDPMError("rank 0 could not prepare the FID reference (its message says why)")
        if evaluator is not None:
            say(evaluator.describe())

    logger = _Logger(run_dir, cfg.tensorboard, step) if d.main else None
    if logger is not None and evaluator is not None:
        logger.fid_floor = evaluator.floor
    bar = None
    if d.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, desc="training")

    # A SIGTERM (a scheduler pre-empting the job; torchrun and SLURM signal every rank) finishes
    # the current step, saves, and exits.
    stop_requested = {"flag": False}
    old_handler = None
    if hasattr(signal, "SIGTERM"):
        try:
            old_handler = signal.signal(signal.SIGTERM, lambda *_: stop_requested.__setitem__("flag", True))
        except ValueError:  # not in the main thread
            old_handler = None

    def save(at_step: int) -> Path | None:
        if not d.main:
            return None
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                 "train_seconds": clock.training_seconds()}
        with run_write_errors(run_dir, f"the checkpoint of step {at_step}"):
            path = save_checkpoint(run_dir, at_step, run_config, state, keep=cfg.keep)
        if logger is not None:
            logger.flush()
        return path

    def evaluate_now(at_step: int) -> float:
        """Score EMA samples of ``at_step`` on rank 0 and log them; every rank returns together
        (an error on rank 0 stops all of them). Returns the seconds it took."""
        t0 = time.perf_counter()
        eval_error: DDPMError | None = None
        if evaluator is not None and logger is not None:
            try:
                row = evaluator(at_step, sampleable)
                logger.log(row)
                logger.flush()
                (bar.write if bar is not None else say)(evaluator.line(row, time.perf_counter() - t0))
            except DDPMError as e:
                eval_error = e
        if any_rank(eval_error is not None, d, device):
            raise eval_error or DDPMError(f"rank 0 could not evaluate step {at_step} (its message says why)")
        return time.perf_counter() - t0

    # Model FLOPs utilisation needs the device's peak; where none is known (CPUs) it is not logged.
    peak = accounting.peak_flops(device, precision) if d.main else None
    flops_per_image = _train_flops_per_image(model_cfg) if peak is not None else 0.0
    clock = _Clock(train_seconds, step)
    meter = _Meter(device)
    elapsed = train_seconds  # seconds of training in this run so far, the same on every rank
    last_path: Path | None = resume_path

    def log_interval(at_step: int, lr: float, ema_decay: float) -> None:
        mean, mean_grad_norm = meter.read(d)
        if not math.isfinite(mean):
            raise _non_finite(f"loss became {mean}", at_step, last_path)
        ips = clock.images_per_s(at_step, cfg.batch_size)
        if not d.main:
            return
        if logger is not None:
            row = {"step": at_step, "loss": mean, "lr": lr, "images_per_s": ips, "epoch": stream.epoch(at_step),
                   "ema_decay": ema_decay, "grad_norm": mean_grad_norm}
            if peak is not None:
                row["mfu"] = ips * flops_per_image / (peak * d.world)
            logger.log(row)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{ips:.1f}", epoch=f"{stream.epoch(at_step):.1f}")
        if on_step is not None:
            on_step(at_step, mean)

    def checkpoint_now(at_step: int) -> None:
        nonlocal last_path
        # A finite loss can still come with non-finite updates; never save such weights.
        ok = meter.finite() and all(bool(p.isfinite().all()) for p in model.parameters())
        if any_rank(not ok, d, device):
            raise _non_finite("loss or weights became non-finite", at_step, last_path)
        failed: DDPMError | None = None
        try:
            last_path = save(at_step)
        except DDPMError as e:  # a full disk: every rank stops, not only the writer
            failed = e
        if any_rank(failed is not None, d, device):
            raise failed or DDPMError("rank 0 could not write the checkpoint (its message says why)")
        if d.world > 1:
            dist.barrier()

    def grid_now(at_step: int) -> float:
        """Draw the sample grid of ``at_step`` on rank 0; every rank returns together, so each
        leaves the same seconds out of its training clock (the others wait meanwhile, and their
        clocks feed the agreed --time-limit), and an error on rank 0 stops all of them."""
        t0 = time.perf_counter()
        failed: DDPMError | None = None
        if d.main:
            try:
                with run_write_errors(run_dir, "a sample grid"):
                    grid = _sample_grid(sampleable, cfg, runtime, run_dir / "samples" / f"step_{at_step:09d}.png")
                if logger is not None:
                    logger.image(at_step, grid)
            except DDPMError as e:
                failed = e
        if any_rank(failed is not None, d, device):
            raise failed or DDPMError(f"rank 0 could not draw the sample grid of step {at_step} (its message says why)")
        return time.perf_counter() - t0

    model.train()
    try:
        if cfg.eval_every > 0 and step > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            # A run stopped (or killed) at an evaluation step (or the last one) after its checkpoint
            # but before that evaluation's row resumes past the step: evaluate it now, so each
            # step has one row.
            if any_rank(logger is not None and not logger.has_eval(step), d, device):
                clock.exclude(evaluate_now(step))
        while step < cfg.steps:
            # Everything random in this step derives from (seed, step, rank): data order and
            # flips (in the stream), timesteps, noise, label dropout, dropout masks.
            torch.manual_seed(_mix(cfg.seed, step, d.rank, 0xD1CE))
            gen = torch.Generator(device=device).manual_seed(_mix(cfg.seed, step, d.rank, 0x7E57))
            if d.world == 1:
                elapsed = clock.training_seconds()
            # else: the value all ranks agreed on at the last check below, so their rates stay equal
            lr = lr_at(step, cfg, elapsed)
            x_u8, y = next(it)
            x = to_model_range(x_u8.to(device, non_blocking=True))
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if y is not None:
                y = y.to(device, non_blocking=True)
            meter.add(*train_step(train_model, model, opt, ema, schedule, x, y, cfg, step=step, lr=lr, generator=gen,
                                  t_probabilities=t_probabilities, null_class=null_class,
                                  autocast=runtime.autocast))
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                log_interval(step, lr, meter.ema_decay)
            if bar is not None:
                bar.update(1)

            stop = False
            want_save = (cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.steps
            # Under DDP, agreeing on a stop is a collective: do it every few steps, not every step.
            if d.world == 1 or step % 10 == 0 or want_save:
                elapsed = _agree_elapsed(clock.training_seconds(), d, device)
                out_of_time = cfg.time_limit > 0 and elapsed > 60.0 * cfg.time_limit
                stop = any_rank(stop_requested["flag"] or out_of_time, d, device) and step < cfg.steps
            if want_save or stop:
                checkpoint_now(step)
            # The grid comes after the checkpoint, so a failure while sampling loses no training;
            # sampling and evaluating are not training time (images/s, --time-limit, the lr).
            if (cfg.sample_every > 0 and step % cfg.sample_every == 0) or step == cfg.steps:
                clock.exclude(grid_now(step))
            # After the checkpoint too; when stopping, it is left to the resumed run (see above).
            if cfg.eval_every > 0 and not stop and (step % cfg.eval_every == 0 or step == cfg.steps):
                clock.exclude(evaluate_now(step))
            if stop:
                why = "SIGTERM" if stop_requested["flag"] else f"--time-limit {cfg.time_limit:g} min"
                say(f"\nstopped by {why} at step {step}; continue with --resume"
                    + (" and a larger --time-limit (it counts the whole run)" if not stop_requested["flag"] else ""))
                break
        if logger is not None:
            logger.close()
            logger = None
    finally:
        if bar is not None:
            bar.close()
        if logger is not None:
            # Leaving on an error: close what can be closed, but that error is the one to report.
            with contextlib.suppress(Exception):
                logger.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)
    if d.world > 1:
        _check_replicas_agree(model, ema, d, device, say)
    if d.main and last_path is not None:
        say(f"checkpoint: {last_path}")
    return last_path if last_path is not None else run_dir


def t_probabilities_for(cfg: TrainConfig, schedule: Schedule) -> torch.Tensor | None:
    """The density training draws timesteps from: None for ``--t-sampling uniform`` (Ho et al.
    2020's uniform t), else float64 [T] from :func:`ddpm.core.losses.timestep_probabilities`
    (``--t-logsnr-mean`` / ``--t-logsnr-std``, EDM's lognormal over noise levels). Raises
    ``ValueError`` for an unknown density or a std <= 0."""
    if cfg.t_sampling == "uniform":
        return None
    return timestep_probabilities(schedule, cfg.t_sampling, cfg.t_logsnr_mean, cfg.t_logsnr_std)


def train_step(net: Callable[..., torch.Tensor], model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA,
               schedule: Schedule, x0: torch.Tensor, labels: torch.Tensor | None, cfg: TrainConfig, *, step: int,
               lr: float, generator: torch.Generator | None, t_probabilities: torch.Tensor | None = None,
               null_class: int | None = None,
               autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
               ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimiser step of ``ddpm train``, the one ``benchmarks/speed.py`` times too.

    Sets the learning rate ``lr``; splits ``x0`` (float [B, C, H, W] in [-1, 1], this process's
    share of the global batch, on the model's device) and ``labels`` (int64 [B] or None) into
    ``cfg.grad_accum`` micro-batches; for each, ``net(x_t, t[, y])`` under ``autocast()`` gives the
    per-sample loss of :func:`ddpm.core.losses.diffusion_loss` with ``cfg``'s target, weighting and
    label dropout (timesteps from ``t_probabilities``, noise and dropout from ``generator``),
    whose mean is back-propagated; then clips the global gradient norm of ``model`` to
    ``cfg.grad_clip`` (0: measured, not clipped), steps ``opt`` and updates ``ema`` with the decay
    for ``step`` (the EMA's own warm-up when ``cfg.ema_rampup`` is 0, else EDM's half-life rule
    for ``step * cfg.batch_size`` images seen). ``net`` is ``model`` itself or a wrapper of it
    (DistributedDataParallel, torch.compile, a peer's call adapter); under DDP gradients are
    synchronised on the last micro-batch only.

    Returns ``(loss, grad_norm, ema_decay)``: the step's mean loss and the gradient norm before
    clipping as float64 0-dim tensors on the device (not synchronised, so the caller decides
    when to read them), and the EMA decay used. Raises ``ValueError`` for a batch that does not
    split into ``cfg.grad_accum`` equal micro-batches, and (from the loss) for a target or
    weighting it does not know, or labels without ``null_class``.
    """
    if cfg.grad_accum < 1 or x0.shape[0] < cfg.grad_accum or x0.shape[0] % cfg.grad_accum:
        raise ValueError(f"a batch of {x0.shape[0]} images does not split into {cfg.grad_accum} equal micro-batches")
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    micro = x0.shape[0] // cfg.grad_accum
    no_sync = getattr(net, "no_sync", None)
    loss_sum = torch.zeros((), device=x0.device, dtype=torch.float64)
    for k in range(cfg.grad_accum):
        sl = slice(k * micro, (k + 1) * micro)
        # DDP: all-reduce the gradients once, after the last micro-batch.
        ctx = no_sync() if (no_sync is not None and k < cfg.grad_accum - 1) else contextlib.nullcontext()
        with ctx, autocast():
            losses = diffusion_loss(net, schedule, x0[sl], None if labels is None else labels[sl],
                                    prediction=cfg.prediction, weighting=cfg.loss_weighting,
                                    min_snr_gamma=cfg.min_snr_gamma, t_probabilities=t_probabilities,
                                    p_uncond=cfg.p_uncond, null_class=null_class, generator=generator)
            loss = losses.mean() / cfg.grad_accum
        loss.backward()
        loss_sum += loss.detach().double()
    # The norm returned is the one before clipping. With --grad-clip 0, max_norm = inf only
    # measures it: the scale factor is clamped to exactly 1, so the weights are unchanged.
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    opt.step()
    ema_decay = (ema.current_decay() if cfg.ema_rampup == 0 else
                 edm_ema_decay(step * cfg.batch_size, cfg.batch_size, cfg.ema_halflife_kimg, cfg.ema_rampup))
    ema.update(model, ema_decay)
    return loss_sum, grad_norm.detach().double(), ema_decay


def _check_replicas_agree(model: torch.nn.Module, ema: EMA, d: Dist, device: torch.device,
                          say: Callable[..., None]) -> None:
    """Compare weight and EMA digests across ranks: DDP keeps replicas equal, and a silent
    divergence (a rank with different data or a non-deterministic kernel) would corrupt the run."""
    from ..run.checkpoint import weights_sha256

    mine = weights_sha256(model.state_dict()) + weights_sha256(ema.module.state_dict())
    gathered: list[Any] = [None] * d.world
    dist.all_gather_object(gathered, mine)
    if len(set(gathered)) != 1:
        raise DDPMError(f"the {d.world} processes ended with different weights; the run is not trustworthy")
    say(f"all {d.world} processes hold identical model and EMA weights (sha256 {mine[:12]}...)")


def _agree_elapsed(seconds: float, d: Dist, device: torch.device) -> float:
    """The largest of the ranks' training clocks: a time-based learning-rate decay must give
    every rank the same rate, or DDP's replicas (which share gradients, not weights) drift apart."""
    if d.world == 1:
        return seconds
    t = torch.tensor([seconds], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


@contextlib.contextmanager
def _hold_run_folder(run_dir: Path, d: Dist, device: torch.device) -> Iterator[None]:
    """Rank 0, the only writer, locks the run folder for the whole run; every rank learns
    whether it could, so that all stop together instead of waiting for rank 0 at a barrier."""
    with contextlib.ExitStack() as stack:
        error: DDPMError | None = None
        if d.main:
            try:
                stack.enter_context(lock_run_folder(run_dir, advice="wait for it to finish or choose another --out"))
            except DDPMError as e:
                error = e
        if any_rank(error is not None, d, device):
            raise error or DDPMError(f"rank 0 could not take the run folder {str(run_dir)!r} (its message says why)")
        yield


# Options whose None means "keep the model preset's value" (or "auto" for workers).
OPTIONAL_FIELDS = ("image_size", "base_channels", "dropout", "workers")


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
