"""Classifier-free guidance (Ho & Salimans 2022) as a model wrapper any sampler can use."""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["guided"]


def guided(
    model: Callable[..., torch.Tensor],
    y: torch.Tensor,
    scale: float,
    null_class: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Turn a class-conditional model into a guided model callable ``(x, t) -> eps``.

    The convention: ``eps = eps_uncond + scale * (eps_cond - eps_uncond)``. So ``scale = 1``
    is plain conditional sampling, ``scale = 0`` is unconditional sampling, and larger values
    trade diversity for fidelity to the class. (The CFG paper writes ``(1 + w) eps_cond - w
    eps_uncond``; its ``w`` is ``scale - 1``.)

    ``y`` holds one label per sample ([B], int64). ``null_class`` defaults to
    ``model.num_classes`` (the index of the learned null embedding of :class:`ddpm.UNet`).
    For ``scale`` other than 0 and 1 the conditional and unconditional passes run as one
    batch of ``2B``, which is faster than two passes on every device.
    """
    if null_class is None:
        null_class = getattr(model, "num_classes", None)
        if null_class is None:
            inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
            null_class = getattr(inner, "num_classes", None)
        if null_class is None:
            raise ValueError("guided() needs a class-conditional model (num_classes set) or an explicit null_class")
    y = torch.as_tensor(y, dtype=torch.long)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D tensor [B], got shape {tuple(y.shape)}")
    if (y < 0).any() or (y >= null_class).any():
        raise ValueError(f"labels must lie in [0, {null_class}), got {y.tolist()}")
    scale = float(scale)

    def call(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        yy = y.to(x.device)
        if yy.shape[0] != x.shape[0]:
            raise ValueError(f"{yy.shape[0]} labels for a batch of {x.shape[0]}")
        if scale == 1.0:
            return model(x, t, yy)
        null = torch.full_like(yy, null_class)
        if scale == 0.0:
            return model(x, t, null)
        out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([yy, null]))
        eps_c, eps_u = out.float().chunk(2)
        return eps_u + scale * (eps_c - eps_u)

    return call
