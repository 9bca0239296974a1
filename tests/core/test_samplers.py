"""Samplers: analytic tests with Gaussian data, determinism, reproducibility, callbacks, NFEs.

The analytic tests. For data x0 ~ N(mu, sigma^2 I) every marginal of the forward process is
Gaussian, x_t ~ N(sqrt(abar_t) mu, V_t I) with V_t = abar_t sigma^2 + 1 - abar_t, and the optimal
noise predictor (the minimiser of the DDPM loss) has the closed form

    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) mu) / V_t.

Running a sampler with eps* must then produce samples with mean ~mu and std ~sigma. "~" has two
parts, both derived here rather than tuned:

1. Sampling error. N = 2000 samples of 3x8x8 = 192 values, n = 384,000 values, independent
   (every sampler acts elementwise, except Langevin whose step size couples the 192 values of
   one sample weakly). Standard errors: mean s / sqrt(n), std s / sqrt(2n) (Gaussian), i.e.
   0.16% and 0.11% of sigma. We allow K_SE = 4 standard errors. (A deterministic sampler's
   output is an affine function of x_T, so its error is x_T's own sampling error, scaled: the
   same formulas hold, and all deterministic samplers share the one draw of x_T.)
2. Discretisation bias. With eps* every update is affine in x and the noise, so the exact
   output mean and variance of each sampler follow from a scalar recursion over its timesteps
   (``_theory_*`` below, written from the papers' equations, in float64). The results
   (linear schedule, T = 1000, mu = 0.3, sigma = 0.5; std bias relative to sigma):

       ancestral "small", 1000 steps   -0.78%   (posterior variance beta-tilde: under-disperses)
       ancestral "large", 1000 steps   +0.15%   (beta: over-disperses)
       ddim eta=0, 250 steps           -1.15%   mean -0.00094 (*)
       ddim eta=1, 250 steps           -2.84%
       langevin PC, 200 steps          +0.73%   (approximate: see _theory_langevin)
         snr 0.3 (200 / 100 x 2)       +4.9% / +4.5%
       dpm-solver++ 2M, 20 / 50 steps  +1.38% / +0.22%   mean -0.001 (as DDIM)
         25 steps, trailing spacing    -2.2%

   (*) x_T ~ N(0, 1) instead of the true N(sqrt(abar_T) mu, V_T): an ODE solver carries the offset
   through, -sigma sqrt(abar_T) mu / sqrt(V_T) = -0.00095; stochastic chains forget it.

   "small" under-disperses because beta-tilde is the reverse variance given x0 and ignores
   Var(x0 | x_t); "large" over-disperses because beta is the reverse variance for N(0, I) data,
   which is wider than sigma = 0.5. Ho et al. (sec. 3.2) note the two are the extremes; for
   this data the "~1%" is -0.8% and +0.15%, and the tests assert the sign of each.

Each analytic test asserts: (a) the theory's bias is within a documented bound, (b) the observed
mean and std are within K_SE standard errors plus the theory's bias of mu and sigma, and (c) the
stronger statement that they are within K_SE standard errors of the theory's exact prediction.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import Schedule
from ddpm import samplers as S

MU, SIGMA = 0.3, 0.5
SHAPE = (2000, 3, 8, 8)
K_SE = 4.0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.linear()


def gaussian_eps_model(schedule: Schedule, mu: float = MU, sigma: float = SIGMA):
    """The optimal eps predictor for data ~ N(mu, sigma^2 I): eps = c1[t] x - c0[t].

    The coefficients are computed in float64 and applied in float32 (the samplers' precision),
    so that a 1000-step chain over 384,000 values costs two elementwise ops per step.
    """
    a = schedule.alphas_cumprod
    v = a * sigma**2 + 1 - a
    c1 = ((1 - a).sqrt() / v).float()
    c0 = ((1 - a).sqrt() * a.sqrt() * mu / v).float()

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        return torch.addcmul(-c0[t].reshape(shape), c1[t].reshape(shape), x)

    return model


class CountingModel:
    """Wraps a model and records each call: its timesteps and a copy of its input."""

    def __init__(self, model):
        self.model = model
        self.calls: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.calls.append((t.tolist(), x.clone()))
        return self.model(x, t)


# ------------------------------------------------------------------------------ the theory
def _abar(s: Schedule, t: int) -> float:
    return 1.0 if t < 0 else float(s.alphas_cumprod[t])


def _x0_coefs(a: float, mu: float = MU, sigma: float = SIGMA) -> tuple[float, float]:
    """E[x0 | x_t] = p x_t + q for Gaussian data (the x0 that eps* implies, eq. 15)."""
    v = a * sigma**2 + 1 - a
    return math.sqrt(a) * sigma**2 / v, (1 - a) * mu / v


def _pairs(ts: list[int]):
    return [(t, ts[i + 1] if i + 1 < len(ts) else -1) for i, t in enumerate(ts)]


def _ancestral_update(s: Schedule, t: int, tp: int, variance: str, m: float, v: float) -> tuple[float, float]:
    """One step of Algorithm 2 of Ho et al. (respaced: beta = 1 - abar_t / abar_prev) on the mean m
    and variance v: x_{t_prev} = c0 x0_hat + cx x_t + sqrt(var) z (eq. 7), no noise on the last step."""
    a, ap = _abar(s, t), _abar(s, tp)
    beta = 1 - a / ap
    p, q = _x0_coefs(a)
    c0, cx = math.sqrt(ap) * beta / (1 - a), math.sqrt(1 - beta) * (1 - ap) / (1 - a)
    var = 0.0 if tp < 0 else (beta * (1 - ap) / (1 - a) if variance == "small" else beta)
    return (c0 * p + cx) * m + c0 * q, (c0 * p + cx) ** 2 * v + var


def _theory_ancestral(s: Schedule, ts: list[int], variance: str) -> tuple[float, float]:
    m, v = 0.0, 1.0  # x_T ~ N(0, 1)
    for t, tp in _pairs(ts):
        m, v = _ancestral_update(s, t, tp, variance, m, v)
    return m, v


def _theory_ddim(s: Schedule, ts: list[int], eta: float):
    """Song et al. 2021, eq. 12 with sigma_t(eta) of eq. 16."""
    m, v = 0.0, 1.0
    for t, tp in _pairs(ts):
        a, ap = _abar(s, t), _abar(s, tp)
        p, q = _x0_coefs(a)
        ep, eq = (1 - math.sqrt(a) * p) / math.sqrt(1 - a), -math.sqrt(a) * q / math.sqrt(1 - a)  # eps = ep x + eq
        sig = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        k = math.sqrt(1 - ap - sig**2)
        A, B = math.sqrt(ap) * p + k * ep, math.sqrt(ap) * q + k * eq
        m, v = A * m + B, A * A * v + sig**2
    return m, v


def _theory_dpm_solver(s: Schedule, ts: list[int], order: int = 2):
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2; deterministic, so track the output as an
    affine function A x_T + b of the starting noise (x_T ~ N(0, 1): mean b, variance A^2)."""
    x = (1.0, 0.0)
    prev_x0, prev_h = None, 0.0
    for t, tn in _pairs(ts):
        a = _abar(s, t)
        p, q = _x0_coefs(a)
        x0 = (p * x[0], p * x[1] + q)
        if tn < 0:
            x = x0
        else:
            an = _abar(s, tn)
            h = 0.5 * math.log(an / (1 - an)) - 0.5 * math.log(a / (1 - a))
            if order == 2 and prev_x0 is not None:
                r = prev_h / h
                d = tuple((1 + 1 / (2 * r)) * c - 1 / (2 * r) * cp for c, cp in zip(x0, prev_x0))
            else:
                d = x0
            ratio, k = math.sqrt((1 - an) / (1 - a)), -math.sqrt(an) * math.expm1(-h)
            x = (ratio * x[0] + k * d[0], ratio * x[1] + k * d[1])
            prev_h = h
        prev_x0 = x0
    return x[1], x[0] ** 2


def _theory_langevin(s: Schedule, ts: list[int], snr: float = 0.16, corrector_steps: int = 1, d: int = 3 * 8 * 8):
    """Predictor-corrector (Song et al. 2021, Alg. 5): Langevin corrector steps, then ancestral "small".

    With the optimal score, a corrector step is x' = x - e (x - c) / V + sqrt(2 e) z with c =
    sqrt(abar) mu and a per-sample step e = 2 alpha (snr |z| / |score|)^2 = k |z|^2 / |x - c|^2,
    k = 2 alpha snr^2 V^2. Writing u = |z|^2 / d and r = |x - c|^2 / d (per sample), the second
    moment obeys E[r'] = E[r] - 2k / V + (k^2 / V^2 + 2k) E[u^2] E[1 / r] (the cross term vanishes
    by symmetry of z); with u ~ chi2_d / d, E[u^2] = 1 + 2/d, and r concentrated at E[r] with the
    same relative spread, E[1/r] ~ (1 + 2/d) / E[r]. This is exact in the step size and to first
    order in 1/d; the neglected terms are O(1/d^2) (~1e-4 relative here), so the prediction
    carries a small allowance (LANGEVIN_MODEL_TOL). The k^2 / V^2 term is the unadjusted Langevin
    algorithm's own bias (~snr^2 in variance), the 1/d terms the price of a per-sample step size;
    both over-disperse, which the under-dispersing "small" predictor partly undoes.
    """
    m, v = 0.0, 1.0
    w = 1 + 2 / d
    for t, tp in _pairs(ts):
        a, ap = _abar(s, t), _abar(s, tp)
        if tp >= 0:
            V, c = a * SIGMA**2 + 1 - a, math.sqrt(a) * MU
            k = 2 * (a / ap) * snr**2 * V**2
            for _ in range(corrector_steps):
                r = v + (m - c) ** 2
                r_new = r - 2 * k / V + (k * k / V**2 + 2 * k) * w * w / r
                mc = (m - c) * (1 - k * w / (r * V))
                m, v = c + mc, r_new - mc**2
        m, v = _ancestral_update(s, t, tp, "small", m, v)
    return m, v


LANGEVIN_MODEL_TOL = 0.002  # relative to sigma, see _theory_langevin


# ------------------------------------------------------------------------- analytic tests
# name, sampler, kwargs, theory(schedule) -> (mean, var), bound on the std bias (lo, hi) relative
# to sigma, bound on |mean bias|, extra model tolerance.
ANALYTIC = [
    ("ancestral-small", S.ancestral, dict(variance="small"),
     lambda s: _theory_ancestral(s, s.timesteps().tolist(), "small"), (-0.01, 0.0), 1e-4, 0.0),
    ("ancestral-large", S.ancestral, dict(variance="large"),
     lambda s: _theory_ancestral(s, s.timesteps().tolist(), "large"), (0.0, 0.005), 1e-4, 0.0),
    ("ddim-eta0-250", S.ddim, dict(steps=250, eta=0.0),
     lambda s: _theory_ddim(s, s.timesteps(250).tolist(), 0.0), (-0.015, 0.0), 2e-3, 0.0),
    ("ddim-eta1-250", S.ddim, dict(steps=250, eta=1.0),
     lambda s: _theory_ddim(s, s.timesteps(250).tolist(), 1.0), (-0.035, 0.0), 1e-4, 0.0),
    ("langevin-200", S.langevin, dict(steps=200),
     lambda s: _theory_langevin(s, s.timesteps(200).tolist()), (-0.015, 0.015), 1e-4, LANGEVIN_MODEL_TOL),
    # a strong corrector: the Langevin bias dominates and the prediction must still hold
    ("langevin-200-snr0.3", S.langevin, dict(steps=200, snr=0.3),
     lambda s: _theory_langevin(s, s.timesteps(200).tolist(), snr=0.3), (0.03, 0.06), 1e-4, LANGEVIN_MODEL_TOL),
    ("langevin-100-snr0.3-x2", S.langevin, dict(steps=100, snr=0.3, corrector_steps=2),
     lambda s: _theory_langevin(s, s.timesteps(100).tolist(), snr=0.3, corrector_steps=2), (0.03, 0.06), 1e-4,
     LANGEVIN_MODEL_TOL),
    ("dpm-solver-20", S.dpm_solver, dict(steps=20),
     lambda s: _theory_dpm_solver(s, s.timesteps(20, "logsnr").tolist()), (0.0, 0.02), 2e-3, 0.0),
    ("dpm-solver-50", S.dpm_solver, dict(steps=50),
     lambda s: _theory_dpm_solver(s, s.timesteps(50, "logsnr").tolist()), (0.0, 0.005), 2e-3, 0.0),
    # uneven steps in lambda (r != 1) exercise the multistep extrapolation
    ("dpm-solver-25-trailing", S.dpm_solver, dict(steps=25, spacing="trailing"),
     lambda s: _theory_dpm_solver(s, s.timesteps(25, "trailing").tolist()), (-0.03, 0.0), 2e-3, 0.0),
]


@pytest.mark.parametrize("name,sampler,kwargs,theory,std_bias_bounds,mean_bias_bound,model_tol", ANALYTIC,
                         ids=[a[0] for a in ANALYTIC])
def test_sampler_reproduces_gaussian_data(sched, name, sampler, kwargs, theory, std_bias_bounds,
                                          mean_bias_bound, model_tol):
    th_mean, th_var = theory(sched)
    th_std = math.sqrt(th_var)
    # (a) the sampler's known discretisation bias is what we say it is
    lo, hi = std_bias_bounds
    assert lo <= th_std / SIGMA - 1 <= hi, f"{name}: theory std bias {th_std / SIGMA - 1:+.4f}"
    assert abs(th_mean - MU) <= mean_bias_bound, f"{name}: theory mean bias {th_mean - MU:+.5f}"

    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = sampler(gaussian_eps_model(sched), x_T, sched, clip=False, generator=torch.Generator().manual_seed(1),
                **kwargs)
    assert x.shape == SHAPE and x.dtype == torch.float32 and torch.isfinite(x).all()
    n = x.numel()
    mean, std = x.double().mean().item(), x.double().std().item()
    se_mean, se_std = th_std / math.sqrt(n), th_std / math.sqrt(2 * n)
    tol_mean, tol_std = K_SE * se_mean + model_tol * SIGMA, K_SE * se_std + model_tol * SIGMA
    report = f"{name}: mean {mean:.5f} (theory {th_mean:.5f}), std {std:.5f} (theory {th_std:.5f})"
    # (b) the data's mean and std, within sampling error plus the known bias
    assert abs(mean - MU) <= tol_mean + abs(th_mean - MU), report
    assert abs(std - SIGMA) <= tol_std + abs(th_std - SIGMA), report
    # (c) and, sharper, the exact prediction for this sampler within sampling error
    assert abs(mean - th_mean) <= tol_mean, report
    assert abs(std - th_std) <= tol_std, report


def test_ddim_eta1_over_the_full_chain_is_ancestral_small(sched):
    """DDIM's sigma(eta=1) is the DDPM posterior std, and its mean is the posterior mean written
    another way, and both samplers draw noise on the same steps: same seed, same samples."""
    model = gaussian_eps_model(sched)
    x_T = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    a = S.ancestral(model, x_T, sched, clip=False, generator=torch.Generator().manual_seed(3))
    b = S.ddim(model, x_T, sched, steps=1000, eta=1.0, clip=False, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a, b, atol=2e-5)


def test_dpm_solver_first_order_is_ddim(sched):
    """DPM-Solver++ of order 1 is DDIM (Lu et al. 2022, sec. 4.1): the same map on the same grid."""
    model = gaussian_eps_model(sched)
    x_T = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    for spacing in ("logsnr", "linspace"):
        a = S.dpm_solver(model, x_T, sched, steps=15, order=1, clip=False, spacing=spacing)
        b = S.ddim(model, x_T, sched, steps=15, eta=0.0, clip=False, spacing=spacing)
        assert torch.allclose(a, b, atol=1e-5), spacing


def _exact_ode_map(sched: Schedule, x_T: torch.Tensor) -> torch.Tensor:
    """For Gaussian data the probability-flow ODE maps N(sqrt(abar_T) mu, V_T) to N(mu, sigma^2) by
    the unique increasing affine map: its exact solution, whatever the discretisation."""
    a = float(sched.alphas_cumprod[-1])
    v = a * SIGMA**2 + 1 - a
    return MU + SIGMA * (x_T.double() - math.sqrt(a) * MU) / math.sqrt(v)


def test_deterministic_samplers_converge_to_the_exact_ode_solution(sched):
    model = gaussian_eps_model(sched)
    x_T = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    exact = _exact_ode_map(sched, x_T)

    def err(sampler, steps: int) -> float:
        return (sampler(model, x_T, sched, steps=steps, clip=False).double() - exact).abs().max().item()

    # DDIM is first order: doubling the steps halves the error (measured ratios 0.40 - 0.52)
    ddim_steps = [10, 20, 40, 80, 160]
    ddim_errs = [err(S.ddim, n) for n in ddim_steps]
    for e1, e2 in zip(ddim_errs, ddim_errs[1:]):
        assert 0.3 < e2 / e1 < 0.65, ddim_errs
    # DPM-Solver++(2M) is second order: 10x the steps, >= 33x less error (measured 240x, 20 -> 200)
    dpm_steps = [10, 20, 50, 100, 200]
    dpm_errs = [err(S.dpm_solver, n) for n in dpm_steps]
    assert all(e2 < e1 for e1, e2 in zip(dpm_errs, dpm_errs[1:])), dpm_errs
    assert dpm_errs[-1] / dpm_errs[1] < 0.03, dpm_errs
    # and far more accurate than DDIM at equal cost
    assert dpm_errs[2] < 0.1 * err(S.ddim, 50)
    # on a grid uneven in lambda (linspace in t) still second order: doubling the steps quarters
    # the error (measured ratios 0.25, 0.23; first order would be 0.5)
    lin = [err(lambda *a, **k: S.dpm_solver(*a, spacing="linspace", **k), n) for n in (50, 100, 200)]
    assert lin[1] / lin[0] < 0.32 and lin[2] / lin[1] < 0.32, lin


# ----------------------------------------------------------------- determinism, seeds, callback
def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A cheap, deterministic, nonlinear eps model."""
    return 0.5 * torch.tanh(x) + 0.01 * t.float().reshape(-1, *([1] * (x.ndim - 1))) / 1000


def test_ddim_eta0_is_deterministic(sched):
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(6))
    outs = [S.ddim(_toy_model, x_T, sched, steps=20, eta=0.0, generator=g)
            for g in (None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))]
    outs.append(S.ddim(_toy_model, x_T.clone(), sched, steps=20))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert not torch.equal(outs[0], S.ddim(_toy_model, x_T + 0.1, sched, steps=20))
    for g in (None, torch.Generator().manual_seed(7)):  # DPM-Solver is an ODE solver too
        assert torch.equal(S.dpm_solver(_toy_model, x_T, sched, steps=10, generator=g),
                           S.dpm_solver(_toy_model, x_T, sched, steps=10))


STOCHASTIC = [
    ("ancestral", S.ancestral, dict(steps=20)),
    ("ancestral-large", S.ancestral, dict(steps=20, variance="large")),
    ("ddim-eta1", S.ddim, dict(steps=20, eta=1.0)),
    ("langevin", S.langevin, dict(steps=20, corrector_steps=2)),
]


@pytest.mark.parametrize("name,sampler,kwargs", STOCHASTIC, ids=[s[0] for s in STOCHASTIC])
def test_generator_seed_makes_stochastic_samplers_reproducible(sched, name, sampler, kwargs):
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    a = sampler(_toy_model, x_T, sched, generator=torch.Generator().manual_seed(123), **kwargs)
    b = sampler(_toy_model, x_T, sched, generator=torch.Generator().manual_seed(123), **kwargs)
    c = sampler(_toy_model, x_T, sched, generator=torch.Generator().manual_seed(124), **kwargs)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3  # another seed, another chain
    # the global RNG is not used when a generator is given
    torch.manual_seed(0)
    d = sampler(_toy_model, x_T, sched, generator=torch.Generator().manual_seed(123), **kwargs)
    torch.manual_seed(999)
    e = sampler(_toy_model, x_T, sched, generator=torch.Generator().manual_seed(123), **kwargs)
    assert torch.equal(a, d) and torch.equal(a, e)


ALL = [
    ("ancestral", S.ancestral, dict(steps=7)),
    ("ddim", S.ddim, dict(steps=7, eta=0.3)),
    ("langevin", S.langevin, dict(steps=7)),
    ("dpm-solver", S.dpm_solver, dict(steps=7)),
]


@pytest.mark.parametrize("name,sampler,kwargs", ALL, ids=[s[0] for s in ALL])
def test_callback_called_once_per_step_with_the_right_arguments(sched, name, sampler, kwargs):
    x_T = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(9))
    model = CountingModel(_toy_model)
    seen: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
    out = sampler(model, x_T, sched, clip=False, generator=torch.Generator().manual_seed(0),
                  callback=lambda i, t, x, x0: seen.append((i, t, x.clone(), x0.clone())), **kwargs)
    spacing = "logsnr" if sampler is S.dpm_solver else "linspace"
    ts = sched.timesteps(7, spacing).tolist()
    assert [s[0] for s in seen] == list(range(7))
    assert [s[1] for s in seen] == ts
    assert all(isinstance(s[0], int) and isinstance(s[1], int) for s in seen)
    assert torch.equal(seen[-1][2], out)  # the last callback sees the returned sample
    # the x of step i is the sample the model sees at step i + 1 (its last evaluation of that step)
    last_input = {}
    for tt, xin in model.calls:
        last_input[tt[0]] = xin
    for (i, t, x, x0), t_next in zip(seen, ts[1:]):
        if sampler is not S.langevin:  # Langevin's corrector moves x before the predictor sees it
            assert torch.equal(last_input[t_next], x), (i, t)
    # x0 is the model's prediction of clean data at that step (clip=False): eq. 15 on its input
    for i, t, x, x0 in seen:
        xin = last_input[t]
        eps = _toy_model(xin, torch.full((3,), t))
        assert torch.allclose(x0, sched.x0_from_eps(xin, torch.full((3,), t), eps), atol=1e-5, rtol=1e-5), (i, t)
    assert seen[-1][2].shape == x_T.shape


@pytest.mark.parametrize("name", ["ancestral", "ddim", "langevin", "dpm-solver", "dpm_solver"])
@pytest.mark.parametrize("steps", [1, 2, 10, 33])
def test_model_evaluations_counts_calls(sched, name, steps):
    sampler = S.get_sampler(name)
    correctors = [0, 1, 3] if sampler is S.langevin else [1]
    for c in correctors:
        model = CountingModel(_toy_model)
        kwargs = {"corrector_steps": c} if sampler is S.langevin else {}
        sampler(model, torch.randn(2, 3, 4, 4), sched, steps=steps, generator=torch.Generator().manual_seed(0),
                **kwargs)
        assert len(model.calls) == S.model_evaluations(name, steps, corrector_steps=c), (name, steps, c)
        # one call per step at that step's timestep; Langevin adds c corrector calls before each
        # predictor call except the last step's
        ts = sched.timesteps(steps, "logsnr" if sampler is S.dpm_solver else "linspace").tolist()
        per_step = [c + 1] * (steps - 1) + [1] if sampler is S.langevin else [1] * steps
        assert [tt[0] for tt, _ in model.calls] == [t for t, k in zip(ts, per_step) for _ in range(k)]


def test_full_chain_by_default_and_explicit_timesteps(sched):
    model = CountingModel(_toy_model)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(10))
    S.ancestral(model, x_T, sched, generator=torch.Generator().manual_seed(0))
    assert [tt[0] for tt, _ in model.calls] == list(range(999, -1, -1))
    ts = torch.tensor([900, 500, 123, 7])
    model = CountingModel(_toy_model)
    a = S.ddim(model, x_T, sched, timesteps=ts)
    assert [tt[0] for tt, _ in model.calls] == ts.tolist()
    # explicit timesteps win over steps / spacing
    assert torch.equal(a, S.ddim(_toy_model, x_T, sched, steps=50, spacing="trailing", timesteps=ts))


def test_clip_keeps_x0_in_range_and_final_sample_in_range(sched):
    """With clip=True the x0 prediction is clamped to [-1, 1]; the last step returns it (DDIM,
    DPM-Solver) or the posterior mean with abar_prev = 1, i.e. x0 itself (ancestral)."""
    x_T = 3 * torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(11))
    wild = lambda x, t: -3 * x  # noqa: E731 - predicts absurd noise, so x0 falls far outside [-1, 1]
    for name, sampler, kwargs in ALL:
        x0s = []
        out = sampler(wild, x_T, sched, clip=True, generator=torch.Generator().manual_seed(0),
                      callback=lambda i, t, x, x0: x0s.append(x0), **kwargs)
        assert all(x0.abs().max() <= 1 for x0 in x0s), name
        assert out.abs().max() <= 1 + 1e-6, name
        unclipped = sampler(wild, x_T, sched, clip=False, generator=torch.Generator().manual_seed(0), **kwargs)
        assert unclipped.abs().max() > 1, name


def test_eps_model_adapts_v_prediction(sched):
    """A network predicting v = sqrt(abar) eps - sqrt(1 - abar) x0 gives back eps through eps_model."""
    g = torch.Generator().manual_seed(12)
    x0, eps = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 900, 999])
    xt = sched.add_noise(x0, eps, t)
    v_net = lambda x, tt: sched.v_from_eps(x0, eps, tt)  # noqa: E731 - a perfect v-network for this batch
    assert torch.allclose(S.eps_model(v_net, sched, "v")(xt, t), eps, atol=1e-5)
    x0_net = lambda x, tt: x0  # noqa: E731 - a perfect x0-network for this batch
    assert torch.allclose(S.eps_model(x0_net, sched, "x0")(xt, t), eps, atol=1e-4)
    assert torch.equal(S.eps_model(_toy_model, sched, "eps")(xt, t), _toy_model(xt, t))


@pytest.mark.parametrize("call,match", [
    (lambda s: S.get_sampler("euler"), "unknown sampler 'euler'"),
    (lambda s: S.model_evaluations("heun", 10), "unknown sampler 'heun'"),
    (lambda s: S.eps_model(_toy_model, s, "score"), "unknown prediction 'score'"),
    (lambda s: S.ancestral(_toy_model, torch.zeros(1, 1), s, steps=2, variance="medium"), "unknown variance"),
    (lambda s: S.ancestral(_toy_model, torch.zeros(1, 1), s, steps=0), "steps must be between 1 and T=1000"),
    (lambda s: S.ddim(_toy_model, torch.zeros(1, 1), s, steps=1001), "steps must be between 1 and T=1000"),
    (lambda s: S.ddim(_toy_model, torch.zeros(1, 1), s, spacing="cubic"), "unknown spacing 'cubic'"),
    (lambda s: S.ddim(_toy_model, torch.zeros(1, 1), s, timesteps=torch.tensor([5, 5, 1])), "strictly decreasing"),
    (lambda s: S.ddim(_toy_model, torch.zeros(1, 1), s, timesteps=torch.tensor([1000, 5])), r"\[0, 1000\)"),
    (lambda s: S.ddim(_toy_model, torch.zeros(1, 1), s, timesteps=torch.tensor([5, -1])), r"\[0, 1000\)"),
    (lambda s: S.langevin(_toy_model, torch.zeros(1, 1), s, steps=2, corrector_steps=-1), "corrector_steps"),
    (lambda s: S.dpm_solver(_toy_model, torch.zeros(1, 1), s, order=3), "order must be 1 or 2, got 3"),
])
def test_bad_sampler_input_raises_value_error(sched, call, match):
    with pytest.raises(ValueError, match=match):
        call(sched)


def test_every_list_of_samplers_comes_from_the_registry():
    import argparse

    from ddpm import samplers
    from ddpm.cli import app as cli
    from ddpm.sample.spec import SampleSpec
    from ddpm.scoring.evaluate import SweepGrid

    names = tuple(samplers.SAMPLERS)
    assert set(samplers.DEFAULT_STEPS) == set(samplers.STOCHASTIC) == set(names) == set(samplers.SAMPLER_NAMES)
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for command in ("sample", "eval"):
        action = next(a for a in sub.choices[command]._actions if a.dest == "sampler")
        assert tuple(action.choices) == names
    sweep = next(a for a in sub.choices["eval"]._actions if a.dest == "sweep_samplers")
    assert tuple(sweep.choices) == names
    # the sweep's default: every sampler of a diffusion run (the consistency one only when named)
    assert tuple(sweep.default) == tuple(SweepGrid().samplers) == samplers.DIFFUSION_SAMPLERS
    assert set(names) - set(samplers.DIFFUSION_SAMPLERS) == {samplers.CONSISTENCY_SAMPLER}
    assert tuple(n for n in names if SampleSpec(n).stochastic) == tuple(n for n in names if samplers.STOCHASTIC[n])


@pytest.mark.parametrize("name", S.SAMPLER_NAMES)
def test_a_sampler_called_without_steps_runs_the_commands_default(name: str) -> None:
    """``steps=None`` means DEFAULT_STEPS for the library functions too, as for ``ddpm sample``
    (langevin once ran all T steps when called directly and 250 from the command line)."""
    s = Schedule.linear(300)
    visited: list[int] = []
    S.get_sampler(name)(_toy_model, torch.zeros(1, 1), s, generator=torch.Generator().manual_seed(0),
                        callback=lambda i, t, x, x0: visited.append(t))
    assert len(visited) == S.resolve_steps(name, None, s.T) == (S.DEFAULT_STEPS[name] or s.T)
