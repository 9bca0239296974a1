"""``ddpm distill``: consistency tuning of a tiny trained run, end to end on the CPU (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli.app import main, run_info
from ddpm.cli.distill import distill_config
from ddpm.train import TrainConfig, train


def _folder(root: Path, classes: list[str], per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.array([60 + 90 * c, 200 - 80 * c, 120])
            pixels = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distill")
    data = _folder(root / "data", ["a", "b"])
    run = root / "teacher"
    train(TrainConfig(data=str(data), out=str(run), conditional=True, model="tiny", image_size=16, steps=3,
                      batch_size=4, lr=1e-3, warmup=1, timesteps=50, sample_every=0, save_every=0, sample_n=2,
                      sample_steps=2, progress=False, tensorboard=False, precision="fp32", device="cpu", workers=0))
    return run


def _distill(teacher: Path, out: Path, *extra: str) -> int:
    return main(["distill", str(teacher), "--out", str(out), "--device", "cpu", "--precision", "fp32",
                 "--no-progress", *extra])


def test_distill_starts_from_the_teacher_s_ema_and_samples_in_two_steps(teacher: Path, tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "tuned"
    assert _distill(teacher, out, "--steps", "2") == 0
    printed = capsys.readouterr().out
    newest = sorted((teacher / "checkpoints").glob("*.safetensors"))[-1]
    assert f"starting from the EMA weights of {newest} (step 3)" in printed
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["objective"] == "consistency" and saved["train"]["init_from"] == str(newest)
    assert saved["train"]["lr"] == pytest.approx(1e-3 / 30)  # a thirtieth of the teacher's
    assert saved["classes"] == ["a", "b"] and saved["model"] == json.loads((teacher / "config.json").read_text())["model"]
    assert run_info(str(out))["step"] == 2
    assert main(["info", str(out)]) == 0
    assert "consistency model (ddpm distill), tuned from" in capsys.readouterr().out
    assert main(["sample", "--run", str(out), "--class", "a", "--n", "2", "--out", str(tmp_path / "s.png"),
                 "--device", "cpu"]) == 0
    assert "consistency" in capsys.readouterr().out and (tmp_path / "s.png").is_file()


def test_a_tuning_run_resumes_bit_exactly(teacher: Path, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _distill(teacher, straight, "--steps", "4") == 0

    class Stop(Exception):
        pass

    def stop_after_two(step: int, loss: float) -> None:
        if step == 3:  # step 2's checkpoint is written: end the process here, as a kill would
            raise Stop

    cfg = distill_config(teacher, split, steps=4, device="cpu", precision="fp32", progress=False, save_every=2,
                         log_every=1)
    with pytest.raises(Stop):
        train(cfg, on_step=stop_after_two)
    assert run_info(str(split))["step"] == 2
    assert _distill(teacher, split, "--steps", "4", "--resume") == 0
    a, b = run_info(str(straight)), run_info(str(split))
    assert a["step"] == b["step"] == 4
    assert a["model_sha256"] == b["model_sha256"] and a["ema_sha256"] == b["ema_sha256"]


def test_bad_distill_requests_are_one_line(teacher: Path, tmp_path: Path, capsys) -> None:
    def error(*args: str) -> str:
        assert _distill(*args) == 2  # type: ignore[misc]
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    assert "give the tuning's length: --minutes M or --steps N" in error(teacher, tmp_path / "x")
    assert "--steps must be at least 1" in error(teacher, tmp_path / "x", "--steps", "0")
    (tmp_path / "empty").mkdir()
    assert "is not a trained run to distill" in error(tmp_path / "empty", tmp_path / "x", "--steps", "1")
    tuned = tmp_path / "tuned"
    assert _distill(teacher, tuned, "--steps", "1") == 0
    assert "is already a consistency model" in error(tuned, tmp_path / "x", "--steps", "1")
    assert main(["sample", "--run", str(tuned), "--n", "1", "--steps", "5", "--out", str(tmp_path / "s.png")]) == 2
    assert "the consistency sampler takes 1 to 4 steps" in capsys.readouterr().err
    assert "holds a diffusion run, not a consistency tuning" in error(teacher, teacher, "--steps", "9", "--resume")


def test_a_tuning_given_minutes_alone_finishes_with_exit_0(teacher: Path, tmp_path: Path) -> None:
    """Its time limit is its end, not a stop to resume (exit 3 would have a requeue script resume it)."""
    out = tmp_path / "timed"
    assert _distill(teacher, out, "--minutes", "0.005") == 0
    assert json.loads((out / "config.json").read_text())["train"]["time_limit"] == 0.005
