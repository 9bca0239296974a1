"""Speed settings shared by training, sampling and ``benchmarks/speed.py``.

The trainer, the sampling CLI and the benchmark all call these helpers, so the benchmark
measures exactly what a user gets. Each helper makes one decision and says why; the numbers
behind the defaults are in ``docs/benchmarks.md``.

* **Device.** :func:`resolve_device` is the one reading of ``--device`` (``auto``, ``cpu``,
  ``cuda``, ``cuda:N``) for every command, the trainer under torchrun, evaluation and the
  Inception network; :func:`resolve_runtime` bundles it with the resolved precision and memory
  layout into the :class:`Runtime` that a command prints once and passes on.
* **Precision.** ``"bf16"`` means bfloat16 *autocast*: weights, optimiser state and the loss
  stay in float32; convolutions, matmuls and attention run in bfloat16. bf16 has float32's
  exponent range, so no loss scaling is needed. On CUDA it is used on every GPU that supports
  it. On a CPU it is only used by default when the processor has native bf16 dot products
  (AVX512_BF16 on AMD Zen 4+ / Intel Cooper Lake+, or AMX on Sapphire Rapids+): there oneDNN's
  bf16 convolutions do twice the work per cycle of float32 ones (measured: 1000 vs 476
  GFLOP/s on a 2-core AMD EPYC). Other CPUs have no fast bf16 kernels (oneDNN converts to
  float32 or uses reference code), so ``"auto"`` keeps float32 there.
* **Memory format.** channels_last (NHWC) is the native layout of cuDNN's tensor-core kernels;
  oneDNN's CPU convolutions accept both, and on the development CPU channels_last was within a
  few percent of NCHW either way (``docs/benchmarks.md``), so it is the default everywhere.
* **Compilation.** ``torch.compile`` fuses the GroupNorm -> SiLU -> dtype-cast chains between
  convolutions, which on a GPU are memory-bound passes as long as the convolutions themselves.
  :func:`default_compile`: on by default on CUDA where Triton is installed (the training network
  is compiled; a compile that fails falls back to eager with one warning, and the compile time
  is reported apart from the training time); opt-in on CPUs, where it needs a C++ compiler and
  costs a minute or more of start-up for little gain at the batch sizes a CPU runs.
* **CUDA graphs at sampling.** :func:`default_cuda_graphs`: on CUDA the sampling network is
  recorded once per batch shape and replayed (:mod:`ddpm.runtime.graphs`), without
  ``torch.compile`` (whose minute of compiling per shape would outlast most ``ddpm sample``
  calls); a capture that fails falls back to eager calls with one warning.
* **Optimiser.** AdamW with ``fused=True`` (CUDA, and CPU since PyTorch 2.4) updates all
  parameters in one pass instead of about ten element-wise passes.
* **Small convolutions under CPU bf16** get float32 weight gradients inside the UNet itself
  (:mod:`ddpm.core.conv`): that is a property of the network's convolution, not a policy.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterable

import torch
from torch import nn

from ..errors import DDPMError
from .graphs import GraphedCall

__all__ = [
    "PRECISIONS",
    "Runtime",
    "resolve_device",
    "resolve_runtime",
    "runtime_of",
    "is_out_of_memory",
    "out_of_memory_error",
    "bf16_supported",
    "default_precision",
    "resolve_precision",
    "autocast_context",
    "default_channels_last",
    "compile_supported",
    "default_compile",
    "default_cuda_graphs",
    "is_compile_failure",
    "prepare_model",
    "make_optimizer",
    "opt_kernel_flags",
    "load_optimizer_state",
    "match_state_strides",
    "inference_model",
    "to_memory_format",
]

PRECISIONS = ("fp32", "bf16")


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def resolve_device(device: str | torch.device | None = "auto", *, local_rank: int = 0, world: int = 1) -> torch.device:
    """The torch.device a ``--device`` value names: ``auto`` (or None) is ``cuda:LOCAL_RANK`` when
    CUDA is available, else ``cpu``; ``cuda`` under several processes (torchrun) is each
    process's own ``cuda:LOCAL_RANK``; ``cpu``, ``cuda:N`` and torch.device values pass through.

    Raises :class:`DDPMError` (one line) for a CUDA device on a machine without CUDA, a
    ``cuda:N`` beyond the GPUs present, ``cuda:N`` under several processes other than the
    rank's own ``cuda:LOCAL_RANK`` (all would share one GPU), a LOCAL_RANK with no GPU of its own, or any other device type (this package runs on
    CPUs and CUDA GPUs).
    """
    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = "auto" if device is None else str(device).strip()
    auto = name == "auto"
    if auto:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise DDPMError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DDPMError(f"--device {name} asked for but CUDA is not available; use --device cpu or auto")
    count = torch.cuda.device_count()
    # A rank's own GPU, already resolved (cuda:LOCAL_RANK), passes; any other index is shared.
    if world > 1 and dev.index is not None and dev.index != local_rank:
        raise DDPMError(f"--device {name} under torchrun would put every process on one GPU; use --device cuda "
                        "(each process takes the GPU of its LOCAL_RANK)")
    if world > 1 and local_rank >= count:
        raise DDPMError(f"process LOCAL_RANK={local_rank} needs GPU {local_rank}, but only {count} are visible; "
                        "start one process per visible GPU (torchrun --nproc-per-node)")
    if dev.index is None:
        return torch.device(f"cuda:{local_rank}") if world > 1 or auto else dev
    if dev.index >= count:
        raise DDPMError(f"--device {name}: this machine has {count} GPU(s), numbered 0 to {count - 1}")
    return dev


@dataclass(frozen=True)
class Runtime:
    """Where and how a command runs, decided once (:func:`resolve_runtime`) and passed on: the
    one value that training, sampling, scoring, the memorisation check and the benchmarks take
    instead of loose device and precision strings.

    ``precision`` is what really runs ("fp32" or "bf16" autocast), never "auto";
    ``channels_last`` the activations' memory layout; ``compile`` whether the training network
    is wrapped in ``torch.compile``; ``cuda_graphs`` whether the sampling network is replayed
    from CUDA graphs (:mod:`ddpm.runtime.graphs`; CUDA devices only); ``progress`` whether this
    command shows progress bars (on torchrun's rank 0 only: callers pass their processes).
    """

    device: torch.device
    precision: str
    channels_last: bool
    compile: bool = False
    progress: bool = True
    cuda_graphs: bool = False

    def autocast(self) -> ContextManager[Any]:
        """The forward pass's autocast context for this runtime (see :func:`autocast_context`)."""
        return autocast_context(self.device, self.precision)

    def describe(self) -> str:
        """One line for the log, e.g. ``bf16 autocast on cpu``."""
        return f"{'bf16 autocast' if self.precision == 'bf16' else 'fp32'} on {self.device}"

    def quiet(self) -> "Runtime":
        """This runtime without progress bars (the trainer's grids, nested steps)."""
        return replace(self, progress=False)

    def place(self, model: nn.Module) -> nn.Module:
        """Move ``model`` onto the device in this runtime's layout, in place, and return it
        (:func:`prepare_model`; compiled when ``compile``)."""
        return prepare_model(model, self.device, channels_last=self.channels_last, compile=self.compile)

    def sampling_network(self, net: nn.Module) -> nn.Module:
        """``net`` itself when it already sits on this device in the layout sampling uses here,
        else a copy placed so: sampling never moves or re-lays the caller's weights (the
        trainer's EMA network, a run loaded on another device)."""
        device = self.device
        if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU, not any GPU
            device = torch.device("cuda", torch.cuda.current_device())
        params = list(net.parameters())
        here = all(p.device.type == device.type and (device.index is None or p.device.index == device.index)
                   for p in params)
        laid_out = not self.channels_last or all(
            p.dim() != 4 or p.is_contiguous(memory_format=torch.channels_last) for p in params)
        if here and laid_out:
            return net
        # Copy each tensor straight onto the target device: a plain deepcopy would first duplicate
        # the weights where they are (a GPU run sampled on the CPU would briefly need twice its GPU memory).
        memo: dict[int, Any] = {}
        for p in params:
            memo[id(p)] = torch.nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
        for b in net.buffers():
            memo[id(b)] = b.detach().to(device, copy=True)
        return prepare_model(copy.deepcopy(net, memo), device, channels_last=self.channels_last)

    def sampling_call(self, net: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``net`` wrapped for the samplers (:func:`inference_model`): autocast and layout inside,
        float32 NCHW out; on CUDA with ``cuda_graphs``, replayed from CUDA graphs
        (:class:`ddpm.runtime.graphs.GraphedCall`). Make one per sampling run: it holds the
        graphs' memory for as long as it lives."""
        call = inference_model(net, self.device, self.precision, channels_last=self.channels_last)
        if self.cuda_graphs and self.device.type == "cuda":
            return GraphedCall(call)
        return call


def resolve_runtime(device: str | torch.device | None = "auto", precision: str = "auto", *, local_rank: int = 0,
                    world: int = 1, channels_last: bool | None = None, compile: bool | None = False,
                    progress: bool = True, cuda_graphs: bool | None = None) -> Runtime:
    """The :class:`Runtime` of ``--device`` and ``--precision`` (``auto``, ``fp32`` or ``bf16``):
    the device by :func:`resolve_device`, the precision by :func:`resolve_precision` (``bf16`` on a
    device without fast bf16 warns and runs fp32, and the runtime says fp32), channels_last by
    :func:`default_channels_last` unless given, ``compile`` None by :func:`default_compile`,
    ``cuda_graphs`` None by :func:`default_cuda_graphs`.
    Raises :class:`DDPMError` for a bad device or an unknown precision."""
    dev = resolve_device(device, local_rank=local_rank, world=world)
    if precision != "auto" and precision not in PRECISIONS:
        raise DDPMError(f"unknown precision {precision!r}; expected auto, {' or '.join(PRECISIONS)}")
    prec = resolve_precision(dev, precision)
    return Runtime(dev, prec, default_channels_last(dev) if channels_last is None else channels_last,
                   compile=default_compile(dev) if compile is None else compile, progress=progress,
                   cuda_graphs=default_cuda_graphs(dev) if cuda_graphs is None else cuda_graphs)


def default_compile(device: torch.device) -> bool:
    """Whether training compiles its network when ``--compile`` is not given: on CUDA where
    Inductor can build kernels (Triton installed), not on CPUs (see the module docstring)."""
    return device.type == "cuda" and compile_supported("cuda")


def default_cuda_graphs(device: torch.device) -> bool:
    """Whether sampling replays its network from CUDA graphs when ``--no-cuda-graphs`` is not
    given: on CUDA. A recorded call costs one launch instead of a few hundred, which is what bounds
    a GPU at sampling batch sizes; recording needs no compiler and takes one call's time."""
    return device.type == "cuda"


def is_compile_failure(error: BaseException) -> bool:
    """Whether ``error`` came from ``torch.compile``'s tracing or code generation (TorchDynamo,
    Inductor, Triton) rather than from the computation itself: the caller can then run eagerly."""
    for e in (error, error.__cause__, error.__context__):
        module = type(e).__module__ if e is not None else ""
        if module.startswith(("torch._dynamo", "torch._inductor", "triton")):
            return True
    return False


def runtime_of(net: nn.Module, precision: str = "auto", *, progress: bool = True) -> Runtime:
    """The :class:`Runtime` of the device ``net``'s weights are on (for library callers that
    sample a network where it is): ``precision`` resolved there, the default layout."""
    return resolve_runtime(next(net.parameters()).device, precision, progress=progress)


@functools.lru_cache(maxsize=None)
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512_BF16 or AMX-BF16, or Arm's BF16).

    ``torch.backends.cpu.get_cpu_capability()`` only reports the vector width ("AVX512"), which
    Skylake-era CPUs without bf16 also report, so the individual feature flags are checked.
    """
    caps: dict[str, Any] = {}
    get_caps = getattr(torch.cpu, "get_capabilities", None)
    if get_caps is not None:
        try:
            caps = dict(get_caps())
        except Exception:  # pragma: no cover - depends on the build
            caps = {}
    if caps:
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("amx_tile") or caps.get("bf16"))
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):  # older PyTorch
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    # Last resort (Linux): the kernel's list of CPU flags.
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
    except OSError:
        return False
    words = set(flags.split())
    return bool(words & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_supported(device: torch.device | str) -> bool:
    """Whether bf16 autocast is *fast* on ``device`` (not merely possible).

    CUDA: the GPU has bf16 tensor cores (compute capability 8.0+, i.e. Ampere or newer; older
    GPUs such as the T4 and V100 only emulate bf16, which torch's ``is_bf16_supported`` counts).
    CPU: the processor has native bf16 dot products (see :func:`_cpu_has_native_bf16`);
    otherwise oneDNN emulates bf16 and float32 is faster. Other devices: False.
    """
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return False


def default_precision(device: torch.device | str) -> str:
    """``"bf16"`` where :func:`bf16_supported`, else ``"fp32"``.

    On the development CPU (AMD EPYC, AVX512_BF16) bf16 autocast trains the DDPM-CIFAR model
    about 1.5-2x faster than float32 and changes the loss on a fixed batch by well under 1%;
    see ``docs/benchmarks.md``.
    """
    return "bf16" if bf16_supported(device) else "fp32"


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """The precision that will actually be used: ``"auto"`` becomes :func:`default_precision`,
    and ``"bf16"`` on a device without fast bf16 falls back to ``"fp32"`` with a warning."""
    if precision == "auto":
        return default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected 'auto' or one of {', '.join(PRECISIONS)}")
    if precision == "bf16" and not bf16_supported(device):
        warnings.warn(
            f"bf16 requested but {_device(device)} has no fast bf16 support; using fp32", RuntimeWarning, stacklevel=2
        )
        return "fp32"
    return precision


def autocast_context(device: torch.device | str, precision: str = "auto") -> ContextManager[Any]:
    """A context manager for the forward pass: bf16 autocast, or nothing for fp32.

    Use it around the model call only; the loss (``ddpm.diffusion_loss`` casts to float32),
    ``backward()`` and the optimiser step stay outside, as the PyTorch AMP recipe says.
    """
    device = _device(device)
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def default_channels_last(device: torch.device | str) -> bool:
    """Whether to keep activations in channels_last (NHWC) by default: yes on CUDA and CPU.

    cuDNN's tensor-core convolutions are NHWC. On the development CPU channels_last was 5% faster
    than NCHW in fp32 and 3% slower in bf16 (``docs/benchmarks.md``): a wash, so one default.
    """
    return _device(device).type in ("cuda", "cpu")


@functools.lru_cache(maxsize=None)
def compile_supported(device_type: str = "cpu") -> bool:
    """Whether ``torch.compile``'s default backend (Inductor) can build kernels here.

    CPU kernels are C++ compiled at run time (needs ``$CXX`` or ``g++``/``clang++``); CUDA
    kernels need Triton. Windows and Python builds Inductor does not support return False.
    """
    if not hasattr(torch, "compile") or sys.platform == "win32":
        return False
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return torch.cuda.is_available()
    if device_type == "cpu":
        cxx = os.environ.get("CXX")
        return any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "clang++"])
    return False


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels_last layout if asked and 4-D; otherwise unchanged (no copy)."""
    if channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def prepare_model(
    model: nn.Module,
    device: torch.device | str,
    channels_last: bool | None = None,
    compile: bool = False,
    compile_mode: str | None = None,
) -> nn.Module:
    """Move ``model`` to ``device`` (in place), optionally convert it to channels_last, and
    return it, wrapped in ``torch.compile`` if ``compile``.

    The returned module is what the training step calls; keep the plain ``model`` for the EMA
    copy and for ``state_dict()`` (``ddpm.EMA`` also unwraps compiled modules itself).
    ``channels_last=None`` means :func:`default_channels_last`. ``compile_mode`` is passed to
    ``torch.compile`` (e.g. ``"reduce-overhead"`` for CUDA graphs at sampling time).
    """
    device = _device(device)
    if channels_last is None:
        channels_last = default_channels_last(device)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        if not compile_supported(device.type):
            raise RuntimeError(
                f"torch.compile needs a C++ compiler (CPU) or Triton (CUDA); none found for {device.type}"
            )
        return torch.compile(model, mode=compile_mode)
    return model


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    device: torch.device | str,
    lr: float = 2e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW with the fastest implementation available on ``device``.

    ``fused=True`` is one kernel per parameter group on CUDA and a single vectorised pass on
    CPU (PyTorch 2.4+); elsewhere ``foreach`` multi-tensor kernels. The update is the same
    AdamW either way (to float rounding).
    """
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                             **opt_kernel_flags(device))


def opt_kernel_flags(device: torch.device | str) -> dict[str, bool | None]:
    """The ``fused``/``foreach`` optimiser flags that are fastest on ``device``.

    :func:`load_optimizer_state` applies them to param groups loaded from a checkpoint, which
    carry the flags of the machine that saved them.
    """
    device = _device(device)
    if device.type in ("cuda", "cpu") and _torch_at_least(2, 4):
        return {"fused": True, "foreach": None}
    return {"fused": None, "foreach": True}


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict[str, Any], device: torch.device | str) -> None:
    """``opt.load_state_dict(state)`` made safe and fast for a state saved elsewhere.

    The saved param groups carry the saving machine's ``fused``/``foreach`` flags, replaced by
    this device's best; and the moments get their weights' memory layout back (see
    :func:`match_state_strides`).
    """
    opt.load_state_dict(state)
    fastest = opt_kernel_flags(device)
    for group in opt.param_groups:
        group.update(fastest)
    match_state_strides(opt)


def match_state_strides(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter optimiser state tensor its parameter's memory layout.

    Checkpoints store tensors contiguous, so after ``load_state_dict`` the Adam moments of a
    channels_last weight are NCHW while the weight is NHWC. The fused AdamW kernels (CPU and
    CUDA, PyTorch 2.14) walk parameter, gradient and moments in memory order, so mismatched
    layouts silently pair the wrong elements; the foreach path does not care.
    """
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def inference_model(
    net: Callable[..., torch.Tensor],
    device: torch.device | str,
    precision: str = "auto",
    channels_last: bool | None = None,
) -> Callable[..., torch.Tensor]:
    """Wrap ``net`` for sampling: ``call(x, t, *args) -> float32`` under autocast.

    ``x`` is converted to channels_last if asked (default: :func:`default_channels_last`); the
    output comes back as contiguous float32 NCHW so the samplers' update arithmetic is float32.
    ``net.num_classes`` is forwarded so :func:`ddpm.guided` finds the null class. The samplers
    already run under ``torch.inference_mode``.
    """
    device = _device(device)
    if channels_last is None:
        channels_last = default_channels_last(device)
    precision = resolve_precision(device, precision)

    def call(x: torch.Tensor, t: torch.Tensor, *args: Any) -> torch.Tensor:
        with autocast_context(device, precision):
            out = net(to_memory_format(x, channels_last), t, *args)
        return out.float().contiguous()

    inner = getattr(net, "_orig_mod", net)
    call.num_classes = getattr(inner, "num_classes", None)  # type: ignore[attr-defined]
    return call


def _torch_at_least(major: int, minor: int) -> bool:
    v = torch.__version__.split("+")[0].split(".")
    try:
        return (int(v[0]), int(v[1])) >= (major, minor)
    except (ValueError, IndexError):  # pragma: no cover - exotic version strings
        return True


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocator running out of memory: CUDA's ``OutOfMemoryError``, the
    CPU allocator's ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory") or ``MemoryError``."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory_error(error: BaseException, doing: str, remedies: str) -> DDPMError:
    """The one line for an allocator that ran out of memory while ``doing`` (e.g. "a training step
    of 64 images of 64x64"): how much it asked for, when the allocator said, and ``remedies``."""
    m = re.search(r"(?:tried to allocate|Tried to allocate) ([0-9.]+ ?[KMGT]?i?B|\d+ bytes)", str(error))
    asked = m.group(1) if m else None
    if asked is not None and asked.endswith(" bytes"):
        n = int(asked.split()[0])
        asked = next((f"{n / s:.1f} {u}" for u, s in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)) if n >= s),
                     asked)
    where = "the GPU" if type(error).__name__ == "OutOfMemoryError" else "this machine"
    return DDPMError(f"out of memory on {where} in {doing}" + (f" (it asked for {asked} more)" if asked else "")
                     + f"; {remedies}")
