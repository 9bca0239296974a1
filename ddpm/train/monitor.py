"""What a training run shows while it trains: the log line (metrics.csv, TensorBoard, the loss and
FID curves, the progress bar), the sample grids and the in-training FID, the step losses and
gradient norms between log lines and the training images/s.

The loop calls :class:`Monitor` twice a step: :meth:`Monitor.after_step` once the optimiser has
stepped (the log line), :meth:`Monitor.after_checkpoint` once the step's checkpoint, if any, is
written (the grid and the evaluation come after it, so a failure while sampling loses no
training). Rank 0 alone writes; the other ranks take part in the agreements, so that an error on
rank 0 stops all of them.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..core.samplers import CONSISTENCY_SAMPLER, DEFAULT_SAMPLER, resolve_steps
from ..core.unet import UNet, UNetConfig
from ..data.sets import BatchStream
from ..files.atomic import atomic_write_json, atomic_write_text, atomic_write_with
from ..run.checkpoint import Sampleable
from ..run.folder import RunFolder, run_write_errors
from ..runtime import accounting
from ..runtime.policy import Runtime
from ..runtime.processes import Dist, any_rank, on_rank_0
from ..sample.engine import generate
from ..sample.pictures import make_grid, save_png
from ..sample.spec import SampleSpec
from ..scoring import evaluate
from .config import GRID_SEED_OFFSET, TrainConfig, eval_reference
from .state import StepResult, TrainState

__all__ = ["Monitor", "final_eval_logged"]


# Waiting for data longer than this fraction of a step's time is worth a warning (once per run).
STARVED = 0.10


class _Logger:
    """CSV + optional TensorBoard + curve PNGs (loss, and FID with --eval-every); only rank 0 makes one.

    Each logged row is appended to ``metrics.csv`` at once, so ``tail -f`` follows the run; the
    curves are redrawn when a checkpoint is written and after each evaluation.
    """

    FIELDS = ("step", "loss", "lr", "images_per_s", "epoch", "ema_decay", "grad_norm", "mfu", "data_wait", "fid", "kid")
    # Of a log interval: loss and grad_norm (the global L2 norm of the gradient before clipping)
    # are means over the interval; lr and ema_decay are those of its last step; images_per_s
    # counts training only; mfu is model FLOP/s (accounting.train_flops_per_image x images/s) over the
    # devices' data-sheet peak (accounting.peak_flops), left empty where that peak is unknown (CPUs);
    # data_wait is the mean seconds per step the host waited for its batch (decoding, copying).
    # TensorBoard gets the same numbers under the column names, and each sample grid as an image.
    # A row is one of two kinds, each with its own columns filled and the others left empty: a
    # log interval's (it has a loss) or an evaluation's (it has an FID, written by --eval-every).
    KINDS = ("loss", "fid")

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int) -> None:
        """Keep the rows of ``run_dir/metrics.csv`` up to ``resume_step`` (0 for a new run) and
        drop the rest. Raises :class:`DDPMError` when the file cannot be written."""
        self.path = RunFolder(run_dir).metrics_path
        self.rows: list[dict[str, float]] = []
        self.fid_floor: float | None = None  # drawn as a line on fid.png when known
        with run_write_errors(run_dir, "metrics.csv"):
            if self.path.exists():
                self.rows = self._read(resume_step)
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=self.FIELDS)
            w.writeheader()
            w.writerows(self.rows)
            atomic_write_text(self.path, buf.getvalue())
        self.tb = None
        if tensorboard:
            try:
                # Here, not at the top: tensorboard is an optional install.
                from torch.utils.tensorboard import SummaryWriter

                # purge_step hides the events of steps that will be redone (those of a process
                # killed after its last checkpoint), at step 0 too: a new run over a killed one.
                # Events of the resumed step itself stay: they were written with the weights of
                # its checkpoint, and the step's grid and evaluation are not redone.
                self.tb = SummaryWriter(str(RunFolder(run_dir).tensorboard_dir), purge_step=resume_step + 1)
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
            _plot_curve(RunFolder(run_dir).curve_path("loss"), losses, "loss (mean over log interval)")
        fids = [(r["step"], r["fid"]) for r in self.rows if "fid" in r]
        if fids:
            floor = None if self.fid_floor is None else (self.fid_floor, "floor: as many real images")
            _plot_curve(RunFolder(run_dir).curve_path("fid"), fids, "FID of EMA samples", marker="o", line=floor)

    def close(self) -> None:
        self.flush()
        self._tb("close")


def final_eval_logged(run_dir: Path, step: int) -> bool:
    """Whether RUN/metrics.csv has an evaluation row of ``step`` (an unreadable file counts as
    one: the logger reports it when the run goes on)."""
    try:
        return any(r["step"] == step and "fid" in r for r in _Logger.read_rows(RunFolder(run_dir).metrics_path, step))
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _plot_curve(path: Path, points: list[tuple[float, float]], ylabel: str, *, marker: str | None = None,
                line: tuple[float, str] | None = None) -> None:
    """Draw ``points`` (step, value) as a curve on a log y axis and write the PNG atomically;
    ``line`` is (value, label) of a dashed horizontal reference line. The run's curves
    (loss.png, fid.png) all come from here, so they look alike."""
    # Here, not at the top: pyplot takes 0.4 s to import, and only rank 0 draws.
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
    spec = SampleSpec(grid_sampler(cfg), cfg.sample_steps, cfg.sample_guidance if classes else 1.0,
                      cfg.seed + GRID_SEED_OFFSET, batch_size=n)
    images = generate(sampleable, n, spec, runtime.quiet(), labels=labels)
    grid = make_grid(images, nrow=nrow)
    save_png(grid, path)
    return grid


def grid_sampler(cfg: TrainConfig) -> str:
    """The sampler of a run's grids and in-training FID, in --sample-steps: DPM-Solver++ for a
    diffusion run, the consistency sampler for a consistency-tuning one (``ddpm distill``)."""
    return CONSISTENCY_SAMPLER if cfg.objective == "consistency" else DEFAULT_SAMPLER


def _train_flops_per_image(model_cfg: UNetConfig) -> float:
    """Model FLOPs of a training step per image (:func:`ddpm.runtime.accounting.train_flops_per_image`) for
    the UNet ``model_cfg``, counted on the meta device: no compute and no real weights touched."""
    with torch.device("meta"):
        net = UNet(model_cfg)
        size = model_cfg.image_size
        inputs = [torch.zeros(1, model_cfg.in_channels, size, size), torch.zeros(1, dtype=torch.long)]
        if model_cfg.conditional:
            inputs.append(torch.zeros(1, dtype=torch.long))
    return accounting.train_flops_per_image(net, *inputs)


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
        self.cfg, self.classes, self.batch, self.runtime = cfg, classes, batch, runtime
        self.ref_name = cfg.eval_ref or "the training images"
        # Unconditional scoring (no probe): the log line and metrics.csv carry FID and KID only.
        self.reference = evaluate.Reference.build(
            eval_reference(cfg), image_size, runtime if cfg.progress else runtime.quiet(),
            settings=evaluate.ReferenceSettings(cifar_root=cfg.data_root or None))
        self.ref = self.reference.stats
        self.steps = resolve_steps(grid_sampler(cfg), None, T)  # 'ddpm sample's default for such a run
        self.floor = self._floor(run_dir)

    def _floor(self, run_dir: Path) -> float | None:
        n = self.cfg.eval_n
        self.floor_lower_bound = evaluate.floor_is_lower_bound(self.ref, n)
        method = (f"FID of {n} reference feature vectors drawn with replacement (seed 0) against the whole "
                  "reference's statistics: a lower bound, the reference has fewer than 2n images"
                  if self.floor_lower_bound else
                  f"FID of a fixed subset of {n} reference images (seed 0) against the statistics of the others")
        path = RunFolder(run_dir).fid_floor_path
        # The method is part of the key: a floor kept by an older version, made another way, is redone.
        key = {"reference_key": self.ref.key, "n": n, "method": method}
        try:
            saved = json.loads(path.read_text())
            if {k: saved.get(k) for k in key} == key:
                return saved["fid_floor"]
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            pass  # absent, unreadable or for another reference or n: compute it
        value = evaluate.fid_floor(self.ref, n)
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
        cfg, n = self.cfg, self.cfg.eval_n
        labels = evaluate.spread_labels(n, self.classes)  # as 'ddpm eval' spreads its samples over the classes
        spec = SampleSpec(grid_sampler(cfg), self.steps, cfg.sample_guidance if self.classes else 1.0, cfg.seed,
                          batch_size=self.batch)
        images = generate(sampleable, n, spec, self.runtime.quiet(), labels=labels)
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


class _Meter:
    """The step losses and gradient norms since the last log line, summed on the device so that
    no step waits for the device; read (and reset) only at log lines."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device, dtype=torch.float64)
        self.grad_norm = torch.zeros((), device=device, dtype=torch.float64)
        self.count = 0
        self.ema_decay = 0.0
        self.data_wait = 0.0  # seconds, summed on the host

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, ema_decay: float, data_wait: float = 0.0) -> None:
        """Count one step's :func:`train_step` result and the seconds it waited for its batch."""
        self.loss += loss
        self.grad_norm += grad_norm
        self.count += 1
        self.ema_decay = ema_decay
        self.data_wait += data_wait

    def finite(self) -> bool:
        """Whether the losses summed since the last log line are finite."""
        return math.isfinite(float(self.loss))

    def read(self, d: Dist) -> tuple[float, float, float]:
        """Mean loss (averaged over the ranks), mean gradient norm (the same on every rank under
        DDP) and this rank's mean seconds of waiting for data per step since the last read;
        resets the sums."""
        mean_loss = self.loss / max(self.count, 1)
        if d.world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= d.world
        out = float(mean_loss), float(self.grad_norm) / max(self.count, 1), self.data_wait / max(self.count, 1)
        self.loss.zero_()
        self.grad_norm.zero_()
        self.count, self.data_wait = 0, 0.0
        return out


class _Rate:
    """Training images per second between log lines, leaving out the time spent drawing grids
    and evaluating. It runs from when it is made."""

    def __init__(self, step: int) -> None:
        self.last = time.perf_counter()
        self.step_last = step

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (sampling, evaluating) out of the current interval."""
        self.last += seconds

    def images_per_s(self, step: int, batch_size: int) -> float:
        """Training images per second since the previous call (or the start) at ``step``."""
        now = time.perf_counter()
        ips = (step - self.step_last) * batch_size / max(now - self.last, 1e-9)
        self.last, self.step_last = now, step
        return ips


def _silent(*args: object, **kwargs: object) -> None:
    """``print`` of the ranks other than 0, which print nothing."""


class Monitor:
    """Everything a run reports while it trains, made once before the loop, on every rank.

    Rank 0 holds the metrics.csv logger (with TensorBoard and the curves), the progress bar and,
    with --eval-every, the in-training FID (its reference statistics are made here, before the
    first step, so a bad reference costs no training); the other ranks hold none of them but
    take part in every agreement, so that all return together from each call and an error on
    rank 0 stops every rank. Use it as a context manager around the loop: leaving it closes the
    bar and the logger (whose last curves are drawn on a clean exit; on an error, the error is
    the one reported).
    """

    def __init__(self, cfg: TrainConfig, d: Dist, runtime: Runtime, sampleable: Sampleable, stream: BatchStream,
                 step: int, on_step: Callable[[int, float], None] | None) -> None:
        """Set up for a run at ``step`` (0, or the step resumed from) of ``cfg``'s run folder,
        sampling grids and evaluations from ``sampleable``; ``stream`` gives the epochs, and
        ``on_step(step, loss)`` is called on rank 0 after each log line. Raises
        :class:`DDPMError` (on every rank) when rank 0 cannot prepare the FID reference, and
        when metrics.csv cannot be written."""
        self.cfg, self.d, self.runtime, self.sampleable = cfg, d, runtime, sampleable
        self.stream, self.on_step = stream, on_step
        self.run_dir = Path(cfg.out)
        self.say = print if d.main else _silent
        self.evaluator = self._make_evaluator() if cfg.eval_every > 0 else None
        self.logger = _Logger(self.run_dir, cfg.tensorboard, step) if d.main else None
        if self.logger is not None and self.evaluator is not None:
            self.logger.fid_floor = self.evaluator.floor
        self.bar = (tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, desc="training")
                    if d.main and cfg.progress else None)
        # Model FLOPs utilisation needs the device's peak; where none is known (CPUs) it is not logged.
        self.peak = accounting.peak_flops(runtime.device, runtime.precision) if d.main else None
        model_cfg: UNetConfig = sampleable.model.config
        self.flops_per_image = _train_flops_per_image(model_cfg) if self.peak is not None else 0.0
        self.meter = _Meter(runtime.device)
        self.starved_warned = False
        self.rate = _Rate(step)  # last: images/s count from here, after the set-up above

    def _make_evaluator(self) -> _TrainingEval | None:
        """Rank 0's evaluator (None on the others, which wait for it at the agreement after each
        evaluation), its description printed."""
        cfg, d, s = self.cfg, self.d, self.sampleable
        micro = cfg.batch_size // (d.world * cfg.grad_accum)  # images per forward pass: the evaluator's batch
        make = functools.partial(_TrainingEval, cfg, self.run_dir, s.image_size, s.schedule.T, s.classes, micro,
                                 self.runtime)
        evaluator = on_rank_0(d, self.runtime.device, make, "prepare the FID reference")
        if evaluator is not None:
            self.say(evaluator.describe())
        return evaluator

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None and self.logger is not None:
                self.logger.close()
                self.logger = None
        finally:
            if self.bar is not None:
                self.bar.close()
            if self.logger is not None:
                # Leaving on an error: close what can be closed, but that error is the one to report.
                with contextlib.suppress(Exception):
                    self.logger.close()

    def owed_evaluation(self, state: TrainState) -> None:
        """Evaluate the step a run resumes at when it owes that step an evaluation: a run stopped
        (or killed) at an evaluation step (or the last one) after its checkpoint but before that
        evaluation's row resumes past the step, so that each step has one row."""
        cfg, step = self.cfg, state.step
        if cfg.eval_every > 0 and step > 0 and (step % cfg.eval_every == 0 or step == cfg.steps):
            if any_rank(self.logger is not None and not self.logger.has_eval(step), self.d, self.runtime.device):
                self._exclude(state, self._evaluate(step))

    def after_step(self, state: TrainState, lr: float, result: StepResult, data_wait: float = 0.0) -> None:
        """Count the optimiser step that brought ``state`` to ``state.step`` (``result``: its
        loss and gradient norm, float64 0-dim on the device, and EMA decay, as
        :func:`~ddpm.train.state.train_step` returns them; ``lr`` its learning rate;
        ``data_wait`` the seconds it waited for its batch), and write the log line when one is
        due. Raises :class:`DDPMError` on every rank when the mean loss of the interval is not finite."""
        self.meter.add(*result, data_wait)
        if state.step % self.cfg.log_every == 0 or state.step == self.cfg.steps:
            self._log_line(state, lr)
        if self.bar is not None:
            self.bar.update(1)

    def _log_line(self, state: TrainState, lr: float) -> None:
        step, ema_decay = state.step, self.meter.ema_decay
        mean, mean_grad_norm, data_wait = self.meter.read(self.d)
        if not math.isfinite(mean):
            raise state.non_finite_error(f"loss became {mean}")
        ips = self.rate.images_per_s(step, self.cfg.batch_size)
        if not self.d.main:
            return
        self._warn_if_starved(data_wait, self.cfg.batch_size / max(ips, 1e-9))
        epoch = self.stream.epoch(step)
        if self.logger is not None:
            row = {"step": step, "loss": mean, "lr": lr, "images_per_s": ips, "epoch": epoch,
                   "ema_decay": ema_decay, "grad_norm": mean_grad_norm, "data_wait": data_wait}
            if self.peak is not None:
                row["mfu"] = ips * self.flops_per_image / (self.peak * self.d.world)
            self.logger.log(row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{ips:.1f}", epoch=f"{epoch:.1f}")
        if self.on_step is not None:
            self.on_step(step, mean)

    def _warn_if_starved(self, data_wait: float, step_s: float) -> None:
        """Warn once when waiting for data took more than :data:`STARVED` of a step's time."""
        if self.starved_warned or data_wait <= STARVED * step_s:
            return
        self.starved_warned = True
        cache = ("--no-data-cache is set: drop it, so the images are decoded once into a cache file that is "
                 "mapped instead" if self.cfg.no_data_cache else
                 "put the decoded-data cache (--data-cache) on a fast local disk, or raise --workers for a set "
                 "decoded lazily")
        warnings.warn(f"waiting for data took {data_wait / step_s:.0%} of each training step ({data_wait * 1e3:.1f} ms "
                      f"of {step_s * 1e3:.1f} ms), so the device idles: {cache}", stacklevel=2)

    def loss_finite(self) -> bool:
        """Whether the step losses since the last log line are finite (on this rank)."""
        return self.meter.finite()

    def checkpoint_written(self) -> None:
        """Redraw the curves: a checkpoint of the run was just written (rank 0)."""
        if self.logger is not None:
            self.logger.flush()

    def after_checkpoint(self, state: TrainState, stopping: bool) -> None:
        """Draw the sample grid and evaluate the step when they are due (no evaluation when
        ``stopping``: it is left to the resumed run, see :meth:`owed_evaluation`). Sampling and
        evaluating are not training time: their seconds leave ``state``'s clock and images/s.
        Raises :class:`DDPMError` on every rank when rank 0 cannot draw or evaluate."""
        cfg, step = self.cfg, state.step
        if (cfg.sample_every > 0 and step % cfg.sample_every == 0) or step == cfg.steps:
            self._exclude(state, self._grid(step))
        if cfg.eval_every > 0 and not stopping and (step % cfg.eval_every == 0 or step == cfg.steps):
            self._exclude(state, self._evaluate(step))

    def compiled(self, state: TrainState, seconds: float) -> None:
        """The first compiled step took ``seconds``, nearly all of it compiling: say so, and leave
        it out of the training time (--time-limit, the learning-rate schedule) and images/s."""
        self._exclude(state, seconds)
        if self.d.main:
            print(f"compiled the training network in {seconds:.1f} s (left out of the training time and images/s)",
                  flush=True)

    def _exclude(self, state: TrainState, seconds: float) -> None:
        assert state.clock is not None, "the loop starts the training clock before the first step"
        state.clock.exclude(seconds)
        self.rate.exclude(seconds)

    def _grid(self, step: int) -> float:
        """Draw the sample grid of ``step`` on rank 0; every rank returns together, so each
        leaves the same seconds out of its training clock (the others wait meanwhile, and their
        clocks feed the agreed --time-limit). Returns the seconds it took."""
        t0 = time.perf_counter()
        on_rank_0(self.d, self.runtime.device, functools.partial(self._draw_grid, step),
                  f"draw the sample grid of step {step}")
        return time.perf_counter() - t0

    def _draw_grid(self, step: int) -> None:
        with run_write_errors(self.run_dir, "a sample grid"):
            grid = _sample_grid(self.sampleable, self.cfg, self.runtime, RunFolder(self.run_dir).grid_path(step))
        if self.logger is not None:
            self.logger.image(step, grid)

    def _evaluate(self, step: int) -> float:
        """Score EMA samples of ``step`` on rank 0 and log them; every rank returns together.
        Returns the seconds it took."""
        t0 = time.perf_counter()
        on_rank_0(self.d, self.runtime.device, functools.partial(self._score, step, t0), f"evaluate step {step}")
        return time.perf_counter() - t0

    def _score(self, step: int, t0: float) -> None:
        if self.evaluator is None or self.logger is None:
            return  # rank 0 has both whenever --eval-every is set
        row = self.evaluator(step, self.sampleable)
        self.logger.log(row)
        self.logger.flush()
        (self.bar.write if self.bar is not None else self.say)(self.evaluator.line(row, time.perf_counter() - t0))
