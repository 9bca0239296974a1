"""The training loss, configured once and then called with data only (EDM's ``loss_fn(net, images,
labels)``): the schedule, the target, the weighting over noise levels, the density timesteps are
drawn from and the label dropout of classifier-free guidance are fixed when the run starts, so
the step that calls it knows none of them.

The maths is :func:`ddpm.core.losses.diffusion_loss`'s (and, for ``ddpm distill``,
:func:`ddpm.core.consistency.consistency_loss`'s); this only holds their settings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..core.consistency import ECT_LOGSNR_MEAN, ECT_LOGSNR_STD, STAGES, consistency_loss
from ..core.losses import PREDICTIONS, WEIGHTINGS, diffusion_loss, timestep_probabilities
from ..core.schedule import Schedule
from .config import TrainConfig

__all__ = ["DiffusionLoss", "ConsistencyLoss", "training_loss", "t_probabilities_for"]


def t_probabilities_for(cfg: TrainConfig, schedule: Schedule) -> torch.Tensor | None:
    """The density training draws timesteps from: None for ``--t-sampling uniform`` (Ho et al.
    2020's uniform t), else float64 [T] from :func:`ddpm.core.losses.timestep_probabilities`
    (``--t-logsnr-mean`` / ``--t-logsnr-std``, EDM's lognormal over noise levels). Raises
    ``ValueError`` for an unknown density or a std <= 0."""
    if cfg.t_sampling == "uniform":
        return None
    return timestep_probabilities(schedule, cfg.t_sampling, cfg.t_logsnr_mean, cfg.t_logsnr_std)


# eq=False: the fields hold a tensor, whose == is elementwise; a loss is equal to itself only.
@dataclass(frozen=True, eq=False)
class DiffusionLoss:
    """The per-sample denoising loss of one training run.

    ``schedule``: the noise schedule; ``prediction``: the network's target (eps, v or x0);
    ``weighting``: uniform or min-snr, with ``min_snr_gamma``; ``t_probabilities``: float64 [T]
    to draw timesteps from, or None for uniform; ``p_uncond``: the probability of dropping a
    label to ``null_class`` (the class-free token of a conditional network, None for an
    unconditional one). Raises ``ValueError`` for a target or weighting
    :func:`~ddpm.core.losses.diffusion_loss` does not know, or an eps target on a
    zero-terminal-SNR schedule, when made rather than at the first step.
    """

    schedule: Schedule
    prediction: str = "eps"
    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    t_probabilities: torch.Tensor | None = None
    p_uncond: float = 0.1
    null_class: int | None = None

    def __post_init__(self) -> None:
        # The same refusals as diffusion_loss's, so a bad setting fails before a model is built.
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of {', '.join(PREDICTIONS)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {self.weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
        if self.prediction == "eps" and self.schedule.zero_terminal_snr:
            raise ValueError("an eps target cannot be trained on a zero-terminal-SNR schedule; predict v or x0")

    @classmethod
    def from_config(cls, cfg: TrainConfig, schedule: Schedule, null_class: int | None) -> DiffusionLoss:
        """The loss ``cfg`` trains with on ``schedule`` (``--prediction``, ``--loss-weighting``,
        ``--min-snr-gamma``, ``--t-sampling`` through :func:`t_probabilities_for`,
        ``--p-uncond``); ``null_class`` is the network's (``UNetConfig.null_class``). Raises
        ``ValueError`` as the constructor and :func:`t_probabilities_for` do."""
        return cls(schedule, prediction=cfg.prediction, weighting=cfg.loss_weighting, min_snr_gamma=cfg.min_snr_gamma,
                   t_probabilities=t_probabilities_for(cfg, schedule), p_uncond=cfg.p_uncond, null_class=null_class)

    def __call__(self, net: Callable[..., torch.Tensor], x0: torch.Tensor, labels: torch.Tensor | None,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample loss, float32 [B], of ``net(x_t, t[, y])`` on ``x0`` (float [B, C, H, W] in
        [-1, 1]) and ``labels`` (int64 [B], or None for an unconditional network): timesteps,
        noise and label dropout are drawn from ``generator`` in that order (dropout masks inside
        ``net`` from the global generator). Raises ``ValueError`` for labels when ``null_class``
        is None."""
        return diffusion_loss(net, self.schedule, x0, labels, prediction=self.prediction, weighting=self.weighting,
                              min_snr_gamma=self.min_snr_gamma, t_probabilities=self.t_probabilities,
                              p_uncond=self.p_uncond, null_class=self.null_class, generator=generator)


@dataclass(frozen=True, eq=False)
class ConsistencyLoss:
    """The per-sample ECT loss of a consistency-tuning run (``ddpm distill``;
    :func:`ddpm.core.consistency.consistency_loss`): ``stage`` 1 .. :data:`STAGES` sets the gap
    between the two noise levels compared, :meth:`at` moves it with the run's progress. Timesteps
    come from ECT's lognormal density, labels are dropped with ``p_uncond`` as in training."""

    schedule: Schedule
    prediction: str = "v"
    t_probabilities: torch.Tensor | None = None
    p_uncond: float = 0.1
    null_class: int | None = None
    stage: int = 1

    @classmethod
    def from_config(cls, cfg: TrainConfig, schedule: Schedule, null_class: int | None) -> "ConsistencyLoss":
        """The loss ``cfg`` tunes with on ``schedule`` (``--prediction``, ``--p-uncond``)."""
        return cls(schedule, prediction=cfg.prediction,
                   t_probabilities=timestep_probabilities(schedule, "lognormal", ECT_LOGSNR_MEAN, ECT_LOGSNR_STD),
                   p_uncond=cfg.p_uncond, null_class=null_class)

    def at(self, progress: float) -> "ConsistencyLoss":
        """This loss at the stage of a run ``progress`` (0 .. 1) of the way through: the gap halves
        every 1/STAGES of the run."""
        stage = 1 + min(STAGES - 1, int(math.floor(progress * STAGES)))
        return self if stage == self.stage else replace(self, stage=stage)

    def __call__(self, net: Callable[..., torch.Tensor], x0: torch.Tensor, labels: torch.Tensor | None,
                 generator: torch.Generator | None) -> torch.Tensor:
        """Per-sample loss, float32 [B], of ``net`` on ``x0`` (float [B, C, H, W] in [-1, 1])."""
        return consistency_loss(net, self.schedule, x0, labels, prediction=self.prediction, stage=self.stage,
                                t_probabilities=self.t_probabilities, p_uncond=self.p_uncond,
                                null_class=self.null_class, generator=generator)


def training_loss(cfg: TrainConfig, schedule: Schedule, null_class: int | None) -> "DiffusionLoss | ConsistencyLoss":
    """The loss of ``cfg.objective``: :class:`DiffusionLoss` or :class:`ConsistencyLoss`."""
    if cfg.objective == "consistency":
        return ConsistencyLoss.from_config(cfg, schedule, null_class)
    return DiffusionLoss.from_config(cfg, schedule, null_class)

