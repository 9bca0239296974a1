"""Training and sampling speed of our UNet presets against diffusers and lucidrains, in one process.

For each suite (our DDPM-CIFAR preset at 32x32, our 64x64 preset) it measures, at the same batch
size, threads and device:

* training images/s: the optimiser step of ``ddpm train`` itself (``ddpm.train.train_step`` with
  the trainer's default recipe: sigmoid schedule, v target, lognormal timesteps, gradient
  clipping, AdamW, EDM's EMA), the same for every model;
* sampling: seconds per model evaluation under ``torch.inference_mode`` (EMA weights, eval mode),
  per image per evaluation, and per image for a 1000-step DDPM and a 20-step DPM-Solver run;
* peak memory of a training step: the exact size of what lives between steps (weights, AdamW
  state, EMA) plus the step's peak above that (gradients, activations, temporaries; CUDA:
  ``max_memory_allocated``; CPU: the rise of the process's peak resident set, approximate);
* model FLOPs per image (``torch.utils.flop_counter``) and the achieved FLOP/s as a fraction of
  the machine's peak for the same dtype, measured in the same run by timing a large matmul and a
  channels_last convolution.

The entries of a suite:

* ``ours``: what ``ddpm train`` / ``ddpm sample`` use by default (``ddpm.runtime.policy``): bf16 autocast
  where the device runs it fast, channels_last, fused AdamW, ``torch.compile`` with ``--compile``;
* ``ours-fp32``: our network in the peers' default settings (fp32, NCHW, default AdamW), which
  separates the network from the settings;
* ``diffusers``: ``UNet2DModel`` configured as the DDPM CIFAR-10 model (35.7M, the same
  architecture as ours; at 64x64 configured like our ``ddpm-64`` preset, 74.1M), default settings;
* ``lucidrains``: ``denoising_diffusion_pytorch.Unet(dim=128, dim_mults=(1,2,2,2))`` (28.5M; at
  64x64 ``dim_mults=(1,2,2,4)``), default settings;
* ``diffusers+ours`` / ``lucidrains+ours``: the peers with our settings, for fairness (including
  ``conv.use_fp32_weight_grad_for_small_convs``, which ``ddpm.UNet`` has built in);
* ``ours-gc`` (with ``--grad-checkpoint``): ours with activation checkpointing and ``--grad-accum``
  micro-batches, for the memory it saves and the compute it costs;
* ``ours-eager`` (with ``--compile``): ours without ``torch.compile``, to show what compiling buys;
* ``ours-nofix`` (with ``--compare-small-conv-fix``): ours with oneDNN's bf16 weight gradients for
  small convolutions too.

``--quick`` runs only ours, diffusers and lucidrains, two rounds, the 64x64 suite at a quarter of
the batch. ``OMP_WAIT_POLICY`` defaults to ``PASSIVE`` here (see below).

Entries are timed interleaved (one step of each, round after round), so that load from other
processes falls on all of them alike; ratios ours/peer are taken per round and their median is
reported. Wall-clock figures are the median over rounds. On a CPU the script also reports a
CPU-time figure (images per CPU-second times threads), which is much less sensitive to other
processes on a shared machine.

    python benchmarks/speed.py --quick        # under 2 minutes on a busy 2-core CPU
    python benchmarks/speed.py --grad-checkpoint --compare-small-conv-fix --loss-curve 100 --rounds 4 --json cpu.json
    python benchmarks/speed.py --device cuda --batch-size 128 --compile --grad-checkpoint --json gpu.json

Peers are skipped (with a note) when their packages are not installed:
``pip install diffusers`` and ``pip install --no-deps denoising-diffusion-pytorch einops ema-pytorch
accelerate psutil`` (its ``Unet`` import pulls in the whole package; ``pytorch-fid`` must also be
importable).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# OpenMP threads that wait at a barrier sleep instead of spinning (must be set before torch loads
# libgomp). On an idle machine this changes little; on a shared one, spinning threads burn the
# time slices their sibling thread needs, and measured steps became up to 15x slower and erratic
# (docs/benchmarks.md). Set OMP_WAIT_POLICY=ACTIVE to measure libgomp's default instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import ddpm  # noqa: E402
from ddpm.runtime import policy as perf  # noqa: E402
from ddpm.core import conv  # noqa: E402
from ddpm.runtime import accounting  # noqa: E402
from ddpm.errors import DDPMError  # noqa: E402
from ddpm.files.atomic import atomic_write_text  # noqa: E402
from ddpm.train import DiffusionLoss, StepSettings, TrainConfig, TrainState, t_probabilities_for  # noqa: E402
from ddpm.train import train_step as trainer_step  # noqa: E402

SUITES = ("ddpm-cifar10", "ddpm-64")
PEERS = ("diffusers", "lucidrains")
Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------ timing helpers
def sync(device: torch.device) -> None:
    """Wait for queued kernels so that host timers measure device work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall and process-CPU time of a block of work (CPU time: all threads of this process)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> "Clock":
        sync(self.device)
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync(self.device)
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def best_time(fn: Callable[..., Any], device: torch.device, reps: int, *args: Any) -> float:
    """Fastest of ``reps`` timed calls of ``fn(*args)`` after one warm-up call (a peak, so the best is wanted).

    The operands are passed, not closed over, so the caller can free them right after.
    """
    fn(*args)
    times = []
    for _ in range(reps):
        with Clock(device) as c:
            fn(*args)
        times.append(c.wall)
    return min(times)


# ------------------------------------------------------------------------------- machine peak
def measure_peak(device: torch.device, quick: bool) -> dict[str, dict[str, float]]:
    """FLOP/s of a large matmul and a 3x3 channels_last convolution, in fp32 and bf16.

    The per-dtype peak used for the "fraction of peak" figures is the larger of the two: on
    CPUs oneDNN's convolutions can outrun the BLAS matmul (on AMD, MKL's fp32 GEMM does).
    """
    out: dict[str, dict[str, float]] = {}
    n = 8192 if device.type == "cuda" else 4096
    # conv: [B, 256, S, S] -> 256 channels, 3x3; big enough to be compute bound
    cb, cs = (128, 64) if device.type == "cuda" else (32, 32)
    reps = 2 if quick else 4
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        if dtype == torch.bfloat16 and not perf.bf16_supported(device):
            continue
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        t_mm = best_time(torch.matmul, device, reps, a, b)
        del a, b  # free the matmul operands before the conv's
        x = torch.randn(cb, 256, cs, cs, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        t_cv = best_time(functools.partial(torch.nn.functional.conv2d, padding=1), device, reps, x, w)
        del x, w
        mm = 2 * n**3 / t_mm
        cv = 2 * cb * 256 * 256 * 9 * cs * cs / t_cv
        out[name] = {"matmul_flops": mm, "conv_channels_last_flops": cv, "peak_flops": max(mm, cv),
                     "matmul_size": n, "conv_shape": [cb, 256, cs, cs]}
    return out


# ---------------------------------------------------------------------------------- memory
class PeakRSS:
    """Peak resident memory of this process over a block, minus the resident memory at its start.

    Freed memory that glibc keeps cached is first returned to the system (``malloc_trim``), so
    that the memory a step allocates anew shows up as a rise.

    Linux lets a process reset its own peak (``/proc/self/clear_refs`` <- 5, Linux 4.0+), so
    each block gets its own peak; otherwise the all-time ``ru_maxrss`` is used, which only
    shows blocks that set a new record. Approximate: it counts the allocator's cached pages and
    anything else the process touches.
    """

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        _malloc_trim()  # hand freed-but-cached heap pages back, so RSS starts near the live size
        self.reset = _clear_peak_rss()
        self.rss0 = _proc_status_bytes("VmRSS") if self.reset else accounting.max_rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        peak = _proc_status_bytes("VmHWM") if self.reset else accounting.max_rss_bytes()
        self.delta = max(0, (peak or 0) - (self.rss0 or 0))


class _StepMemory:
    """Peak memory of one training step above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (exact, tensors only). CPU: :class:`PeakRSS`.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.delta = 0
        self.method = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                       else "rise of the process's peak RSS during one step (approximate)")

    def __enter__(self) -> "_StepMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.rss = PeakRSS().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.delta = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.rss.__exit__(*exc)
            self.delta = self.rss.delta


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _clear_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmHWM") is not None
    except OSError:
        return False


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def state_bytes(model: nn.Module, opt: torch.optim.Optimizer, ema: ddpm.EMA) -> int:
    """Bytes held between steps: weights, optimiser state and the EMA copy (gradients are freed
    after each step, ``zero_grad(set_to_none=True)``, so they count in the step's peak)."""
    n = 0
    for p in model.parameters():
        n += p.numel() * p.element_size()
    for st in opt.state.values():
        n += sum(v.numel() * v.element_size() for v in st.values() if torch.is_tensor(v))
    n += sum(p.numel() * p.element_size() for p in ema.module.parameters())
    return n


# ---------------------------------------------------------------------------------- models
def diffusers_unet(suite: str) -> tuple[nn.Module, str]:
    """diffusers' UNet2DModel with the architecture of our preset (the DDPM CIFAR-10 model at 32)."""
    from diffusers import UNet2DModel

    common = dict(in_channels=3, out_channels=3, layers_per_block=2, norm_num_groups=32, norm_eps=1e-6,
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, dropout=0.1)
    if suite == "ddpm-cifar10":  # google/ddpm-cifar10-32: attention at 16x16
        m = UNet2DModel(sample_size=32, block_out_channels=(128, 256, 256, 256),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), **common)
        return m, "UNet2DModel, DDPM CIFAR-10 config (128,256,256,256), attention at 16x16"
    # like our ddpm-64: mults (1,2,2,4), attention at 16 and 8 (64-channel heads)
    m = UNet2DModel(sample_size=64, block_out_channels=(128, 256, 256, 512), attention_head_dim=64,
                    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), **common)
    return m, "UNet2DModel (128,256,256,512), attention at 16x16 and 8x8"


def lucidrains_unet(suite: str) -> tuple[nn.Module, str]:
    """lucidrains' Unet(dim=128, dim_mults=(1,2,2,2)) (28.5M); (1,2,2,4) for the 64x64 suite."""
    from denoising_diffusion_pytorch import Unet

    mults = (1, 2, 2, 2) if suite == "ddpm-cifar10" else (1, 2, 2, 4)
    return Unet(dim=128, dim_mults=mults), f"denoising_diffusion_pytorch.Unet(dim=128, dim_mults={mults})"


def peer_available(name: str) -> str | None:
    """None if the peer's package imports, else the reason it does not."""
    try:
        if name == "diffusers":
            from diffusers import UNet2DModel  # noqa: F401
        else:
            from denoising_diffusion_pytorch import Unet  # noqa: F401
    except Exception as e:  # ImportError, or a missing dependency of the package
        return f"{type(e).__name__}: {e}"
    return None


def call_adapter(kind: str, net: Callable[..., Any]) -> Forward:
    """A uniform ``(x, t) -> prediction`` for each family."""
    if kind == "diffusers":
        return lambda x, t: net(x, t).sample
    if kind == "lucidrains":
        return lambda x, t: net(x, t)
    return lambda x, t: net(x, t)


@dataclass
class Entry:
    """One model in one configuration, with its optimiser and EMA, ready to step."""

    name: str
    kind: str  # "ours" | "diffusers" | "lucidrains"
    description: str
    model: nn.Module
    train_fwd: Forward
    sample_fwd: Forward
    opt: torch.optim.Optimizer
    ema: ddpm.EMA
    precision: str
    channels_last: bool
    compiled: bool
    grad_checkpoint: bool = False
    grad_accum: int = 1
    small_conv_fix: bool = True  # the float32 weight-gradient switch of this entry's convolutions (ddpm.core.conv)
    params: int = 0
    results: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        return {"precision": self.precision, "channels_last": self.channels_last, "compile": self.compiled,
                "optimizer": _opt_name(self.opt), "grad_checkpoint": self.grad_checkpoint,
                "grad_accum": self.grad_accum, "small_conv_fp32_weight_grad": self.small_conv_fix}


def _opt_name(opt: torch.optim.Optimizer) -> str:
    d = opt.defaults
    return "AdamW(" + ("fused" if d.get("fused") else "foreach" if d.get("foreach") else "default") + ")"


def build_entry(name: str, kind: str, suite: str, device: torch.device, *, ours_settings: bool,
                precision: str, compile: bool, grad_checkpoint: bool = False, grad_accum: int = 1,
                small_conv_fix: bool = True) -> Entry:
    """Build a model with its optimiser and EMA, in our settings or in the family's defaults."""
    torch.manual_seed(0)
    if kind == "ours":
        model: nn.Module = ddpm.UNet(ddpm.UNetConfig.preset(suite), grad_checkpoint=grad_checkpoint)
        desc = f"ddpm.UNet preset {suite}"
    elif kind == "diffusers":
        model, desc = diffusers_unet(suite)
    else:
        model, desc = lucidrains_unet(suite)
    model.train()
    if ours_settings:
        prec = perf.resolve_precision(device, precision)
        cl = perf.default_channels_last(device)
        if kind != "ours":  # what ddpm.UNet has built in; a no-op unless CPU bf16 autocast
            conv.use_fp32_weight_grad_for_small_convs(model)
        conv.set_small_conv_weight_grad(model, small_conv_fix)
        train_net = perf.prepare_model(model, device, channels_last=cl, compile=compile)
        opt = perf.make_optimizer(model.parameters(), device, lr=2e-4)
    else:  # the family's defaults: fp32, NCHW, eager, torch's default AdamW
        prec, cl = "fp32", False
        model.to(device)
        train_net = model
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
    ema = ddpm.EMA(model, decay=0.9999)  # the same EMA for every model
    train_call = call_adapter(kind, train_net)

    def train_fwd(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return train_call(perf.to_memory_format(x, cl), t)  # autocast: the trainer's step sets it

    sample_call = call_adapter(kind, ema.module)
    if ours_settings:  # the network as `ddpm sample` calls it: replayed from CUDA graphs on CUDA
        sample_fwd = perf.resolve_runtime(device, prec, channels_last=cl, progress=False).sampling_call(sample_call)
    else:
        sample_fwd = sample_call
    return Entry(name=name, kind=kind, description=desc, model=model, train_fwd=train_fwd, sample_fwd=sample_fwd,
                 opt=opt, ema=ema, precision=prec, channels_last=cl, compiled=ours_settings and compile,
                 grad_checkpoint=grad_checkpoint, grad_accum=grad_accum, small_conv_fix=small_conv_fix,
                 params=ddpm.count_parameters(model))


# ------------------------------------------------------------------------------ the work
# What every entry's step trains with: the defaults of `ddpm train` (so the figure is what a user's
# run gets), at a constant learning rate (its value does not change the work of a step).
# The trainer's defaults; the rate of the default preset at the batch a speed figure uses (a rate
# changes no timing, only what the step computes, which the benchmark's test compares).
RECIPE = replace(TrainConfig(), lr=2e-4)


def training_recipe() -> tuple[ddpm.Schedule, torch.Tensor | None]:
    """The schedule (float64 tables on the CPU) and timestep density (float64 [T] or None) that
    ``ddpm train`` builds from its default config."""
    schedule = ddpm.Schedule.from_name(RECIPE.schedule, RECIPE.timesteps, logsnr_shift=RECIPE.logsnr_shift,
                                       zero_terminal_snr=RECIPE.zero_terminal_snr)
    return schedule, t_probabilities_for(RECIPE, schedule)


def train_step(e: Entry, x0: torch.Tensor, schedule: ddpm.Schedule, t_probabilities: torch.Tensor | None,
               gen: torch.Generator, step: int = 0) -> float:
    """One optimiser step of ``ddpm train`` (``ddpm.train.train_step``) on ``x0`` (float [B, 3, H, W]
    in [-1, 1]) in ``e.grad_accum`` micro-batches; returns its mean loss (a float: the host waits
    for the step, so its timing is complete)."""
    cfg = replace(RECIPE, grad_accum=e.grad_accum, batch_size=x0.shape[0])
    loss_fn = DiffusionLoss(schedule, prediction=cfg.prediction, weighting=cfg.loss_weighting,
                            min_snr_gamma=cfg.min_snr_gamma, t_probabilities=t_probabilities, p_uncond=cfg.p_uncond)
    settings = StepSettings.from_config(cfg, autocast=lambda: perf.autocast_context(x0.device, e.precision))
    loss, _, _ = trainer_step(e.train_fwd, TrainState(e.model, e.ema, e.opt, step=step), loss_fn, x0, None,
                              lr=RECIPE.lr, generator=gen, settings=settings)
    return float(loss)


def count_flops(e: Entry, size: int, device: torch.device) -> dict[str, float]:
    """Model FLOPs per image: forward, and forward + backward (what a training step costs).

    Counted at batch 2 in fp32 eager on the plain module (the count does not depend on dtype,
    layout or compilation); matmuls, convolutions and attention kernels are counted, element-
    wise work is not.
    """
    call = call_adapter(e.kind, e.model)
    x = torch.randn(2, 3, size, size, device=device)
    t = torch.randint(0, 1000, (2,), device=device)
    was_gc = getattr(e.model, "grad_checkpoint", False)
    if was_gc:
        e.model.grad_checkpoint = False  # count the model, not the recomputation
    with FlopCounterMode(display=False) as fc:
        call(x, t).float().square().mean().backward()
    train = fc.get_total_flops() / 2
    e.model.zero_grad(set_to_none=True)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        call(x, t)
    fwd = fc.get_total_flops() / 2
    if was_gc:
        e.model.grad_checkpoint = True
    return {"forward_flops_per_image": fwd, "train_flops_per_image": train}


def bench_training(entries: list[Entry], batch: int, size: int, device: torch.device, warmup: int, rounds: int,
                   threads: int) -> None:
    """Warm up each entry, measure its step's memory, then time all entries interleaved."""
    schedule, t_probabilities = training_recipe()
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, 3, size, size, device=device, generator=gen) * 2 - 1
    for e in entries:
        with Clock(device) as c:
            with Clock(device) as first:
                train_step(e, x0, schedule, t_probabilities, gen)
            for _ in range(warmup - 1):
                train_step(e, x0, schedule, t_probabilities, gen)
        e.results["train_warmup_s"] = c.wall
        if e.compiled:  # the first step compiles forward and backward: reported apart, as the trainer does
            e.results["compile_s"] = first.wall
        print(f"  warmed up {e.name:<18} {c.wall:7.1f} s for {warmup} step(s)", flush=True)
    walls: dict[str, list[float]] = {e.name: [] for e in entries}
    cpus: dict[str, list[float]] = {e.name: [] for e in entries}
    for r in range(rounds):
        for e in entries:
            # The first round also measures the step's peak memory (outside the timed block).
            mem = _StepMemory(device) if r == 0 else contextlib.nullcontext()
            with mem:
                with Clock(device) as c:
                    train_step(e, x0, schedule, t_probabilities, gen)
            if r == 0:
                st = state_bytes(e.model, e.opt, e.ema)
                e.results.update(state_bytes=st, step_peak_bytes=mem.delta, peak_memory_bytes=st + mem.delta,
                                 memory_method=mem.method)
            walls[e.name].append(c.wall)
            cpus[e.name].append(c.cpu)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{e.name} {batch / walls[e.name][-1]:.2f}"
                                                        for e in entries) + " img/s", flush=True)
    for e in entries:
        w, cp = walls[e.name], cpus[e.name]
        e.results["train_step_s"] = w
        e.results["train_images_per_s"] = batch / statistics.median(w)
        e.results["train_images_per_s_best"] = batch / min(w)
        if device.type == "cpu":
            e.results["train_cpu_s"] = cp
            e.results["train_images_per_cpu_s_x_threads"] = batch * threads / statistics.median(cp)


def bench_sampling(entries: list[Entry], batch: int, size: int, device: torch.device, warmup: int, rounds: int,
                   evals: int, threads: int) -> None:
    """Seconds per model evaluation (EMA weights, eval mode, inference_mode), interleaved."""
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=device, generator=gen)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    with torch.inference_mode():
        for e in entries:
            with Clock(device) as c:
                for _ in range(warmup):
                    e.sample_fwd(x, t)
            e.results["sample_warmup_s"] = c.wall
        walls: dict[str, list[float]] = {e.name: [] for e in entries}
        cpus: dict[str, list[float]] = {e.name: [] for e in entries}
        for _ in range(rounds):
            for e in entries:
                with Clock(device) as c:
                    for _ in range(evals):
                        e.sample_fwd(x, t)
                walls[e.name].append(c.wall / evals)
                cpus[e.name].append(c.cpu / evals)
    for e in entries:
        s = statistics.median(walls[e.name])
        e.results.update(sample_eval_s=walls[e.name], sample_s_per_eval=s, sample_s_per_eval_best=min(walls[e.name]),
                         sample_s_per_image_per_eval=s / batch, sample_s_per_image_1000_steps=1000 * s / batch,
                         sample_s_per_image_20_steps=20 * s / batch)
        if device.type == "cpu":
            e.results["sample_cpu_s_per_eval_over_threads"] = statistics.median(cpus[e.name]) / threads


def bench_generate(e: Entry, batch: int, size: int, device: torch.device, rounds: int) -> None:
    """What ``ddpm sample`` runs by default on the entry's EMA weights: ``ddpm.sample.engine.generate``
    (DPM-Solver++ with its default 20 steps, per-image seeds, the entry's precision), ``batch``
    images at once; seconds per image (median over rounds), and their ratio to 20 bare network
    evaluations of ``bench_sampling`` (what the sampler and seeding add on top of the network)."""
    from ddpm.run.checkpoint import Sampleable
    from ddpm.sample.engine import generate
    from ddpm.sample.spec import SampleSpec

    schedule, _ = training_recipe()
    run = Sampleable(model=e.model, ema_model=e.ema.module, schedule=schedule, classes=None,
                     prediction=RECIPE.prediction, image_size=size)
    runtime = perf.resolve_runtime(device, e.precision, progress=False)  # CUDA graphs as `ddpm sample` decides
    graphs = runtime.cuda_graphs and device.type == "cuda"
    # On CUDA the same images without graphs too, round by round: the speed-up graphs buy and how
    # far they move the images (the kernels are the same, so nothing or a rounding level is expected).
    # Every graphed round records its graphs anew, as each `ddpm sample` does.
    arms = {"graphs" if graphs else "plain": runtime, **({"eager": replace(runtime, cuda_graphs=False)} if graphs else {})}
    for rt in arms.values():
        generate(run, batch, SampleSpec(steps=2, batch_size=batch), rt)  # warm-up
    walls: dict[str, list[float]] = {k: [] for k in arms}
    images: dict[str, torch.Tensor] = {}
    for _ in range(rounds):
        for name, rt in arms.items():
            with Clock(device) as c:
                images[name] = generate(run, batch, SampleSpec(batch_size=batch), rt)
            walls[name].append(c.wall / batch)
    first = next(iter(arms))
    per_image = statistics.median(walls[first])
    e.results.update(generate_s_per_image_20_steps=per_image, generate_s_per_image=walls[first],
                     generate_cuda_graphs=graphs,
                     generate_over_network_20_steps=per_image / e.results["sample_s_per_image_20_steps"])
    if graphs:
        diff = (images["graphs"].int() - images["eager"].int()).abs()
        e.results.update(generate_eager_s_per_image_20_steps=statistics.median(walls["eager"]),
                         generate_cuda_graphs_speedup=paired_ratio(walls["eager"], walls["graphs"]),
                         generate_cuda_graphs_max_level_diff=int(diff.max()),
                         generate_cuda_graphs_levels_differing=float((diff > 0).float().mean()))


def paired_ratio(num: list[float], den: list[float]) -> float:
    """Median over rounds of num[r] / den[r] (times measured back to back are compared)."""
    return statistics.median(a / b for a, b in zip(num, den))


# ------------------------------------------------------------------------- precision checks
def precision_check(device: torch.device, batch: int = 8) -> dict[str, float]:
    """How far bf16 autocast moves the loss, the output and the gradient of our DDPM-CIFAR model.

    One batch, fixed timesteps (spread over 0..999) and noise, evaluated in fp32 and in bf16
    (our settings otherwise). The convolutions are re-initialised with PyTorch's default init so
    that the function is not trivially zero (the UNet zero-initialises its output convolutions);
    eval mode, so dropout does not differ between the two passes.
    """
    torch.manual_seed(0)
    model = ddpm.UNet(ddpm.UNetConfig.preset("ddpm-cifar10"))
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    model.eval()
    cl = perf.default_channels_last(device)
    perf.prepare_model(model, device, channels_last=cl)
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.rand(batch, 3, 32, 32, device=device, generator=gen) * 2 - 1
    noise = torch.randn(batch, 3, 32, 32, device=device, generator=gen)
    t = torch.linspace(0, 999, batch, device=device).long()
    schedule = ddpm.Schedule.linear()
    res = {}
    for prec in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        outs = []

        def fwd(x: torch.Tensor, tt: torch.Tensor, prec: str = prec) -> torch.Tensor:
            with perf.autocast_context(device, prec):
                out = model(perf.to_memory_format(x, cl), tt)
            outs.append(out.detach().double())
            return out

        loss = ddpm.diffusion_loss(fwd, schedule, x0, t=t, noise=noise)
        loss.mean().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        res[prec] = (loss.detach().double(), outs[0], grad)
    (lf, of, gf), (lb, ob, gb) = res["fp32"], res["bf16"]
    return {
        "loss_fp32": float(lf.mean()), "loss_bf16": float(lb.mean()),
        "loss_rel_diff": float((lb.mean() - lf.mean()).abs() / lf.mean()),
        "loss_rel_diff_max_per_sample": float(((lb - lf).abs() / lf).max()),
        "output_rel_error": float((ob - of).norm() / of.norm()),
        "grad_cosine": float(torch.dot(gf, gb) / (gf.norm() * gb.norm())),
        "grad_rel_error": float((gb - gf).norm() / gf.norm()),
        "batch": batch,
    }


def loss_curve(device: torch.device, steps: int, batch: int = 32) -> dict[str, Any]:
    """Train the ``small`` preset from one initialisation in fp32 and in bf16 on the same batches.

    The data are 512 smooth synthetic images (4x4 noise upsampled to 32x32); every run sees the
    same batches, timesteps and noise in the same order. Reports the mean loss over the last
    fifth of the steps for each precision and their relative difference, next to the same
    difference between two fp32 runs from different initialisations (run-to-run variation).
    """
    gen = torch.Generator().manual_seed(0)
    data = torch.nn.functional.interpolate(torch.rand(512, 3, 4, 4, generator=gen) * 2 - 1, size=32,
                                           mode="bicubic", align_corners=False).clamp(-1, 1)
    schedule = ddpm.Schedule.linear()
    cl = perf.default_channels_last(device)
    runs = {}
    for name, prec, seed in (("fp32", "fp32", 0), ("bf16", "bf16", 0), ("fp32-other-init", "fp32", 1)):
        torch.manual_seed(seed)
        model = ddpm.UNet(ddpm.UNetConfig.preset("small")).train()
        net = perf.prepare_model(model, device, channels_last=cl)
        opt = perf.make_optimizer(model.parameters(), device, lr=2e-4)

        def fwd(x: torch.Tensor, tt: torch.Tensor, prec: str = prec, net: nn.Module = net) -> torch.Tensor:
            with perf.autocast_context(device, prec):
                return net(perf.to_memory_format(x, cl), tt)

        g = torch.Generator().manual_seed(1)
        losses = []
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = torch.randint(0, data.shape[0], (batch,), generator=g)
            x0 = data[idx].to(device)
            t = torch.randint(0, schedule.T, (batch,), generator=g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            loss = ddpm.diffusion_loss(fwd, schedule, x0, t=t, noise=noise).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        runs[name] = {"losses": losses, "seconds": time.perf_counter() - t0}
    tail = max(1, steps // 5)
    lf, lb, lc = (statistics.fmean(runs[k]["losses"][-tail:]) for k in ("fp32", "bf16", "fp32-other-init"))
    return {"steps": steps, "batch": batch, "model": "small", "final_loss_fp32": lf, "final_loss_bf16": lb,
            "final_loss_fp32_other_init": lc, "final_loss_rel_diff": abs(lb - lf) / lf,
            "control_rel_diff": abs(lc - lf) / lf, "runs": runs}


# ---------------------------------------------------------------------------------- report
def gib(n: float) -> float:
    return n / 2**30


def fmt_flops(f: float) -> str:
    return f"{f / 1e9:.1f} G"


def run_suite(suite: str, args: argparse.Namespace, device: torch.device, peak: dict[str, Any],
              peers: list[str]) -> dict[str, Any]:
    size = ddpm.UNetConfig.preset(suite).image_size
    batch = args.batch_size if suite == "ddpm-cifar10" or args.batch_size_64 is None else args.batch_size_64
    print(f"\n=== {suite} ({size}x{size}), batch {batch}, {args.threads} thread(s), {device} ===", flush=True)
    specs: list[tuple[str, str, bool, dict[str, Any]]] = [("ours", "ours", True, {})]
    if args.grad_checkpoint:
        specs.append(("ours-gc", "ours", True, {"grad_checkpoint": True, "grad_accum": args.grad_accum}))
    if args.compile:
        specs.append(("ours-eager", "ours", True, {"compile": False}))
    if args.compare_small_conv_fix:
        specs.append(("ours-nofix", "ours", True, {"small_conv_fix": False}))
    if not args.quick:
        specs.append(("ours-fp32", "ours", False, {}))
    for p in peers:
        specs.append((p, p, False, {}))
        if not args.quick or args.peer_settings:
            specs.append((f"{p}+ours", p, True, {}))
    entries = []
    for name, kind, ours_settings, kw in specs:
        kw = {"compile": args.compile, **kw}
        e = build_entry(name, kind, suite, device, ours_settings=ours_settings, precision=args.precision, **kw)
        e.results.update(count_flops(e, size, device))
        entries.append(e)
        print(f"  {name:<18} {e.params / 1e6:6.2f}M params, {fmt_flops(e.results['train_flops_per_image'])}FLOP/image "
              f"train ({fmt_flops(e.results['forward_flops_per_image'])} forward); {e.settings()}", flush=True)

    bench_training(entries, batch, size, device, args.warmup, args.rounds, args.threads)
    sb = args.sample_batch or batch
    # Two warm-up calls at least: a graphed network runs eagerly once, records on the second call.
    bench_sampling(entries, sb, size, device, max(2, args.warmup), args.rounds,
                   args.sample_evals, args.threads)
    bench_generate(entries[0], sb, size, device, args.rounds)

    # FLOP/s and fraction of the peak of the dtype the entry computes in (measured, and data sheet)
    for e in entries:
        r = e.results
        pk = peak.get(e.precision, {}).get("peak_flops")
        r["train_flops_per_s"] = r["train_images_per_s"] * r["train_flops_per_image"]
        r["sample_flops_per_s"] = sb * r["forward_flops_per_image"] / r["sample_s_per_eval"]
        sheet = accounting.peak_flops(device, e.precision)  # the trainer's MFU uses the same table
        if sheet:
            r["train_fraction_of_datasheet_peak"] = r["train_flops_per_s"] / sheet
            r["sample_fraction_of_datasheet_peak"] = r["sample_flops_per_s"] / sheet
        if pk:
            r["train_fraction_of_peak"] = r["train_flops_per_s"] / pk
            r["sample_fraction_of_peak"] = r["sample_flops_per_s"] / pk
            if "train_images_per_cpu_s_x_threads" in r:
                r["train_fraction_of_peak_cpu_time"] = (r["train_images_per_cpu_s_x_threads"]
                                                        * r["train_flops_per_image"] / pk)

    # ratios ours / peer, per round
    ours = entries[0]
    ratios: dict[str, dict[str, float]] = {}
    for e in entries[1:]:
        rr = {
            "train_speedup": paired_ratio(e.results["train_step_s"], ours.results["train_step_s"]),
            "train_speedup_of_medians": ours.results["train_images_per_s"] / e.results["train_images_per_s"],
            "train_speedup_best": ours.results["train_images_per_s_best"] / e.results["train_images_per_s_best"],
            "sample_speedup_per_eval": paired_ratio(e.results["sample_eval_s"], ours.results["sample_eval_s"]),
            "sample_speedup_per_eval_best": e.results["sample_s_per_eval_best"] / ours.results["sample_s_per_eval_best"],
            "memory_ratio": ours.results["peak_memory_bytes"] / max(1, e.results["peak_memory_bytes"]),
        }
        if device.type == "cpu":
            rr["train_speedup_cpu_time"] = paired_ratio(e.results["train_cpu_s"], ours.results["train_cpu_s"])
        ratios[e.name] = rr

    print_suite(entries, ratios, batch, sb, device)
    return {"image_size": size, "batch_size": batch, "sample_batch_size": sb,
            "entries": {e.name: {"kind": e.kind, "description": e.description, "parameters": e.params,
                                 "settings": e.settings(), **e.results} for e in entries},
            "ratios_ours_over": ratios}


def print_suite(entries: list[Entry], ratios: dict[str, dict[str, float]], batch: int, sb: int,
                device: torch.device) -> None:
    cpu = device.type == "cpu"
    print(f"\n  training (batch {batch}; img/s = median over rounds; cpu = images per CPU-second x threads)")
    head = f"  {'model':<18}{'params':>8}{'prec':>6}{'img/s':>8}{'best':>8}" + (f"{'cpu':>8}" if cpu else "")
    print(head + f"{'GFLOP/img':>11}{'TFLOP/s':>9}{'%peak':>7}{'%sheet':>7}{'mem GiB':>9}{'compile s':>10}")
    for e in entries:
        r = e.results
        frac, sheet = r.get("train_fraction_of_peak"), r.get("train_fraction_of_datasheet_peak")
        print(f"  {e.name:<18}{e.params / 1e6:7.1f}M{e.precision:>6}{r['train_images_per_s']:8.2f}"
              f"{r['train_images_per_s_best']:8.2f}" + (f"{r['train_images_per_cpu_s_x_threads']:8.2f}" if cpu else "")
              + f"{r['train_flops_per_image'] / 1e9:11.1f}{r['train_flops_per_s'] / 1e12:9.3f}"
              f"{(100 * frac if frac else float('nan')):7.1f}{(100 * sheet if sheet else float('nan')):7.1f}"
              f"{gib(r['peak_memory_bytes']):9.2f}" + (f"{r['compile_s']:10.1f}" if "compile_s" in r else f"{'-':>10}"))
    print(f"\n  sampling (batch {sb}; EMA weights, inference_mode)")
    print(f"  {'model':<18}{'ms/eval':>9}{'ms/img/eval':>13}{'s/img 1000 steps':>18}{'s/img 20 steps':>16}{'%peak':>7}")
    for e in entries:
        r = e.results
        frac = r.get("sample_fraction_of_peak")
        print(f"  {e.name:<18}{1e3 * r['sample_s_per_eval']:9.1f}{1e3 * r['sample_s_per_image_per_eval']:13.2f}"
              f"{r['sample_s_per_image_1000_steps']:18.2f}{r['sample_s_per_image_20_steps']:16.3f}"
              f"{(100 * frac if frac else float('nan')):7.1f}")
    r = entries[0].results
    print(f"  {entries[0].name}: 'ddpm sample' by default (ddpm.sample.engine, 20 steps): {r['generate_s_per_image_20_steps']:.3f}"
          f" s/img, {r['generate_over_network_20_steps']:.2f}x the 20 network evaluations above")
    if r.get("generate_cuda_graphs"):
        print(f"  CUDA graphs: {r['generate_cuda_graphs_speedup']:.2f}x faster than eager "
              f"({r['generate_eager_s_per_image_20_steps']:.4f} s/img); images differ at "
              f"{100 * r['generate_cuda_graphs_levels_differing']:.3f}% of values, by at most "
              f"{r['generate_cuda_graphs_max_level_diff']} level(s)")
    print("\n  ours / other: speed-up = median of per-round ratios (best round vs best round in brackets);"
          " memory: ours / other")
    for name, rr in ratios.items():
        extra = f", cpu-time {rr['train_speedup_cpu_time']:.2f}x" if "train_speedup_cpu_time" in rr else ""
        print(f"  vs {name:<18} training {rr['train_speedup']:.2f}x ({rr['train_speedup_best']:.2f}x){extra}; "
              f"sampling per eval {rr['sample_speedup_per_eval']:.2f}x ({rr['sample_speedup_per_eval_best']:.2f}x); "
              f"peak memory {rr['memory_ratio']:.2f}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds, 64x64 suite at a quarter of the batch")
    ap.add_argument("--json", metavar="FILE", help="also write every figure and ratio as JSON")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch for every model (default 16)")
    ap.add_argument("--batch-size-64", type=int, default=None,
                    help="batch for the 64x64 suite (default: --batch-size; --quick: a quarter of it)")
    ap.add_argument("--sample-batch", type=int, default=None, help="sampling batch (default: the training batch)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 2 on CPU, unchanged on GPU)")
    ap.add_argument("--precision", default="auto", choices=["auto", *perf.PRECISIONS],
                    help="our precision (auto: bf16 where the device runs it fast); peers run fp32")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile our model (and peers in our settings), with an ours-eager entry beside it "
                         "(unset: as ddpm train decides, on for CUDA with Triton)")
    ap.add_argument("--grad-checkpoint", action="store_true",
                    help="add an 'ours-gc' entry: activation checkpointing and --grad-accum micro-batches")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step of the ours-gc entry")
    ap.add_argument("--models", nargs="+", default=[*SUITES, *PEERS], choices=[*SUITES, *PEERS],
                    help="suites (our presets) and peers to run (default: all)")
    ap.add_argument("--peer-settings", action="store_true",
                    help="in --quick, also run the peers in our settings (always done without --quick)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps per entry (default 2; --quick 1)")
    ap.add_argument("--sample-evals", type=int, default=None, help="evaluations per sampling round (default 3; quick 1)")
    ap.add_argument("--compare-small-conv-fix", action="store_true",
                    help="add an 'ours-nofix' entry: oneDNN's bf16 weight gradients for small convolutions too")
    ap.add_argument("--loss-curve", type=int, default=0, metavar="STEPS",
                    help="also train the small preset STEPS steps in fp32 and in bf16 and compare the losses")
    args = ap.parse_args(argv)

    try:
        device = perf.resolve_device(args.device)
    except DDPMError as e:
        ap.error(str(e))
    if args.threads is None:
        args.threads = 2 if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (2 if args.quick else 5)
    # at least one: the optimiser state is created in the first step, not in the measured ones
    args.warmup = max(1, args.warmup if args.warmup is not None else (1 if args.quick else 2))
    args.sample_evals = args.sample_evals or (1 if args.quick else 3)
    if args.quick and args.batch_size_64 is None:
        args.batch_size_64 = max(1, args.batch_size // 4)
    for suite in (m for m in args.models if m in SUITES):
        b = args.batch_size if suite == "ddpm-cifar10" or args.batch_size_64 is None else args.batch_size_64
        if args.grad_checkpoint and b % args.grad_accum:
            ap.error(f"{suite}: batch size {b} is not divisible by --grad-accum {args.grad_accum}")
    if args.compile is None:
        args.compile = perf.default_compile(device)
    if args.compile and not perf.compile_supported(device.type):
        ap.error(f"--compile: torch.compile cannot build kernels for {device.type} here "
                 "(needs a C++ compiler on CPU, Triton on CUDA)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest conv algorithms once

    suites = [m for m in args.models if m in SUITES]
    peers = []
    skipped = {}
    for p in (m for m in args.models if m in PEERS):
        why = peer_available(p)
        if why:
            skipped[p] = why
            print(f"note: skipping peer {p}: {why}")
        else:
            peers.append(p)

    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                                   else platform.processor() or _cpu_name()),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
           "bf16_supported": perf.bf16_supported(device), "our_precision": perf.resolve_precision(device, args.precision),
           "channels_last": perf.default_channels_last(device), "compile": args.compile,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "argv": sys.argv,
           "load_average_at_start": _loadavg(),
           "peer_versions": _peer_versions(peers), "peers_skipped": skipped}
    print(f"torch {env['torch']} on {env['device_name']} ({device}), {args.threads} threads, CPU capability "
          f"{env['cpu_capability']}, fast bf16: {env['bf16_supported']}; ours: {env['our_precision']}, "
          f"channels_last={env['channels_last']}, compile={args.compile}")
    t_start = time.perf_counter()
    peak = measure_peak(device, args.quick)
    for k, v in peak.items():
        print(f"peak {k}: matmul {v['matmul_size']}^3 {v['matmul_flops'] / 1e9:.0f} GFLOP/s, 3x3 conv channels_last "
              f"{v['conv_channels_last_flops'] / 1e9:.0f} GFLOP/s -> peak {v['peak_flops'] / 1e9:.0f} GFLOP/s", flush=True)
    report: dict[str, Any] = {"environment": env, "peak": peak, "suites": {},
                              "settings": {k: v for k, v in vars(args).items() if k != "json"}}
    if perf.bf16_supported(device):
        pc = precision_check(device)
        report["precision_check"] = pc
        print(f"bf16 vs fp32 on one batch of ddpm-cifar10 (batch {pc['batch']}): loss {pc['loss_fp32']:.6f} vs "
              f"{pc['loss_bf16']:.6f} (relative difference {pc['loss_rel_diff']:.1e}, per sample at most "
              f"{pc['loss_rel_diff_max_per_sample']:.1e}); output relative error {pc['output_rel_error']:.1e}; "
              f"gradient cosine {pc['grad_cosine']:.5f}", flush=True)
    if args.loss_curve and perf.bf16_supported(device):
        lc = loss_curve(device, args.loss_curve)
        report["loss_curve"] = lc
        print(f"small preset, {lc['steps']} steps at batch {lc['batch']}, mean loss of the last fifth: fp32 "
              f"{lc['final_loss_fp32']:.5f}, bf16 {lc['final_loss_bf16']:.5f} (relative difference "
              f"{lc['final_loss_rel_diff']:.1e}); fp32 from another initialisation {lc['final_loss_fp32_other_init']:.5f} "
              f"(relative difference {lc['control_rel_diff']:.1e})", flush=True)
    for suite in suites:
        report["suites"][suite] = run_suite(suite, args, device, peak, peers)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["total_s"] = time.perf_counter() - t_start
    report["environment"]["load_average_at_end"] = _loadavg()
    print(f"\ntotal {report['total_s']:.0f} s; load average at start {env['load_average_at_start']}, "
          f"at end {env['load_average_at_end']}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(report, indent=1, default=_json_default) + "\n")
        print(f"wrote {path}")
    return report


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _loadavg() -> list[float] | None:
    """1, 5 and 15-minute load averages: how busy the (possibly shared) machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _peer_versions(peers: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p, dist in (("diffusers", "diffusers"), ("lucidrains", "denoising-diffusion-pytorch")):
        if p in peers:
            with contextlib.suppress(PackageNotFoundError):
                out[p] = version(dist)
    return out


if __name__ == "__main__":
    main()
