"""CUDA graphs for the sampling network: one recorded launch per network evaluation.

A sampler calls the network tens to hundreds of times on inputs of one shape. In eager mode
each call launches a few hundred kernels from Python, and at the batch sizes a sampler runs
(and for the small networks of a 32x32 run) that launch cost, not the arithmetic, bounds the
GPU. A CUDA graph (``torch.cuda.CUDAGraph``) records the kernels of one call once and replays
them with a single launch. :class:`GraphedCall` does this for any ``call(x, t, *labels)`` that
reads only its tensor arguments, with no ``torch.compile`` and so no compile time: the first call
of a new input signature runs eagerly (the warm-up cuDNN and the allocator need before
capture), the second records the graph, every later one replays it.

What a replay may and may not do:

* The recorded kernels read the inputs from fixed buffers and write the output to a fixed
  buffer. Each call copies its inputs in and returns a *copy* of the output, so results a
  sampler keeps across steps (DPM-Solver++'s previous prediction) are never overwritten.
* Anything the call computed from Python values at capture time is frozen. The UNet's forward
  computes everything (timestep embedding, null labels) from its tensor arguments, which
  ``tests/sample/test_graphs.py`` checks on the CPU by recording the call with ``make_fx`` (which
  freezes Python values exactly as a capture does) and comparing replayed samples with eager ones.
* A capture that fails (an operation CUDA graphs cannot record) falls back to eager calls with
  one warning, for the rest of the sampling.

Used by :meth:`ddpm.runtime.policy.Runtime.sampling_call`, on CUDA by default
(:func:`ddpm.runtime.policy.default_cuda_graphs`); ``--no-cuda-graphs`` turns it off.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Protocol

import torch

from ..errors import first_line

__all__ = ["GraphedCall", "Recorder", "CudaRecorder"]

Call = Callable[..., torch.Tensor]


class Recorder(Protocol):
    """How :class:`GraphedCall` records one call.

    ``warm_up(call, inputs)`` runs the call once before its recording and returns its output.
    ``record(call, inputs) -> (replay, output)`` records it on ``inputs``, the fixed input
    buffers; ``output`` is the fixed output buffer that every ``replay()`` rewrites from the
    buffers' current contents. ``record`` raises on failure (any exception) and leaves the device
    usable for eager calls; ``warm_up`` raises what the call raises.
    """

    def warm_up(self, call: Call, inputs: tuple[torch.Tensor | None, ...]) -> torch.Tensor: ...

    def record(self, call: Call, inputs: tuple[torch.Tensor | None, ...]) -> tuple[Callable[[], None], torch.Tensor]: ...


# One side stream and one graph memory pool per device, for the whole process: warming up and
# capturing on the same stream lets capture reuse the cuBLAS workspace the warm-up created
# (cuBLAS keeps one per stream; a new stream per capture would pin a new workspace inside each
# graph's pool), and the pool is shared by every graph of every sampling run on the device.
_STREAMS: dict[torch.device, tuple[torch.cuda.Stream, Any]] = {}


def _stream_and_pool(device: torch.device) -> tuple[torch.cuda.Stream, Any]:
    if device not in _STREAMS:
        _STREAMS[device] = (torch.cuda.Stream(device=device), torch.cuda.graph_pool_handle())
    return _STREAMS[device]


class CudaRecorder:
    """Records with ``torch.cuda.graph`` on the inputs' device (warm-up and capture on one side
    stream and one memory pool per device, see ``_STREAMS``). Sharing the pool means a second
    shape (the last, smaller batch; a guided batch of 2B) reuses the first's activation memory.
    That is safe in any replay order here: the input buffers live outside the pool, each output is
    copied out before another graph can run, and the stream orders the replays.

    The capture is ``thread_local``: other threads of the process (a DataLoader's pin-memory
    thread, NCCL's watchdog) may use CUDA meanwhile. It runs inside a stream context of our own,
    so a capture that fails still leaves the caller on the stream it was on.
    """

    def warm_up(self, call: Call, inputs: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
        """``call(*inputs)`` on the side stream, ordered after and before the caller's stream: lazy
        initialisation (cuDNN plans, cuBLAS workspaces) then happens here, not inside the capture."""
        device = _device_of(inputs)
        with torch.cuda.device(device):
            stream, _ = _stream_and_pool(device)
            caller = torch.cuda.current_stream(device)
            stream.wait_stream(caller)
            with torch.cuda.stream(stream):
                out = call(*inputs)
            caller.wait_stream(stream)
            out.record_stream(caller)  # used (and freed) on the caller's stream
        return out

    def record(self, call: Call, inputs: tuple[torch.Tensor | None, ...]) -> tuple[Callable[[], None], torch.Tensor]:
        """The graph of ``call(*inputs)`` and its output buffer. Raises the error that broke the
        capture (not the capture's own complaint at its end), after synchronising the device."""
        device = _device_of(inputs)
        with torch.cuda.device(device):
            stream, pool = _stream_and_pool(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            graph = torch.cuda.CUDAGraph()
            cause: BaseException | None = None
            try:
                with torch.cuda.stream(stream):
                    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
                        try:
                            out = call(*inputs)
                        except Exception as e:
                            cause = e  # the capture's end then fails too; this is the cause to report
                            raise
            except Exception as e:
                torch.cuda.synchronize(device)
                raise (cause if isinstance(cause, Exception) else e) from None
            torch.cuda.current_stream(device).wait_stream(stream)
        return graph.replay, out


def _device_of(inputs: tuple[torch.Tensor | None, ...]) -> torch.device:
    return next(a.device for a in inputs if a is not None)


class GraphedCall:
    """``call`` replayed from one recorded graph per input signature (the shapes, dtypes and
    devices of its tensor arguments, and which are None).

    ``call(x, t, *labels)``: ``x`` float [B, C, H, W], ``t`` int64 [B] steps, labels int64 [B] or
    None; it returns a float tensor (the samplers': float32 [B, C, H, W]), which a
    :class:`GraphedCall` returns as a fresh tensor each time. Every call runs under
    :func:`torch.inference_mode` (a graph records no autograd, and the input buffers are inference
    tensors). ``num_classes`` is forwarded (:func:`ddpm.core.guidance.guided` reads it).
    ``recorder`` defaults to CUDA graphs (:class:`CudaRecorder`); tests pass one that records on
    the CPU. At most ``max_graphs`` signatures are recorded; calls of further ones run eagerly.

    Errors: what ``call`` raises at a warm-up or an eager call propagates. A recording that raises
    is reported once with a ``RuntimeWarning`` and the call then runs eagerly from there on.
    """

    def __init__(self, call: Call, recorder: Recorder | None = None, max_graphs: int = 4) -> None:
        self.call = call
        self.num_classes = getattr(call, "num_classes", None)
        self.recorder = recorder if recorder is not None else CudaRecorder()
        self.max_graphs = max_graphs
        self.eager = False
        self._seen: set[tuple] = set()
        self._graphs: dict[tuple, tuple[tuple[torch.Tensor | None, ...], Callable[[], None], torch.Tensor]] = {}

    @staticmethod
    def signature(args: tuple[Any, ...]) -> tuple:
        """The key one graph serves: per argument its shape, dtype and device, or None."""
        return tuple(None if a is None else (tuple(a.shape), a.dtype, a.device) for a in args)

    @torch.inference_mode()
    def __call__(self, *args: torch.Tensor | None) -> torch.Tensor:
        """``call(*args)``: eagerly at a signature's first call (the warm-up), recorded at its
        second, replayed after; eagerly throughout once a recording failed or ``max_graphs``
        signatures are recorded."""
        if self.eager:
            return self.call(*args)
        key = self.signature(args)
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return self.call(*args)
            if key not in self._seen:  # first sight: the warm-up, whose output is this call's
                self._seen.add(key)
                return self.recorder.warm_up(self.call, args)
            buffers = tuple(None if a is None else a.clone() for a in args)
            try:
                replay, output = self.recorder.record(self.call, buffers)
            except Exception as e:  # noqa: BLE001 - any failure to record means: run eagerly
                self.eager = True
                self._graphs.clear()
                warnings.warn(f"CUDA graph capture of the sampling network failed ({first_line(e)}); sampling without "
                              "CUDA graphs", RuntimeWarning, stacklevel=2)
                return self.call(*args)
            entry = self._graphs[key] = (buffers, replay, output)
        buffers, replay, output = entry
        for buffer, a in zip(buffers, args):
            if buffer is not None:
                buffer.copy_(a)
        replay()
        return output.clone()
