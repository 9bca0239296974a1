"""SampleSpec: the sampling request, validated once, with one-line errors naming the flag."""

from __future__ import annotations

import math

import pytest

from ddpm.core.samplers import DEFAULT_STEPS, MAX_SEED, SAMPLER_NAMES
from ddpm.errors import DDPMError
from ddpm.sample.spec import SampleSpec


def test_defaults_are_dpm_solver_with_its_default_steps() -> None:
    spec = SampleSpec()
    assert (spec.sampler, spec.steps, spec.guidance, spec.seed, spec.use_ema) == ("dpm-solver", None, 1.0, 0, True)
    assert spec.for_run(1000).steps == DEFAULT_STEPS["dpm-solver"]
    assert spec.for_run(7).steps == 7  # capped at T
    assert SampleSpec("ancestral").for_run(50).steps == 50  # all T


@pytest.mark.parametrize("changes, flag", [
    ({"sampler": "euler"}, "sampler"), ({"steps": 0}, "--steps"), ({"guidance": math.nan}, "--guidance"),
    ({"guidance": math.inf}, "--guidance"), ({"eta": -0.1}, "--eta"), ({"eta": math.nan}, "--eta"),
    ({"seed": -1}, "--seed"), ({"seed": MAX_SEED + 1}, "--seed"), ({"batch_size": 0}, "--batch-size"),
])
def test_bad_values_are_one_line_errors_naming_the_flag(changes, flag) -> None:
    with pytest.raises(DDPMError) as e:
        SampleSpec(**changes)
    assert flag in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DDPMError):
        SampleSpec().with_(**changes)  # copies are checked too


def test_steps_above_T_are_refused_when_the_run_is_known() -> None:
    with pytest.raises(DDPMError, match="exceeds this run's 20 diffusion steps"):
        SampleSpec(steps=50).for_run(20)


def test_names_options_and_noise() -> None:
    assert SampleSpec("dpm_solver").sampler == "dpm-solver"  # the registry's spelling
    assert SampleSpec("ddim", eta=0.5).options == {"eta": 0.5} and SampleSpec(eta=0.5).options == {}
    assert not SampleSpec("ddim").stochastic and SampleSpec("ddim", eta=0.3).stochastic
    assert {name: SampleSpec(name).stochastic for name in SAMPLER_NAMES} == {
        "ancestral": True, "ddim": False, "langevin": True, "dpm-solver": False, "consistency": True}
    assert SampleSpec("langevin", steps=10).nfe(1000) == 10 + 9  # one corrector step between predictor steps
