"""``ddpm distill RUN --out RUN2``: tune a trained run into a consistency model that samples in 2 steps."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import DDPMError
from ..run.config import RunConfig
from ..run.folder import RunFolder
from ..train import IMPORTED, MACHINE_LOCAL, TrainConfig, config_from_dict, train
from .common import EXIT_OK, EXIT_STOPPED, Formatter, add_runtime_arguments

__all__ = ["register", "distill_config", "LR_FRACTION"]

_DESCRIPTION = """\
Consistency tuning (ECT: Geng et al. 2024, "Consistency models made easy"): start from RUN's EMA
weights and train the network to map every point of a noise trajectory to the same clean image,
with the gap between the two noise levels it compares shrinking over the tuning run. The result
is a run folder like any other (sample, eval, info, export, --resume) whose config.json says it is
a consistency model and which checkpoint it started from; 'ddpm sample' then uses the
consistency sampler (2 network evaluations per image by default; 1 to 4 with --steps) instead of
DPM-Solver++'s 20. It trains on RUN's own data (--data to point elsewhere); a conditional run
keeps its classes and classifier-free guidance (guidance is applied when sampling)."""

# The step budget of a tuning bounded by --minutes alone: its time limit is then its end.
_NO_STEP_LIMIT = 10**9

# The tuning's learning rate as a fraction of the teacher's. ECT tunes at a tenth (1e-4 for EDM's
# 1e-3 over an A100-hour); in 10-minute tunings on the CPU a thirtieth gave the better 2-step FID
# (docs/benchmarks.md, "Two-step samples by consistency tuning": 1e-3, 1e-4, 3e-5 and 1e-5 tried).
LR_FRACTION = 1 / 30

# Training options of the tuning run that are not the teacher's: a constant rate (the stages, not
# the rate, shape the run); grids in the consistency sampler's 2 steps; no in-training FID.
_TUNING: dict[str, Any] = {"objective": "consistency", "lr_schedule": "constant", "warmup": 0, "sample_steps": 2,
                           "eval_every": 0, "resume": False}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``distill`` subcommand (``func(args) -> int``) to ``ddpm``'s subparsers."""
    p = subparsers.add_parser("distill", formatter_class=Formatter, description=_DESCRIPTION,
                              help="tune a trained run into a consistency model that samples in 2 steps (ECT)")
    p.add_argument("run", metavar="RUN", help="a run folder written by 'ddpm train' (its newest checkpoint's EMA)")
    p.add_argument("--out", required=True, help="the new run folder of the tuned model")
    p.add_argument("--minutes", type=float, default=None,
                   help="minutes of tuning (the stages follow the time; resumes count it whole)")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps of tuning (with --minutes: whichever "
                                                           "comes first)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (unset: a thirtieth of RUN's)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch (unset: RUN's)")
    p.add_argument("--data", default=None, help="training images (unset: RUN's own --data)")
    p.add_argument("--resume", action="store_true",
                   help="continue the tuning run in --out (bit-exact with a --steps budget; with --minutes the "
                        "stages follow the clock)")
    p.add_argument("--seed", type=int, default=None, help="random seed (unset: RUN's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_runtime_arguments(p)
    # Unset: the teacher's (a new tuning) or the tuning run's own (--resume), never a changed setting.
    p.set_defaults(func=_cmd_distill, device=None, precision=None)


def distill_config(run: str | Path, out: str | Path, *, minutes: float | None = None, steps: int | None = None,
                   **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of tuning ``run`` (a run folder) into ``out``: the teacher's
    training options (model, schedule, target, data, classes, batch, EMA) with the tuning ones
    (consistency objective, :data:`LR_FRACTION` of its learning rate, constant, 2-step grids),
    starting from its newest checkpoint's EMA weights, for ``minutes`` of training and/or
    ``steps`` steps; ``overrides`` are further TrainConfig fields. Raises :class:`DDPMError` (one line) for a
    folder that holds no trained run, a run that is already a consistency model, neither budget
    given, or a budget that is not positive."""
    if minutes is None and steps is None:
        raise DDPMError("give the tuning's length: --minutes M or --steps N (or both)")
    if minutes is not None and not minutes > 0:
        raise DDPMError(f"--minutes must be positive, got {minutes}")
    if steps is not None and steps < 1:
        raise DDPMError(f"--steps must be at least 1, got {steps}")
    folder = RunFolder(run)
    try:
        teacher = RunConfig.read(folder)
    except DDPMError as e:
        raise DDPMError(f"{str(run)!r} is not a trained run to distill ({e})") from None
    checkpoint = folder.latest_checkpoint()
    if checkpoint is None:
        raise DDPMError(f"{str(run)!r} has no checkpoint yet; train it first")
    if teacher.consistency:
        raise DDPMError(f"{str(run)!r} is already a consistency model (tuned from {teacher.train.get('init_from')}); "
                        "sample it with --sampler consistency, or distill the run it came from")
    if teacher.imported is not None or teacher.train.get("model") == IMPORTED:
        raise DDPMError(f"{str(run)!r} holds a network brought in by 'ddpm import'; distilling one is not supported "
                        "(its architecture is no preset); distill a run trained by 'ddpm train'")
    values = {k: v for k, v in teacher.train.items() if k in TrainConfig.field_names() and k not in MACHINE_LOCAL}
    values.update(_TUNING)
    values.update(out=str(out), init_from=str(checkpoint.resolve()), lr=float(values.get("lr") or 2e-4) * LR_FRACTION,
                  time_limit=float(minutes or 0.0), steps=int(steps or _NO_STEP_LIMIT))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(values)


def _cmd_distill(args: argparse.Namespace) -> int:
    common = dict(lr=args.lr, batch_size=args.batch_size, data=args.data, seed=args.seed, device=args.device,
                  precision=args.precision, progress=False if args.no_progress else None)
    saved = RunFolder(args.out).config_path
    if args.resume and saved.is_file():  # the tuning run's own options, with a new budget if given
        own = RunConfig.read(RunFolder(args.out))
        if not own.consistency:
            raise DDPMError(f"--out {str(args.out)!r} holds a diffusion run, not a consistency tuning; resume it with "
                            "ddpm train --resume, or choose another --out")
        values = {k: v for k, v in own.train.items() if k not in MACHINE_LOCAL}
        if args.minutes is not None:
            values["time_limit"] = float(args.minutes)
        if args.steps is not None:
            values["steps"] = int(args.steps)
        values.update({k: v for k, v in common.items() if v is not None}, resume=True, out=str(args.out))
        cfg = config_from_dict(values)
    else:
        cfg = distill_config(args.run, args.out, minutes=args.minutes, steps=args.steps, resume=args.resume, **common)
    outcome = train(cfg)
    # A tuning given minutes alone ends at its time limit: that is its finish, not a stop to resume.
    done = outcome.finished or (outcome.stopped_by == "--time-limit" and cfg.steps >= _NO_STEP_LIMIT)
    return EXIT_OK if done else EXIT_STOPPED
