"""configs/: every file is a valid training config, and each CPU config trains its model."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import copy_subset
from ddpm.cli import run_info
from ddpm.train import config_from_dict, train
from ddpm.unet import PRESETS

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
CPU_CONFIGS = [c for c in CONFIGS if c.stem.endswith("-cpu")]


def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_the_headline_configs_exist() -> None:
    names = {c.name for c in CONFIGS}
    assert {"landscapes-64.toml", "landscapes-64-cpu.toml", "cifar10-64-cfg.toml", "cifar10-64-cfg-cpu.toml",
            "cifar10-32-ddpm.toml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_parses_into_a_valid_training_config(path: Path) -> None:
    text = path.read_text()
    assert text.startswith("#"), "each config starts with a comment saying what it reproduces"
    assert "Compute" in text and "ddpm train --config" in text
    cfg = config_from_dict(_load(path))
    assert cfg.model in PRESETS and cfg.image_size in (32, 64)


@pytest.mark.parametrize("path", CPU_CONFIGS, ids=[c.name for c in CPU_CONFIGS])
def test_cpu_config_trains_two_steps_on_real_images(path: Path, cifar10_dir: Path, landscapes_dir: Path,
                                                    tmp_path: Path) -> None:
    values = _load(path)
    if values.get("conditional"):
        data = copy_subset(cifar10_dir / "train", tmp_path / "data", ["airplane", "ship"], 4)
    else:
        data = copy_subset(landscapes_dir, tmp_path / "data", None, 8)
    # the config's model, size and recipe; a short run on a small batch
    values.update(data=str(data), out=str(tmp_path / "run"), steps=2, batch_size=4, time_limit=0.0,
                  sample_every=0, sample_n=2, sample_steps=2, progress=False, tensorboard=False, device="cpu")
    train(config_from_dict(values))
    info = run_info(str(tmp_path / "run"))
    assert info["step"] == 2 and info["image_size"] == _load(path)["image_size"]
