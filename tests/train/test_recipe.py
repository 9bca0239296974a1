"""The training recipe's options: schedules (sigmoid, log-SNR shift, zero terminal SNR), network
targets (eps, v, x0), loss weightings, noise-level densities, learning-rate and EMA schedules.

Closed forms are written out here independently of the library; the Gaussian tests use data
x0 ~ N(mu, sigma^2), whose optimal denoiser is known exactly (see tests/core/test_samplers.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import Schedule
from ddpm import samplers as S
from ddpm.core.ema import edm_ema_decay
from ddpm.core.losses import diffusion_loss, loss_weights, sample_timesteps, timestep_probabilities
from ddpm.train import TrainConfig, lr_at

pytestmark = pytest.mark.usefixtures("one_thread")

MU, SIGMA = 0.3, 0.5


# ------------------------------------------------------------------------------ schedules
def test_sigmoid_schedule_matches_its_closed_form():
    T, start, end, tau = 1000, -3.0, 3.0, 1.0
    s = Schedule.sigmoid(T, start, end, tau)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    f = lambda u: (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))  # noqa: E731
    for t in (0, 1, 100, 500, 900, 990):  # betas below the 0.999 cap up to here
        assert math.isclose(float(s.alphas_cumprod[t]), f((t + 1) / T) / f(0), rel_tol=1e-9), t
    assert float(s.betas.max()) <= 0.999
    assert Schedule.from_dict(s.to_dict()) == s and s.to_dict()["kind"] == "sigmoid"


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("shift", [-1.3862943611198906, 0.7])
def test_shifted_schedule_is_the_base_log_snr_plus_the_shift(name, shift):
    base, shifted = Schedule.from_name(name), Schedule.from_name(name, logsnr_shift=shift)
    diff = shifted.log_snr - base.log_snr
    assert torch.allclose(diff, torch.full_like(diff, shift), atol=1e-7), (diff.min(), diff.max())
    assert Schedule.from_dict(shifted.to_dict()) == shifted


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_zero_terminal_snr_ends_at_exactly_zero_signal(name):
    base, z = Schedule.from_name(name), Schedule.from_name(name, zero_terminal_snr=True)
    assert float(z.alphas_cumprod[-1]) == 0.0 and float(z.sqrt_alphas_cumprod[-1]) == 0.0
    assert float(z.betas[-1]) == 1.0 and z.zero_terminal_snr and not base.zero_terminal_snr
    assert z.log_snr[-1] == -math.inf and torch.isfinite(z.log_snr[:-1]).all()
    # Lin et al. 2023, Algorithm 1: sqrt(abar) mapped affinely, first value kept, last sent to 0
    r0 = base.sqrt_alphas_cumprod
    expected = (r0 - r0[-1]) * r0[0] / (r0[0] - r0[-1])
    assert torch.allclose(z.sqrt_alphas_cumprod, expected, atol=1e-12)
    assert float(z.posterior_variance[-1]) > 0 and torch.isfinite(z.posterior_log_variance_clipped).all()
    ts = z.timesteps(20, "logsnr")
    assert int(ts[0]) == z.T - 1 and bool((ts[1:] < ts[:-1]).all())
    assert Schedule.from_dict(z.to_dict()) == z


# -------------------------------------------------------------------- exact Gaussian denoiser
def _gaussian(schedule: Schedule, prediction: str, mu: float = MU, sigma: float = SIGMA):
    """The optimal network for data ~ N(mu, sigma^2) predicting ``prediction`` (float64 maths)."""
    a = schedule.alphas_cumprod
    var = a * sigma**2 + 1 - a
    # x0* = E[x0 | x_t] = mu + sqrt(a) sigma^2 (x_t - sqrt(a) mu) / var
    p = (a.sqrt() * sigma**2 / var)
    q = mu - p * a.sqrt() * mu

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shape = (-1, *([1] * (x.ndim - 1)))
        at, pt, qt = a[t].reshape(shape), p[t].reshape(shape), q[t].reshape(shape)
        xd = x.double()
        x0 = pt * xd + qt
        if prediction == "x0":
            out = x0
        else:
            eps = (xd - at.sqrt() * x0) / (1 - at).sqrt()
            out = eps if prediction == "eps" else at.sqrt() * eps - (1 - at).sqrt() * x0
        return out.float()

    return net


SAMPLER_CASES = [("ddim-100", S.ddim, dict(steps=100)), ("dpm-solver-20", S.dpm_solver, dict(steps=20)),
                 ("ancestral-250", S.ancestral, dict(steps=250)), ("langevin-100", S.langevin, dict(steps=100))]


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("name,sampler,kwargs", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_every_target_samples_like_the_eps_network(prediction, name, sampler, kwargs):
    """The same exact denoiser written as v or x0, through eps_model, gives eps's samples."""
    sched = Schedule.linear()
    x_T = torch.randn(256, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    ref = sampler(_gaussian(sched, "eps"), x_T, sched, clip=False, generator=torch.Generator().manual_seed(1), **kwargs)
    out = sampler(S.eps_model(_gaussian(sched, prediction), sched, prediction), x_T, sched, clip=False,
                  generator=torch.Generator().manual_seed(1), **kwargs)
    assert torch.allclose(out, ref, atol=2e-3), (out - ref).abs().max()


@pytest.mark.parametrize("prediction", ["v", "x0"])
@pytest.mark.parametrize("name,sampler,kwargs", SAMPLER_CASES, ids=[c[0] for c in SAMPLER_CASES])
def test_zero_terminal_snr_samplers_reproduce_gaussian_data(prediction, name, sampler, kwargs):
    """At zero terminal SNR x_T ~ N(0, I) is exactly the last marginal; nothing divides by alpha = 0."""
    sched = Schedule.sigmoid(zero_terminal_snr=True)
    x_T = torch.randn(2000, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = sampler(S.eps_model(_gaussian(sched, prediction), sched, prediction), x_T, sched, clip=False,
                generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.isfinite(x).all()
    mean, std = x.double().mean().item(), x.double().std().item()
    # 384,000 values: standard errors 0.0008 (mean) and 0.0006 (std); the rest is each sampler's
    # discretisation bias, under 2% of sigma at these step counts (see tests/core/test_samplers.py).
    assert abs(mean - MU) < 0.004 and abs(std / SIGMA - 1) < 0.02, (mean, std)


def test_eps_networks_are_refused_at_zero_snr():
    sched = Schedule.linear(zero_terminal_snr=True)
    with pytest.raises(ValueError, match="zero-SNR"):
        S.ddim(S.eps_model(_gaussian(sched, "eps"), sched, "eps"), torch.zeros(2, 1), sched, steps=5)
    with pytest.raises(ValueError, match="zero-SNR"):
        S.ddim(_gaussian(sched, "eps"), torch.zeros(2, 1), sched, steps=5)
    with pytest.raises(ValueError, match="zero-terminal-SNR"):
        diffusion_loss(_gaussian(sched, "eps"), sched, torch.zeros(2, 1), prediction="eps")


# ------------------------------------------------------------------------------ the losses
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights_equal_their_closed_forms(prediction):
    sched = Schedule.cosine()
    t = torch.tensor([0, 50, 200, 500, 800, 999])
    gamma = 5.0
    w = loss_weights(sched, t, prediction, "min-snr", gamma)
    for ti, wi in zip(t.tolist(), w.tolist()):
        a = float(sched.alphas_cumprod[ti])
        snr = a / (1 - a)
        expected = {"eps": min(snr, gamma) / snr, "v": min(snr, gamma) / (snr + 1), "x0": min(snr, gamma)}[prediction]
        assert math.isclose(wi, expected, rel_tol=1e-5), (ti, wi, expected)
    assert torch.equal(loss_weights(sched, t, prediction, "uniform"), torch.ones(6))


def test_min_snr_loss_is_the_same_x0_loss_whatever_the_target():
    """Min-SNR-gamma weights make every target's loss min(SNR, gamma) ||x0 - x0_hat||^2 (Hang et
    al. 2023, with the v correction): feed each target the output that implies one x0_hat."""
    sched = Schedule.sigmoid()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1, torch.randn(6, 3, 4, 4, generator=g)
    x0_hat = x0 + 0.1 * torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([3, 100, 300, 500, 700, 950])
    x_t = sched.add_noise(x0, noise, t)
    outputs = {"x0": x0_hat, "eps": sched.eps_from_x0(x_t, t, x0_hat)}
    outputs["v"] = sched.v_from_eps(x0_hat, outputs["eps"], t)
    snr = sched.log_snr[t].exp()
    expected = snr.clamp(max=5.0) * (x0 - x0_hat).pow(2).flatten(1).mean(1).double()
    for prediction, out in outputs.items():
        loss = diffusion_loss(lambda x, tt, o=out: o, sched, x0, prediction=prediction, weighting="min-snr",
                              t=t, noise=noise)
        assert torch.allclose(loss.double(), expected, rtol=2e-3), prediction


def test_lognormal_density_is_normal_mass_per_log_snr_interval():
    from scipy.stats import norm

    sched = Schedule.linear()
    p = timestep_probabilities(sched, "lognormal", mean=1.0, std=2.0)
    assert p.dtype == torch.float64 and p.shape == (1000,) and math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)
    lam = sched.log_snr.numpy()
    for t in (10, 300, 600):  # the mass between the midpoints to the neighbours
        hi, lo = (lam[t - 1] + lam[t]) / 2, (lam[t] + lam[t + 1]) / 2
        assert math.isclose(float(p[t]), norm.cdf(hi, 1.0, 2.0) - norm.cdf(lo, 1.0, 2.0), rel_tol=1e-6)
    # the tails go to the ends
    assert math.isclose(float(p[0]), norm.sf((lam[0] + lam[1]) / 2, 1.0, 2.0), rel_tol=1e-6)
    assert torch.equal(timestep_probabilities(sched, "uniform"), torch.full((1000,), 1e-3, dtype=torch.float64))
    # a zero-SNR end takes the lower tail, and no probability is NaN
    pz = timestep_probabilities(Schedule.sigmoid(zero_terminal_snr=True), "lognormal")
    assert torch.isfinite(pz).all() and math.isclose(float(pz.sum()), 1.0, rel_tol=1e-12)


def test_drawn_timesteps_follow_the_probabilities():
    sched = Schedule.cosine(T=50)
    p = timestep_probabilities(sched, "lognormal", 0.0, 1.5)
    n = 200_000
    t = sample_timesteps(p, 50, n, torch.Generator().manual_seed(0), torch.device("cpu"))
    freq = torch.bincount(t, minlength=50).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert bool(((freq - p).abs() <= 5 * se + 1e-9).all())


CASES = [("eps", "uniform", "uniform"), ("v", "uniform", "uniform"), ("x0", "uniform", "uniform"),
         ("eps", "min-snr", "uniform"), ("v", "min-snr", "lognormal"), ("x0", "min-snr", "lognormal"),
         ("v", "uniform", "lognormal")]


@pytest.mark.parametrize("prediction,weighting,t_sampling", CASES)
def test_loss_minimiser_is_the_exact_gaussian_denoiser(prediction, weighting, t_sampling):
    """Train a per-timestep affine network ``a[t] x + b[t]`` (the family the exact denoiser lives
    in) on Gaussian data with each target, weighting and density; it must converge to the exact
    denoiser's coefficients, and DDIM with it must reproduce the data's mean and std."""
    sched = Schedule.cosine(T=40)
    exact = _gaussian(sched, prediction)
    # exact coefficients of the target: out = A[t] x + B[t]
    zeros, ones = torch.zeros(40, 1), torch.ones(40, 1)
    tt = torch.arange(40)
    B = exact(zeros, tt).double().squeeze(1)
    A = exact(ones, tt).double().squeeze(1) - B
    a_p = torch.zeros(40, requires_grad=True)
    b_p = torch.zeros(40, requires_grad=True)
    net = lambda x, t: a_p[t].reshape(-1, 1) * x + b_p[t].reshape(-1, 1)  # noqa: E731
    probs = None if t_sampling == "uniform" else timestep_probabilities(sched, t_sampling, 0.0, 3.0)
    opt = torch.optim.Adam([a_p, b_p], lr=0.05)
    g = torch.Generator().manual_seed(0)
    avg_a, avg_b = torch.zeros(40), torch.zeros(40)
    for step in range(800):
        x0 = MU + SIGMA * torch.randn(4096, 1, generator=g)
        loss = diffusion_loss(net, sched, x0, prediction=prediction, weighting=weighting, t_probabilities=probs,
                              generator=g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (300, 500):
            for group in opt.param_groups:
                group["lr"] *= 0.2
        if step >= 600:  # average the last iterates: SGD noise, not bias, is what remains
            avg_a += a_p.detach() / 200
            avg_b += b_p.detach() / 200
    seen = (probs if probs is not None else torch.full((40,), 1 / 40)) > 0.01
    # x0 targets are hopeless at the noisiest steps (the target ignores x_t there): compare in
    # x0 units, where every target's error means the same thing.
    def to_x0(coef_a, coef_b):
        x = torch.linspace(-2, 2, 5, dtype=torch.float64).reshape(1, -1)
        out = coef_a.reshape(-1, 1) * x + coef_b.reshape(-1, 1)
        a = sched.alphas_cumprod.reshape(-1, 1)
        if prediction == "x0":
            return out
        if prediction == "eps":
            return (x - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * x - (1 - a).sqrt() * out

    err = (to_x0(avg_a.double(), avg_b.double()) - to_x0(A, B)).abs().max(1).values
    assert bool((err[seen & (sched.alphas_cumprod > 0.1)] < 0.02).all()), err
    with torch.no_grad():
        a_p.copy_(avg_a)
        b_p.copy_(avg_b)
    learned = S.eps_model(lambda x, t: net(x.reshape(-1, 1), t).reshape(x.shape).detach(), sched, prediction)
    x = S.ddim(learned, torch.randn(20000, 1, generator=torch.Generator().manual_seed(5)), sched, steps=40,
               clip=False)
    assert abs(x.mean().item() - MU) < 0.03 and abs(x.std().item() / SIGMA - 1) < 0.05, (x.mean(), x.std())


# -------------------------------------------------------------------- learning rate and EMA
def test_learning_rate_schedules_follow_their_formulas():
    c = TrainConfig(lr=1e-3, warmup=10, steps=110, lr_schedule="constant")
    assert math.isclose(lr_at(0, c), 1e-4) and math.isclose(lr_at(9, c), 1e-3) and lr_at(100, c) == 1e-3
    c = TrainConfig(lr=1e-3, warmup=0, steps=100, lr_schedule="cosine")
    for step in (0, 25, 50, 75, 100):
        assert math.isclose(lr_at(step, c), 1e-3 * 0.5 * (1 + math.cos(math.pi * step / 100)), abs_tol=1e-15)
    c = TrainConfig(lr=1e-3, warmup=20, steps=100, lr_schedule="linear")
    assert math.isclose(lr_at(4, c), 1e-3 * (5 / 20) * (1 - 4 / 100))
    assert math.isclose(lr_at(60, c), 1e-3 * 0.4)
    # a time limit that ends first sets the progress: 3 of 10 minutes gone
    c = TrainConfig(lr=1e-3, warmup=0, steps=10**9, time_limit=10.0, lr_schedule="cosine")
    assert math.isclose(lr_at(7, c, elapsed_s=180.0), 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.3)))
    assert lr_at(7, c, elapsed_s=900.0) == 0.0


def test_edm_ema_half_life_grows_with_the_images_seen():
    # 0.05 x 6,400 images = half-life 320 images = 10 steps of 32
    assert math.isclose(edm_ema_decay(6400, 32, 500.0, 0.05), 0.5 ** (32 / 320))
    # capped at 500k images
    assert math.isclose(edm_ema_decay(10**9, 32, 500.0, 0.05), 0.5 ** (32 / 500_000))
    assert math.isclose(edm_ema_decay(10**9, 32, 2.0, 0.0), 0.5 ** (32 / 2000))
    d = edm_ema_decay(6400, 32)
    assert math.isclose(d ** 10, 0.5, rel_tol=1e-12)  # ten steps halve the old weights' share
    with pytest.raises(ValueError):
        edm_ema_decay(100, 0)
