"""Generate images from a trained network: the one sampling path of ``ddpm sample``, ``ddpm
eval`` and its sweep, the memorisation check, the trainer's sample grids and its in-training FID.

:func:`generate` takes the network (a :class:`~ddpm.run.checkpoint.Sampleable`), how many images,
how to sample (a :class:`~ddpm.sample.spec.SampleSpec`), where to run (a
:class:`~ddpm.runtime.policy.Runtime`) and, under torchrun, the processes to split the images
over. Every image is seeded by its own index (:func:`ddpm.core.samplers.image_seed`), so the
images do not depend on the batch size or on how many processes drew them.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from ..core.guidance import guided
from ..core.samplers import ImageGenerators, eps_model, get_sampler
from ..data.sets import to_uint8
from ..errors import DDPMError
from ..run.checkpoint import Sampleable
from ..runtime.accounting import host_memory_bytes
from ..runtime.policy import Runtime, is_out_of_memory, out_of_memory_error, runtime_of
from ..runtime.processes import Dist, gather_images, shard
from .spec import SampleSpec

__all__ = ["generate", "sample_draw", "check_request", "check_labels", "starting_noise", "Draw", "BatchCallback"]

# Called after every sampler step of every batch as ``callback(batch, i, t, x, x0)``.
BatchCallback = Callable[[int, int, int, torch.Tensor, torch.Tensor], None]


class Draw(NamedTuple):
    """Which images one process draws: ``n`` of them from index ``first`` of the seed, their
    labels (int64 [n] or None) and starting noise (float [n, C, H, W] or None: the seed's)."""

    n: int
    first: int = 0
    labels: torch.Tensor | None = None
    noise: torch.Tensor | None = None


def starting_noise(run: Sampleable, n: int, *, seed: int = 0) -> torch.Tensor:
    """The starting noise x_T that ``generate(run, n, SampleSpec(seed=seed))`` draws, at any batch
    size: float32 [n, C, H, W], standard normal, on the CPU. Row i is the first draw of image i's
    own CPU generator, seeded ``seed * 1_000_003 + i`` (:func:`ddpm.core.samplers.image_seed`), so
    it depends on the seed and i alone: the first rows of a larger n are the rows of a smaller one.
    """
    c, size = run.model.config.in_channels, run.image_size
    return ImageGenerators.seeded(seed, n).randn((c, size, size))


def generate(run: Sampleable, n: int, spec: SampleSpec = SampleSpec(), runtime: Runtime | None = None,
             processes: Dist | None = None, *, labels: torch.Tensor | None = None,
             callback: BatchCallback | None = None) -> torch.Tensor | None:
    """``n`` images as uint8 [n, 3, H, W] on the CPU from ``run``'s EMA (or raw) weights, as ``spec`` says.

    ``run`` is any :class:`ddpm.run.checkpoint.Sampleable`: a :class:`~ddpm.run.checkpoint.Run`
    from :func:`ddpm.run.checkpoint.load_run`, or the one the trainer builds around its EMA
    weights. ``runtime`` says where and in which precision (None: where the weights are, the
    default precision there); the caller's network is left as it was found (sampling on another
    device or layout works on a copy). ``labels`` (int64 [n]) picks each image's class for
    conditional runs, guided by ``spec.guidance``; without labels a conditional run samples the
    null class.

    Image i has a CPU generator of its own, seeded ``spec.seed * 1_000_003 + i``: it draws the
    image's starting noise (:func:`starting_noise`), then every noise a stochastic sampler adds
    to that image, in the same order at any ``spec.batch_size``, so the seed alone fixes image i
    (up to float rounding: a network may round a batch of 1 and of 64 differently).

    ``processes`` (torchrun's, from :func:`ddpm.runtime.processes.init_distributed`) splits the
    images: rank r draws its contiguous block (:func:`ddpm.runtime.processes.shard`) and rank 0
    returns all ``n`` in index order, the other ranks None; every rank must call. With one
    process (or None) this process draws all.

    ``callback(batch, i, t, x, x0)``, when given, is called after step ``i`` (timestep ``t``) of
    each batch in turn, with the new x_t and the model's prediction of x0, float32 [b, C, H, W]
    on the sampling device. Raises :class:`DDPMError` for ``n`` below 1 or too large for this
    machine's memory, steps above the run's T, or labels of the wrong shape or on an
    unconditional run.
    """
    check_request(run, n, spec.seed)
    spec = spec.for_run(run.schedule.T)
    check_labels(run, n, labels)
    net = run.ema_model if spec.use_ema and run.ema_model is not None else run.model
    runtime = runtime if runtime is not None else runtime_of(net)
    d = processes or Dist()
    if d.world == 1:
        return sample_draw(run, Draw(n, labels=labels), spec, runtime, callback)
    mine = shard(n, d)
    # Every rank joins the gather, also one whose block is empty (fewer images than processes).
    part = sample_draw(run, Draw(len(mine), mine.start, None if labels is None else labels[mine.start:mine.stop]),
                       spec, runtime if d.main else runtime.quiet(), callback) if len(mine) else \
        torch.zeros((0, net.config.in_channels, run.image_size, run.image_size), dtype=torch.uint8)
    return gather_images(part, n, d, runtime.device)


def check_request(run: Sampleable, n: int, seed: int) -> None:
    """Raise :class:`DDPMError` for a request :func:`generate` would refuse: ``n`` below 1, a
    ``seed`` outside 0 .. :data:`ddpm.core.samplers.MAX_SEED`, or ``n`` images of ``run`` whose
    uint8 pixels (held twice while the batches are joined) would not fit in this machine's
    memory. Commands call it before they build anything of size ``n``."""
    if n < 1:
        raise DDPMError(f"--n must be at least 1, got {n}")
    SampleSpec(seed=seed)  # the seed's range is checked there
    total = host_memory_bytes()
    need = 2 * n * run.model.config.in_channels * run.image_size ** 2
    if total is not None and need > total:
        raise DDPMError(f"--n {n} images of {run.image_size}x{run.image_size} need {_bytes(need)} of memory "
                        f"at once; this machine has {_bytes(total)}: ask for fewer")


def check_labels(run: Sampleable, n: int, labels: torch.Tensor | None) -> None:
    if labels is None:
        return
    if tuple(torch.as_tensor(labels).shape) != (n,):
        raise DDPMError(f"need one label per image: {n} images but labels of shape {tuple(torch.as_tensor(labels).shape)}")
    if not run.conditional:
        raise DDPMError("labels were given but this run's model is unconditional")


def _bytes(count: int) -> str:
    """``count`` bytes in the largest binary unit that keeps one digit before the point."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} bytes"


def sample_draw(run: Sampleable, draw: Draw, spec: SampleSpec, runtime: Runtime,
                callback: BatchCallback | None = None) -> torch.Tensor:
    """The images of ``draw`` in this process: uint8 [draw.n, 3, H, W] on the CPU. ``spec`` has
    its steps fixed for the run (:meth:`SampleSpec.for_run`). Used by :func:`generate` and by the
    pictures that bring their own starting noise (:func:`ddpm.sample.pictures.interpolate`)."""
    c, size = run.model.config.in_channels, run.image_size
    if draw.noise is not None and tuple(draw.noise.shape) != (draw.n, c, size, size):
        raise DDPMError(f"starting noise of shape {tuple(draw.noise.shape)} does not fit {draw.n} images of "
                        f"{c}x{size}x{size}")
    net = runtime.sampling_network(run.ema_model if spec.use_ema and run.ema_model is not None else run.model)
    was_training = net.training
    net.eval()
    try:
        call = runtime.sampling_call(net)
        try:
            out = [_sample_batch(run, call, draw, k, spec, runtime, callback)
                   for k in _batches(math.ceil(draw.n / spec.batch_size), spec.sampler, runtime.progress)]
        except (RuntimeError, MemoryError) as e:
            if not is_out_of_memory(e):
                raise
            raise out_of_memory_error(e, f"sampling a batch of {min(spec.batch_size, draw.n)} images of {size}x{size}",
                                      "lower --batch-size (the images do not depend on it)") from None
    finally:
        net.train(was_training)
    return torch.cat(out)


def _batches(count: int, sampler: str, progress: bool):
    if not progress:
        return range(count)
    from tqdm import tqdm  # local: tqdm's import is only paid where a bar is shown

    return tqdm(range(count), desc=f"sampling ({sampler})", unit="batch", dynamic_ncols=True, leave=False)


def _sample_batch(run: Sampleable, call: Callable[..., torch.Tensor], draw: Draw, k: int, spec: SampleSpec,
                  runtime: Runtime, callback: BatchCallback | None) -> torch.Tensor:
    """Batch ``k`` of ``draw``: its images' generators draw x_T, then the sampler runs."""
    lo = k * spec.batch_size
    b = min(spec.batch_size, draw.n - lo)
    # The generators of this batch's images: each draws its image's x_T, then its step noise.
    gen = ImageGenerators.seeded(spec.seed, b, start=draw.first + lo)
    x_T = gen.randn((run.model.config.in_channels, run.image_size, run.image_size))  # drawn even when replaced
    if draw.noise is not None:
        x_T = draw.noise[lo:lo + b].float()
    model = call
    if draw.labels is not None:
        model = guided(call, torch.as_tensor(draw.labels[lo:lo + b], dtype=torch.long).to(runtime.device),
                       spec.guidance, null_class=run.model.config.null_class)
    model = eps_model(model, run.schedule, run.prediction)
    # Bound to this batch's index now; None keeps the samplers' per-step path free of any call.
    step_cb = None if callback is None else (lambda i, t, x, x0: callback(k, i, t, x, x0))
    # Autocast and layout live inside ``call``; the samplers' arithmetic stays float32.
    x = get_sampler(spec.sampler)(model, x_T.to(runtime.device), run.schedule, steps=spec.steps, clip=spec.clip,
                                  generator=gen, callback=step_cb, **spec.options)
    return to_uint8(x).cpu()
