"""Generate images from a trained run: the glue between a run folder and the samplers.

Besides plain samples (:func:`generate`) it makes the pictures that show what a model does:
the sampling chain as an animation (:class:`ChainRecorder`, :func:`chain_frames`, :func:`save_gif`),
a class x guidance-scale grid (:func:`guidance_sweep`) and a walk between two starting noises
(:func:`interpolate`, with :func:`slerp`). Every image of them comes from :func:`generate`, so
the starting noise of a seed, batching and precision are decided there alone.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..run.checkpoint import Sampleable
from ..data.sets import to_uint8
from ..runtime.processes import Dist
from ..errors import DDPMError
from ..core.guidance import guided
from ..files.atomic import atomic_write_with
from ..core.samplers import MAX_SEED, STOCHASTIC, ImageGenerators, eps_model, get_sampler, resolve_steps

__all__ = ["generate", "generate_sharded", "check_request", "starting_noise", "make_grid", "save_png", "save_gif", "slerp",
           "ChainRecorder", "Chain", "chain_frames", "default_animate_every", "guidance_sweep", "interpolate",
           "STOCHASTIC_SAMPLERS", "BATCH_SIZE", "check_animate_every", "check_sweep_scales",
           "check_interpolation_n"]

# Images sampled at once unless asked otherwise (speed and memory only: every image has its own noise).
BATCH_SIZE = 64

# Samplers that add fresh noise at every step (ddim too when its eta > 0).
STOCHASTIC_SAMPLERS = tuple(name for name, noisy in STOCHASTIC.items() if noisy)

# Called after every sampler step of every batch as ``callback(batch, i, t, x, x0)``.
BatchCallback = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]


def starting_noise(run: Sampleable, n: int, *, seed: int = 0, batch_size: int | None = None) -> torch.Tensor:
    """The starting noise x_T that ``generate(run, n, seed=seed)`` draws, at any batch size:
    float32 [n, C, H, W], standard normal, on the CPU. Row i is the first draw of image i's own
    CPU generator, seeded ``seed * 1_000_003 + i`` (:func:`ddpm.core.samplers.image_seed`), so it
    depends on the seed and i alone: the first rows of a larger n are the rows of a smaller one.
    ``batch_size`` is accepted for callers written when batches were seeded, and changes nothing.
    """
    del batch_size  # images are seeded one by one: the batch changes nothing
    c, size = run.model.config.in_channels, run.image_size
    return ImageGenerators.seeded(seed, n).randn((c, size, size))


def generate(
    run: Sampleable,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    sampler: str = "dpm-solver",
    steps: int | None = None,
    guidance: float = 1.0,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
    use_ema: bool = True,
    device: str | torch.device | None = None,
    progress: bool = True,
    clip: bool = True,
    precision: str = "auto",
    callback: BatchCallback | None = None,
    first_index: int = 0,
    **sampler_options,
) -> torch.Tensor:
    """``n`` images as uint8 [N, 3, H, W] from ``run``'s EMA (or raw) weights.

    ``run`` is any :class:`ddpm.run.checkpoint.Sampleable`: a :class:`~ddpm.run.checkpoint.Run` from
    :func:`ddpm.load_run`, or the one the trainer builds around its EMA weights. The caller's
    network is left as it was found: on its device, in its layout and its train/eval mode
    (sampling on another device, or where the network is not in the layout sampling uses
    there, works on a copy).

    ``labels`` (int64 [N]) picks the class of each image for conditional runs; without labels a
    conditional run samples unconditionally (the null class). Image ``i`` has a CPU generator of
    its own, seeded ``seed * 1_000_003 + i`` (:class:`ddpm.core.samplers.ImageGenerators`): it draws
    the image's starting noise (:func:`starting_noise`), then every noise a stochastic sampler
    (ancestral, langevin, ddim with eta > 0) adds to that image, in the same order at any
    ``batch_size``. So the seed alone fixes image i: the batch size does not change it, and the
    first images of a larger ``n`` are those of a smaller one. (Up to float rounding: the network
    may round a batch of 1 and a batch of 64 differently on some devices, which can move a pixel
    by one level.) ``noise`` (float [N, C, H, W]) replaces the starting noise; image i's generator
    still draws (and drops) its own first, so a stochastic sampler adds the same noise with or
    without it. ``batch_size`` sets only how many images go through the network at once.
    ``first_index`` numbers the images from there: image i of this call is image
    ``first_index + i`` of the seed (how :func:`generate_sharded` splits a draw over processes).

    ``callback(batch, i, t, x, x0)``, when given, is called after step ``i`` (timestep ``t``) of
    each batch in turn, with the new x_t and the model's current prediction of x0, both float32
    [b, C, H, W] on the sampling device in the model's range (x0 clipped to [-1, 1] as the
    sampler clips it, x_t unbounded). Raises :class:`DDPMError` for bad ``n`` (below 1, or more
    images than this machine's memory holds), a ``seed`` outside 0 .. MAX_SEED, bad labels or noise.
    """
    check_request(run, n, seed)
    if first_index < 0:
        raise DDPMError(f"first_index must be >= 0, got {first_index}")
    if noise is not None and tuple(noise.shape) != (n, run.model.config.in_channels, run.image_size, run.image_size):
        raise DDPMError(f"starting noise of shape {tuple(noise.shape)} does not fit {n} images of "
                        f"{run.model.config.in_channels}x{run.image_size}x{run.image_size}")
    net = run.ema_model if use_ema and run.ema_model is not None else run.model
    from ..runtime.policy import inference_model, resolve_device  # local: perf depends on nothing here

    device = resolve_device(device) if device is not None else next(net.parameters()).device
    net = _sampling_network(net, device)
    was_training = net.training
    net.eval()
    try:
        return _generate(run, net, n, device, labels=labels, noise=noise, sampler=sampler, steps=steps,
                         guidance=guidance, seed=seed, batch_size=batch_size, progress=progress, clip=clip,
                         call=inference_model(net, device, precision), callback=callback, first_index=first_index,
                         **sampler_options)
    finally:
        net.train(was_training)


def check_request(run: Sampleable, n: int, seed: int) -> None:
    """Raise :class:`DDPMError` for a request :func:`generate` would refuse: ``n`` below 1, a
    ``seed`` outside 0 .. :data:`ddpm.core.samplers.MAX_SEED`, or ``n`` images of ``run`` whose uint8
    pixels (held twice while the batches are joined) would not fit in this machine's memory.
    Commands call it before they build anything of size ``n``."""
    from ..runtime.accounting import host_memory_bytes

    if n < 1:
        raise DDPMError(f"--n must be at least 1, got {n}")
    if not 0 <= seed <= MAX_SEED:
        raise DDPMError(f"--seed must be from 0 to {MAX_SEED}, got {seed}")
    total = host_memory_bytes()
    need = 2 * n * run.model.config.in_channels * run.image_size ** 2
    if total is not None and need > total:
        raise DDPMError(f"--n {n} images of {run.image_size}x{run.image_size} need {_bytes(need)} of memory "
                        f"at once; this machine has {_bytes(total)}: ask for fewer")


def _bytes(count: int) -> str:
    """``count`` bytes in the largest binary unit that keeps one digit before the point."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def _sampling_network(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``net`` itself when it already sits on ``device`` in the memory layout sampling uses there
    (:func:`ddpm.runtime.policy.default_channels_last`), else a copy prepared so: generate never moves or
    re-lays the caller's weights (the trainer's EMA network, a run loaded on another device)."""
    from ..runtime.policy import default_channels_last, prepare_model

    if device.type == "cuda" and device.index is None:  # "cuda" is the current GPU, not any GPU
        device = torch.device("cuda", torch.cuda.current_device())
    params = list(net.parameters())
    here = all(p.device.type == device.type and (device.index is None or p.device.index == device.index)
               for p in params)
    laid_out = not default_channels_last(device) or all(
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
    return prepare_model(copy.deepcopy(net, memo), device)


def _generate(run: Sampleable, net: torch.nn.Module, n: int, device: torch.device, *, labels: torch.Tensor | None,
              noise: torch.Tensor | None, sampler: str, steps: int | None, guidance: float, seed: int,
              batch_size: int, progress: bool, clip: bool, call: Callable[..., torch.Tensor],
              callback: BatchCallback | None, first_index: int, **sampler_options) -> torch.Tensor:
    """The body of :func:`generate` once the network is ready (on the device, eval mode)."""
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
    # Autocast and layout live inside the network call (``call``); the samplers' arithmetic stays float32.
    for k in batches:
        b = min(batch_size, n - k * batch_size)
        # The generators of this batch's images: each draws its image's x_T, then its step noise.
        gen = ImageGenerators.seeded(seed, b, start=first_index + k * batch_size)
        x_T = gen.randn((net.config.in_channels, size, size))  # drawn even when replaced: see above
        if noise is not None:
            x_T = noise[k * batch_size : k * batch_size + b].float()
        x_T = x_T.to(device)
        if labels is not None:
            model = guided(call, labels[k * batch_size : k * batch_size + b].to(device), guidance,
                           null_class=net.config.null_class)
        else:
            model = call
        model = eps_model(model, run.schedule, run.prediction)
        # Bound to this batch's index now; None keeps the samplers' per-step path free of any call.
        step_cb = None if callback is None else (lambda i, t, x, x0, k=k: callback(k, i, t, x, x0))
        x = sample_fn(model, x_T, run.schedule, steps=steps, clip=clip, generator=gen, callback=step_cb,
                      **sampler_options)
        out.append(to_uint8(x).cpu())
    return torch.cat(out)


def generate_sharded(run: Sampleable, n: int, d: Dist, *, labels: torch.Tensor | None = None,
                     noise: torch.Tensor | None = None, device: str | torch.device | None = None,
                     progress: bool = True, **generate_options) -> torch.Tensor | None:
    """:func:`generate` split over the processes of ``torchrun``: rank ``d.rank`` draws the images
    of :func:`ddpm.runtime.processes.shard` (a contiguous block of indices, each image from its own
    seed), and rank 0 returns all ``n`` as uint8 [n, 3, H, W] on the CPU, in index order; the
    other ranks return None. Because an image depends on its seed and index alone, these are the
    images one process draws with the same options (up to the network's float rounding at
    another batch size; equal at ``batch_size=1``). With one process it is :func:`generate`.
    ``labels`` (int64 [n]) and ``noise`` (float [n, C, H, W]) are those of all n images; the
    progress bar shows on rank 0 only. Raises :class:`DDPMError` as :func:`generate` does.
    """
    from ..runtime.processes import gather_images, shard
    from ..runtime.policy import resolve_device

    if d.world == 1:
        return generate(run, n, labels=labels, noise=noise, device=device, progress=progress, **generate_options)
    check_request(run, n, generate_options.get("seed", 0))  # rank 0 will hold all n
    if labels is not None and tuple(torch.as_tensor(labels).shape) != (n,):
        raise DDPMError(f"need one label per image: {n} images but labels of shape {tuple(torch.as_tensor(labels).shape)}")
    net = run.ema_model if generate_options.get("use_ema", True) and run.ema_model is not None else run.model
    # checked before any rank samples: a rank that failed alone would leave the others in the gather
    if noise is not None and tuple(noise.shape) != (n, net.config.in_channels, run.image_size, run.image_size):
        raise DDPMError(f"starting noise of shape {tuple(noise.shape)} does not fit {n} images of "
                        f"{net.config.in_channels}x{run.image_size}x{run.image_size}")
    dev = resolve_device(device) if device is not None else next(net.parameters()).device
    mine = shard(n, d)
    if len(mine):
        part = generate(run, len(mine), labels=None if labels is None else labels[mine.start:mine.stop],
                        noise=None if noise is None else noise[mine.start:mine.stop], device=dev,
                        progress=progress and d.main, first_index=mine.start, **generate_options)
    else:  # fewer images than processes: this rank has none, but still joins the gather
        part = torch.zeros((0, net.config.in_channels, run.image_size, run.image_size), dtype=torch.uint8)
    return gather_images(part, n, d, dev)


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """Tile uint8 images [N, 3, H, W] into one HWC uint8 array, ``nrow`` images per row.

    ``torchvision.utils.make_grid``'s layout: ``min(nrow, N)`` columns and ``ceil(N / columns)``
    rows of tiles with ``padding`` pixels (white by default) around each, so the array is
    ``rows * (H + padding) + padding`` by ``columns * (W + padding) + padding`` pixels; a single
    image comes back as it is, without padding. Every grid the project writes comes from here.
    """
    from torchvision.utils import make_grid as tv_make_grid

    grid = tv_make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=pad_value)
    return np.ascontiguousarray(grid.permute(1, 2, 0).numpy())


def save_png(array: np.ndarray, path: str | Path) -> None:
    """Save an HWC (or HW grey) uint8 array as a PNG at ``path``, atomically
    (:func:`ddpm.files.atomic.atomic_write_with`, whose errors it raises)."""
    from PIL import Image

    image = Image.fromarray(array)
    atomic_write_with(path, lambda f: image.save(f, format="PNG"))


def save_gif(frames: Sequence[np.ndarray], path: str | Path, *, frame_ms: int = 100, hold_ms: int = 2000) -> None:
    """Save HWC uint8 arrays (all of one size) as an animated GIF that loops forever, atomically.

    Each frame shows for ``frame_ms`` milliseconds, the last for ``hold_ms``. Pillow writes it and
    reduces each frame to its own 256-colour palette; it also merges identical consecutive
    frames into one (adding their durations), so such frames count once. Raises ``ValueError``
    for no frames, and the errors of :func:`ddpm.files.atomic.atomic_write_with`.
    """
    from PIL import Image

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


def guidance_sweep(run: Sampleable, scales: Sequence[float], labels: torch.Tensor, **generate_options) -> torch.Tensor:
    """Images uint8 [R * S, 3, H, W], row-major: row r is class ``labels[r]`` (int64 [R]) at each of
    the S guidance ``scales`` in turn (``eps_uncond + s (eps_cond - eps_uncond)``, see
    :func:`ddpm.guided`), all from the same starting noise, so a row shows only what guidance does.
    Grid it with ``make_grid(images, nrow=S)``. Raises :class:`DDPMError` for an unconditional run,
    no scales or a non-finite one."""
    if not run.conditional:
        raise DDPMError("--guidance-sweep needs a class-conditional run (trained with --conditional); this one is "
                        "unconditional")
    check_sweep_scales(scales)
    # generate() draws image i's noise from the seed and i alone, so every scale starts row r
    # from the same noise (and stochastic samplers add the same noise on the way).
    per_scale = [generate(run, len(labels), labels=labels, guidance=float(s), **generate_options) for s in scales]
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


def interpolate(run: Sampleable, n: int, *, seed: int = 0, sampler: str = "dpm-solver", eta: float = 0.0,
                batch_size: int = BATCH_SIZE, **generate_options) -> torch.Tensor:
    """``n`` images uint8 [n, 3, H, W] along the :func:`slerp` path between two starting noises,
    both ends included: the starting noise of ``generate(run, 1, seed=seed)`` and of
    ``generate(run, 1, seed=seed + 1)``.

    With a deterministic sampler (dpm-solver, or ddim with ``eta`` = 0) the row is a smooth path
    and its ends are those two plain samples (to float rounding: a batch of n may round
    differently from a batch of 1; exactly with ``batch_size=1``). Stochastic samplers (ancestral,
    langevin, ddim with eta > 0) add each image's own noise (image i's generator of ``seed``) at
    every step, so the row is not smooth and its last end is another sample from seed + 1's
    starting noise; a warning says so. Raises :class:`DDPMError` when ``n`` < 2.
    """
    check_interpolation_n(n)
    if sampler.replace("_", "-") in STOCHASTIC_SAMPLERS or (sampler == "ddim" and eta > 0):
        warnings.warn(f"--interpolate with the stochastic sampler {sampler}{f' (eta {eta:g})' if eta > 0 else ''} "
                      "adds other noise to each image, so the row is not a smooth path; use dpm-solver or ddim "
                      "with --eta 0", stacklevel=2)
    ends = [starting_noise(run, 1, seed=s)[0] for s in (seed, seed + 1)]
    noise = slerp(ends[0], ends[1], torch.linspace(0, 1, n, dtype=torch.float64))
    options = {"eta": eta} if sampler == "ddim" else {}
    return generate(run, n, noise=noise, seed=seed, sampler=sampler, batch_size=batch_size, **options,
                    **generate_options)
