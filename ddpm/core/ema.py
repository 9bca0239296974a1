"""Exponential moving average of a model's weights, the copy used for sampling."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EMA", "edm_ema_decay"]


def edm_ema_decay(images_seen: int, batch_size: int, halflife_kimg: float = 500.0, rampup: float = 0.05) -> float:
    """Per-step EMA decay whose half-life grows with the run (Karras et al. 2022, EDM, appendix F).

    The half-life, in images, is ``min(halflife_kimg * 1000, rampup * images_seen)``: early on the
    average covers only the last ``rampup`` fraction of training (the weights change fast), later
    at most ``halflife_kimg`` thousand images. One step of ``batch_size`` images then decays by
    ``0.5 ** (batch_size / half_life)``. ``rampup = 0`` gives the fixed half-life alone.
    Raises ``ValueError`` for a non-positive half-life or batch, or a negative ramp-up.
    """
    if halflife_kimg <= 0 or batch_size < 1 or rampup < 0:
        raise ValueError(f"need halflife_kimg > 0, batch_size >= 1 and rampup >= 0, got {halflife_kimg}, "
                         f"{batch_size}, {rampup}")
    half_life = halflife_kimg * 1000.0
    if rampup > 0:
        half_life = min(half_life, rampup * images_seen)
    return 0.5 ** (batch_size / max(half_life, 1e-8))


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * weights`` after every optimiser step.

    With ``warmup=True`` the decay used at update ``n`` is ``min(decay, (1 + n) / (10 + n))``,
    so the average follows the fast-changing early weights instead of remembering the random
    initialisation for tens of thousands of steps. Buffers (none in the UNet, but e.g. BatchNorm
    statistics elsewhere) are copied, not averaged. ``module`` is the averaged model, in eval mode.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """Move the average towards ``model``'s current weights, by ``decay`` when given (e.g.
        :func:`edm_ema_decay`), else by :meth:`current_decay`."""
        d = self.current_decay() if decay is None else float(decay)
        src = _unwrap(model)
        ema_p = [p for p in self.module.parameters()]
        cur_p = [p.detach() for p in src.parameters()]
        if ema_p:
            # lerp(ema, cur, 1 - d) == d * ema + (1 - d) * cur, in one fused kernel per tensor list.
            torch._foreach_lerp_(ema_p, [c.to(e.dtype) for e, c in zip(ema_p, cur_p)], 1.0 - d)
        for e, c in zip(self.module.buffers(), src.buffers()):
            e.copy_(c)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        """Averaged weights plus the update counter (plain tensors and numbers only)."""
        return {"weights": self.module.state_dict(), "num_updates": self.num_updates, "decay": self.decay,
                "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.module.load_state_dict(state["weights"])
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel or a torch.compile wrapper."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
