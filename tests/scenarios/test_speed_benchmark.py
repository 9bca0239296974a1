"""benchmarks/speed.py measures what a user runs: its training step is the trainer's own
(``ddpm.train.train_step`` with ``ddpm train``'s default recipe), checked here as the same loss
and the same weights on the same batch. Timings are the benchmark's business, not a test's."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import torch

from ddpm.runtime import policy as perf
from ddpm.core.ema import EMA
from ddpm.core.schedule import Schedule
from ddpm.train import DiffusionLoss, StepSettings, TrainConfig, TrainState, train_step

ROOT = Path(__file__).resolve().parents[2]


def _speed_module():
    spec = importlib.util.spec_from_file_location("ddpm_speed_benchmark", ROOT / "benchmarks" / "speed.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_steps_exactly_as_ddpm_train_does() -> None:
    """The benchmark's step and a step built here from TrainConfig's defaults (schedule, target,
    timestep density, clipping, EMA rule, autocast policy, micro-batches) give the same loss,
    weights and EMA: a benchmark that timed its own variant (eps target, linear schedule, no
    clipping) would fail here."""
    speed = _speed_module()
    device = torch.device("cpu")
    entry = speed.build_entry("ours", "ours", "ddpm-cifar10", device, ours_settings=True, precision="auto",
                              compile=False, grad_accum=2)
    cfg = TrainConfig(batch_size=4, grad_accum=2, lr=speed.RECIPE.lr)
    runtime = perf.resolve_runtime("cpu", cfg.precision, channels_last=cfg.channels_last)
    assert entry.precision == runtime.precision  # the benchmark runs the trainer's precision policy

    model = copy.deepcopy(entry.model)  # the same initial weights
    initial = copy.deepcopy(entry.model)
    opt = perf.make_optimizer(model.parameters(), device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    schedule = Schedule.from_name(cfg.schedule, cfg.timesteps, logsnr_shift=cfg.logsnr_shift,
                                  zero_terminal_snr=cfg.zero_terminal_snr)
    x0 = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1

    torch.manual_seed(11)  # dropout masks come from the global generator, as in the trainer's step
    trainer_loss, _, _ = train_step(model, TrainState(model, ema, opt), DiffusionLoss.from_config(cfg, schedule, None),
                                    x0.contiguous(memory_format=torch.channels_last), None, lr=cfg.lr,
                                    generator=torch.Generator().manual_seed(5),
                                    settings=StepSettings.from_config(cfg, runtime.autocast))
    bench_schedule, bench_t_probabilities = speed.training_recipe()
    torch.manual_seed(11)
    bench_loss = speed.train_step(entry, x0, bench_schedule, bench_t_probabilities, torch.Generator().manual_seed(5))

    assert bench_loss == float(trainer_loss) and bench_loss > 0
    for (name, a), b in zip(model.state_dict().items(), entry.model.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(ema.module.state_dict().items(), entry.ema.module.state_dict().values()):
        assert torch.equal(a, b), f"ema {name}"
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), initial.parameters())), "no step was taken"
