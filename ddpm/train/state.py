"""What a training run carries from step to step, and what a checkpoint holds of it: the model,
its EMA, the optimiser, the step reached and the seconds of training so far; and
:func:`train_step`, the optimiser step that takes the state one step on.

A :class:`TrainState` is made fresh (:meth:`TrainState.create`), filled from a checkpoint after
checking that the checkpoint continues this run (:meth:`TrainState.restore`), and written as a
checkpoint (:meth:`TrainState.save`), all here, so that what is saved and what is restored cannot
drift apart.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from ..core.ema import EMA, edm_ema_decay
from ..core.unet import UNet, UNetConfig
from ..data.sets import ImageSet, same_images
from ..errors import DDPMError
from ..files.images import count_hidden_images, count_linked_images
from ..run.checkpoint import load_checkpoint, save_checkpoint
from ..run.config import RunConfig
from ..run.folder import RunFolder, run_write_errors
from ..runtime.policy import load_optimizer_state, make_optimizer, prepare_model
from .config import TrainConfig, check_resume_compatible
from .loss import DiffusionLoss

__all__ = ["TrainState", "TrainClock", "StepSettings", "StepResult", "train_step"]


class TrainClock:
    """A run's training time: the seconds of earlier sessions plus this one's, less the time spent
    drawing sample grids and evaluating (so --time-limit, the learning-rate schedule it drives and
    the saved ``train_seconds`` leave them out, and turning evaluation on does not shorten a
    time-limited run). It runs from when it is made."""

    def __init__(self, before: float) -> None:
        self.before = before
        self.start = time.perf_counter()
        self.excluded = 0.0

    def seconds(self) -> float:
        """Seconds of training in this run so far, resumed sessions included."""
        return self.before + time.perf_counter() - self.start - self.excluded

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (sampling, evaluating) out of the training time."""
        self.excluded += seconds


@dataclass(eq=False)
class TrainState:
    """The model being trained, its EMA, the optimiser, the number of optimiser steps taken, the
    seconds of training in earlier sessions (``train_seconds``), the newest checkpoint of the
    run (the one resumed from or the last written; None before the first) and, once the loop
    starts it, the training clock."""

    model: torch.nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    step: int = 0
    train_seconds: float = 0.0
    last_checkpoint: Path | None = None
    clock: TrainClock | None = None

    @classmethod
    def create(cls, model_cfg: UNetConfig, cfg: TrainConfig, device: torch.device) -> TrainState:
        """A fresh state at step 0: a :class:`~ddpm.core.unet.UNet` of ``model_cfg`` initialised
        from the global torch generator (seed it first: every rank must build the same weights),
        on ``device`` in ``cfg``'s memory layout and with its ``--grad-checkpoint``, an EMA of
        decay ``--ema-decay`` and AdamW with ``--lr`` and ``--weight-decay``."""
        model = UNet(model_cfg)
        model.grad_checkpoint = cfg.grad_checkpoint
        prepare_model(model, device, channels_last=cfg.channels_last)
        ema = EMA(model, cfg.ema_decay)
        opt = make_optimizer(model.parameters(), device, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return cls(model, ema, opt)

    def restore(self, path: Path, cfg: TrainConfig, data: ImageSet, model_cfg: UNetConfig,
                device: torch.device) -> None:
        """Load the checkpoint ``path`` into the model, EMA and optimiser after checking that it
        continues this run (same model, classes, data and the options that shape the run), and
        take its step and seconds of training. Raises :class:`DDPMError` when it does not fit, or
        when the run has used its --time-limit."""
        run_dir = Path(cfg.out)
        saved_step, saved_dict, state = load_checkpoint(path, "cpu")
        saved = RunConfig.from_dict(saved_dict, f"checkpoint {str(path)!r}")
        if saved.imported is not None and not saved.train.get("data"):
            # The first training of an imported run: its saved training options are placeholders,
            # so all are free except the target the imported network predicts.
            if cfg.prediction != saved.prediction:
                raise DDPMError(f"the imported network predicts {saved.prediction!r}; "
                                f"--prediction {cfg.prediction} would need another network")
        else:
            check_resume_compatible(saved.train, cfg)
        _check_same_run(path, saved)
        _check_same_classes(saved, data)
        _check_same_data(saved, cfg, data)
        if saved.model.to_dict() != model_cfg.to_dict() or saved.classes != data.classes:
            raise DDPMError(f"the data or model no longer match the run in {str(run_dir)!r} "
                            "(different classes or model settings); use a new --out")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        if "optimizer" in state:  # an imported run has none: AdamW starts afresh
            load_optimizer_state(self.opt, state["optimizer"], device)
        train_seconds = float(state.get("train_seconds", 0.0))
        if cfg.time_limit > 0 and train_seconds >= 60.0 * cfg.time_limit and saved_step < cfg.steps:
            raise DDPMError(f"the run in {str(run_dir)!r} has used its --time-limit of {cfg.time_limit:g} min "
                            f"({train_seconds / 60:.1f} min of training); pass a larger --time-limit to continue it")
        self.step, self.train_seconds, self.last_checkpoint = saved_step, train_seconds, path

    def start_from(self, path: str | Path, model_cfg: UNetConfig, classes: list[str] | None, prediction: str,
                   schedule: Any) -> int:
        """Load the EMA weights of the checkpoint ``path`` into both the model and the EMA of this
        new run (``ddpm distill`` starts from its teacher's average); returns the checkpoint's step.
        Raises :class:`DDPMError` when its network, classes (label i must mean the same class),
        target or schedule are not this run's."""
        step, saved_dict, state = load_checkpoint(path, "cpu", only=("ema",))
        saved = RunConfig.from_dict(saved_dict, f"checkpoint {str(path)!r}")
        differ = [what for what, same in (
            ("network", saved.model.to_dict() == model_cfg.to_dict()), ("classes", saved.classes == classes),
            ("target", saved.prediction == prediction), ("schedule", saved.schedule.to_dict() == schedule.to_dict()))
            if not same]
        if differ:
            raise DDPMError(f"--init-from {str(path)!r} has another {' and '.join(differ)} than this run; start from "
                            "a checkpoint of the same settings and class folders")
        self.model.load_state_dict(state["ema"]["weights"])
        self.ema.module.load_state_dict(state["ema"]["weights"])
        return step

    def start_clock(self) -> None:
        """Start counting this session's training time, on top of ``train_seconds``."""
        self.clock = TrainClock(self.train_seconds)

    def training_seconds(self) -> float:
        """Seconds of training in this run so far: earlier sessions' and, once the clock runs, this one's."""
        return self.clock.seconds() if self.clock is not None else self.train_seconds

    def save(self, run_dir: Path, run_config: RunConfig, keep: int) -> Path:
        """Write the checkpoint of this step into ``run_dir`` with the run's ``run_config`` (its
        config.json), keeping the newest ``keep``; returns its path. Raises :class:`DDPMError`
        when it cannot be written (a full disk): the earlier checkpoints are then intact."""
        state = {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                 "train_seconds": self.training_seconds()}
        with run_write_errors(run_dir, f"the checkpoint of step {self.step}"):
            return save_checkpoint(run_dir, self.step, run_config, state, keep=keep)

    def non_finite_error(self, what: str) -> DDPMError:
        """The error that stops a run whose loss or weights stopped being finite at this step
        (``what`` says which), naming what is safe."""
        last = self.last_checkpoint
        return DDPMError(f"{what} by step {self.step}; stopped without saving ("
                         + (f"the last good checkpoint {last} is intact" if last else
                            "no checkpoint had been written yet")
                         + "). Try a lower --lr, --precision fp32 or --grad-clip 1")


@dataclass(frozen=True)
class StepSettings:
    """How :func:`train_step` computes a step, fixed for a run (``from_config``): the micro-batches
    each process's batch is split into, the gradient-norm clip (0: measured, not clipped), the
    EMA rule (``ema_rampup`` 0: the EMA's own warm-up; else EDM's half-life of ``ema_rampup`` x
    the images seen, at most ``ema_halflife_kimg`` thousand, for a global ``batch_size``) and
    the autocast context of the forward passes."""

    grad_accum: int = 1
    grad_clip: float = 1.0
    ema_rampup: float = 0.05
    ema_halflife_kimg: float = 500.0
    batch_size: int = 64
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    @classmethod
    def from_config(cls, cfg: TrainConfig,
                    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
                    ) -> StepSettings:
        """The settings of ``cfg`` (``--grad-accum``, ``--grad-clip``, ``--ema-rampup``,
        ``--ema-halflife-kimg``, ``--batch-size``), forward passes under ``autocast()`` (the
        runtime's, :attr:`ddpm.runtime.policy.Runtime.autocast`)."""
        return cls(grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, ema_rampup=cfg.ema_rampup,
                   ema_halflife_kimg=cfg.ema_halflife_kimg, batch_size=cfg.batch_size, autocast=autocast)

    def ema_decay(self, ema: EMA, step: int) -> float:
        """The EMA decay of optimiser step ``step`` (0-based)."""
        if self.ema_rampup == 0:
            return ema.current_decay()
        return edm_ema_decay(step * self.batch_size, self.batch_size, self.ema_halflife_kimg, self.ema_rampup)


class StepResult(NamedTuple):
    """What :func:`train_step` returns: the step's mean loss and the gradient norm before clipping
    (float64 0-dim tensors on the device, not synchronised, so the caller decides when to read
    them), and the EMA decay used."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    ema_decay: float


def train_step(net: Callable[..., torch.Tensor], state: TrainState, loss_fn: DiffusionLoss, x0: torch.Tensor,
               labels: torch.Tensor | None, *, lr: float, generator: torch.Generator | None,
               settings: StepSettings) -> StepResult:
    """One optimiser step of ``ddpm train``, the one ``benchmarks/speed.py`` times too: step
    ``state.step`` (0-based; the caller advances ``state.step``).

    Sets the learning rate ``lr``; splits ``x0`` (float [B, C, H, W] in [-1, 1], this process's
    share of the global batch, on the model's device) and ``labels`` (int64 [B] or None) into
    ``settings.grad_accum`` micro-batches; for each, ``loss_fn(net, x0, labels, generator)``
    under ``settings.autocast()`` gives the per-sample loss (timesteps, noise and label dropout
    from ``generator``, dropout masks from the global generator), whose mean is
    back-propagated; then clips the global gradient norm of ``state.model`` to
    ``settings.grad_clip`` (0: measured, not clipped), steps ``state.opt`` and updates
    ``state.ema`` with the decay of :meth:`StepSettings.ema_decay`. ``net`` is ``state.model``
    itself or a wrapper of it (DistributedDataParallel, torch.compile, a peer's call adapter);
    under DDP gradients are synchronised on the last micro-batch only.

    Returns a :class:`StepResult` ``(loss, grad_norm, ema_decay)``. Raises ``ValueError`` for a
    batch that does not split into ``settings.grad_accum`` equal micro-batches, and (from the
    loss) for labels without a null class.
    """
    accum = settings.grad_accum
    if accum < 1 or x0.shape[0] < accum or x0.shape[0] % accum:
        raise ValueError(f"a batch of {x0.shape[0]} images does not split into {accum} equal micro-batches")
    for group in state.opt.param_groups:
        group["lr"] = lr
    state.opt.zero_grad(set_to_none=True)
    micro = x0.shape[0] // accum
    no_sync = getattr(net, "no_sync", None)
    loss_sum = torch.zeros((), device=x0.device, dtype=torch.float64)
    for k in range(accum):
        sl = slice(k * micro, (k + 1) * micro)
        # DDP: all-reduce the gradients once, after the last micro-batch.
        ctx = no_sync() if (no_sync is not None and k < accum - 1) else contextlib.nullcontext()
        with ctx, settings.autocast():
            losses = loss_fn(net, x0[sl], None if labels is None else labels[sl], generator)
            loss = losses.mean() / accum
        loss.backward()
        loss_sum += loss.detach().double()
    # The norm returned is the one before clipping. With --grad-clip 0, max_norm = inf only
    # measures it: the scale factor is clamped to exactly 1, so the weights are unchanged.
    grad_norm = torch.nn.utils.clip_grad_norm_(state.model.parameters(),
                                               settings.grad_clip if settings.grad_clip > 0 else math.inf)
    state.opt.step()
    ema_decay = settings.ema_decay(state.ema, state.step)
    state.ema.update(state.model, ema_decay)
    return StepResult(loss_sum, grad_norm.detach().double(), ema_decay)


def _check_same_run(path: Path, saved: RunConfig) -> None:
    """Refuse a newest checkpoint that another run wrote (copied into this folder): its network,
    schedule or data differ from the folder's own config.json."""
    folder = RunFolder(path.parent.parent)
    if not folder.config_path.is_file():
        return
    try:
        own = RunConfig.read(folder)
    except DDPMError:
        return  # an unreadable config.json is rewritten at this start; the checkpoint decides
    # The data's images, not its path: a resume with the data moved rewrites config.json's path
    # before its first checkpoint, and a session that dies then must still resume.
    mine, theirs = own.to_dict(), saved.to_dict()
    same = all(mine.get(k) == theirs.get(k) for k in ("model", "schedule", "classes"))
    # Digests of one kind only (runs recorded before 'names' hashed otherwise; the model check holds).
    comparable = own.data is not None and saved.data is not None and own.data.get("names") == saved.data.get("names")
    if own.data is not None and saved.data is not None and (
            not same or (comparable and own.data.get("names_sha256") != saved.data.get("names_sha256"))):
        raise DDPMError(f"the newest checkpoint {str(path)!r} was written by another run (its network, schedule or data "
                        f"differ from {str(folder.config_path)!r}); move it out of the folder, or resume the run it "
                        "came from")


def _check_same_classes(saved: RunConfig, data: ImageSet) -> None:
    """Refuse to continue a conditional run whose class folders were renamed, added or removed,
    naming them (the labels would mean other classes)."""
    if not saved.classes or not data.classes or saved.classes == data.classes:
        return
    gone = [c for c in saved.classes if c not in data.classes]
    new = [c for c in data.classes if c not in saved.classes]
    what = "; ".join(s for s in (f"gone: {', '.join(gone)}" if gone else "", f"new: {', '.join(new)}" if new else "") if s)
    raise DDPMError(f"the class folders changed since this run began ({what or 'their order changed'}); restore "
                    "their names or start a new --out")


def _check_same_data(saved: RunConfig, cfg: TrainConfig, data: ImageSet) -> None:
    """Refuse to continue a run on other images than it began with: its data order (a
    permutation of the indices) would continue over other pictures. Runs that recorded their
    data's identity are checked by it; older ones by the image count. Where the folder itself
    did not change but ddpm's reading of it did (hidden files skipped, linked folders followed),
    the message says so."""
    if saved.data is not None and not same_images(saved.data, cfg.data, data):
        if saved.data.get("path") == str(Path(cfg.data).expanduser().resolve()):
            _explain_count(saved.data.get("images"), cfg, data)
            raise DDPMError(f"the images under --data {cfg.data!r} changed since this run began ({saved.data.get('images')} "
                            f"-> {len(data)} images, or files renamed, added or unreadable); restore them or start a "
                            "new --out")
        raise DDPMError(f"--data {cfg.data!r} is not the data this run began with ({saved.data.get('path')!r}, "
                        f"{saved.data.get('images')} images): its images are not those this run began with; pass "
                        f"--data {saved.data.get('path')!r} or start a new --out")
    if saved.num_images in (None, len(data)):
        return
    _explain_count(saved.num_images, cfg, data)
    raise DDPMError(f"the data changed since this run began ({saved.num_images} -> {len(data)} "
                    "images); restore it or start a new --out")


def _explain_count(then: int | None, cfg: TrainConfig, data: ImageSet) -> None:
    """Raise the message that names the cause when an older ddpm counted the same folder
    differently: hidden files it read, linked folders it did not follow."""
    if not cfg.data or then is None or then == len(data):
        return
    hidden = count_hidden_images(cfg.data)
    if hidden and len(data) + hidden == then:
        raise DDPMError(f"this run was started counting {hidden} hidden image file(s) under --data "
                        f"{cfg.data!r} (names starting with '.') that ddpm now skips, so its data order "
                        "cannot be continued; start a new --out")
    linked = count_linked_images(cfg.data)
    if linked and len(data) - linked == then:
        raise DDPMError(f"this run was started by a ddpm that did not follow symbolic links to folders, and "
                        f"{linked} image(s) under --data {cfg.data!r} are behind such links, so its data order cannot "
                        "be continued; move the linked folders out of --data to continue it, or start a new --out")
