"""The training objective: denoising score matching in the DDPM paper's "simple" form, and the
choices that later work added to it.

Three things define the objective, each a keyword of :func:`diffusion_loss`:

* ``prediction``: what the network outputs. ``eps``, the noise (Ho et al. 2020); ``v``,
  ``sqrt(abar) eps - sqrt(1 - abar) x0`` (Salimans & Ho 2022); ``x0``, the clean image.
* ``weighting``: how the squared error is weighted across noise levels. ``uniform`` is the
  paper's "simple" loss in the chosen target; ``min-snr`` is Min-SNR-gamma (Hang et al. 2023),
  which caps the weight of low-noise steps at ``gamma`` in x0 units.
* ``t_sampling``: how training noise levels are drawn. ``uniform`` over the ``T`` steps (the
  paper), or ``lognormal``: a normal density over the log-SNR, the discrete counterpart of EDM's
  log-normal sigma (Karras et al. 2022), which spends training on the noise levels that matter.

``diffusion_loss`` returns one loss per sample, unreduced, so callers can weight, mask or
average as they need (and distributed training can average exactly).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..core.schedule import Schedule

__all__ = ["diffusion_loss", "drop_labels", "loss_weights", "timestep_probabilities", "sample_timesteps",
           "PREDICTIONS", "WEIGHTINGS", "T_SAMPLINGS"]

PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("uniform", "min-snr")
T_SAMPLINGS = ("uniform", "lognormal")


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


def loss_weights(schedule: Schedule, t: torch.Tensor, prediction: str, weighting: str = "uniform",
                 gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss weights [B] (float32) for timesteps ``t`` (int64 [B]).

    ``uniform`` is 1. ``min-snr`` is Min-SNR-gamma (Hang et al. 2023): the loss in x0 units is
    weighted by ``min(SNR, gamma)``, which in each target's own units is ``min(SNR, gamma) / SNR``
    for eps, ``min(SNR, gamma) / (SNR + 1)`` for v (the published correction) and
    ``min(SNR, gamma)`` for x0, where ``SNR = abar / (1 - abar)``. Raises ``ValueError`` for an
    unknown weighting or prediction.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    table = schedule._table("log_snr", t)
    snr = table[t.to(table.device)].exp().to(t.device)
    capped = snr.clamp(max=gamma)
    if prediction == "eps":
        if bool((snr == 0).any()):
            raise ValueError("min-snr weights of an eps target are undefined at zero SNR; predict v or x0")
        w = capped / snr
    elif prediction == "v":
        w = capped / (snr + 1)
    else:
        w = capped
    return w.float()


def timestep_probabilities(schedule: Schedule, t_sampling: str = "uniform", mean: float = 2.4,
                           std: float = 2.4) -> torch.Tensor:
    """Probability of drawing each timestep ``0 .. T-1`` in training, float64 [T], summing to 1.

    ``lognormal`` puts a normal density ``N(mean, std^2)`` on the log-SNR ``lambda`` and gives
    each step the mass of the interval of ``lambda`` it stands for (between the midpoints to its
    neighbours; the first and last steps take the tails). The defaults, 2.4 and 2.4, are EDM's
    ``ln sigma ~ N(-1.2, 1.2^2)`` for data of standard deviation 0.5 written as log-SNR
    (``lambda = -2 ln sigma``). On a zero-terminal-SNR schedule the last step (lambda = -inf)
    gets no mass: the lower tail goes to the step before it, and the network learns the pure-noise
    step from its neighbours (for v targets min-snr also weights it 0, as Hang et al.'s formula
    gives). Raises ``ValueError`` for an unknown density or ``std <= 0``.
    """
    if t_sampling not in T_SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {t_sampling!r}; expected one of {', '.join(T_SAMPLINGS)}")
    T = schedule.T
    if t_sampling == "uniform":
        return torch.full((T,), 1.0 / T, dtype=torch.float64)
    if not std > 0 or not math.isfinite(mean):
        raise ValueError(f"the log-SNR density needs a finite mean and std > 0, got mean={mean}, std={std}")
    lam = schedule.log_snr  # decreasing in t; the last may be -inf
    edges = torch.cat([torch.tensor([math.inf], dtype=torch.float64), 0.5 * (lam[1:] + lam[:-1]),
                       torch.tensor([-math.inf], dtype=torch.float64)])
    edges = torch.nan_to_num(edges, nan=-math.inf)  # (finite + -inf) / 2 at a zero-SNR end
    cdf = 0.5 * torch.erfc(-(edges - mean) / (std * math.sqrt(2)))
    p = (cdf[:-1] - cdf[1:]).clamp(min=0)
    return p / p.sum()


def sample_timesteps(probabilities: torch.Tensor | None, T: int, n: int, generator: torch.Generator | None,
                     device: torch.device) -> torch.Tensor:
    """``n`` int64 timesteps, uniform over ``0 .. T-1`` when ``probabilities`` is None, else drawn
    from them (float64 [T]) with replacement, from ``generator``'s stream."""
    gen_device = generator.device if generator is not None else device
    if probabilities is None:
        return torch.randint(0, T, (n,), generator=generator, device=gen_device).to(device)
    return torch.multinomial(probabilities.to(gen_device), n, replacement=True, generator=generator).to(device)


def diffusion_loss(
    model: Callable[..., torch.Tensor],
    schedule: Schedule,
    x0: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    prediction: str = "eps",
    weighting: str = "uniform",
    min_snr_gamma: float = 5.0,
    t_probabilities: torch.Tensor | None = None,
    p_uncond: float = 0.1,
    null_class: int | None = None,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample loss ``w(t) || target - model(x_t, t, y) ||^2`` averaged over pixels, float32 [B].

    ``x0`` is a batch of images in [-1, 1], [B, C, H, W]. ``t`` is drawn uniformly from
    ``0 .. T-1`` (Algorithm 1 of Ho et al. 2020), or from ``t_probabilities`` (see
    :func:`timestep_probabilities`), and ``noise`` from N(0, I) unless given. ``prediction``
    picks the target (``eps``, ``v`` or ``x0``), ``weighting`` the weight ``w(t)`` (see
    :func:`loss_weights`). When ``y`` is given, labels are dropped to ``null_class`` with
    probability ``p_uncond`` per sample. Random draws come from ``generator`` so that a run can
    be replayed exactly. Raises ``ValueError`` for an unknown prediction or weighting, and for
    an ``eps`` target on a zero-terminal-SNR schedule (no noise can be predicted from pure noise
    that tells anything about x0).
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTIONS)}")
    if prediction == "eps" and schedule.zero_terminal_snr:
        raise ValueError("an eps target cannot be trained on a zero-terminal-SNR schedule; predict v or x0")
    b = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    if t is None:
        t = sample_timesteps(t_probabilities, schedule.T, b, generator, x0.device)
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
    if prediction == "eps":
        target = noise
    elif prediction == "v":
        target = schedule.v_from_eps(x0, noise, t)
    else:
        target = x0
    # The loss is taken in float32 even under bf16 autocast: small errors late in training
    # are below bf16's resolution.
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)
    if weighting != "uniform":
        per_sample = per_sample * loss_weights(schedule, t, prediction, weighting, min_snr_gamma).to(per_sample.device)
    return per_sample
