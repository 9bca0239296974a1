"""The training objective: denoising score matching in the DDPM paper's "simple" form.

``diffusion_loss`` returns one loss per sample, unreduced, so callers can weight, mask or
average as they need (and distributed training can average exactly).
"""

from __future__ import annotations

from typing import Callable

import torch

from .schedule import Schedule

__all__ = ["diffusion_loss", "drop_labels", "PREDICTIONS"]

PREDICTIONS = ("eps", "v")


def drop_labels(y: torch.Tensor, p_uncond: float, null_class: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by ``null_class`` independently with probability ``p_uncond``.

    Per sample, not per batch: every batch then trains both the conditional and the
    unconditional model, which is what classifier-free guidance needs (Ho & Salimans 2022).
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond}")
    if p_uncond == 0.0:
        return y
    u = torch.rand(y.shape, generator=generator, device=generator.device if generator is not None else y.device)
    return torch.where(u.to(y.device) < p_uncond, torch.full_like(y, null_class), y)


def diffusion_loss(
    model: Callable[..., torch.Tensor],
    schedule: Schedule,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    prediction: str = "eps",
    p_uncond: float = 0.1,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss ``|| target - model(x_t, t, y) ||^2`` averaged over pixels, shape [B].

    ``t`` is drawn uniformly from ``0 .. T-1`` and ``noise`` from N(0, I) unless given
    (Algorithm 1 of Ho et al. 2020). ``prediction="eps"`` regresses the noise (the paper);
    ``"v"`` regresses ``v = sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022). When
    ``y`` is given, labels are dropped to ``null_class`` with probability ``p_uncond`` per sample.
    Random draws come from ``generator`` so that a run can be replayed exactly.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
    b = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, schedule.T, (b,), generator=generator, device=gen_device).to(x0.device)
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    x_t = schedule.add_noise(x0, noise, t)
    if y is not None:
        if null_class is None:
            raise ValueError("labels were given but null_class is None")
        y = drop_labels(y, p_uncond, null_class, generator)
        out = model(x_t, t, y)
    else:
        out = model(x_t, t)
    target = noise if prediction == "eps" else schedule.v_from_eps(x0, noise, t)
    # The loss is taken in float32 even under bf16 autocast: small errors late in training
    # are below bf16's resolution.
    return (out.float() - target.float()).pow(2).flatten(1).mean(1)
