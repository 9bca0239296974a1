"""Samplers: pure functions that turn noise into data with a noise-prediction model.

Every sampler has the same form::

    NAME(model, x_T, schedule, *, steps=None, clip=True, generator=None, callback=None, **options)

``steps=None`` runs the sampler's default number of steps (:data:`DEFAULT_STEPS`: all T for
ancestral, 50 for ddim, 250 for langevin, 20 for dpm-solver, 2 for consistency, each at most T), the same table
``ddpm sample`` and ``ddpm eval`` read.

``model(x, t) -> eps`` is any callable; ``t`` is an int64 tensor [B] of indices into
``schedule.alphas_cumprod``. Wrap a class-conditional network with :func:`ddpm.guided`, and a
network that predicts v or x0 with :func:`eps_model`: the :class:`Denoiser` it returns is still
an eps callable, and also hands the samplers its x0 prediction directly, which stays exact where
``x0 = (x - sigma eps) / alpha`` would divide by an ``alpha`` near or at zero. ``x_T`` is the starting noise; further noise is
drawn from ``generator`` so a seed fixes the whole chain: a ``torch.Generator`` draws the noise
of the whole batch at once (so an image's noise depends on the batch it is in), an
:class:`ImageGenerators` draws each image's noise from that image's own generator (so it does
not). ``callback(i, t, x, x0)`` is called after each step with the step index, timestep, new
sample and the current prediction of x0.

Sampling runs under ``torch.inference_mode``; the update arithmetic is done in float32
whatever dtype the model returns.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch

from ..errors import DDPMError
from ..core.schedule import Schedule

__all__ = ["ancestral", "ddim", "langevin", "dpm_solver", "consistency", "CONSISTENCY_SIGMAS", "DEFAULT_SAMPLER", "CONSISTENCY_SAMPLER", "DIFFUSION_SAMPLERS", "SAMPLERS", "SAMPLER_NAMES", "STOCHASTIC", "get_sampler",
           "eps_model", "Denoiser", "ImageGenerators", "image_seed", "MAX_SEED",
           "ancestral_step", "ddim_step", "model_evaluations", "DEFAULT_STEPS", "resolve_steps"]

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Optional[Callable[[int, int, torch.Tensor, torch.Tensor], None]]


class Denoiser:
    """A network adapted to the samplers: ``denoiser(x, t) -> eps`` and ``denoiser.predict(x, t)
    -> (eps, x0)``, both float32 like ``x`` ([B, C, H, W]).

    ``prediction`` names what ``net(x, t)`` returns: ``eps``, ``v`` (Salimans & Ho 2022) or
    ``x0``. The conversions are the schedule's; x0 is computed from the network's own output
    (for v: ``alpha x - sigma v``), never through eps, so a zero-SNR step (alpha = 0) is exact.
    """

    def __init__(self, net: Callable[..., torch.Tensor], schedule: Schedule, prediction: str = "eps") -> None:
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction {prediction!r}; expected 'eps', 'v' or 'x0'")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def predict(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(eps, x0)`` predicted at ``x`` = x_t, timesteps ``t`` (int64 [B]).

        For an eps network x0 is None: the samplers derive it from eps as they always have, so
        such runs sample exactly as before this adapter existed.
        """
        out = self.net(x, t).float()
        s = self.schedule
        if self.prediction == "eps":
            return out, None
        if self.prediction == "v":
            return s.eps_from_v(x, t, out), s.x0_from_v(x, t, out)
        return s.eps_from_x0(x, t, out), out

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.predict(x, t)[0]


def eps_model(net: Callable[..., torch.Tensor], schedule: Schedule, prediction: str = "eps") -> Model:
    """Adapt a network that predicts ``prediction`` ("eps", "v" or "x0") to the samplers (a :class:`Denoiser`)."""
    return Denoiser(net, schedule, prediction)


def _predict(model: Model, x: torch.Tensor, t: int, schedule: Schedule) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(eps, x0)`` from any sampler model: a v or x0 :class:`Denoiser` gives both; for an eps
    model x0 is None and the step derives it from eps, as in the papers (needs ``abar_t > 0``)."""
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    predict = getattr(model, "predict", None)
    if predict is not None:
        eps, x0 = predict(x, tt)
        if x0 is not None:
            return eps.float(), x0.float()
    else:
        eps = model(x, tt)
    eps = eps.float()
    a = _abar(schedule, t)
    if a <= 0:
        raise ValueError("an eps model cannot be sampled at a zero-SNR step; wrap a v or x0 network with eps_model()")
    return eps, None


# The largest --seed: image seeds (below) then stay under 2**61, far inside the 64 bits a
# torch.Generator takes, for any image count a machine can hold.
MAX_SEED = 2**40 - 1


def image_seed(seed: int, i: int) -> int:
    """The seed of image ``i`` of a call with ``seed``: ``seed * 1_000_003 + i`` (1,000,003 is a
    prime larger than any image count a call makes, so two images of one call, or image i of
    seeds s and s + 1, never share a seed). Image 0's seed is the one the first batch of a seed
    had before images were seeded one by one, so a single image of a seed is what it was.
    Commands accept seeds 0 .. :data:`MAX_SEED`."""
    return int(seed) * 1_000_003 + int(i)


class ImageGenerators:
    """One CPU ``torch.Generator`` per image of a batch, so that every image's noise comes from
    its own generator and never depends on which batch, or where in it, the image is sampled
    (as EDM's ``StackedRandomGenerator`` does). Pass it as a sampler's ``generator``.

    ``randn(shape)`` draws one standard-normal tensor of ``shape`` (one image) from each generator
    in turn and stacks them: float32 [N, *shape]. Each image's draws therefore come in the same
    order (its starting noise, then each step's noise) whatever the batch size. Slicing gives the
    generators of a part of the batch (the same objects, so draws advance them).

        gens = ImageGenerators.seeded(seed=0, n=9)      # image i seeded by image_seed(0, i)
        x_T = gens.randn((3, 32, 32))                   # float32 [9, 3, 32, 32]
        x = ancestral(model, x_T, schedule, generator=gens)
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)
        if not self.generators:
            raise ValueError("ImageGenerators needs at least one generator")

    @classmethod
    def seeded(cls, seed: int, n: int, start: int = 0) -> "ImageGenerators":
        """Generators of images ``start .. start + n - 1`` of a call with ``seed`` (:func:`image_seed`)."""
        return cls([torch.Generator().manual_seed(image_seed(seed, i)) for i in range(start, start + n)])

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, index: slice) -> "ImageGenerators":
        if not isinstance(index, slice):
            raise TypeError("ImageGenerators are sliced (gens[a:b]), not indexed")
        return ImageGenerators(self.generators[index])

    def randn(self, shape: Sequence[int], device: str | torch.device | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """float [N, *shape] standard normal, row i from generator i (drawn on its device, then moved)."""
        draws = [torch.randn(tuple(shape), generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.stack(draws).to(device if device is not None else draws[0].device)


Generator = Union[torch.Generator, ImageGenerators, None]


def _randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise like ``x`` (float32, on x's device) from ``generator``: a torch
    generator draws the batch at once; :class:`ImageGenerators` draw a row per image."""
    if isinstance(generator, ImageGenerators):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} image generators for a batch of {x.shape[0]}")
        return generator.randn(x.shape[1:], device=x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


def _abar(schedule: Schedule, t: int) -> float:
    """abar_t as a Python float in float64 precision; t < 0 means clean data (abar = 1)."""
    return 1.0 if t < 0 else float(schedule.alphas_cumprod[t])


def _eval(model: Model, x: torch.Tensor, t: int) -> torch.Tensor:
    tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    return model(x, tt).float()


def _x0(x: torch.Tensor, eps: torch.Tensor, abar: float, clip: bool, x0: torch.Tensor | None = None) -> torch.Tensor:
    if x0 is None:
        x0 = (x - (1 - abar) ** 0.5 * eps) / abar**0.5
    return x0.clamp(-1, 1) if clip else x0


def _timesteps(schedule: Schedule, steps: int | None, timesteps: torch.Tensor | None, spacing: str,
               name: str) -> list[int]:
    """The decreasing timesteps sampler ``name`` visits: ``timesteps`` when given, else ``steps``
    of the schedule's grid, ``steps=None`` meaning the sampler's default (:data:`DEFAULT_STEPS`,
    the same table the commands read, capped at T)."""
    if timesteps is not None:
        ts = [int(t) for t in torch.as_tensor(timesteps).flatten()]
        if any(a <= b for a, b in zip(ts, ts[1:])) or not all(0 <= t < schedule.T for t in ts):
            raise ValueError(f"timesteps must be strictly decreasing indices in [0, {schedule.T})")
        return ts
    if steps is None and DEFAULT_STEPS[name] is not None:
        steps = min(DEFAULT_STEPS[name], schedule.T)
    return schedule.timesteps(steps, spacing).tolist()


# ---------------------------------------------------------------------------------------- DDPM
def ancestral_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    schedule: Schedule,
    *,
    variance: str = "small",
    clip: bool = True,
    noise: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse step ``x_t -> x_{t_prev}`` of the DDPM chain; returns ``(x_prev, x0_pred)``.

    ``x0``, when given, is the network's own prediction of the clean data (used instead of
    the one derived from ``eps``; needed where ``abar_t = 0``).

    With ``t_prev = t - 1`` this is Algorithm 2 of Ho et al. 2020; with a larger gap it is the
    same step on the respaced chain whose betas are ``1 - abar_t / abar_{t_prev}`` (Nichol &
    Dhariwal 2021, sec. 4). ``t_prev = -1`` is the final step to clean data, which adds no noise.
    """
    a_t, a_prev = _abar(schedule, t), _abar(schedule, t_prev)
    beta = 1 - a_t / a_prev  # beta of the (possibly respaced) step
    # 1. predicted x0 (eq. 15), optionally clipped to the data range
    x0 = _x0(x, eps, a_t, clip, x0)
    # 2. posterior mean of q(x_{t_prev} | x_t, x0) (eq. 7)
    coef_x0 = a_prev**0.5 * beta / (1 - a_t)
    coef_xt = (1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)
    mean = coef_x0 * x0 + coef_xt * x
    if t_prev < 0:
        return mean, x0
    # 3. variance: sigma^2 = beta-tilde (posterior, "small") or beta ("large"); sec. 3.2
    if variance == "small":
        var = max(beta * (1 - a_prev) / (1 - a_t), 1e-20)
    elif variance == "large":
        var = beta
    else:
        raise ValueError(f"unknown variance {variance!r}; expected 'small' or 'large'")
    if noise is None:
        noise = torch.randn_like(x)
    return mean + var**0.5 * noise, x0


@torch.inference_mode()
def ancestral(
    model: Model,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    steps: int | None = None,
    clip: bool = True,
    generator: Generator = None,
    callback: Callback = None,
    variance: str = "small",
    spacing: str = "linspace",
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ancestral sampling with the DDPM reverse chain (Ho et al. 2020, Algorithm 2).

    ``steps=None`` runs all ``T`` steps; fewer runs the respaced chain. ``variance`` is
    ``"small"`` (the posterior variance, best for few steps) or ``"large"`` (beta_t).
    """
    ts = _timesteps(schedule, steps, timesteps, spacing, "ancestral")
    x = x_T.float()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0 = _predict(model, x, t, schedule)
        noise = _randn_like(x, generator) if t_prev >= 0 else None
        x, x0 = ancestral_step(x, eps, t, t_prev, schedule, variance=variance, clip=clip, noise=noise, x0=x0)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ---------------------------------------------------------------------------------------- DDIM
def ddim_step(
    x: torch.Tensor,
    eps: torch.Tensor,
    t: int,
    t_prev: int,
    schedule: Schedule,
    *,
    eta: float = 0.0,
    clip: bool = True,
    noise: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step ``x_t -> x_{t_prev}`` (Song et al. 2021, eq. 12); returns ``(x_prev, x0_pred)``.

    When ``clip`` changes x0, the noise is re-derived from the clipped x0 so that the step stays
    on the line between them (as in improved-diffusion); without clipping this equals diffusers'
    ``DDIMScheduler.step``. ``x0``, when given, is the network's own prediction of the clean data.
    """
    a_t, a_prev = _abar(schedule, t), _abar(schedule, t_prev)
    # 1. predicted x0, and the noise consistent with it
    given = x0 is not None
    x0 = _x0(x, eps, a_t, clip, x0)
    if clip or given:
        eps = (x - a_t**0.5 * x0) / (1 - a_t) ** 0.5
    # 2. sigma_t(eta) (eq. 16): eta = 1 is the DDPM posterior, eta = 0 deterministic
    sigma = eta * ((1 - a_prev) / (1 - a_t)) ** 0.5 * (1 - a_t / a_prev) ** 0.5
    # 3. x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
    x_prev = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
    if sigma > 0:
        if noise is None:
            noise = torch.randn_like(x)
        x_prev = x_prev + sigma * noise
    return x_prev, x0


@torch.inference_mode()
def ddim(
    model: Model,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    steps: int | None = None,
    clip: bool = True,
    generator: Generator = None,
    callback: Callback = None,
    eta: float = 0.0,
    spacing: str = "linspace",
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Denoising diffusion implicit models (Song et al. 2021); ``eta=0`` is deterministic."""
    ts = _timesteps(schedule, steps, timesteps, spacing, "ddim")
    x = x_T.float()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        eps, x0 = _predict(model, x, t, schedule)
        noise = _randn_like(x, generator) if eta > 0 and t_prev >= 0 else None
        x, x0 = ddim_step(x, eps, t, t_prev, schedule, eta=eta, clip=clip, noise=noise, x0=x0)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ------------------------------------------------------------------------- predictor-corrector
@torch.inference_mode()
def langevin(
    model: Model,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    steps: int | None = None,
    clip: bool = True,
    generator: Generator = None,
    callback: Callback = None,
    corrector_steps: int = 1,
    snr: float = 0.16,
    variance: str = "small",
    spacing: str = "linspace",
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Predictor-corrector sampling (Song et al. 2021, "Score-Based Generative Modeling
    through SDEs", Algorithms 2 and 5 for the VP SDE).

    At each timestep, ``corrector_steps`` Langevin MCMC steps with the learned score
    ``-eps / sqrt(1 - abar_t)`` move ``x_t`` towards the model's marginal at ``t``, then an
    ancestral DDPM step predicts ``x_{t_prev}``. The Langevin step size follows the
    signal-to-noise rule ``step = 2 alpha_t (snr * ||z|| / ||score||)^2`` per sample.
    ``corrector_steps=0`` reduces to :func:`ancestral`. Costs ``1 + corrector_steps`` model
    evaluations per step (the last step runs no corrector).
    """
    if corrector_steps < 0:
        raise ValueError(f"corrector_steps must be >= 0, got {corrector_steps}")
    ts = _timesteps(schedule, steps, timesteps, spacing, "langevin")
    x = x_T.float()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = _abar(schedule, t)
        if t_prev >= 0:
            # alpha_t of the (respaced) step t_prev -> t, as score_sde's VP corrector uses.
            alpha = a_t / _abar(schedule, t_prev)
            for _ in range(corrector_steps):
                score = -_eval(model, x, t) / (1 - a_t) ** 0.5
                z = _randn_like(x, generator)
                z_norm = z.flatten(1).norm(dim=1)
                s_norm = score.flatten(1).norm(dim=1).clamp(min=1e-12)
                step = (2 * alpha * (snr * z_norm / s_norm) ** 2).reshape(-1, *([1] * (x.ndim - 1)))
                x = x + step * score + (2 * step).sqrt() * z
        eps, x0 = _predict(model, x, t, schedule)
        noise = _randn_like(x, generator) if t_prev >= 0 else None
        x, x0 = ancestral_step(x, eps, t, t_prev, schedule, variance=variance, clip=clip, noise=noise, x0=x0)
        if callback is not None:
            callback(i, t, x, x0)
    return x


# --------------------------------------------------------------------------- DPM-Solver++(2M)
@torch.inference_mode()
def dpm_solver(
    model: Model,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    steps: int | None = None,
    clip: bool = True,
    generator: Generator = None,
    callback: Callback = None,
    order: int = 2,
    spacing: str = "logsnr",
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022), multistep, in the data-prediction form; deterministic.

    With ``lambda = log(alpha / sigma)`` and ``h = lambda_next - lambda_t``, each step is
    ``x_next = (sigma_next / sigma_t) x_t - alpha_next (e^{-h} - 1) D`` where ``D`` is the
    predicted x0 (order 1) or its second-order multistep extrapolation from the previous
    prediction (order 2, "2M"). The last step goes to clean data and returns the final x0
    prediction, first order, as recommended for few steps. ``generator`` is unused (the
    solver is an ODE solver) and accepted so all samplers share one signature.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    ts = _timesteps(schedule, steps, timesteps, spacing, "dpm-solver")
    x = x_T.float()
    prev_x0: torch.Tensor | None = None
    prev_h = 0.0
    for i, t in enumerate(ts):
        t_next = ts[i + 1] if i + 1 < len(ts) else -1
        a_t = _abar(schedule, t)
        eps, x0 = _predict(model, x, t, schedule)
        x0 = _x0(x, eps, a_t, clip, x0)
        if t_next < 0:
            x = x0
        else:
            a_n = _abar(schedule, t_next)
            alpha_t, sigma_t = a_t**0.5, (1 - a_t) ** 0.5
            alpha_n, sigma_n = a_n**0.5, (1 - a_n) ** 0.5
            # lambda = log(alpha / sigma) is -inf at a zero-SNR start: h is then +inf, e^{-h} = 0
            # and the step is x_next = sigma_n x_t + alpha_n D (with sigma_t = 1), as it should be.
            h = math.log(alpha_n / sigma_n) - (math.log(alpha_t / sigma_t) if alpha_t > 0 else -math.inf)
            if order == 2 and prev_x0 is not None:
                r = prev_h / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0
            else:
                d = x0
            x = (sigma_n / sigma_t) * x - alpha_n * math.expm1(-h) * d
            prev_h = h
        prev_x0 = x0
        if callback is not None:
            callback(i, t, x, x0)
    return x


# ------------------------------------------------------------------------------- consistency
# The intermediate noise levels of multistep consistency sampling, as EDM sigmas
# (sqrt(1 - abar) / sqrt(abar)), by number of steps. Two steps re-noise to 0.821, the level Song et
# al. 2023 and Geng et al. 2024 (ECT) use for CIFAR-10; three and four add levels geometrically
# spaced above it and one below, so each jump removes a similar share of log-noise.
CONSISTENCY_SIGMAS: dict[int, tuple[float, ...]] = {1: (), 2: (0.821,), 3: (2.0, 0.821), 4: (3.0, 1.5, 0.5)}


@torch.inference_mode()
def consistency(
    model: Model,
    x_T: torch.Tensor,
    schedule: Schedule,
    *,
    steps: int | None = None,
    clip: bool = True,
    generator: Generator = None,
    callback: Callback = None,
    sigmas: Sequence[float] | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1) of a consistency-tuned run
    (``ddpm distill``, :mod:`ddpm.core.consistency`): the network's x0 prediction at the last
    step is the sample; each further step re-noises that estimate to the step nearest the next
    level of ``sigmas`` (EDM sigmas, decreasing; default :data:`CONSISTENCY_SIGMAS` for ``steps``,
    2 when None) with fresh noise from ``generator`` and predicts x0 again. Works on any run
    (a diffusion network's x0 jumps), but only a tuned one gives good images in so few steps.
    Raises ``ValueError`` for more than 4 steps without ``sigmas``, or levels not decreasing.
    """
    if sigmas is None:
        k = 2 if steps is None else int(steps)
        if k not in CONSISTENCY_SIGMAS:
            raise ValueError(f"the consistency sampler takes 1 to {max(CONSISTENCY_SIGMAS)} steps, got {k}")
        sigmas = CONSISTENCY_SIGMAS[k]
    levels = [float(v) for v in sigmas]
    if any(a <= b for a, b in zip(levels, levels[1:])) or any(v <= 0 for v in levels):
        raise ValueError(f"consistency noise levels must be positive and decreasing, got {levels}")
    edm = ((1.0 - schedule.alphas_cumprod) / schedule.alphas_cumprod).sqrt()
    finite = edm[torch.isfinite(edm)]
    ts = [schedule.T - 1] + [int(torch.argmin((finite.log() - math.log(v)).abs())) for v in levels]
    x = x_T.float()
    x0 = x
    for i, t in enumerate(ts):
        if i > 0:
            a = _abar(schedule, t)
            x = a**0.5 * x0 + (1 - a) ** 0.5 * _randn_like(x0, generator)
        eps, pred = _predict(model, x, t, schedule)
        x0 = _x0(x, eps, _abar(schedule, t), clip, pred)
        if callback is not None:
            callback(i, t, x, x0)
    return x0


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ancestral": ancestral,
    "ddim": ddim,
    "langevin": langevin,
    "dpm-solver": dpm_solver,
    "consistency": consistency,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """The sampler called ``name`` (``ancestral``, ``ddim``, ``langevin``, ``dpm-solver``)."""
    key = name.replace("_", "-")
    if key not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[key]


# The registry above, DEFAULT_STEPS and STOCHASTIC are the one list of samplers: the commands'
# choices, the sweep's samplers and generate's seeding all derive from them.

# Steps a sampler runs when none are asked for: the full chain (None) for ancestral, few otherwise.
DEFAULT_STEPS: dict[str, int | None] = {"ancestral": None, "ddim": 50, "langevin": 250, "dpm-solver": 20,
                                        "consistency": 2}

# Whether a sampler adds fresh noise at every step (ddim too when its eta > 0), so its samples
# depend on the random generator beyond the starting noise.
STOCHASTIC: dict[str, bool] = {"ancestral": True, "ddim": False, "langevin": True, "dpm-solver": False,
                               "consistency": True}

# The sampler of a diffusion run when none is named: DPM-Solver++(2M) (Lu et al. 2022), whose 20
# steps match the ancestral chain's 1000 on our runs (docs/benchmarks.md); of a consistency run
# (ddpm distill): the consistency sampler.
DEFAULT_SAMPLER = "dpm-solver"
CONSISTENCY_SAMPLER = "consistency"

# Names in the registry's order, as the commands offer them; those that sample any diffusion run
# at any step count (the sweep's): all but the consistency sampler's 1 to 4 jumps.
SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
DIFFUSION_SAMPLERS: tuple[str, ...] = tuple(n for n in SAMPLERS if n != CONSISTENCY_SAMPLER)
assert set(DEFAULT_STEPS) == set(STOCHASTIC) == set(SAMPLERS), "a sampler is missing from a table"


def resolve_steps(name: str, steps: int | None, T: int, option: str = "--steps") -> int:
    """The number of steps sampler ``name`` runs on a schedule of ``T`` steps.

    ``steps=None`` is the sampler's default (:data:`DEFAULT_STEPS`), capped at ``T``. An explicit
    count outside ``1..T`` raises :class:`~ddpm.errors.DDPMError` naming ``option``: every command
    calls this as soon as it knows ``T``, before any sampling or reference statistics.
    """
    key = name.replace("_", "-")
    if key not in DEFAULT_STEPS:
        raise DDPMError(f"unknown sampler {name!r}; expected one of {', '.join(DEFAULT_STEPS)}")
    if steps is None:
        default = DEFAULT_STEPS[key]
        return T if default is None else min(default, T)
    if steps < 1:
        raise DDPMError(f"{option} must be at least 1, got {steps}")
    if steps > T:
        raise DDPMError(f"{option} {steps} exceeds this run's {T} diffusion steps; use at most {T}")
    if key == "consistency" and steps > max(CONSISTENCY_SIGMAS):
        raise DDPMError(f"{option} {steps}: the consistency sampler takes 1 to {max(CONSISTENCY_SIGMAS)} steps")
    return int(steps)


def model_evaluations(name: str, steps: int, corrector_steps: int = 1) -> int:
    """Network evaluations a sampler spends for ``steps`` steps (before guidance doubles them)."""
    if get_sampler(name) is langevin:
        return steps + corrector_steps * (steps - 1)
    return steps
