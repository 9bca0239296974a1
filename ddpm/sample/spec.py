"""The sampling request as one validated value: which sampler, how many steps, what guidance
scale, which seed, EMA or raw weights, how many images at once, and the sampler's options.

``ddpm sample``, ``ddpm eval`` (and its sweep: a list of specs), the memorisation check, the
trainer's sample grids and its in-training FID each build one :class:`SampleSpec` and hand it
to :func:`ddpm.sample.engine.generate`; every check of a sampling option is made here, once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..core.samplers import DEFAULT_SAMPLER, DEFAULT_STEPS, MAX_SEED, STOCHASTIC, model_evaluations, resolve_steps
from ..errors import DDPMError

__all__ = ["SampleSpec", "BATCH_SIZE", "DEFAULT_SAMPLER"]

# Images sampled at once unless asked otherwise (speed and memory only: every image has its own noise).
BATCH_SIZE = 64


@dataclass(frozen=True)
class SampleSpec:
    """How to sample (not how many images, nor which classes: those are the call's).

    ``sampler``: a name of :data:`ddpm.core.samplers.SAMPLERS` (``ancestral`` is Ho et al. 2020's
    chain, ``ddim`` Song et al. 2021, ``langevin`` Song et al. 2021's predictor-corrector,
    ``dpm-solver`` DPM-Solver++(2M));
    ``steps``: sampler steps, None for the sampler's default (:func:`for_run` fixes it against T);
    ``guidance``: the classifier-free guidance scale w of ``eps_uncond + w (eps_cond - eps_uncond)``
    (Ho & Salimans 2022; 1 = plain conditional sampling), applied to conditional runs only;
    ``seed``: images are seeded one by one from it (:func:`ddpm.core.samplers.image_seed`);
    ``use_ema``: sample the EMA weights (else the raw ones); ``batch_size``: images through the
    network at once (speed and memory only); ``eta``: DDIM's noise scale (0 = deterministic);
    ``clip``: clip the predicted x0 to [-1, 1] at every step.

    Raises :class:`DDPMError` (one line, naming the flag) for an unknown sampler, steps below 1,
    a non-finite guidance scale or eta, a negative eta, a seed outside 0 .. MAX_SEED or a batch
    size below 1.
    """

    sampler: str = DEFAULT_SAMPLER
    steps: int | None = None
    guidance: float = 1.0
    seed: int = 0
    use_ema: bool = True
    batch_size: int = BATCH_SIZE
    eta: float = 0.0
    clip: bool = True

    def __post_init__(self) -> None:
        name = self.sampler.replace("_", "-")
        if name not in DEFAULT_STEPS:
            raise DDPMError(f"unknown sampler {self.sampler!r}; expected one of {', '.join(DEFAULT_STEPS)}")
        object.__setattr__(self, "sampler", name)
        if self.steps is not None and self.steps < 1:
            raise DDPMError(f"--steps must be at least 1, got {self.steps}")
        if not math.isfinite(self.guidance):
            raise DDPMError(f"--guidance must be a finite number, got {self.guidance}")
        if not math.isfinite(self.eta) or self.eta < 0:
            raise DDPMError(f"--eta must be a finite number >= 0, got {self.eta}")
        if not 0 <= self.seed <= MAX_SEED:
            raise DDPMError(f"--seed must be from 0 to {MAX_SEED}, got {self.seed}")
        if self.batch_size < 1:
            raise DDPMError(f"--batch-size must be at least 1, got {self.batch_size}")

    def for_run(self, T: int) -> "SampleSpec":
        """This spec with ``steps`` fixed for a schedule of ``T`` steps: the sampler's default
        (capped at T) when None. Raises :class:`DDPMError` for steps above T, before any work."""
        return replace(self, steps=resolve_steps(self.sampler, self.steps, T))

    def with_(self, **changes: Any) -> "SampleSpec":
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options the sampler function takes beyond the common ones."""
        return {"eta": self.eta} if self.sampler == "ddim" else {}

    @property
    def stochastic(self) -> bool:
        """Whether the sampler adds fresh noise at every step (ddim with eta > 0 too)."""
        return STOCHASTIC[self.sampler] or (self.sampler == "ddim" and self.eta > 0)

    def nfe(self, T: int) -> int:
        """Network evaluations per image on a schedule of ``T`` steps, before guidance doubles them."""
        return model_evaluations(self.sampler, self.for_run(T).steps or 1)
