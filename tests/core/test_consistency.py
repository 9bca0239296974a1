"""Consistency tuning (ECT) and the consistency sampler on a Gaussian toy problem, where the exact
consistency function is known in closed form: for data x0 ~ N(mu, s^2) (each pixel), the
probability-flow ODE keeps ``z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)`` constant,
so ``f*(x_t, t) = mu + s z``."""

from __future__ import annotations

import pytest
import torch

from ddpm.core.consistency import consistency_loss, edm_sigmas, partner_steps
from ddpm.core.losses import timestep_probabilities
from ddpm.core.samplers import CONSISTENCY_SIGMAS, consistency, eps_model, resolve_steps
from ddpm.core.schedule import Schedule
from ddpm.errors import DDPMError

MU, S = 0.3, 0.4


class GaussianConsistency(torch.nn.Module):
    """``f(x_t, t) = mu + s (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2)`` with learnable
    mu and s: the exact consistency function of N(MU, S^2) data at mu = MU, s = S. Predicts x0."""

    def __init__(self, schedule: Schedule, mu: float, s: float) -> None:
        super().__init__()
        self.schedule = schedule
        self.mu, self.s = torch.nn.Parameter(torch.tensor(mu)), torch.nn.Parameter(torch.tensor(s))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sig = self.schedule.alpha_sigma(t, x)
        return self.mu + self.s * (x - a * self.mu) / (a.square() * self.s.square() + sig.square()).sqrt()


@pytest.fixture(scope="module")
def schedule() -> Schedule:
    return Schedule.linear(1000)


def test_partner_steps_come_before_t_and_close_in_as_the_stages_go(schedule: Schedule) -> None:
    t = torch.arange(1, 1000)
    sigmas = edm_sigmas(schedule)
    previous = None
    for stage in range(1, 9):
        r = partner_steps(schedule, t, stage)
        assert bool((r < t).all()) and bool((r >= -1).all())
        ratio = torch.where(r >= 0, sigmas[r.clamp(min=0)], torch.zeros(())) / sigmas[t]
        if previous is not None:
            assert bool((ratio >= previous - 1e-12).all())  # never further apart than the stage before
        previous = ratio
    # early on, low noise levels are compared with the clean image itself (the boundary)
    assert int((partner_steps(schedule, t, 1) == -1).sum()) > 0
    # at the last stage the partner of a mid-level step is a near neighbour
    assert float(previous[500]) > 0.95
    with pytest.raises(ValueError, match="stage must be at least 1"):
        partner_steps(schedule, t, 0)


def test_one_step_of_the_exact_consistency_function_gives_the_data_distribution(schedule: Schedule) -> None:
    f = GaussianConsistency(schedule, MU, S)
    x_T = torch.randn(20000, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x0 = consistency(eps_model(f, schedule, "x0"), x_T, schedule, steps=1, clip=False)
    assert float(x0.mean()) == pytest.approx(MU, abs=0.01)
    assert float(x0.std()) == pytest.approx(S, rel=0.02)
    # more steps re-noise and jump again: still the data distribution
    with torch.no_grad():
        x0 = consistency(eps_model(f, schedule, "x0"), x_T, schedule, steps=4, clip=False,
                         generator=torch.Generator().manual_seed(1))
    assert float(x0.mean()) == pytest.approx(MU, abs=0.01) and float(x0.std()) == pytest.approx(S, rel=0.02)


def _gradient(schedule: Schedule, mu: float, s: float, stage: int) -> torch.Tensor:
    f = GaussianConsistency(schedule, mu, s)
    x0 = MU + S * torch.randn(8192, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    p = timestep_probabilities(schedule, "lognormal", 2.2, 4.0)
    loss = consistency_loss(f, schedule, x0, prediction="x0", stage=stage, t_probabilities=p,
                            generator=torch.Generator().manual_seed(3)).mean()
    loss.backward()
    return torch.stack([f.mu.grad, f.s.grad])


def test_the_exact_consistency_function_is_a_fixed_point_of_tuning(schedule: Schedule) -> None:
    """The ECT gradient at the exact consistency function vanishes as the gap between the two
    noise levels closes (its residual has no direction to follow), while a wrong function keeps
    a gradient that points back to the exact one."""
    ratios = []
    for stage in (2, 4, 8):  # the weight 1 / (sigma_t - sigma_r) grows with the stage: compare ratios
        exact, wrong = _gradient(schedule, MU, S, stage), _gradient(schedule, MU + 0.2, S * 1.5, stage)
        ratios.append(float(exact.norm() / wrong.norm()))
        assert float(wrong[0]) > 0 and float(wrong[1]) > 0  # descent lowers mu and s, towards MU and S
    assert ratios[0] > ratios[1] > ratios[2] and ratios[2] < 0.1  # measured 0.96, 0.25, 0.06


def test_the_consistency_sampler_s_steps_are_checked(schedule: Schedule) -> None:
    assert resolve_steps("consistency", None, 1000) == 2
    with pytest.raises(DDPMError, match="the consistency sampler takes 1 to 4 steps"):
        resolve_steps("consistency", 5, 1000)
    assert all(list(v) == sorted(v, reverse=True) for v in CONSISTENCY_SIGMAS.values())
    with pytest.raises(ValueError, match="positive and decreasing"):
        consistency(lambda x, t: x, torch.zeros(1, 1, 2, 2), schedule, sigmas=[0.5, 1.0])
