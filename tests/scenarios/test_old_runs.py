"""Run folders written by earlier versions load, sample and resume as they did.

The on-disk format (config.json, and the same config in each checkpoint's metadata) is read by
:class:`ddpm.run.config.RunConfig` alone. Here a run is rewritten into the oldest form this
package has written: no target recorded (so eps), none of the recipe options (so the legacy
recipe: linear schedule, uniform timesteps, constant learning rate, the EMA's own warm-up) and
0 or -1 for "keep the preset's value". Resumed, it must continue bit-identically to a run that never
stopped, and sample as a run in today's form does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ddpm.cli.app import main
from ddpm.run.checkpoint import latest_checkpoint, load_checkpoint, load_run, save_checkpoint, weights_sha256
from ddpm.sample.engine import generate
from ddpm.sample.spec import SampleSpec
from ddpm.train import TrainConfig, train

from conftest import copy_subset

LEGACY = dict(schedule="linear", prediction="eps", t_sampling="uniform", lr_schedule="constant", ema_rampup=0.0)
RECIPE_KEYS = ("logsnr_shift", "zero_terminal_snr", "loss_weighting", "min_snr_gamma", "t_sampling", "t_logsnr_mean",
               "t_logsnr_std", "lr_schedule", "ema_rampup", "ema_halflife_kimg")


@pytest.fixture(scope="module")
def data(landscapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_subset(landscapes_dir, tmp_path_factory.mktemp("old_runs"), None, 8)


def _cfg(data: Path, out: Path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(data=str(data), out=str(out), model="tiny", image_size=16, steps=steps, batch_size=4,
                       warmup=1, log_every=1, sample_every=0, save_every=2, progress=False, tensorboard=False,
                       precision="fp32", device="cpu", workers=0, timesteps=50, **LEGACY, **kw)


def _make_old(run: Path) -> None:
    """Rewrite ``run``'s config.json and newest checkpoint into the oldest saved form."""
    path = latest_checkpoint(run)
    step, config, state = load_checkpoint(path)
    config.pop("prediction")
    for key in RECIPE_KEYS:
        config["train"].pop(key)
    config["train"].update(base_channels=0, dropout=-1.0, workers=-1)
    (run / "config.json").write_text(json.dumps(config))
    path.unlink()
    save_checkpoint(run, step, config, state)


def test_an_old_run_resumes_bit_identically_and_samples(data: Path, tmp_path: Path) -> None:
    whole, old = tmp_path / "whole", tmp_path / "old"
    train(_cfg(data, whole, 4))
    train(_cfg(data, old, 2))
    _make_old(old)
    assert "prediction" not in json.loads((old / "config.json").read_text())
    run = load_run(old)
    assert run.prediction == "eps" and run.step == 2
    images = generate(run, 2, SampleSpec(steps=3))
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    # A resumed old run: the saved spellings (0, -1) and missing recipe options mean what they meant.
    train(_cfg(data, old, 4, resume=True))
    a, b = load_run(whole), load_run(old)
    assert weights_sha256(a.model.state_dict()) == weights_sha256(b.model.state_dict())
    assert weights_sha256(a.ema_model.state_dict()) == weights_sha256(b.ema_model.state_dict())
    assert main(["sample", "--run", str(old), "--n", "2", "--steps", "3", "--out", str(tmp_path / "g.png"),
                 "--device", "cpu", "--precision", "fp32"]) == 0
