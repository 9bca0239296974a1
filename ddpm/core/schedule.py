"""Noise schedules of the discrete-time diffusion process, and the conversions between
the quantities a network can predict (eps, x0, v, score).

A :class:`Schedule` is a frozen value: it is built from its betas, derives every table
from them in float64 once, and never changes afterwards. Samplers and losses read from it;
nothing writes to it.

Notation (Ho et al. 2020): ``alpha_t = 1 - beta_t``, ``abar_t = prod_{s<=t} alpha_s``,
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Schedule", "SPACINGS", "SCHEDULES"]

SPACINGS = ("linspace", "trailing", "leading", "logsnr")
SCHEDULES = ("linear", "cosine", "sigmoid")


def _reshape_abar(betas: torch.Tensor, logsnr_shift: float, zero_terminal_snr: bool) -> torch.Tensor:
    """Betas of ``betas``' schedule with its log-SNR shifted and/or its last step at zero SNR.

    ``logsnr_shift`` adds a constant to ``log(abar / (1 - abar))`` at every step (Hoogeboom et
    al. 2023, "simple diffusion": ``2 log(base / size)`` keeps a schedule tuned at resolution
    ``base`` equally noisy at resolution ``size``). ``zero_terminal_snr`` rescales
    ``sqrt(abar)`` linearly so that its first value is kept and its last becomes exactly 0
    (Lin et al. 2023, Algorithm 1): the last step is then pure noise, as sampling assumes.
    """
    abar = torch.cumprod(1.0 - betas, 0)
    if logsnr_shift:
        abar = torch.sigmoid(torch.logit(abar) + logsnr_shift)
    if zero_terminal_snr:
        root = abar.sqrt()
        first, last = root[0].clone(), root[-1].clone()
        root = (root - last) * first / (first - last)
        abar = root.square()
        abar[-1] = 0.0
    prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    return 1.0 - abar / prev


def _check_T(T: int) -> None:
    if T < 1:
        raise ValueError(f"T must be at least 1, got {T}")


def _gather(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor, before: float = 1.0) -> torch.Tensor:
    """``table[t]`` reshaped to broadcast over ``like`` ([B] -> [B, 1, 1, 1]) in its dtype.

    Negative ``t`` means "before the first step", where abar is 1: the samplers use it for the
    final step to clean data. There the table's value is ``before``: 1 for ``sqrt(abar)``, but
    0 for ``sqrt(1 - abar)``.
    """
    t = t.to(table.device)
    vals = torch.where(t >= 0, table[t.clamp(min=0)], torch.full((), before, dtype=table.dtype, device=table.device))
    vals = vals.to(device=like.device, dtype=like.dtype if like.is_floating_point() else torch.float32)
    return vals.reshape(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete noise schedule with ``T`` steps; timestep ``t`` indexes ``0 .. T-1``.

    Build one with :meth:`linear`, :meth:`cosine` or :meth:`from_betas`; every table is float64.
    ``kind`` and ``params`` record how it was made so :meth:`to_dict` stays small and exact.
    """

    betas: torch.Tensor
    kind: str = "custom"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        betas = torch.as_tensor(self.betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        # The last beta may be exactly 1: a zero-terminal-SNR schedule ends in pure noise.
        if not (torch.all((betas[:-1] > 0) & (betas[:-1] < 1)) and 0 < betas[-1] <= 1) or (
                betas.numel() == 1 and betas[0] == 1):
            raise ValueError("every beta must lie in the open interval (0, 1) (the last one may be exactly 1)")
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, 0)
        if betas[-1] == 1.0:
            abar[-1] = 0.0  # exactly, not a rounding residue
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        tables = {
            "betas": betas,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            # q(x_{t-1} | x_t, x0) = N(coef1 * x0 + coef2 * x_t, posterior_variance): eq. (6)-(7).
            "posterior_variance": post_var,
            # At t = 0 the posterior variance is 0; the log is clipped to the next value, as the
            # paper's code does, so it stays finite.
            "posterior_log_variance_clipped": torch.log(
                torch.cat([post_var[1:2], post_var[1:]]) if betas.numel() > 1 else post_var.clamp(min=1e-20)
            ),
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            # lambda_t = log(abar / (1 - abar)), the log signal-to-noise ratio (Kingma et al. 2021);
            # -inf at a zero-SNR last step.
            "log_snr": torch.log(abar) - torch.log1p(-abar),
        }
        for name, value in tables.items():
            object.__setattr__(self, name, value)
        # Read by every training step's loss: a Python bool, not a tensor comparison each time.
        object.__setattr__(self, "_zero_terminal", bool(abar[-1] == 0))
        # Copies of the tables on other devices, made on first use: gathering on the device that
        # holds ``t`` avoids a device-to-host copy (a GPU sync) in every training step.
        object.__setattr__(self, "_device_tables", {})
        object.__setattr__(self, "params", dict(self.params))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02, *,
               logsnr_shift: float = 0.0, zero_terminal_snr: bool = False) -> "Schedule":
        """The DDPM paper's schedule: betas linear from ``beta_start`` to ``beta_end`` over ``T`` steps.

        ``logsnr_shift`` and ``zero_terminal_snr`` modify it as described in :meth:`from_name`.
        """
        _check_T(T)
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls._made(betas, "linear", {"T": T, "beta_start": beta_start, "beta_end": beta_end},
                         logsnr_shift, zero_terminal_snr)

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999, *,
               logsnr_shift: float = 0.0, zero_terminal_snr: bool = False) -> "Schedule":
        """Nichol & Dhariwal 2021: ``abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2)``, betas clipped at ``max_beta``."""
        _check_T(T)
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls._made(betas, "cosine", {"T": T, "s": s, "max_beta": max_beta}, logsnr_shift, zero_terminal_snr)

    @classmethod
    def sigmoid(cls, T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                max_beta: float = 0.999, *, logsnr_shift: float = 0.0, zero_terminal_snr: bool = False) -> "Schedule":
        """Jabri et al. 2022 (RIN), the default of lucidrains' denoising-diffusion-pytorch:
        ``abar(u) = (sig(end/tau) - sig((u (end - start) + start) / tau)) / (sig(end/tau) - sig(start/tau))``
        for ``u = t/T``, normalised so ``abar(0) = 1``, betas clipped at ``max_beta``.

        It spends more of its steps at middling noise levels than the linear schedule, whose
        high-noise half carries almost no signal at 32x32.
        """
        _check_T(T)
        if not end > start or tau <= 0:
            raise ValueError(f"the sigmoid schedule needs end > start and tau > 0, got start={start}, end={end}, tau={tau}")
        u = torch.arange(T + 1, dtype=torch.float64) / T
        v_start, v_end = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64)), torch.sigmoid(
            torch.tensor(end / tau, dtype=torch.float64))
        f = (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
        betas = (1 - f[1:] / f[:-1]).clamp(min=1e-12, max=max_beta)
        return cls._made(betas, "sigmoid", {"T": T, "start": start, "end": end, "tau": tau, "max_beta": max_beta},
                         logsnr_shift, zero_terminal_snr)

    @classmethod
    def _made(cls, betas: torch.Tensor, kind: str, params: dict[str, Any], logsnr_shift: float,
              zero_terminal_snr: bool) -> "Schedule":
        if not math.isfinite(logsnr_shift):
            raise ValueError(f"logsnr_shift must be a finite number, got {logsnr_shift}")
        if zero_terminal_snr and betas.numel() < 2:
            raise ValueError("a zero-terminal-SNR schedule needs T >= 2")
        if logsnr_shift or zero_terminal_snr:
            betas = _reshape_abar(betas, float(logsnr_shift), bool(zero_terminal_snr))
            params = {**params, "logsnr_shift": float(logsnr_shift), "zero_terminal_snr": bool(zero_terminal_snr)}
        return cls(betas, kind, params)

    @classmethod
    def from_betas(cls, betas: Any) -> "Schedule":
        """A schedule from explicit betas (any 1-D sequence in (0, 1); the last may be 1)."""
        return cls(torch.as_tensor(betas, dtype=torch.float64), "custom", {})

    @classmethod
    def from_name(cls, name: str, T: int = 1000, *, logsnr_shift: float = 0.0,
                  zero_terminal_snr: bool = False) -> "Schedule":
        """``"linear"``, ``"cosine"`` or ``"sigmoid"`` with default parameters and ``T`` steps.

        ``logsnr_shift`` adds a constant to every step's log-SNR (negative = noisier; Hoogeboom
        et al. 2023 use ``2 log(32 / image_size)`` for a schedule tuned at 32x32).
        ``zero_terminal_snr`` makes the last step pure noise (Lin et al. 2023); only networks that
        predict ``v`` or ``x0`` can be trained on it (``eps`` carries no information there).
        Raises ``ValueError`` for an unknown name.
        """
        makers = {"linear": cls.linear, "cosine": cls.cosine, "sigmoid": cls.sigmoid}
        if name not in makers:
            raise ValueError(f"unknown schedule {name!r}; expected one of {', '.join(SCHEDULES)}")
        return makers[name](T, logsnr_shift=logsnr_shift, zero_terminal_snr=zero_terminal_snr)

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor, before: float = 1.0) -> torch.Tensor:
        """:func:`_gather` from table ``name``, taken on the device of ``t``."""
        return _gather(self._table(name, t), t, like, before)

    def _table(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Table ``name`` on the device of ``t`` (cached), so gathering needs no transfer of ``t``."""
        table = getattr(self, name)
        if t.device == table.device or t.device.type == "mps":  # MPS has no float64: gather on the CPU
            return table
        key = (name, t.device)
        cached = self._device_tables.get(key)
        if cached is None:
            cached = self._device_tables[key] = table.to(t.device)
        return cached

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict from which :meth:`from_dict` rebuilds an identical schedule."""
        if self.kind in SCHEDULES:
            return {"kind": self.kind, **self.params}
        return {"kind": "custom", "betas": self.betas.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Schedule":
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        kind = d.pop("kind", None)
        makers = {"linear": cls.linear, "cosine": cls.cosine, "sigmoid": cls.sigmoid}
        if kind in makers:
            return makers[kind](**d)
        if kind == "custom":
            return cls.from_betas(d["betas"])
        raise ValueError(f"unknown schedule kind {kind!r}; expected one of {', '.join(SCHEDULES)} or 'custom'")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and torch.equal(self.betas, other.betas)

    def __hash__(self) -> int:
        return hash(tuple(self.betas.tolist()))

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params.items() if k != "T")
        return f"Schedule({self.kind}, T={self.T}{extra})"

    # ------------------------------------------------------------------ basic facts
    @property
    def zero_terminal_snr(self) -> bool:
        """Whether the last step is pure noise (``abar_{T-1} = 0``)."""
        return self._zero_terminal

    @property
    def T(self) -> int:
        """Number of diffusion steps."""
        return int(self.betas.numel())

    def timesteps(self, steps: int | None = None, spacing: str = "linspace") -> torch.Tensor:
        """``steps`` timesteps in decreasing order (int64), a subset of ``T-1 .. 0``.

        ``linspace`` (default) rounds an even grid from ``T-1`` to ``0`` and includes both ends,
        as improved-diffusion's respacing does; ``trailing`` starts at ``T-1`` and steps evenly
        down to ``T/steps - 1`` (Lin et al. 2023); ``leading`` is DDIM's ``range(0, T, T // steps)``;
        ``logsnr`` spaces evenly in ``lambda = log(alpha / sigma)`` from ``T-1`` down to (but
        excluding) ``0``, as DPM-Solver recommends for pixel-space models: samplers then jump from
        the last of these straight to clean data.
        """
        T = self.T
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be between 1 and T={T}, got {steps}")
        if spacing == "trailing":
            ts = torch.round(torch.arange(T, 0, -T / steps, dtype=torch.float64)[:steps]) - 1
        elif spacing == "leading":
            ts = (torch.arange(steps, dtype=torch.float64) * (T // steps)).flip(0)
        elif spacing == "linspace":
            ts = torch.round(torch.linspace(T - 1, 0, steps, dtype=torch.float64))
        elif spacing == "logsnr":
            lam = 0.5 * self.log_snr  # decreasing in t
            # A zero-SNR last step has lambda = -inf: space from the step before it, then start
            # at T-1 itself (below), since sampling must begin from pure noise there.
            lam_min = float(lam[-1]) if math.isfinite(float(lam[-1])) else float(lam[-2])
            targets = torch.linspace(lam_min, float(lam[0]), steps + 1, dtype=torch.float64)[:-1]
            # nearest timestep for each target lambda (searchsorted needs increasing values)
            idx = torch.searchsorted(lam.flip(0).contiguous(), targets.contiguous()).clamp(max=T - 1)
            ts = (T - 1 - idx).tolist()
            ts[0] = T - 1
            # Near t = 0 several targets can round to one step: push them apart so that every
            # timestep is used once and the order stays strictly decreasing.
            for i in range(steps - 2, -1, -1):
                ts[i] = max(ts[i], ts[i + 1] + 1)
            for i in range(steps):
                ts[i] = min(ts[i], T - 1 - i)
            ts = torch.tensor(ts, dtype=torch.float64)
        else:
            raise ValueError(f"unknown spacing {spacing!r}; expected one of {', '.join(SPACINGS)}")
        ts = ts.long()
        if torch.unique(ts).numel() != steps:  # pragma: no cover - guarded by the arithmetic above
            raise ValueError(f"spacing {spacing!r} gives repeated timesteps for steps={steps}")
        return ts

    # ------------------------------------------------------------------ forward process
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample ``q(x_t | x0)``: ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` (eq. 4)."""
        a, s = self.alpha_sigma(t, x0)
        return a * x0 + s * noise

    # ------------------------------------------------------------------ conversions
    # All of them take t as an int64 tensor [B]; t = -1 means clean data (abar = 1).
    def alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sqrt(abar_t), sqrt(1 - abar_t))`` shaped to broadcast over ``like``."""
        return (self._at("sqrt_alphas_cumprod", t, like),
                self._at("sqrt_one_minus_alphas_cumprod", t, like, before=0.0))

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Predicted clean data from predicted noise (eq. 15 solved for x0)."""
        a, s = self.alpha_sigma(t, x_t)
        return (x_t - s * eps) / a

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0`` to ``x_t`` at step ``t``."""
        a, s = self.alpha_sigma(t, x_t)
        return (x_t - a * x0) / s

    def v_from_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target of Salimans & Ho 2022: ``sqrt(abar) eps - sqrt(1 - abar) x0``."""
        a, s = self.alpha_sigma(t, x0)
        return a * eps - s * x0

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Noise from a v-prediction: ``sqrt(abar) v + sqrt(1 - abar) x_t``."""
        a, s = self.alpha_sigma(t, x_t)
        return a * v + s * x_t

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Clean data from a v-prediction: ``sqrt(abar) x_t - sqrt(1 - abar) v``."""
        a, s = self.alpha_sigma(t, x_t)
        return a * x_t - s * v

    def score_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Score of the noised marginal, ``grad log p_t(x_t) = -eps / sqrt(1 - abar_t)``."""
        return -eps / self._at("sqrt_one_minus_alphas_cumprod", t, x_t, before=0.0)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(x_{t-1} | x_t, x0)`` over the full (unspaced) chain."""
        mean = (self._at("posterior_mean_coef1", t, x_t) * x0
                + self._at("posterior_mean_coef2", t, x_t) * x_t)
        return mean, self._at("posterior_variance", t, x_t)
