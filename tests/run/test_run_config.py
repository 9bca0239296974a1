"""RunConfig and RunFolder: the typed config.json, its migrations, and the paths of a run folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddpm.core.schedule import Schedule
from ddpm.core.unet import UNetConfig
from ddpm.errors import DDPMError
from ddpm.run.config import RunConfig
from ddpm.run.folder import RunFolder


def _config(**kw) -> RunConfig:
    base = dict(model=UNetConfig.preset("tiny", image_size=16, num_classes=2), schedule=Schedule.from_name("linear", 50),
                prediction="v", classes=["cat", "dog"], num_images=12, train={"lr": 1e-3, "data": "d"})
    base.update(kw)
    return RunConfig(**base)


def test_round_trip_keeps_every_key_and_value(tmp_path: Path) -> None:
    cfg = _config(imported={"from": "/x", "format": "diffusers UNet2DModel"})
    d = cfg.to_dict()
    assert set(d) == {"ddpm_version", "model", "schedule", "prediction", "classes", "image_size", "num_images", "train",
                      "imported"}
    assert d["image_size"] == 16 and d["classes"] == ["cat", "dog"]
    again = RunConfig.from_dict(json.loads(json.dumps(d)))
    assert again.to_dict() == d
    folder = RunFolder(tmp_path / "run")
    cfg.write(folder)
    assert json.loads(folder.config_path.read_text()) == d
    assert RunConfig.read(folder).to_dict() == d
    assert "imported" not in _config().to_dict()  # written only for imported runs, as before


def test_runs_saved_before_targets_and_classes_were_recorded_are_migrated() -> None:
    d = _config().to_dict()
    for key in ("prediction", "classes", "num_images", "train", "ddpm_version"):
        d.pop(key)
    old = RunConfig.from_dict(d)
    assert old.prediction == "eps" and old.classes is None and not old.conditional and old.train == {}
    assert old.image_size == 16


@pytest.mark.parametrize("bad", [[], {"model": {}}, {"schedule": {}}, {"model": {"nope": 1}, "schedule": {}}])
def test_unusable_configs_are_one_line_errors_naming_the_source(bad) -> None:
    with pytest.raises(DDPMError) as e:
        RunConfig.from_dict(bad, "'run/config.json'")
    assert "'run/config.json'" in str(e.value) and "\n" not in str(e.value)


def test_read_names_a_missing_or_broken_file(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    with pytest.raises(DDPMError, match="does not exist"):
        RunConfig.read(folder)
    folder.config_path.write_text("{not json")
    with pytest.raises(DDPMError, match="cannot read"):
        RunConfig.read(folder)


def test_run_folder_paths(tmp_path: Path) -> None:
    f = RunFolder(tmp_path / "r")
    assert f.config_path == tmp_path / "r" / "config.json"
    assert f.checkpoint_path(7) == tmp_path / "r" / "checkpoints" / "ckpt_000000007.safetensors"
    assert f.grid_path(12) == tmp_path / "r" / "samples" / "step_000000012.png"
    assert (f.metrics_path.name, f.tensorboard_dir.name, f.eval_dir.name, f.fid_floor_path.name) == (
        "metrics.csv", "tensorboard", "eval", "fid_floor.json")
    assert f.checkpoints() == [] and f.latest_checkpoint() is None
    for step in (10, 2):
        f.checkpoint_path(step).parent.mkdir(parents=True, exist_ok=True)
        f.checkpoint_path(step).write_bytes(b"")
    (f.checkpoints_dir / "ckpt_000000011.safetensors.tmp").write_bytes(b"")  # an interrupted write
    assert [p.name for p in f.checkpoints()] == ["ckpt_000000002.safetensors", "ckpt_000000010.safetensors"]
    assert f.latest_checkpoint() == f.checkpoint_path(10)
