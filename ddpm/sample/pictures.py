"""Pictures of what a model does, all drawn through :func:`ddpm.sample.engine.generate`'s path:
sample grids and PNGs (:func:`make_grid`, :func:`save_png`), the sampling chain as an animation
(:class:`ChainRecorder`, :func:`chain_frames`, :func:`save_gif`), a class x guidance-scale grid
(:func:`guidance_sweep`) and a walk between two starting noises (:func:`interpolate`, with
:func:`slerp`). Grids come from torchvision and images and GIFs are written by Pillow, through
the one file writer (:mod:`ddpm.files.atomic`).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid as tv_make_grid

from ..data.sets import to_uint8
from ..errors import DDPMError
from ..files.atomic import atomic_write_with
from ..run.checkpoint import Sampleable
from ..runtime.policy import Runtime, runtime_of
from .engine import BatchCallback, Draw, check_labels, check_request, generate, sample_draw, starting_noise
from .spec import SampleSpec

__all__ = ["make_grid", "save_png", "save_gif", "class_labels", "Chain", "ChainRecorder", "chain_frames",
           "check_animate_every", "default_animate_every", "check_sweep_scales", "guidance_sweep", "slerp",
           "check_interpolation_n", "interpolate"]


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images [N, 3, H, W] into one HWC uint8 array, ``nrow`` images per row.

    ``torchvision.utils.make_grid``'s layout: ``min(nrow, N)`` columns and ``ceil(N / columns)``
    rows of tiles with ``padding`` pixels (white by default) around each, so the array is
    ``rows * (H + padding) + padding`` by ``columns * (W + padding) + padding`` pixels; a single
    image comes back as it is, without padding. Every grid the project writes comes from here.
    """
    grid = tv_make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=pad_value)
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Save an HWC (or HW grey) uint8 array as a PNG at ``path``, atomically
    (:func:`ddpm.files.atomic.atomic_write_with`, whose errors it raises)."""
    image = Image.fromarray(array)
    atomic_write_with(path, lambda f: image.save(f, format="PNG"))


def save_gif(frames: Sequence[np.ndarray], path: str | Path, *, frame_ms: int = 100, hold_ms: int = 2000) -> None:
    """Save HWC uint8 arrays (all of one size) as an animated GIF that loops forever, atomically.

    Each frame shows for ``frame_ms`` milliseconds, the last for ``hold_ms``. Pillow writes it and
    reduces each frame to its own 256-colour palette; it also merges identical consecutive
    frames into one (adding their durations), so such frames count once. Raises ``ValueError``
    for no frames, and the errors of :func:`ddpm.files.atomic.atomic_write_with`.
    """
    if not frames:
        raise ValueError("an animation needs at least one frame")
    images = [Image.fromarray(f) for f in frames]
    durations = [frame_ms] * (len(images) - 1) + [hold_ms]
    atomic_write_with(path, lambda f: images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                                                     duration=durations, loop=0))


def class_labels(counts: Sequence[int]) -> torch.Tensor:
    """Labels ``[0]*counts[0] + [1]*counts[1] + ...`` as int64."""
    return torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(counts)])


# ------------------------------------------------------------------------------ the sampling chain
class Chain(NamedTuple):
    """A recorded sampling chain of N images, at F of its steps (uint8 images in [0, 255])."""

    images: torch.Tensor  # uint8 [N, 3, H, W]: the samples
    steps: list[int]  # the F recorded sampler step indices (0-based; the last step is always one)
    x_t: torch.Tensor  # uint8 [F, N, 3, H, W]: x_t after each recorded step, clipped to [-1, 1]
    x0: torch.Tensor  # uint8 [F, N, 3, H, W]: the model's prediction of x0 at that step


def check_animate_every(every: int) -> None:
    """Raise :class:`DDPMError` unless ``every`` (steps between recorded frames) is at least 1."""
    if every < 1:
        raise DDPMError(f"--animate-every must be at least 1, got {every}")


def default_animate_every(steps: int) -> int:
    """Record every k-th of ``steps`` sampler steps: ``ceil(steps / 50)``, so an animation has
    all the steps of a short chain and 25 to 50 frames of a long one (1000 ancestral steps: 50)."""
    return max(1, math.ceil(steps / 50))


class ChainRecorder:
    """A ``callback`` for :func:`generate` (or anything that calls it: :func:`interpolate`) that
    records x_t and the predicted x0 after every ``every``-th of the ``steps`` sampler steps and
    after the last one: ``ceil(steps / every)`` frames. Copies go to the CPU as uint8 at those
    steps only. Raises :class:`DDPMError` when ``every`` < 1.

        rec = ChainRecorder(every=2, steps=20)
        chain = rec.chain(generate(run, 8, steps=20, callback=rec))
    """

    def __init__(self, every: int, steps: int) -> None:
        check_animate_every(every)
        self.every, self.steps = int(every), int(steps)
        self.batches: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}

    def __call__(self, batch: int, i: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if (i + 1) % self.every == 0 or i + 1 == self.steps:
            self.batches.setdefault(batch, []).append((i, to_uint8(x).cpu(), to_uint8(x0).cpu()))

    def chain(self, images: torch.Tensor) -> Chain:
        """The recorded chain of the sampling run that returned ``images`` (uint8 [N, 3, H, W])."""
        batches = [self.batches[k] for k in sorted(self.batches)]
        steps = [i for i, _, _ in batches[0]]
        x_t = torch.stack([torch.cat([b[f][1] for b in batches]) for f in range(len(steps))])
        x0 = torch.stack([torch.cat([b[f][2] for b in batches]) for f in range(len(steps))])
        return Chain(images, steps, x_t, x0)


def chain_frames(chain: Chain, nrow: int) -> list[np.ndarray]:
    """One HWC uint8 picture per recorded step: a tile per sample, x_t on the left and the
    predicted x0 on the right ([3, H, 2W]), tiled ``nrow`` per row by :func:`make_grid`, so a
    frame is ``rows * (H + 2) + 2`` by ``columns * (2W + 2) + 2`` pixels."""
    return [make_grid(torch.cat([xt, x0], dim=-1), nrow=nrow) for xt, x0 in zip(chain.x_t, chain.x0)]


# ----------------------------------------------------------------------------------- guidance
def check_sweep_scales(scales: Sequence[float]) -> None:
    """Raise :class:`DDPMError` unless ``scales`` holds one or more finite guidance scales."""
    if not scales or not all(math.isfinite(s) for s in scales):
        raise DDPMError(f"--guidance-sweep needs one or more finite scales, got {' '.join(map(str, scales)) or 'none'}")


def guidance_sweep(run: Sampleable, scales: Sequence[float], labels: torch.Tensor, spec: SampleSpec,
                   runtime: Runtime | None = None) -> torch.Tensor:
    """Images uint8 [R * S, 3, H, W], row-major: row r is class ``labels[r]`` (int64 [R]) at each of
    the S guidance ``scales`` in turn (``eps_uncond + s (eps_cond - eps_uncond)``, see
    :func:`ddpm.guided`), all from the same starting noise, so a row shows only what guidance does;
    ``spec.guidance`` is ignored. Grid it with ``make_grid(images, nrow=S)``. Raises
    :class:`DDPMError` for an unconditional run, no scales or a non-finite one."""
    if not run.conditional:
        raise DDPMError("--guidance-sweep needs a class-conditional run (trained with --conditional); this one is "
                        "unconditional")
    check_sweep_scales(scales)
    # generate() draws image i's noise from the seed and i alone, so every scale starts row r
    # from the same noise (and stochastic samplers add the same noise on the way).
    per_scale = [generate(run, len(labels), spec.with_(guidance=float(s)), runtime, labels=labels) for s in scales]
    return torch.stack(per_scale, dim=1).flatten(0, 1)


# ------------------------------------------------------------------------------- interpolation
def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """Spherical linear interpolation between ``a`` and ``b`` (any one shape, taken as single
    vectors) at fractions ``t`` in [0, 1]: float32 [len(t), *a.shape].

    ``slerp(t) = sin((1 - t) theta) / sin(theta) a + sin(t theta) / sin(theta) b`` with theta the
    angle between a and b (Shoemake 1985, "Animating rotation with quaternion curves"). Between
    two Gaussian noises it keeps the norm a sample of the noise has, where a straight line would
    pass through improbably small noise; DDIM (Song et al. 2021, sec. 5.3) interpolates its
    starting noise this way. ``t = 0`` and ``t = 1`` give ``a`` and ``b`` exactly. Nearly
    parallel vectors (sin(theta) < 1e-6) are interpolated linearly.
    """
    t = torch.as_tensor(t, dtype=torch.float64).flatten()
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = float(torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp(min=1e-30))
    theta = math.acos(min(1.0, max(-1.0, cos)))
    out = []
    for ti in t.tolist():
        if math.sin(theta) < 1e-6:
            wa, wb = 1.0 - ti, ti
        else:
            wa, wb = math.sin((1 - ti) * theta) / math.sin(theta), math.sin(ti * theta) / math.sin(theta)
        out.append(wa * a.float() + wb * b.float())
    return torch.stack(out)


def check_interpolation_n(n: int) -> None:
    """Raise :class:`DDPMError` unless a row of ``n`` images can hold both ends (n >= 2)."""
    if n < 2:
        raise DDPMError(f"--interpolate needs --n of at least 2 (both ends are included), got {n}")


def interpolate(run: Sampleable, n: int, spec: SampleSpec, runtime: Runtime | None = None, *,
                labels: torch.Tensor | None = None, callback: BatchCallback | None = None) -> torch.Tensor:
    """``n`` images uint8 [n, 3, H, W] along the :func:`slerp` path between two starting noises,
    both ends included: the starting noise of ``generate(run, 1, spec)`` and of the same with
    ``spec.seed + 1``. ``labels`` (int64 [n]) and ``callback`` as for :func:`generate`.

    With a deterministic sampler (dpm-solver, or ddim with eta = 0) the row is a smooth path
    and its ends are those two plain samples (to float rounding: a batch of n may round
    differently from a batch of 1; exactly with ``batch_size=1``). Stochastic samplers (ancestral,
    langevin, ddim with eta > 0) add each image's own noise at every step, so the row is not
    smooth and its last end is another sample from seed + 1's starting noise; a warning says so.
    Raises :class:`DDPMError` when ``n`` < 2, and as :func:`generate` does.
    """
    check_interpolation_n(n)
    check_request(run, n, spec.seed + 1)
    if spec.stochastic:
        eta = f" (eta {spec.eta:g})" if spec.sampler == "ddim" else ""
        warnings.warn(f"--interpolate with the stochastic sampler {spec.sampler}{eta} adds other noise to each image, "
                      "so the row is not a smooth path; use dpm-solver or ddim with --eta 0", stacklevel=2)
    check_labels(run, n, labels)
    ends = [starting_noise(run, 1, seed=s)[0] for s in (spec.seed, spec.seed + 1)]
    noise = slerp(ends[0], ends[1], torch.linspace(0, 1, n, dtype=torch.float64))
    net = run.ema_model if spec.use_ema and run.ema_model is not None else run.model
    return sample_draw(run, Draw(n, labels=labels, noise=noise), spec.for_run(run.schedule.T),
                       runtime if runtime is not None else runtime_of(net), callback)
