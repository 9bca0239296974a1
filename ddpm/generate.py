"""Generate images from a trained run: the glue between a run folder and the samplers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import Run, atomic_write_bytes
from .data import to_uint8
from .errors import DDPMError
from .guidance import guided
from .samplers import DEFAULT_STEPS, eps_model, get_sampler, resolve_steps

__all__ = ["generate", "make_grid", "save_png", "default_steps"]


def default_steps(sampler: str) -> int | None:
    """Steps a sampler runs when none are asked for: the full chain (None) for ancestral, few
    otherwise (:data:`ddpm.samplers.DEFAULT_STEPS`)."""
    return DEFAULT_STEPS[sampler.replace("_", "-")]


def generate(
    run: Run,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    sampler: str = "dpm-solver",
    steps: int | None = None,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    clip: bool = True,
    precision: str = "fp32",
    **sampler_options,
) -> torch.Tensor:
    """``n`` images as uint8 [N, 3, H, W] from ``run``'s EMA (or raw) weights.

    ``labels`` (int64 [N]) picks the class of each image for conditional runs; without labels a
    conditional run samples unconditionally (the null class). Batch ``k`` starts from noise
    seeded by ``(seed, k)``, so the same seed and batch size give the same images.
    """
    if n < 1:
        raise DDPMError(f"--n must be at least 1, got {n}")
    net = run.ema_model if use_ema and run.ema_model is not None else run.model
    device = torch.device(device) if device is not None else next(net.parameters()).device
    from .perf import inference_model, prepare_model  # local: perf depends on nothing here

    net = prepare_model(net, device).eval()  # on the device, channels_last where that is the default
    sample_fn = get_sampler(sampler)
    steps = resolve_steps(sampler, steps, run.schedule.T)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (n,):
            raise DDPMError(f"need one label per image: {n} images but labels of shape {tuple(labels.shape)}")
        if not run.conditional:
            raise DDPMError("labels were given but this run's model is unconditional")
    size = run.image_size
    out = []
    batches = range(math.ceil(n / batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"sampling ({sampler})", unit="batch", dynamic_ncols=True, leave=False)
    # Autocast and layout live inside the network call; the samplers' arithmetic stays float32.
    call = inference_model(net, device, precision)
    for k in batches:
        b = min(batch_size, n - k * batch_size)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
        x_T = torch.randn(b, net.config.in_channels, size, size, generator=gen).to(device)
        if labels is not None:
            model = guided(call, labels[k * batch_size : k * batch_size + b].to(device), guidance)
        else:
            model = call
        model = eps_model(model, run.schedule, run.prediction)
        x = sample_fn(model, x_T, run.schedule, steps=steps, clip=clip, generator=gen, **sampler_options)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images [N, 3, H, W] into one HWC array with ``nrow`` images per row."""
    n, c, h, w = images.shape
    ncol = nrow
    rows = math.ceil(n / ncol)
    grid = np.full((rows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8)
    arr = images.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, cidx = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + cidx * (w + padding)
        grid[top : top + h, left : left + w] = arr[i]
    return grid


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Save an HWC uint8 array as PNG, atomically."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def class_labels(counts: Sequence[int]) -> torch.Tensor:
    """Labels ``[0]*counts[0] + [1]*counts[1] + ...`` as int64."""
    return torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])
