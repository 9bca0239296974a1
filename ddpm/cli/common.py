"""What several commands share: the sampling flags of ``ddpm sample`` and ``ddpm eval`` (one
function adds them, one turns them into a :class:`~ddpm.sample.spec.SampleSpec`), and the one
place a sampling or scoring command resolves its :class:`~ddpm.runtime.policy.Runtime`."""

from __future__ import annotations

import argparse

from ..core.samplers import DEFAULT_STEPS, SAMPLER_NAMES
from ..runtime.policy import PRECISIONS, Runtime, resolve_runtime
from ..runtime.processes import Dist
from ..sample.spec import BATCH_SIZE, DEFAULT_SAMPLER, SampleSpec

__all__ = ["EXIT_OK", "EXIT_INTERNAL_ERROR", "EXIT_USER_ERROR", "EXIT_STOPPED", "EXIT_INTERRUPTED", "Formatter", "add_runtime_arguments", "add_sampling_arguments", "sample_spec", "command_runtime",
           "PRECISION_HELP"]

# The exit codes of every ddpm command (README, "Exit codes"), the same on every torchrun process.
EXIT_OK = 0  # finished: the command did all it was asked
EXIT_INTERNAL_ERROR = 1  # a bug: Python's traceback says where
EXIT_USER_ERROR = 2  # bad input or environment: one line says what and what was expected
EXIT_STOPPED = 3  # stopped early on request (SIGTERM, --time-limit), resumable: run the same command again
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

PRECISION_HELP = "fp32, or bf16 autocast; auto = bf16 on GPUs and on CPUs with native bf16"


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default; keeps the description's line breaks."""


def add_runtime_arguments(p: argparse.ArgumentParser, *, precision: bool = True) -> None:
    """``--device`` (and ``--precision``) as every command spells them."""
    p.add_argument("--device", default="auto", help="cpu, cuda or cuda:N; auto = cuda when available")
    if precision:
        p.add_argument("--precision", default="auto", choices=["auto", *PRECISIONS], help=PRECISION_HELP)


def add_sampling_arguments(p: argparse.ArgumentParser, *, guidance: float) -> None:
    """The flags of a :class:`SampleSpec` (sampler, steps, guidance, eta, seed, EMA, batch size),
    with ``guidance`` as the default guidance scale, plus the runtime flags."""
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES,
                   help=f"sampling method: ancestral (Ho et al. 2020), ddim (Song et al. 2021), langevin "
                        f"(predictor-corrector, Song et al. 2021), dpm-solver (DPM-Solver++(2M), Lu et al. 2022), "
                        f"consistency (Song et al. 2023; for runs tuned by ddpm distill) (unset: {DEFAULT_SAMPLER}, "
                        f"or consistency for a distilled run)")
    defaults = ", ".join(f"{name} {'all T' if k is None else k}" for name, k in DEFAULT_STEPS.items())
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps (default: {defaults}; at most T)")
    p.add_argument("--guidance", type=float, default=guidance,
                   help="guidance scale s: eps = eps_uncond + s (eps_cond - eps_uncond); 1 = conditional, "
                        "0 = unconditional (Ho & Salimans 2022)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed: image i's starting noise (and a stochastic sampler's noise) comes from a "
                        "generator of its own seeded by (seed, i), so it is the same at any --batch-size and --n")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="images sampled at once (speed and memory only: the images do not depend on it)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, call the network eagerly instead of replaying it from CUDA graphs (the default "
                        "there: one launch per network evaluation)")
    add_runtime_arguments(p)


def sample_spec(args: argparse.Namespace) -> SampleSpec:
    """The :class:`SampleSpec` of the flags :func:`add_sampling_arguments` added (checked there:
    one line for a bad value); an unset ``--sampler`` is the diffusion default here, which a
    command that has loaded its run replaces by the run's own (``RunConfig.default_sampler``)."""
    return SampleSpec(sampler=args.sampler or DEFAULT_SAMPLER, steps=args.steps, guidance=args.guidance, seed=args.seed,
                      use_ema=not args.no_ema, batch_size=args.batch_size, eta=args.eta)


def command_runtime(args: argparse.Namespace, d: Dist, *, progress: bool = True) -> Runtime:
    """The runtime of a sampling or scoring command, resolved once from ``--device`` and
    ``--precision`` (``auto`` where the command has no ``--precision``) for this process of ``d``;
    progress bars only on rank 0."""
    return resolve_runtime(args.device, getattr(args, "precision", "auto"), local_rank=d.local_rank, world=d.world,
                           progress=progress and d.main,
                           cuda_graphs=False if getattr(args, "no_cuda_graphs", False) else None)
