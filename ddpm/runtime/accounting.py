"""Accounting for speed figures: model FLOPs per training image, the devices' data-sheet peaks
(for model FLOPs utilisation, MFU) and the process's and machine's memory."""

from __future__ import annotations

import os
import platform
import re
import resource

import torch
from torch import nn

__all__ = ["train_flops_per_image", "peak_flops", "max_rss_bytes", "host_memory_bytes"]


def train_flops_per_image(model: nn.Module, *inputs: torch.Tensor) -> float:
    """FLOPs of one training step per image: forward and backward of ``model(*inputs)``.

    ``inputs`` are what the model is called with, batch first (e.g. x [B, C, H, W], t int64 [B],
    labels int64 [B]); the count of the whole batch is divided by B. Counted with
    ``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention, a
    multiply-add being 2 FLOPs; element-wise work is not counted, nor what activation
    checkpointing recomputes (the "model FLOPs" of model FLOPs utilisation, MFU: Chowdhery et al.
    2022, PaLM, appendix B). The count depends on shapes only, so a model and inputs built on the
    ``meta`` device give it without computing anything or touching real weights and gradients.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        model(*inputs).float().square().mean().backward()
    return counter.get_total_flops() / inputs[0].shape[0]


# Dense peak throughput in TFLOP/s from NVIDIA's data sheets (which quote TF32 and BF16 with
# structured sparsity: half of those), by the number format the tensor cores run. The first
# pattern that matches a device name decides; NVL boards run other clocks and get no figures, and
# a GPU not listed has no peak here rather than a guessed one.
_DATASHEET_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bNVL\b", {}),
    (r"\bA100\b", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
    (r"\bH100\b.*\bPCIe\b", {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5}),
    (r"\bH100\b", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),  # SXM5
    (r"\bH200\b", {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5}),  # SXM: the H100 SXM's compute
)


def peak_flops(device: torch.device | str, precision: str) -> float | None:
    """The data-sheet peak FLOP/s of ``device`` for training in ``precision`` (``fp32``/``bf16``),
    or None where it is not known.

    Known: the CUDA GPUs of ``_DATASHEET_TFLOPS`` (A100, H100 SXM and PCIe, H200), dense figures.
    ``fp32`` means TF32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is on (PyTorch's
    default), since the UNet's FLOPs are almost all convolutions; plain FP32 otherwise. None for
    CPUs (their peak depends on cores, clocks and vector units that no table here covers;
    ``benchmarks/speed.py`` measures one instead) and for unlisted GPUs: a fraction of peak is
    then not reported rather than computed from an invented number.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    kind = "bf16" if precision == "bf16" else ("tf32" if torch.backends.cudnn.allow_tf32 else "fp32")
    for pattern, table in _DATASHEET_TFLOPS:
        if re.search(pattern, name, re.IGNORECASE):
            return table[kind] * 1e12 if kind in table else None
    return None


def max_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes (Linux reports KiB, macOS bytes).

    A CPU stand-in for ``torch.cuda.max_memory_allocated``: it never goes down, includes the
    Python interpreter and the allocator's cached pages, and so is approximate.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


def host_memory_bytes() -> int | None:
    """This machine's physical memory in bytes, or None where the OS does not say (Windows)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None
