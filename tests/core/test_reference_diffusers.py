"""Reference tests: our schedule tables and sampler steps against Hugging Face diffusers.

diffusers' ``DDPMScheduler`` and ``DDIMScheduler`` are an independent implementation of the same
equations (Ho et al. 2020 eq. 6-7 and 15; Song et al. 2021 eq. 12 and 16). Given the same
timesteps, model outputs and noise, one step of ours must agree with one step of theirs.

Precision. diffusers keeps its tables in float32 (betas rounded to float32, cumprod in float32)
and computes ``1 - abar_t`` and ``1 - abar_t / abar_prev`` in float32, which near t = 0 (where
both are ~1e-4) loses ~ulp(1) / (1 - abar_t) ~ 1e-3 relative precision. We keep the tables in
float64 and only the update arithmetic in float32. So the step comparisons load our float64
tables into the diffusers schedulers (after checking that the tables agree to float32 rounding)
and feed them a float64 sample: diffusers then evaluates its own formulas in float64, and our
float32 result must agree to float32 precision (measured: <= 7e-7 on outputs of size ~5). One
test runs stock float32 diffusers with a tolerance derived from that cancellation. The x0
prediction divides by sqrt(abar_t) (~6e-3 at t = 999), which amplifies float32 rounding of
``x - sqrt(1 - abar) eps`` up to ~150x, hence its looser absolute bound at large t. (The DDPM
steps keep eps in float32: DDPMScheduler draws its noise in the model output's dtype, and a
float32 draw from the same seed is then exactly our noise.)

Known differences, all on diffusers' side and worked around here rather than copied:
- DDPMScheduler adds noise on the last step of a respaced chain that ends above t = 0 (for
  fixed_large: sqrt(1 - abar_t) of it); Algorithm 2 adds none on the step to clean data.
- DDIMScheduler steps to ``t - T // steps``, which is the next timestep of its own list only when
  the spacing is "leading" or ``steps`` divides T; our samplers always step to the next timestep.
- Timestep lists: rounding of exact .5 ties differs by one step for a few step counts, diffusers'
  "linspace" with one step is [0], and its "trailing" sometimes has steps + 1 entries.
"""

from __future__ import annotations

import math

import pytest
import torch

from ddpm import Schedule
from ddpm.core.samplers import ancestral, ancestral_step, ddim, ddim_step

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

T = 1000
SHAPE = (4, 3, 8, 8)
# One float32 step against a float64 evaluation: values up to ~5, so a few float32 ulps (~5e-7).
STEP_ATOL = 3e-6
STEP_RTOL = 1e-6


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.linear(T)


def _ddpm(variance_type: str = "fixed_small", clip: bool = False, spacing: str = "linspace",
          exact: bool = True) -> DDPMScheduler:
    ref = DDPMScheduler(
        num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
        variance_type=variance_type, clip_sample=clip, prediction_type="epsilon", timestep_spacing=spacing,
    )
    if exact:  # float64 tables (see the module docstring); step() reads only alphas_cumprod and one
        ref.alphas_cumprod = Schedule.linear(T).alphas_cumprod.clone()
        ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _ddim(spacing: str = "leading", exact: bool = True, clip: bool = False) -> DDIMScheduler:
    ref = DDIMScheduler(
        num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=clip,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", timestep_spacing=spacing,
    )
    if exact:  # step() reads alphas_cumprod and final_alpha_cumprod
        ref.alphas_cumprod = Schedule.linear(T).alphas_cumprod.clone()
        ref.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return ref


def _inputs(seed: int, shape=SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # x_t scaled up so clipping at +-1 really bites at small t; eps a plausible prediction.
    return 1.5 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def _x0_tol(t: int, sched: Schedule) -> float:
    # x0 = (x - sqrt(1 - abar) eps) / sqrt(abar): absolute error grows like 1 / sqrt(abar_t).
    return STEP_ATOL / math.sqrt(float(sched.alphas_cumprod[t]))


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float, atol: float, msg: object = "") -> None:
    """``|ours - theirs| <= atol + rtol |theirs|`` elementwise, compared in float64."""
    ours, theirs = ours.double(), theirs.double()
    err = (ours - theirs).abs()
    bound = atol + rtol * theirs.abs()
    excess = (err - bound).max().item()
    assert excess <= 0, f"{msg} max |diff| {err.max().item():.3e}, max excess over the bound {excess:.3e}"


_ABAR = Schedule.linear(T).alphas_cumprod


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed, deterministic, nonlinear stand-in for a trained eps network (t: [B] or 0-d).

    The optimal eps predictor for data ~ N(0, 0.5^2 I) plus a nonlinear perturbation: close
    enough to a real denoiser that the chains stay O(1) without clipping.
    """
    a = _ABAR[torch.as_tensor(t).reshape(-1)].to(torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
    return (1 - a).sqrt() * x / (0.25 * a + 1 - a) + 0.1 * torch.sin(3 * x) * (1 - a)


# ------------------------------------------------------------------------------------- tables
def test_schedule_tables_match_ddpm_scheduler(sched):
    ref = _ddpm(exact=False)
    # diffusers stores float32; ours are float64 from the same linspace, so they agree to float32 rounding.
    assert_close(sched.betas, ref.betas.double(), rtol=1e-6, atol=0)
    assert_close(sched.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-6, atol=0)
    # and ours is the more exact one: float64 cumprod of float64 betas
    exact = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
    assert torch.equal(sched.alphas_cumprod, exact)


@pytest.mark.parametrize("steps", [10, 20, 25, 50, 100, 250, 500, 1000])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_match_diffusers_spacing(sched, spacing, steps):
    ref = _ddpm(spacing=spacing, exact=False)
    ref.set_timesteps(steps)
    assert sched.timesteps(steps, spacing).tolist() == ref.timesteps.tolist()


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_timesteps_close_to_diffusers_for_every_step_count(sched, spacing):
    """For every step count the two conventions agree up to rounding of exact .5 ties (+-1).

    Known, accepted differences: diffusers' linspace with 1 step returns [0] (we return [T-1]:
    one step must start from noise), and its trailing np.arange with a float stride sometimes
    yields steps + 1 values (we cut to ``steps``).
    """
    ref = _ddpm(spacing=spacing, exact=False)
    for n in range(2, T + 1):
        ref.set_timesteps(n)
        theirs = ref.timesteps[:n]
        ours = sched.timesteps(n, spacing)
        assert (ours - theirs).abs().max() <= 1, (spacing, n)


# ------------------------------------------------------------------------------ single steps
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance,variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
@pytest.mark.parametrize("t", [999, 998, 700, 300, 50, 5, 1, 0])
def test_ancestral_step_matches_ddpm_scheduler_full_chain(sched, t, variance, variance_type, clip):
    ref = _ddpm(variance_type, clip)  # no set_timesteps: the full chain, previous timestep t - 1
    x, eps = _inputs(t)
    seed = 1000 + t
    out = ref.step(eps, t, x.double(), generator=torch.Generator().manual_seed(seed))
    # diffusers draws its noise with torch.randn(shape, generator, dtype=model_output.dtype) on the
    # CPU: eps stays float32, so this is the same draw.
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    x_prev, x0 = ancestral_step(x, eps, t, t - 1, sched, variance=variance, clip=clip, noise=noise)
    assert_close(x0, out.pred_original_sample, rtol=STEP_RTOL, atol=_x0_tol(t, sched))
    assert_close(x_prev, out.prev_sample, rtol=STEP_RTOL, atol=STEP_ATOL)
    if clip:
        assert x0.abs().max() <= 1.0


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance,variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
@pytest.mark.parametrize("spacing,steps", [("linspace", 10), ("leading", 50), ("trailing", 25), ("logsnr", 20)])
def test_ancestral_step_matches_ddpm_scheduler_respaced(sched, spacing, steps, variance, variance_type, clip):
    ts = sched.timesteps(steps, spacing)
    ref = _ddpm(variance_type, clip)
    ref.set_timesteps(timesteps=ts.tolist())  # custom timesteps: diffusers then steps along our list
    for i, t in enumerate(ts.tolist()):
        t_prev = ts[i + 1].item() if i + 1 < len(ts) else -1
        # the respaced chain: our t_prev is exactly diffusers' previous timestep
        assert int(ref.previous_timestep(t)) == t_prev
        x, eps = _inputs(10 * t + i)
        seed = 7 + t
        out = ref.step(eps, t, x.double(), generator=torch.Generator().manual_seed(seed))
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
        x_prev, x0 = ancestral_step(x, eps, t, t_prev, sched, variance=variance, clip=clip, noise=noise)
        expected = out.prev_sample
        if t_prev < 0 and t > 0:
            # The last step of a respaced chain that ends above t = 0. Algorithm 2 of the DDPM paper
            # adds no noise on the step to clean data (z = 0), and neither do we; diffusers adds
            # noise whenever t > 0: sqrt(1e-20) (negligible) for fixed_small, but sqrt(1 - abar_t)
            # for fixed_large. Compare the deterministic part: take their noise back out.
            var = float(ref._get_variance(t))
            expected = expected - math.sqrt(var) * noise
            assert var < 1e-19 if variance == "small" else var > 0
        assert_close(x0, out.pred_original_sample, rtol=STEP_RTOL, atol=_x0_tol(t, sched), msg=(t, t_prev))
        assert_close(x_prev, expected, rtol=STEP_RTOL, atol=STEP_ATOL, msg=(t, t_prev))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t", [999, 500, 20, 1])
def test_ddim_step_matches_ddim_scheduler_full_chain(sched, t, eta):
    ref = _ddim("leading")
    ref.set_timesteps(T)  # stride T // T = 1: the full chain
    x, eps = _inputs(t)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
    out = ref.step(eps.double(), t, x.double(), eta=eta, variance_noise=noise.double())
    x_prev, x0 = ddim_step(x, eps, t, t - 1, sched, eta=eta, clip=False, noise=noise)
    assert_close(x0, out.pred_original_sample, rtol=STEP_RTOL, atol=_x0_tol(t, sched))
    assert_close(x_prev, out.prev_sample, rtol=STEP_RTOL, atol=STEP_ATOL)


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("leading", 50), ("trailing", 20), ("trailing", 250)])
def test_ddim_step_matches_ddim_scheduler_respaced(sched, spacing, steps, eta):
    """DDIMScheduler steps to ``t - T // steps``; with these spacings (steps dividing T) that is
    exactly the next timestep of the list, which is what our samplers pass as ``t_prev``."""
    ts = sched.timesteps(steps, spacing)
    ref = _ddim(spacing)
    ref.set_timesteps(steps)
    assert ts.tolist() == ref.timesteps.tolist()
    for i, t in enumerate(ts.tolist()):
        t_prev = ts[i + 1].item() if i + 1 < len(ts) else -1
        assert max(t - T // steps, -1) == t_prev
        x, eps = _inputs(3 * t + i)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        out = ref.step(eps.double(), t, x.double(), eta=eta, variance_noise=noise.double())
        x_prev, x0 = ddim_step(x, eps, t, t_prev, sched, eta=eta, clip=False, noise=noise)
        assert_close(x0, out.pred_original_sample, rtol=STEP_RTOL, atol=_x0_tol(t, sched), msg=t)
        assert_close(x_prev, out.prev_sample, rtol=STEP_RTOL, atol=STEP_ATOL, msg=t)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_clipped_ddim_step_matches_diffusers_use_clipped_model_output(sched, eta):
    """With clip=True our ddim_step re-derives eps from the clipped x0 (documented); diffusers does
    the same only with ``use_clipped_model_output=True``, so that is the setting to compare with."""
    ref = _ddim("leading", clip=True)
    ref.set_timesteps(10)
    clipped_somewhere = False
    for t in ref.timesteps.tolist():
        x, eps = _inputs(t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
        out = ref.step(eps.double(), t, x.double(), eta=eta, use_clipped_model_output=True,
                       variance_noise=noise.double())
        x_prev, x0 = ddim_step(x, eps, t, t - 100, sched, eta=eta, clip=True, noise=noise)
        clipped_somewhere |= bool((sched.x0_from_eps(x, torch.tensor([t]), eps).abs() > 1).any())
        assert_close(x0, out.pred_original_sample, rtol=STEP_RTOL, atol=STEP_ATOL, msg=t)
        assert_close(x_prev, out.prev_sample, rtol=STEP_RTOL, atol=STEP_ATOL, msg=t)
    assert clipped_somewhere


@pytest.mark.parametrize("variance,variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
@pytest.mark.parametrize("t", [999, 500, 100, 20, 5, 1, 0])
def test_ancestral_step_matches_stock_float32_diffusers(sched, t, variance, variance_type):
    """Stock diffusers, float32 tables and arithmetic. Its ``1 - abar_t`` and
    ``1 - abar_t / abar_prev`` are rounded to ~ulp(1) = 1.2e-7 absolutely, i.e. 1.2e-7 / (1 - abar_t)
    relatively, and those coefficients multiply values up to max|x|: the bound is 2 ulps of that
    on top of a float32 step tolerance (measured: 2.7e-4 at t = 1, where 1 - abar_t = 2.2e-4)."""
    ref = _ddpm(variance_type, clip=False, exact=False)
    x, eps = _inputs(t)
    out = ref.step(eps, t, x, generator=torch.Generator().manual_seed(t))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(t))
    x_prev, x0 = ancestral_step(x, eps, t, t - 1, sched, variance=variance, clip=False, noise=noise)
    one_minus_abar = 1 - float(sched.alphas_cumprod[t])
    tol = 2e-5 + 2 * 2**-23 * float(x.abs().max()) / one_minus_abar
    assert_close(x_prev, out.prev_sample, rtol=1e-5, atol=tol)
    assert_close(x0, out.pred_original_sample, rtol=1e-5, atol=tol / math.sqrt(1 - one_minus_abar))


# ---------------------------------------------------------------------------------- full loops
def _diffusers_loop(ref, x: torch.Tensor, **step_kwargs) -> torch.Tensor:
    """diffusers' 4-line pipeline loop. The sample is carried in float64 (exact tables); the model
    returns float32, so diffusers draws its noise in float32, i.e. the same draws as ours."""
    x = x.double()
    for t in ref.timesteps:
        x = ref.step(fake_model(x.float(), t), t, x, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("variance,variance_type", [("small", "fixed_small"), ("large", "fixed_large")])
def test_ancestral_loop_matches_diffusers(sched, variance, variance_type, clip):
    """Ten respaced DDPM steps with a fixed fake model and the same generator seed.

    Both draw one torch.randn per step except the last (ours: t_prev < 0; theirs: t == 0, the
    last linspace timestep), so the same seed gives the same noise sequence.
    """
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    ref = _ddpm(variance_type, clip, spacing="linspace")
    ref.set_timesteps(10)
    theirs = _diffusers_loop(ref, x_T.clone(), generator=torch.Generator().manual_seed(42))
    ours = ancestral(fake_model, x_T, sched, steps=10, variance=variance, clip=clip,
                     generator=torch.Generator().manual_seed(42))
    # ten float32 steps of O(1) values: measured <= 3e-7; the bound allows ~10 ulps per step.
    assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_ancestral_full_1000_step_loop_matches_diffusers(sched):
    x_T = torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    ref = _ddpm("fixed_small", clip=False)
    ref.set_timesteps(T)
    theirs = _diffusers_loop(ref, x_T.clone(), generator=torch.Generator().manual_seed(5))
    ours = ancestral(fake_model, x_T, sched, clip=False, generator=torch.Generator().manual_seed(5))
    # 1000 float32 steps, each contracting towards the data: measured 1.2e-6.
    assert_close(ours, theirs, rtol=0, atol=2e-5)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("spacing,steps", [("leading", 10), ("trailing", 8)])
def test_ddim_loop_matches_diffusers(sched, eta, spacing, steps):
    """Our ddim() draws noise on every step but the last; DDIMScheduler also draws one on the last
    step (and multiplies it by sigma = 0). The extra draw comes last, so the sequences agree."""
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ref = _ddim(spacing)
    ref.set_timesteps(steps)
    theirs = _diffusers_loop(ref, x_T.clone(), eta=eta, generator=torch.Generator().manual_seed(9))
    ours = ddim(fake_model, x_T, sched, steps=steps, eta=eta, clip=False, spacing=spacing,
                generator=torch.Generator().manual_seed(9))
    assert_close(ours, theirs, rtol=0, atol=1e-5)  # measured <= 6e-7
