"""Training: ``train(config)``, the loop.

The loop, top to bottom: load data; build model, EMA, optimiser; resume if asked; then for
each step draw a batch, compute the per-sample denoising loss, step the optimiser, update the
EMA; every so often log, write a checkpoint, draw a sample grid and evaluate. What it is made
of lives beside it: the options (:mod:`.config`), the loss (:mod:`.loss`), the state a
checkpoint holds and the optimiser step that advances it (:mod:`.state`), and what the run
reports (:mod:`.monitor`).

Reproducibility: every random draw of step ``s`` (batch order, flips, timesteps, noise, label
dropout, dropout masks) is seeded from ``(seed, s, rank)``, and checkpoints hold the model,
EMA and optimiser state exactly, so a run resumed at step ``s`` continues bit-identically on
the CPU, whatever happened to the process in between.

Distributed: under ``torchrun`` the model is wrapped in DistributedDataParallel, each rank
takes its slice of every global batch, and rank 0 alone writes files and prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator, NamedTuple

import torch
import torch.distributed as dist

from ..core.schedule import Schedule
from ..core.unet import PRESETS, UNetConfig, count_parameters
from ..data.cache import CacheSettings, open_training_set
from ..data.sets import BatchStream, ImageSet, _mix, batches, data_identity, load_dataset, names_cifar10, to_model_range
from ..errors import DDPMError, StoppedEarly, first_line
from ..run.checkpoint import Sampleable, weights_sha256
from ..run.config import RunConfig
from ..run.folder import RunFolder
from ..runtime.policy import Runtime, is_compile_failure, is_out_of_memory, out_of_memory_error, resolve_runtime
from ..runtime.processes import Dist, any_rank, lost_peer, on_rank_0, process_group
from .config import IMPORTED, TrainConfig, default_lr, lr_at, run_progress, validate
from .loss import ConsistencyLoss, DiffusionLoss, training_loss
from .monitor import Monitor, final_eval_logged
from .state import StepSettings, TrainState, train_step

__all__ = ["train", "TrainOutcome"]


class TrainOutcome(NamedTuple):
    """How :func:`train` ended: ``checkpoint`` (the newest, or the run folder when none was
    written), ``step`` reached, ``finished`` (``--steps`` reached, or nothing was left to do) and,
    when not, ``stopped_by`` (``"SIGTERM"`` or ``"--time-limit"``: the run resumes with
    ``--resume``)."""

    checkpoint: Path
    step: int
    finished: bool
    stopped_by: str | None = None


def train(cfg: TrainConfig, *, on_step: Callable[[int, float], None] | None = None) -> TrainOutcome:
    """Train a model as ``cfg`` says; returns how it ended (:class:`TrainOutcome`: the final
    checkpoint, whether ``--steps`` was reached or a SIGTERM or ``--time-limit`` stopped it).

    ``on_step(step, loss)`` is called on rank 0 after each logged interval (for tests and
    notebooks). Raises :class:`DDPMError` for bad settings or data, and when the loss stops
    being finite (the last good checkpoint is left as it was).
    """
    # The SIGTERM handler comes first: a scheduler may stop a job while it joins its peers or
    # decodes its data, and that must end it as a stop (exit 3), not kill it half-way.
    # On a clean exit the ranks meet once more: rank 0 draws the last grid alone, and without that
    # meeting the others tore the process group down under it (gloo then aborted rank 0 at exit).
    with _StopOnSigterm() as sigterm, process_group(cfg.device) as d:
        try:
            with contextlib.ExitStack() as held:  # held: the run folder's lock
                return _train(cfg, d, on_step, held, sigterm)
        except StoppedEarly:
            raise
        except Exception as e:
            # Stopped in set-up, the error is the signal's doing: a decoding pool's workers killed
            # by it, a peer that stopped first. In the loop a transport error means a lost peer.
            if sigterm.requested and sigterm.in_setup:
                raise _stopped_in_setup(d) from None
            if d.world > 1 and lost_peer(e):
                raise _lost_contact(cfg, d, sigterm.requested) from None
            raise


def _train(cfg: TrainConfig, d: Dist, on_step: Callable[[int, float], None] | None,
           held: contextlib.ExitStack, sigterm: _StopOnSigterm) -> TrainOutcome:
    """The set-up of :func:`train`, then :func:`_loop`. Until the loop begins a SIGTERM ends it
    at once (:class:`StoppedEarly`; nothing is half-written: every file is written atomically)."""
    sigterm.interrupt = functools.partial(_stopped_in_setup, d)
    validate(cfg, d.world)
    lr_default = cfg.lr is None
    if lr_default:
        cfg = dataclasses.replace(cfg, lr=_learning_rate(cfg))
    if not names_cifar10(cfg.data):
        # Saved absolute, so that '--resume' from any directory (a requeued job) finds the same data.
        cfg = dataclasses.replace(cfg, data=str(Path(cfg.data).expanduser().resolve()))
    if cfg.init_from:
        cfg = dataclasses.replace(cfg, init_from=str(Path(cfg.init_from).expanduser().resolve()))
    # device and precision are decided here once; "bf16" where it would not run becomes fp32 (warned).
    # No CUDA graphs for the grids and in-training FID: entering a capture synchronises and empties
    # the allocator's cache, which costs the training steps more than a grid's few hundred calls gain.
    runtime = resolve_runtime(cfg.device, cfg.precision, local_rank=d.local_rank, world=d.world,
                              channels_last=cfg.channels_last, compile=cfg.compile, progress=cfg.progress and d.main,
                              cuda_graphs=False)
    folder = RunFolder(cfg.out)
    say = print if d.main else _silent
    _take_run_folder(folder, d, runtime.device, held)

    # ---- resume: the saved run config wins for everything that shapes the model
    resume_path = _resume_path(cfg, folder, say)

    # ---- data
    imported = _imported_config(folder) if cfg.model == IMPORTED else None
    data = _load_data(cfg, d, folder.path, imported)
    say(f"data: {len(data)} images at {data.image_size}x{data.image_size}"
        + (f", {len(data.classes)} classes: {', '.join(data.classes)}" if data.classes else ", unconditional"))

    # ---- model, schedule, loss, EMA, optimiser (identical on every rank: same seed)
    torch.manual_seed(cfg.seed)
    model_cfg, schedule = _model_and_schedule(cfg, data.classes, imported)
    loss_fn = training_loss(cfg, schedule, model_cfg.null_class)
    state = TrainState.create(model_cfg, cfg, runtime.device)
    run_config = RunConfig(model_cfg, schedule, cfg.prediction, data.classes, len(data), asdict(cfg),
                           imported=imported.imported if imported is not None else None,
                           data=data_identity(cfg.data, data))
    # What the sample grids and the in-training FID sample from, as 'ddpm sample' samples a loaded
    # run: generate() uses the EMA network and leaves it (and the training network) as it was.
    sampleable = Sampleable(model=state.model, ema_model=state.ema.module, schedule=schedule, classes=data.classes,
                            prediction=cfg.prediction, image_size=model_cfg.image_size)
    if resume_path is not None:
        state.restore(resume_path, cfg, data, model_cfg, runtime.device)
        say(f"resumed from {resume_path} at step {state.step}")
    elif cfg.init_from:
        teacher_step = state.start_from(cfg.init_from, model_cfg, data.classes, cfg.prediction, schedule)
        say(f"starting from the EMA weights of {cfg.init_from} (step {teacher_step})")
    # A run killed after its last checkpoint but before that step's evaluation still owes it.
    final_eval_missing = (cfg.eval_every > 0 and state.step == cfg.steps > 0
                          and not final_eval_logged(folder.path, state.step))
    if state.step >= cfg.steps and not final_eval_missing:
        say(f"nothing to do: the run is at step {state.step} and --steps is {cfg.steps}")
        return TrainOutcome(resume_path, state.step, True)  # type: ignore[arg-type]

    if d.main:
        run_config.write(folder)
    say(f"model: {cfg.model}, {count_parameters(state.model) / 1e6:.2f}M parameters, {runtime.describe()}"
        + (f", {d.world} processes" if d.world > 1 else ""))
    say(f"batch: {cfg.batch_size} global = {d.world} process(es) x {cfg.grad_accum} micro-batch(es) x "
        f"{cfg.batch_size // (d.world * cfg.grad_accum)} images")
    say(f"lr: {cfg.lr:.3g}" + (f" (the default for {cfg.model} at a global batch of {cfg.batch_size}; --lr sets "
                                "another)" if lr_default and resume_path is None else ""))

    stream = BatchStream(len(data), cfg.batch_size, cfg.seed, rank=d.rank, world=d.world, hflip=cfg.hflip)
    workers = cfg.workers if cfg.workers is not None else min(4, os.cpu_count() or 1)
    it = batches(data, stream, state.step, workers=workers, pin_memory=runtime.device.type == "cuda")
    monitor = Monitor(cfg, d, runtime, sampleable, stream, state.step, on_step)
    return _loop(cfg, d, runtime, state, loss_fn, it, monitor, run_config, sigterm)


def _loop(cfg: TrainConfig, d: Dist, runtime: Runtime, state: TrainState, loss_fn: DiffusionLoss | ConsistencyLoss,
          it: Iterator[tuple[torch.Tensor, torch.Tensor | None]], monitor: Monitor, run_config: RunConfig,
          sigterm: _StopOnSigterm) -> TrainOutcome:
    """Train ``state`` from its step to ``cfg.steps`` (or a stop) on the batches ``it``, reporting
    through ``monitor``; returns how it ended (:class:`TrainOutcome`)."""
    device, say, run_dir = runtime.device, print if d.main else _silent, Path(cfg.out)
    stopped_by: str | None = None
    net = _training_net(state.model, d, device, runtime.compile)
    compiling = runtime.compile  # until the first step has run compiled (or failed to compile)
    settings = StepSettings.from_config(cfg, runtime.autocast)
    elapsed = state.train_seconds  # seconds of training in this run so far, the same on every rank
    state.model.train()
    # From here a SIGTERM asks: the step in flight finishes, all ranks agree, the run saves and stops.
    sigterm.interrupt, sigterm.in_setup = None, False
    with monitor:
        state.start_clock()
        monitor.owed_evaluation(state)
        while state.step < cfg.steps:
            # Everything random in this step derives from (seed, step, rank): data order and
            # flips (in the stream), timesteps, noise, label dropout, dropout masks.
            torch.manual_seed(_mix(cfg.seed, state.step, d.rank, 0xD1CE))
            gen = torch.Generator(device=device).manual_seed(_mix(cfg.seed, state.step, d.rank, 0x7E57))
            if d.world == 1:
                elapsed = state.training_seconds()
            # else: the value all ranks agreed on at the last check below, so their rates stay equal
            lr = lr_at(state.step, cfg, elapsed)
            if isinstance(loss_fn, ConsistencyLoss):  # the gap of its stage shrinks as the run goes on
                loss_fn = loss_fn.at(run_progress(state.step, cfg, elapsed))
            t0 = time.perf_counter()
            x, y = _to_device(next(it), device, cfg.channels_last)
            data_wait = time.perf_counter() - t0  # the host waiting for a batch (decoding, copying)
            t_step = time.perf_counter()
            try:
                result = train_step(net, state, loss_fn, x, y, lr=lr, generator=gen, settings=settings)
            except Exception as e:
                if is_out_of_memory(e):
                    raise _oom(e, cfg, x) from None
                if not (compiling and is_compile_failure(e)):
                    raise
                # Compiling happens in the first step's forward pass, before any update: the same
                # step again, eager and from the same seeds, is the run as if never compiled.
                warnings.warn(f"torch.compile failed ({first_line(e)}); training without it (--no-compile "
                              "skips the attempt)", stacklevel=1)
                net, compiling = _training_net(state.model, d, device, False), False
                torch.manual_seed(_mix(cfg.seed, state.step, d.rank, 0xD1CE))
                gen = torch.Generator(device=device).manual_seed(_mix(cfg.seed, state.step, d.rank, 0x7E57))
                result = train_step(net, state, loss_fn, x, y, lr=lr, generator=gen, settings=settings)
            if compiling:
                monitor.compiled(state, time.perf_counter() - t_step)
                compiling = False  # reported once; later recompiles (a last smaller batch) are short
            state.step += 1
            monitor.after_step(state, lr, result, data_wait)

            stop = False
            want_save = (cfg.save_every > 0 and state.step % cfg.save_every == 0) or state.step == cfg.steps
            # Under DDP, agreeing on a stop is a collective: do it every few steps, not every step.
            if d.world == 1 or state.step % 10 == 0 or want_save:
                elapsed = _agree_elapsed(state.training_seconds(), d, device)
                out_of_time = cfg.time_limit > 0 and elapsed > 60.0 * cfg.time_limit
                stop = any_rank(sigterm.requested or out_of_time, d, device) and state.step < cfg.steps
            if want_save or stop:
                _checkpoint(cfg, state, monitor, d, device, run_config)
            monitor.after_checkpoint(state, stopping=stop)
            if stop:
                stopped_by = "SIGTERM" if sigterm.requested else "--time-limit"
                why = "SIGTERM" if sigterm.requested else f"--time-limit {cfg.time_limit:g} min"
                say(f"\nstopped by {why} at step {state.step}; continue with --resume"
                    + (" and a larger --time-limit (it counts the whole run)" if not sigterm.requested else ""))
                break
    if d.world > 1:
        _check_replicas_agree(state, d, say)
    if d.main and state.last_checkpoint is not None:
        say(f"checkpoint: {state.last_checkpoint}")
    last = state.last_checkpoint if state.last_checkpoint is not None else run_dir
    return TrainOutcome(last, state.step, stopped_by is None, stopped_by)


def _oom(error: BaseException, cfg: TrainConfig, x: torch.Tensor) -> DDPMError:
    """The one line for a training step that ran out of memory (nothing was saved by it)."""
    micro = x.shape[0] // max(cfg.grad_accum, 1)
    return out_of_memory_error(
        error, f"a training step ({x.shape[0]} images of {x.shape[-1]}x{x.shape[-2]} per process, forward passes "
               f"of {micro})",
        "lower --batch-size, raise --grad-accum (same batch, smaller passes), or pass --grad-checkpoint; the run "
        "folder is as it was, so the same command with --resume continues it")


def _stopped_in_setup(d: Dist) -> StoppedEarly:
    """What a SIGTERM before the first step ends in: one line (rank 0), then exit 3."""
    if d.main:
        print("stopped by SIGTERM before training began; nothing was left half-written; run the same command "
              "again to start (or continue) the run", file=sys.stderr, flush=True)
    return StoppedEarly("SIGTERM during set-up")


def _lost_contact(cfg: TrainConfig, d: Dist, sigterm: bool) -> StoppedEarly:
    """The one line a surviving rank prints when another process of the run ended or was killed
    (its collectives fail with a transport error): which checkpoint is newest, and how to go on."""
    newest = RunFolder(cfg.out).latest_checkpoint()
    where = f"the newest checkpoint is {newest.name}" if newest is not None else "no checkpoint was written yet"
    print(f"rank {d.rank}: lost contact with another process of this run (it ended or was killed"
          f"{'; this one was sent SIGTERM too' if sigterm else ''}); {where}; resume with the same command",
          file=sys.stderr, flush=True)
    return StoppedEarly("lost a peer")


# ------------------------------------------------------------------------------- set-up
def _silent(*args: object, **kwargs: object) -> None:
    """``print`` of the ranks other than 0, which print nothing."""


def _learning_rate(cfg: TrainConfig) -> float:
    """The rate of a run started without ``--lr``: a resumed run's own (the command line takes it
    from config.json; a library caller may not), else :func:`~ddpm.train.config.default_lr`."""
    if cfg.resume:
        try:
            saved = RunConfig.read(RunFolder(cfg.out)).train.get("lr")
        except DDPMError:  # no run there yet, or an unreadable config.json the checkpoint replaces
            saved = None
        if isinstance(saved, (int, float)) and not isinstance(saved, bool):
            return float(saved)
    return default_lr(cfg.model, cfg.batch_size)


def _take_run_folder(folder: RunFolder, d: Dist, device: torch.device, held: contextlib.ExitStack) -> None:
    """Check that the run folder can be written (before minutes of decoding), then have rank 0,
    the only writer, lock it into ``held`` for the whole run; every rank learns whether it could,
    so that all stop together instead of waiting for rank 0 at a barrier."""
    folder.check_writable("--out")
    # Everything after this reads or writes the run folder, so it is this process's from here on.
    on_rank_0(d, device, functools.partial(_lock, folder, held), f"take the run folder {str(folder.path)!r}")
    if d.main:
        folder.remove_temp_files()


def _lock(folder: RunFolder, held: contextlib.ExitStack) -> None:
    held.enter_context(folder.lock(advice="wait for it to finish or choose another --out"))


def _resume_path(cfg: TrainConfig, folder: RunFolder, say: Callable[..., None]) -> Path | None:
    """The checkpoint to resume from: the newest in ``folder`` with --resume, else None. Raises
    :class:`DDPMError` for a run folder that holds a run and no --resume."""
    run_dir = folder.path
    resume_path = folder.latest_checkpoint() if cfg.resume else None
    if cfg.resume and resume_path is None:
        # A requeued job repeats its first command line: with nothing saved yet (no folder, or
        # one left by a process killed before its first checkpoint) that line starts the run.
        say(f"--resume: {str(run_dir)!r} has no checkpoint yet, starting a new run there")
    if not cfg.resume and folder.latest_checkpoint() is not None:
        raise DDPMError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it or choose another --out")
    return resume_path


def _load_data(cfg: TrainConfig, d: Dist, run_dir: Path, imported: RunConfig | None) -> ImageSet:
    """The training images at the run's resolution (an imported network's, else --image-size or
    the preset's), mapped from the decoded-data cache (:mod:`ddpm.data.cache`): rank 0 builds or
    maps it first, then the others map the same file (one copy in memory per node). Raises
    :class:`DDPMError` for a run folder inside the data and for unusable data."""
    if imported is not None:
        image_size = imported.image_size
    else:
        image_size = cfg.image_size or PRESETS[cfg.model].image_size
    data_path = Path(cfg.data).expanduser().resolve()
    if data_path.is_dir() and (run_dir.expanduser().resolve() == data_path or data_path in run_dir.expanduser().resolve().parents):
        raise DDPMError(f"--out {str(run_dir)!r} is inside --data {cfg.data!r}; the run's own sample grids would "
                        "become training images. Put the run folder elsewhere")
    # Rank 0 loads first (a CIFAR-10 download, one warning about bad files, the cache build),
    # then the others map what it made. A build can outlast the collectives' timeout (a million
    # photographs at 256 px), so the others wait on a group of their own with a day's patience;
    # if rank 0 dies meanwhile, its closed connection ends their wait at once.
    patient = dist.new_group(backend="gloo", timeout=timedelta(hours=24)) if d.world > 1 else None
    if d.world > 1 and not d.main:
        warnings.filterwarnings("ignore", message="skipped")
        dist.barrier(group=patient)
    if names_cifar10(cfg.data):  # torchvision's CIFAR-10 arrays: nothing to decode
        data = load_dataset(cfg.data, image_size, conditional=cfg.conditional, data_root=cfg.data_root or None,
                            progress=cfg.progress and d.main)
    else:
        cache = CacheSettings(dir=Path(cfg.data_cache).expanduser() if cfg.data_cache else None,
                              enabled=not cfg.no_data_cache, workers=cfg.workers)
        data = open_training_set(cfg.data, image_size, conditional=cfg.conditional, random_crop=cfg.random_crop,
                                 strict=cfg.strict, drop_empty_classes=cfg.drop_empty_classes, cache=cache,
                                 progress=cfg.progress and d.main)
    if d.world > 1 and d.main:
        dist.barrier(group=patient)
    if patient is not None:
        dist.destroy_process_group(patient)
    return data


def _model_and_schedule(cfg: TrainConfig, classes: list[str] | None,
                        imported: RunConfig | None) -> tuple[UNetConfig, Schedule]:
    """The network and noise schedule of the run: an imported run's own, else ``cfg``'s."""
    if imported is not None:
        return imported.model, imported.schedule
    schedule = Schedule.from_name(cfg.schedule, cfg.timesteps, logsnr_shift=cfg.logsnr_shift,
                                  zero_terminal_snr=cfg.zero_terminal_snr)
    return _model_config(cfg, classes), schedule


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


def _imported_config(folder: RunFolder) -> RunConfig:
    """The config of a run written by 'ddpm import' (for ``--model imported``)."""
    try:
        saved = RunConfig.read(folder)
    except DDPMError as e:
        raise DDPMError(f"--model {IMPORTED} needs the config.json of a run written by 'ddpm import' in --out ({e})") from None
    if saved.imported is None:
        raise DDPMError(f"--model {IMPORTED} is for runs written by 'ddpm import', and {str(folder.path)!r} is not one; "
                        f"use a preset: {', '.join(PRESETS)}")
    return saved


def _training_net(model: torch.nn.Module, d: Dist, device: torch.device, compile: bool) -> torch.nn.Module:
    """What the steps call: ``model``, in DistributedDataParallel under torchrun and compiled
    with --compile (the same parameters: the optimiser, EMA and checkpoints see ``model``)."""
    net: torch.nn.Module = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        net = torch.compile(net)
    return net


# ------------------------------------------------------------------------------- the loop
class _StopOnSigterm:
    """While entered, a SIGTERM (a scheduler pre-empting the job; torchrun and SLURM signal every
    rank) sets ``requested`` instead of killing the process. While ``interrupt`` is set (set-up:
    joining, decoding, building the model) the handler then raises what it returns, ending the
    command at once; in the loop (``interrupt`` None) the current step finishes, the run saves and
    exits. Outside the main thread, where no handler can be installed, it does nothing."""

    def __init__(self) -> None:
        self.requested = False
        self.interrupt: Callable[[], BaseException] | None = None
        self.in_setup = True
        self.old_handler: Any = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        if self.interrupt is not None:
            interrupt, self.interrupt = self.interrupt, None  # once: cleanup code must not be cut short again
            raise interrupt()

    def __enter__(self) -> _StopOnSigterm:
        if hasattr(signal, "SIGTERM"):
            try:
                self.old_handler = signal.signal(signal.SIGTERM, self)
            except ValueError:  # not in the main thread
                self.old_handler = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.old_handler is not None:
            signal.signal(signal.SIGTERM, self.old_handler)


def _to_device(batch: tuple[torch.Tensor, torch.Tensor | None], device: torch.device,
               channels_last: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A batch of :func:`ddpm.data.sets.batches` (uint8 [b, 3, H, W], int64 [b] or None) as the
    step takes it: float [b, 3, H, W] in [-1, 1] and the labels, on ``device``."""
    x_u8, y = batch
    x = to_model_range(x_u8.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if y is not None:
        y = y.to(device, non_blocking=True)
    return x, y


def _save(state: TrainState, monitor: Monitor, run_dir: Path, run_config: RunConfig, keep: int) -> Path:
    """Rank 0's part of a checkpoint: write it, then redraw the curves."""
    path = state.save(run_dir, run_config, keep)
    monitor.checkpoint_written()
    return path


def _checkpoint(cfg: TrainConfig, state: TrainState, monitor: Monitor, d: Dist, device: torch.device,
                run_config: RunConfig) -> None:
    """Write the checkpoint of ``state.step`` (rank 0) once every rank agrees that its loss and
    weights are finite; all ranks return together. Raises :class:`DDPMError` on every rank for
    non-finite values (nothing is saved) and when rank 0 cannot write (a full disk)."""
    # A finite loss can still come with non-finite updates; never save such weights.
    ok = monitor.loss_finite() and all(bool(p.isfinite().all()) for p in state.model.parameters())
    if any_rank(not ok, d, device):
        raise state.non_finite_error("loss or weights became non-finite")
    save = functools.partial(_save, state, monitor, Path(cfg.out), run_config, cfg.keep)
    # None on the other ranks, as it always was: only rank 0 names checkpoints.
    state.last_checkpoint = on_rank_0(d, device, save, "write the checkpoint")
    if d.world > 1:
        dist.barrier()


def _check_replicas_agree(state: TrainState, d: Dist, say: Callable[..., None]) -> None:
    """Compare weight and EMA digests across ranks: DDP keeps replicas equal, and a silent
    divergence (a rank with different data or a non-deterministic kernel) would corrupt the run."""
    mine = weights_sha256(state.model.state_dict()) + weights_sha256(state.ema.module.state_dict())
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
