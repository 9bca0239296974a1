"""Schedule: the DDPM and cosine tables, the forward process, conversions, spacings, errors."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from ddpm import Schedule
from ddpm.core.schedule import SPACINGS

TABLES = ("betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2")


pytestmark = pytest.mark.usefixtures("one_thread")


def _cosine_betas_by_hand(T: int, s: float = 0.008, max_beta: float = 0.999) -> list[float]:
    """Nichol & Dhariwal 2021, eq. 17 and the text after it, written out with the math module."""
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    return [min(1 - f[t + 1] / f[t], max_beta) for t in range(T)]


# --------------------------------------------------------------------------------- the tables
def test_linear_schedule_is_the_ddpm_paper_schedule():
    s = Schedule.linear()
    assert s.T == 1000 and s.kind == "linear"
    assert s.betas.dtype == torch.float64
    assert s.betas[0].item() == 1e-4 and s.betas[-1].item() == 0.02
    # beta_t = 1e-4 + (0.02 - 1e-4) t / 999, computed independently in Python floats
    by_hand = torch.tensor([1e-4 + (0.02 - 1e-4) * t / 999 for t in range(1000)], dtype=torch.float64)
    assert torch.allclose(s.betas, by_hand, rtol=1e-14, atol=0)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(1 - by_hand, 0), rtol=1e-12, atol=0)
    # the paper's table: abar_T ~ 4.0e-5, so x_T is noise to within sqrt(abar_T) ~ 0.006
    assert 4.0e-5 < s.alphas_cumprod[-1].item() < 4.1e-5


def test_cosine_schedule_matches_nichol_dhariwal():
    s = Schedule.cosine(1000)
    by_hand = torch.tensor(_cosine_betas_by_hand(1000), dtype=torch.float64)
    assert torch.allclose(s.betas, by_hand, rtol=1e-12, atol=1e-15)
    # the last beta would be 1 (abar(T) = cos^2(pi/2) = 0): it is clipped at 0.999
    assert s.betas[-1].item() == 0.999
    assert s.betas.max().item() == 0.999
    # away from the clip, abar_t equals f(t) / f(0) exactly as the paper defines it
    f0 = math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    for t in (0, 10, 500, 900):
        f = math.cos(((t + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
        assert s.alphas_cumprod[t].item() == pytest.approx(f / f0, rel=1e-10)


@pytest.mark.parametrize("sched", [Schedule.linear(), Schedule.cosine(), Schedule.linear(T=10),
                                   Schedule.cosine(T=50), Schedule.from_betas([0.1, 0.2, 0.3])],
                         ids=["linear", "cosine", "linear10", "cosine50", "custom"])
def test_tables_are_float64_and_consistent(sched):
    for name in TABLES:
        table = getattr(sched, name)
        assert table.dtype == torch.float64, name
        assert table.shape == (sched.T,), name
        assert torch.isfinite(table).all(), name
    abar = sched.alphas_cumprod
    assert bool((abar[1:] < abar[:-1]).all()), "alphas_cumprod must be strictly decreasing"
    assert 0 < abar[-1] and abar[0] < 1
    assert torch.allclose(abar, torch.cumprod(1 - sched.betas, 0), rtol=1e-14, atol=0)
    assert sched.alphas_cumprod_prev[0] == 1 and torch.equal(sched.alphas_cumprod_prev[1:], abar[:-1])
    # the posterior variance lies between 0 and beta (beta-tilde <= beta, sec. 3.2)
    assert sched.posterior_variance[0] == 0
    assert bool((sched.posterior_variance <= sched.betas).all())


def test_schedule_is_frozen_and_copies_its_input():
    betas = torch.tensor([0.1, 0.2], dtype=torch.float64)
    s = Schedule.from_betas(betas)
    betas[0] = 0.5
    assert s.betas[0].item() == 0.1
    with pytest.raises(Exception):  # dataclasses.FrozenInstanceError
        s.betas = betas  # type: ignore[misc]


# ---------------------------------------------------------------------------- forward process
def test_add_noise_at_t0_is_x0_up_to_the_first_beta():
    s = Schedule.linear()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(16, 3, 8, 8, generator=g)
    xt = s.add_noise(x0, noise, torch.zeros(16, dtype=torch.long))
    b0 = 1e-4
    # x_0noised - x0 = (sqrt(1 - b0) - 1) x0 + sqrt(b0) noise, so it is bounded by:
    bound = math.sqrt(b0) * noise.abs() + (1 - math.sqrt(1 - b0)) * x0.abs()
    assert bool(((xt - x0).abs() <= bound + 1e-6).all())
    assert (xt - x0).abs().max() < 0.06  # |noise| < ~5.5 here, sqrt(b0) = 0.01


def test_add_noise_matches_eq4_and_broadcasts_per_sample():
    s = Schedule.cosine()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 998, 999])
    xt = s.add_noise(x0, noise, t)
    assert xt.dtype == torch.float32 and xt.shape == x0.shape
    for i, ti in enumerate(t.tolist()):
        a = s.alphas_cumprod[ti].item()
        assert torch.allclose(xt[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i], atol=1e-6)


def test_add_noise_has_the_marginal_variance():
    """x_t of unit-variance data has unit variance at every t (the process is variance preserving)."""
    s = Schedule.linear()
    g = torch.Generator().manual_seed(2)
    n = 200_000
    x0, noise = torch.randn(n, 1, generator=g), torch.randn(n, 1, generator=g)
    for t in (0, 300, 999):
        xt = s.add_noise(x0, noise, torch.full((n,), t))
        assert xt.var().item() == pytest.approx(1.0, abs=5 * math.sqrt(2 / n))


# ---------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_conversions_round_trip(kind):
    s = Schedule.from_name(kind)
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 10, 100, 500, 900, 998, 999, -1])
    x0 = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    xt = s.add_noise(x0, eps, t)
    tn = t[:-1]  # conversions that divide by sqrt(1 - abar) need t >= 0
    # float64 all the way, so the round trips are exact to ~1e-12 even where sqrt(abar) ~ 0.006
    assert torch.allclose(s.x0_from_eps(xt, t, eps), x0, atol=1e-10)
    assert torch.allclose(s.eps_from_x0(xt[:-1], tn, x0[:-1]), eps[:-1], atol=1e-10)
    v = s.v_from_eps(x0, eps, t)
    assert torch.allclose(s.eps_from_v(xt, t, v), eps, atol=1e-10)
    assert torch.allclose(s.x0_from_v(xt, t, v), x0, atol=1e-10)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0, and |v|^2-weighted: x_t, v is a rotation of x0, eps
    a, sig = s.alpha_sigma(t, x0)
    assert torch.allclose(v, a * eps - sig * x0, atol=1e-12)
    assert torch.allclose(xt**2 + v**2, x0**2 + eps**2, atol=1e-10)
    # score <-> eps: score = -eps / sqrt(1 - abar)
    score = s.score_from_eps(xt[:-1], tn, eps[:-1])
    assert torch.allclose(-score * sig[:-1], eps[:-1], atol=1e-12)
    # t = -1 means clean data: abar = 1
    assert torch.allclose(xt[-1], x0[-1]) and a[-1].item() == 1 and sig[-1].item() == 0


def test_t_minus_one_means_clean_data():
    """Regression: t = -1 ("before the first step", abar = 1) used to give sqrt(1 - abar) = 1
    instead of 0, so add_noise(x0, noise, -1) returned x0 + noise and eps_from_v / x0_from_v were
    wrong there."""
    s = Schedule.linear()
    g = torch.Generator().manual_seed(5)
    x0, noise = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    t = torch.tensor([-1, -1])
    a, sig = s.alpha_sigma(t, x0)
    assert bool((a == 1).all()) and bool((sig == 0).all())
    assert torch.equal(s.add_noise(x0, noise, t), x0)
    v = s.v_from_eps(x0, noise, t)
    assert torch.equal(v, noise)  # v = 1 * eps - 0 * x0
    assert torch.equal(s.x0_from_v(x0, t, v), x0)
    assert torch.equal(s.eps_from_v(x0, t, v), noise)
    assert torch.equal(s.x0_from_eps(x0, t, noise), x0)
    # mixed batches pick the right value per sample
    _, sig2 = s.alpha_sigma(torch.tensor([-1, 0]), x0)
    assert sig2[0].item() == 0 and sig2[1].item() == pytest.approx(1e-2)


def test_score_of_gaussian_data_is_the_analytic_score():
    """For x0 ~ N(mu, sigma^2), x_t ~ N(sqrt(abar) mu, abar sigma^2 + 1 - abar): its score is
    -(x - sqrt(abar) mu) / var, and the optimal eps is sqrt(1 - abar) (x - sqrt(abar) mu) / var."""
    s = Schedule.linear()
    mu, sigma = 0.3, 0.5
    t = torch.tensor([0, 200, 999])
    x = torch.linspace(-3, 3, 7, dtype=torch.float64).repeat(3, 1)
    abar = s.alphas_cumprod[t][:, None]
    var = abar * sigma**2 + 1 - abar
    eps = (1 - abar).sqrt() * (x - abar.sqrt() * mu) / var
    assert torch.allclose(s.score_from_eps(x, t, eps), -(x - abar.sqrt() * mu) / var, atol=1e-12)


def test_posterior_is_bayes_rule():
    """q(x_{t-1} | x_t, x0) from Bayes' rule with q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
    and q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): precisions add, means are precision-weighted."""
    s = Schedule.linear()
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([1, 2, 50, 999])
    x0 = torch.randn(4, 6, generator=g, dtype=torch.float64)
    xt = torch.randn(4, 6, generator=g, dtype=torch.float64)
    mean, var = s.posterior(x0, xt, t)
    ap, alpha, beta = s.alphas_cumprod[t - 1][:, None], s.alphas[t][:, None], s.betas[t][:, None]
    prec = 1 / (1 - ap) + alpha / beta
    assert torch.allclose(var, 1 / prec, rtol=1e-10)
    assert torch.allclose(mean, (ap.sqrt() * x0 / (1 - ap) + alpha.sqrt() * xt / beta) / prec, rtol=1e-10)
    # and at t = 0 the posterior collapses to x0: mean x0, variance 0
    m0, v0 = s.posterior(x0, xt, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(m0, x0) and bool((v0 == 0).all())


# ------------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize("sched", [
    Schedule.linear(), Schedule.linear(T=37, beta_start=3e-4, beta_end=0.05), Schedule.cosine(),
    Schedule.cosine(T=10, s=0.02, max_beta=0.5),
    Schedule.from_betas([0.1, 0.123456789012345678, 1 / 3, 0.999999]),
    Schedule.from_betas(torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 1e-6),
], ids=["linear", "linear-custom", "cosine", "cosine-custom", "custom", "custom-random"])
def test_to_dict_from_dict_round_trips_exactly(sched):
    d = sched.to_dict()
    for back in (Schedule.from_dict(d), Schedule.from_dict(json.loads(json.dumps(d)))):
        assert back == sched
        assert back.kind == sched.kind and back.params == sched.params
        for name in TABLES:
            assert torch.equal(getattr(back, name), getattr(sched, name)), name
        assert back.to_dict() == d
    assert Schedule.from_dict(d) is not sched and d == sched.to_dict()  # from_dict did not consume d


def test_equality_and_hash_follow_the_betas():
    assert Schedule.linear() == Schedule.from_betas(Schedule.linear().betas)
    assert hash(Schedule.linear()) == hash(Schedule.linear())
    assert Schedule.linear() != Schedule.cosine()
    assert Schedule.linear(T=10) != Schedule.linear(T=11)
    assert Schedule.linear() != "linear"


# -------------------------------------------------------------------------------------- spacing
def _check_timesteps(ts: torch.Tensor, steps: int, T: int, msg) -> None:
    assert ts.dtype == torch.int64, msg
    assert ts.shape == (steps,), msg
    assert bool((ts[1:] < ts[:-1]).all()), msg  # strictly decreasing, hence unique
    assert torch.unique(ts).numel() == steps, msg
    assert 0 <= ts.min().item() and ts.max().item() < T, msg


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_timesteps_every_step_count(kind, spacing):
    s = Schedule.from_name(kind)
    if spacing == "logsnr":
        # logsnr is a Python loop, ~10 ms for large counts: every count up to 100, then a fixed
        # random sample of the rest, and the extremes.
        rng = random.Random(0)
        counts = list(range(1, 101)) + rng.sample(range(101, 1000), 60) + [999, 1000]
    else:
        counts = range(1, 1001)
    for steps in counts:
        _check_timesteps(s.timesteps(steps, spacing), steps, 1000, (spacing, steps))


@pytest.mark.parametrize("T", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_small_T(T, spacing):
    s = Schedule.cosine(T)
    for steps in range(1, T + 1):
        _check_timesteps(s.timesteps(steps, spacing), steps, T, (T, spacing, steps))


def test_timesteps_endpoints_and_full_chain():
    s = Schedule.linear()
    full = torch.arange(999, -1, -1)
    for spacing in SPACINGS:
        assert torch.equal(s.timesteps(1000, spacing), full), spacing
    assert torch.equal(s.timesteps(), full)  # default: all T steps
    assert s.timesteps(10, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert s.timesteps(10, "leading").tolist() == list(range(900, -1, -100))
    assert s.timesteps(10, "trailing").tolist() == list(range(999, 0, -100))
    # logsnr starts from pure noise and its largest gaps are in the middle of the chain
    ls = s.timesteps(20, "logsnr")
    assert ls[0].item() == 999
    lam = 0.5 * torch.log(s.alphas_cumprod / (1 - s.alphas_cumprod))
    dl = lam[ls[1:]] - lam[ls[:-1]]
    assert bool((dl > 0).all())
    # even in lambda: the nearest-timestep rounding only perturbs the interior gaps a little
    assert (dl[1:-1].max() / dl[1:-1].min()).item() < 1.5


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("make,match", [
    (lambda: Schedule.linear(T=0), "T must be at least 1"),
    (lambda: Schedule.cosine(T=-3), "T must be at least 1"),
    (lambda: Schedule.from_betas([]), "non-empty 1-D"),
    (lambda: Schedule.from_betas([[0.1, 0.2]]), "non-empty 1-D"),
    (lambda: Schedule.from_betas([0.1, 0.0]), r"open interval \(0, 1\)"),
    (lambda: Schedule.from_betas([1.0, 0.1]), r"open interval \(0, 1\)"),
    (lambda: Schedule.from_betas([1.0]), r"open interval \(0, 1\)"),
    (lambda: Schedule.from_betas([0.1, float("nan")]), r"open interval \(0, 1\)"),
    (lambda: Schedule.linear(T=10, beta_start=0.0), r"open interval \(0, 1\)"),
    (lambda: Schedule.from_name("quadratic"), "unknown schedule 'quadratic'"),
    (lambda: Schedule.from_dict({"kind": "quadratic"}), "unknown schedule kind 'quadratic'"),
    (lambda: Schedule.from_dict({"T": 10}), "unknown schedule kind None"),
    (lambda: Schedule.linear(T=10).timesteps(0), "steps must be between 1 and T=10, got 0"),
    (lambda: Schedule.linear(T=10).timesteps(11), "steps must be between 1 and T=10, got 11"),
    (lambda: Schedule.linear(T=10).timesteps(5, "uniform"), "unknown spacing 'uniform'"),
])
def test_bad_input_raises_value_error_with_a_clear_message(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_tables_are_gathered_on_the_device_of_t_and_cached() -> None:
    """On a GPU, moving t to the CPU tables would sync every step; the tables come to t instead.
    The meta device stands in for a GPU here: no data, but devices and caching are real."""
    s = Schedule.linear(100)
    t = torch.tensor([0, 5, -1], device="meta")
    x = torch.empty(3, 3, 4, 4, device="meta")
    a, sig = s.alpha_sigma(t, x)
    assert a.device.type == sig.device.type == "meta" and a.shape == (3, 1, 1, 1)
    first = s._table("sqrt_alphas_cumprod", t)
    assert first.device.type == "meta" and s._table("sqrt_alphas_cumprod", t) is first
    assert s.sqrt_alphas_cumprod.device.type == "cpu"  # the CPU tables themselves are untouched
    cpu_t = torch.tensor([0, 5, -1])
    torch.testing.assert_close(s.alpha_sigma(cpu_t, torch.zeros(3, 1))[1].flatten(),
                               s.sqrt_one_minus_alphas_cumprod[[0, 5, 5]].float() * torch.tensor([1.0, 1.0, 0.0]))
