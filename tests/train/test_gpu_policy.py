"""The training step as the GPU runs it, checked on the CPU (issue 24): the compiled step against
the eager one, the fallback when compiling fails, no host-device synchronisation inside a step,
and the default learning rate as a function of the preset and the global batch."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.cli.app import main, run_info
from ddpm.core.ema import EMA
from ddpm.core.schedule import Schedule
from ddpm.core.unet import UNet, UNetConfig
from ddpm.runtime.policy import compile_supported, make_optimizer, resolve_runtime
from ddpm.train import DiffusionLoss, StepSettings, TrainConfig, TrainState, train, train_step
from ddpm.train.config import default_lr


def _folder(root: Path, n: int = 16) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def _cfg(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="tiny", image_size=16, steps=3, batch_size=4, lr=1e-3,
                warmup=1, log_every=1, sample_every=0, save_every=0, sample_n=2, sample_steps=2, timesteps=20,
                lr_schedule="constant", progress=False, tensorboard=False, precision="fp32", device="cpu", workers=0,
                compile=False)
    base.update(kw)
    return TrainConfig(**base)


def _step_pieces(seed: int = 0):
    torch.manual_seed(seed)
    net = UNet(UNetConfig.preset("tiny", image_size=16))
    state = TrainState(net, EMA(net), torch.optim.AdamW(net.parameters(), lr=1e-3))
    return net, state, DiffusionLoss(Schedule.linear(20))


# --------------------------------------------------------------------------- compile
def test_compile_is_on_by_default_only_where_it_pays() -> None:
    assert resolve_runtime("cpu", "fp32", compile=None).compile is False  # a CPU: opt-in
    assert resolve_runtime("cpu", "fp32", compile=True).compile is True
    assert TrainConfig().compile is None  # unset: decided by the runtime policy per device


@pytest.mark.slow
@pytest.mark.skipif(not compile_supported("cpu"), reason="torch.compile on a CPU needs a C++ compiler")
def test_the_compiled_step_gives_the_eager_loss_and_gradients(tmp_path: Path) -> None:
    """Inductor's fused kernels against eager PyTorch on one training step: the loss and every
    gradient agree to float32 rounding."""
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    results = []
    for compiled in (False, True):
        net, state, loss_fn = _step_pieces()
        call = torch.compile(net) if compiled else net
        gen = torch.Generator().manual_seed(7)
        torch.manual_seed(3)
        result = train_step(call, state, loss_fn, x, None, lr=1e-3, generator=gen,
                            settings=StepSettings.from_config(TrainConfig(grad_clip=0.0)))
        # the step applied its update; the gradients it used are still on the parameters
        results.append((float(result.loss), [p.grad.clone() for p in net.parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    for ge, gc in zip(grads_e, grads_c):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(not compile_supported("cpu"), reason="torch.compile on a CPU needs a C++ compiler")
def test_a_compiled_run_resumes_bit_exactly(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data")
    full, half = tmp_path / "full", tmp_path / "half"
    train(_cfg(data, full, steps=4, compile=True))
    assert "compiled the training network in" in capsys.readouterr().out
    train(_cfg(data, half, steps=2, compile=True))
    train(_cfg(data, half, steps=4, compile=True, resume=True))
    a, b = run_info(str(full)), run_info(str(half))
    assert a["model_sha256"] == b["model_sha256"] and a["ema_sha256"] == b["ema_sha256"]


def test_a_compile_that_fails_falls_back_to_eager_with_one_warning(tmp_path: Path, monkeypatch) -> None:
    """A real compile failure (a backend that raises, as a missing compiler or an Inductor bug
    does): one warning, and the run is bit-identical to one never compiled."""
    data = _folder(tmp_path / "data")
    eager = tmp_path / "eager"
    train(_cfg(data, eager))

    def broken_backend(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    fallen = tmp_path / "fallen"
    with pytest.warns(UserWarning, match=r"torch.compile failed .*; training without it") as caught:
        train(_cfg(data, fallen, compile=True))
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    a, b = run_info(str(eager)), run_info(str(fallen))
    assert a["model_sha256"] == b["model_sha256"] and a["ema_sha256"] == b["ema_sha256"]


# ------------------------------------------------------------------- synchronisation
class _CountSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operators that copy a device value to the host (``.item()``, ``bool(t)``,
    ``.tolist()``, ``.cpu()`` of a scalar): each one stalls a GPU's queue until it drains."""

    SYNCING = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [dict(), dict(grad_accum=2, grad_clip=0.0), dict(prediction="eps"),
                                     dict(loss_weighting="min-snr", conditional=True)])
def test_a_training_step_never_waits_for_the_device(options: dict) -> None:
    """The step (forward, loss, backward, clipping, the optimiser, the EMA) queues work and
    returns: the loss and gradient norm stay tensors until the monitor reads them at a log line."""
    conditional = options.pop("conditional", False)
    cfg = TrainConfig(**options)
    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", image_size=16, num_classes=3 if conditional else None))
    # the trainer's optimiser (fused AdamW): the unfused one reads its step count with .item()
    state = TrainState(net, EMA(net, 0.99), make_optimizer(net.parameters(), "cpu", lr=1e-3))
    loss_fn = DiffusionLoss.from_config(cfg, Schedule.from_name("sigmoid", 20), 3 if conditional else None)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 0]) if conditional else None
    settings = StepSettings.from_config(cfg)
    train_step(net, state, loss_fn, x, y, lr=1e-3, generator=torch.Generator().manual_seed(0), settings=settings)
    with _CountSyncs() as syncs:
        result = train_step(net, state, loss_fn, x, y, lr=1e-3, generator=torch.Generator().manual_seed(1),
                            settings=settings)
    assert syncs.seen == []
    assert isinstance(result.loss, torch.Tensor) and math.isfinite(float(result.loss))


# ------------------------------------------------------------------ the learning rate
def test_the_default_learning_rate_follows_the_preset_and_the_global_batch() -> None:
    assert default_lr("small", 32) == 1e-3 == default_lr("tiny", 32)  # the ablation's winner
    assert default_lr("small", 512) == 1e-3  # never above what was measured
    assert default_lr("small", 8) == pytest.approx(1e-3 * 0.5)  # Adam's square-root rule
    assert default_lr("ddpm-cifar10", 128) == 2e-4  # Ho et al. 2020
    assert default_lr("ddpm-cifar10", 64) == pytest.approx(2e-4 / math.sqrt(2))
    assert default_lr("ddpm-64", 2048) == 2e-4
    assert default_lr("imported", 128) == 2e-4


def test_an_unset_lr_is_the_default_printed_and_saved_and_a_set_one_is_kept(tmp_path: Path, capsys) -> None:
    data = _folder(tmp_path / "data")
    run = tmp_path / "run"
    train(_cfg(data, run, lr=None, steps=2, batch_size=8))
    out = capsys.readouterr().out
    expected = default_lr("tiny", 8)
    assert expected == pytest.approx(1e-3 * 0.5)
    assert f"lr: {expected:.3g} (the default for tiny at a global batch of 8; --lr sets another)" in out
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == expected
    # the command line resumes with the saved rate, and a run that set --lr keeps its own
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert f"lr: {expected:.3g}\n" in capsys.readouterr().out
    fixed = tmp_path / "fixed"
    train(_cfg(data, fixed, lr=3e-4, steps=1))
    assert json.loads((fixed / "config.json").read_text())["train"]["lr"] == 3e-4


def test_a_run_saved_with_the_old_default_resumes_at_its_own_rate(tmp_path: Path) -> None:
    """A library caller resuming with lr unset gets the run's saved rate, not today's default."""
    data = _folder(tmp_path / "data")
    run = tmp_path / "run"
    train(_cfg(data, run, lr=2e-4, steps=1, batch_size=8))  # as the old default saved it
    train(_cfg(data, run, lr=None, steps=2, batch_size=8, resume=True))
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 2e-4
    assert run_info(str(run))["step"] == 2
