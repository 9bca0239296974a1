"""Consistency tuning of a trained diffusion model (ECT: Geng et al. 2024, "Consistency models made
easy"), on this package's discrete variance-preserving schedules.

A consistency function ``f(x_t, t)`` maps any point of a probability-flow trajectory to the
trajectory's clean end, so one evaluation samples (Song et al. 2023, "Consistency models"). A
diffusion network is already close to one at low noise: its x0 prediction. ECT starts from the
trained network and enforces the consistency condition between two noise levels ``t > r`` of
the same noise draw, ``f(x_t, t) = f(x_r, r)``, with the gap between the two shrinking in stages
over the tuning run: the first stages keep the network a denoiser, the last make it consistent.

Noise levels are written as EDM's ``sigma = sqrt(1 - abar) / sqrt(abar)`` (the noise of
``x_t / alpha``, for data of standard deviation 0.5 as ours in [-1, 1]). Of a step ``t`` drawn
from ECT's lognormal density (``ln sigma ~ N(-1.1, 2.0^2)``, as a log-SNR density: mean 2.2, std
4.0), the partner ``r`` is the step nearest below ``sigma_t (1 - gap)`` with ECT's gap
``n(sigma) / q^stage``, ``n(sigma) = 1 + 8 sigmoid(-sigma)`` and ``q = 2``; a partner below the
first step is the clean image itself (``r = -1``, where ``f`` is the identity). The loss of a
sample is ECT's ``w(sigma_t, sigma_r) d(f(x_t, t), stopgrad f(x_r, r))`` with ``w = 1 /
(sigma_t - sigma_r)`` and the pseudo-Huber distance ``d(a, b) = sqrt(||a - b||^2 + c^2) - c``,
``c = 0.00054 sqrt(dim)`` (Song & Dhariwal 2023, "Improved techniques for training consistency
models"). Both evaluations share the noise, the labels (dropped to the null class together, so
the tuned network keeps classifier-free guidance) and the dropout masks.

Sampling (:func:`ddpm.core.samplers.consistency`) jumps from pure noise to x0 in one evaluation
and, for more steps, re-noises the estimate to :data:`CONSISTENCY_SIGMAS` and jumps again.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .losses import drop_labels, sample_timesteps
from .schedule import Schedule

__all__ = ["edm_sigmas", "partner_steps", "x0_prediction", "pseudo_huber", "consistency_loss", "ECT_LOGSNR_MEAN",
           "ECT_LOGSNR_STD", "ECT_Q", "STAGES"]

# ECT's training noise levels, ln sigma ~ N(-1.1, 2.0^2), written as a log-SNR density (lambda = -2 ln sigma).
ECT_LOGSNR_MEAN, ECT_LOGSNR_STD = 2.2, 4.0
# The gap shrinks by this factor at each stage (ECT's q).
ECT_Q = 2.0
# Stages over a tuning run: the gap halves every 1/STAGES of it, starting at stage 1 (stage 0 of
# ECT is plain denoising, which the diffusion run this tuning starts from has already done).
STAGES = 8


def edm_sigmas(schedule: Schedule, device: torch.device | str = "cpu") -> torch.Tensor:
    """float64 [T] on ``device``: EDM's noise level of each step, ``sqrt(1 - abar_t) / sqrt(abar_t)``,
    increasing in t (``inf`` at a zero-terminal-SNR last step). Gathered where it is used, so a
    training step reads nothing back from the device."""
    steps = torch.arange(schedule.T, device=device)
    alpha, sigma = schedule.alpha_sigma(steps, torch.empty(schedule.T, dtype=torch.float64, device=device))
    return sigma / alpha


def _finite(sigmas: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``values`` with an infinite level (a zero-SNR step) replaced by the largest finite one."""
    largest = torch.where(torch.isfinite(sigmas), sigmas, torch.zeros_like(sigmas)).max()
    return torch.where(torch.isfinite(values), values, largest)


def partner_steps(schedule: Schedule, t: torch.Tensor, stage: int) -> torch.Tensor:
    """int64 [B] on ``t``'s device: the step ``r < t`` each step of ``t`` (int64 [B]) is compared
    with at tuning stage ``stage`` (1, 2, ...): the step nearest below ``sigma_t (1 - n(sigma_t) /
    q^stage)``, or -1 (the clean image) when that level lies below the first step's or is not
    positive. Raises ``ValueError`` for a stage below 1."""
    if stage < 1:
        raise ValueError(f"stage must be at least 1, got {stage}")
    sigmas = edm_sigmas(schedule, t.device)
    s_t = _finite(sigmas, sigmas[t])
    s_r = s_t * (1.0 - (1.0 + 8.0 * torch.sigmoid(-s_t)) / ECT_Q**stage)
    # The largest step whose sigma is at most s_r: searchsorted counts the sigmas <= s_r.
    r = torch.searchsorted(sigmas, s_r, right=True) - 1
    r = torch.minimum(r, t - 1)  # always strictly earlier than t
    return torch.where(s_r > 0, r, torch.full_like(r, -1))


def x0_prediction(out: torch.Tensor, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor,
                  prediction: str) -> torch.Tensor:
    """The consistency function's value: the clean image the network's output ``out`` (float
    [B, C, H, W], an eps, v or x0 prediction at ``x_t``, steps ``t``) stands for, float32."""
    out = out.float()
    if prediction == "x0":
        return out
    if prediction == "v":
        return schedule.x0_from_v(x_t, t, out).float()
    return schedule.x0_from_eps(x_t, t, out).float()


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 [B]: ``sqrt(||a - b||^2 + c^2) - c`` per sample with ``c = 0.00054 sqrt(dim)``
    (iCT's robust distance: quadratic for small errors, linear for large ones)."""
    diff = (a.float() - b.float()).flatten(1)
    c = 0.00054 * math.sqrt(diff.shape[1])
    return (diff.square().sum(1) + c * c).sqrt() - c


def consistency_loss(
    net: Callable[..., torch.Tensor],
    schedule: Schedule,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    prediction: str,
    stage: int,
    t_probabilities: torch.Tensor | None,
    p_uncond: float = 0.1,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample ECT loss, float32 [B], of ``net(x, t[, y])`` (a network predicting
    ``prediction``) on clean images ``x0`` (float [B, C, H, W] in [-1, 1]) at tuning ``stage``.

    Draws, in order from ``generator``: the steps ``t`` (from ``t_probabilities``, float64 [T]),
    the noise and the label dropout; dropout masks come from the global generator, the same for
    both evaluations. The target evaluation runs without gradients. Raises ``ValueError`` as
    :func:`partner_steps` does, and for labels without a ``null_class``.
    """
    b = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    t = sample_timesteps(t_probabilities, schedule.T, b, generator, x0.device)
    # Step 0 has no earlier step to meet; a draw there is moved to step 1 (its partner: the image).
    t = t.clamp(min=1)
    r = partner_steps(schedule, t, stage)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    if y is not None:
        if null_class is None:
            raise ValueError("labels were given but null_class is None")
        y = drop_labels(y, p_uncond, null_class, generator)
    x_t, x_r = schedule.add_noise(x0, noise, t), schedule.add_noise(x0, noise, r)

    def f(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        out = net(x, steps.clamp(min=0), y) if y is not None else net(x, steps.clamp(min=0))
        return x0_prediction(out, schedule, x, steps.clamp(min=0), prediction)

    # The target draws its dropout masks from the global generator and fork_rng puts its state
    # back: the tuned evaluation then draws the same masks (ECT's shared dropout).
    with torch.random.fork_rng(devices=[x0.device] if x0.device.type == "cuda" else []), torch.no_grad():
        target = f(x_r, r)
    target = torch.where((r < 0).view(-1, 1, 1, 1), x0.float(), target)  # f(x, -1) = x: the boundary
    sigmas = edm_sigmas(schedule, x0.device)
    s_t = _finite(sigmas, sigmas[t])
    s_r = torch.where(r < 0, torch.zeros_like(s_t), sigmas[r.clamp(min=0)])
    return (1.0 / (s_t - s_r)).float() * pseudo_huber(f(x_t, t), target)
