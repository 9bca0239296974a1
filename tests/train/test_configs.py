"""configs/: every file is a valid training config, and each CPU config trains its model."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from conftest import copy_subset
from ddpm.cli.app import run_info
from ddpm.train import config_from_dict, train
from ddpm.core.unet import PRESETS

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))
CPU_CONFIGS = [c for c in CONFIGS if c.stem.endswith("-cpu")]


def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def test_the_headline_configs_exist() -> None:
    names = {c.name for c in CONFIGS}
    assert {"landscapes-64.toml", "landscapes-64-cpu.toml", "cifar10-64-cfg.toml", "cifar10-64-cfg-cpu.toml",
            "cifar10-32-ddpm.toml", "cifar10-32-gpu-10min.toml", "landscapes-64-gpu-10min.toml"} <= names


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


def _gpu_script(cifar10_dir: Path, landscapes_dir: Path, tmp_path: Path, *flags: str):
    """benchmarks/gpu_seed_results.sh on a few real images, shrunk to seconds on the CPU:
    (command, environment, output folder, completed process)."""
    import os
    import shutil
    import subprocess
    import sys

    land = copy_subset(landscapes_dir, tmp_path / "land", None, 12)
    cifar = tmp_path / "cifar"
    for split in ("train", "test"):
        copy_subset(cifar10_dir / split, cifar / split, ["airplane", "ship"], 6)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "DDPM_CACHE": str(tmp_path / "cache")}
    cmd = [shutil.which("bash") or "bash", str(ROOT / "benchmarks" / "gpu_seed_results.sh"), "--landscapes", str(land),
           "--cifar", str(cifar), "--out", str(out), "--minutes", "0.02", "--n", "8", "--device", "cpu",
           "--sample-batch", "4", "--train-args", "--model tiny --batch-size 2 --save-every 0 --sample-every 0", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cmd, env, out, proc


def test_gpu_seed_results_script_runs_end_to_end_on_a_tiny_cpu_budget(cifar10_dir: Path, landscapes_dir: Path,
                                                                      tmp_path: Path) -> None:
    """Both configs train, sample their grids and are scored; the CIFAR-10 run is also scored
    during training (the FID curve), and the summary names both FIDs and the ship/airplane accuracy."""
    import subprocess

    cmd, env, out, _ = _gpu_script(cifar10_dir, landscapes_dir, tmp_path, "--curve-every", "1", "--curve-n", "4")
    for name in ("landscapes.png", "cifar_ship_airplane.png", "land_eval.json", "cifar_eval.json",
                 "cifar_fid_curve.png"):
        assert (out / name).is_file(), name
    rows = (out / "cifar" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert any(r.split(",")[header.index("fid")] for r in rows[1:]), "no in-training FID row"
    summary = (out / "summary.txt").read_text()
    assert "land: step" in summary and "cifar: step" in summary and "ship" in summary and "airplane" in summary
    assert (out / "land.trained").is_file() and (out / "cifar.trained").is_file()  # a rerun only scores
    bad = subprocess.run(cmd[:2] + ["--landscapes", str(cmd[3])], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--cifar is required" in bad.stderr


def test_gpu_seed_results_script_without_fid_returns_the_samples(cifar10_dir: Path, landscapes_dir: Path,
                                                                 tmp_path: Path) -> None:
    """--no-fid (a machine without the Inception weights): no scoring, each run's --n samples as
    PNGs in a tar, to be scored elsewhere."""
    import tarfile

    _, _, out, proc = _gpu_script(cifar10_dir, landscapes_dir, tmp_path, "--no-fid", "--curve-every", "1")
    assert not (out / "land_eval.json").exists() and not (out / "cifar_fid_curve.png").exists()
    for name in ("land", "cifar"):
        with tarfile.open(out / f"{name}_samples.tar") as tar:
            pngs = [m.name for m in tar.getmembers() if m.name.endswith(".png")]
        assert len(pngs) == 8, (name, pngs)
    # the CIFAR-10 samples are what the FID would score: every class of the data, in equal shares
    assert "cifar_samples_grid.png (8 images of airplane, ship," in proc.stdout, proc.stdout[-800:]
    assert "no FID" in (out / "summary.txt").read_text()


def test_gpu_seed_results_script_runs_one_config_with_only(cifar10_dir: Path, landscapes_dir: Path,
                                                           tmp_path: Path) -> None:
    """--only cifar (a lease too short for both): the CIFAR-10 run alone is trained and scored,
    the landscapes are neither trained nor required; a wrong name is refused in one line."""
    import subprocess

    cmd, env, out, _ = _gpu_script(cifar10_dir, landscapes_dir, tmp_path, "--only", "cifar")
    assert (out / "cifar_eval.json").is_file() and (out / "cifar.trained").is_file()
    assert not (out / "land").exists() and not (out / "land_eval.json").exists()
    summary = (out / "summary.txt").read_text()
    assert "cifar: step" in summary and "land: step" not in summary and "(--only cifar)" in summary
    no_land = [a for i, a in enumerate(cmd) if a != "--landscapes" and (i == 0 or cmd[i - 1] != "--landscapes")]
    assert subprocess.run(no_land, env=env, capture_output=True, text=True).returncode == 0  # not required
    bad = subprocess.run(cmd[:2] + ["--only", "birds", "--out", str(out)], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == "gpu_seed_results.sh: --only birds: expected land or cifar"


def _gpu_check(cifar10_dir: Path, tmp_path: Path, *flags: str):
    """benchmarks/gpu_check.sh on a few real images with a budget of seconds on the CPU."""
    import os
    import shutil
    import subprocess
    import sys

    cifar = tmp_path / "cifar"
    for split in ("train", "test"):
        copy_subset(cifar10_dir / split, cifar / split, ["airplane", "ship"], 6)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "OMP_NUM_THREADS": "1", "DDPM_CACHE": str(tmp_path / "cache")}
    cmd = [shutil.which("bash") or "bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cifar", str(cifar),
           "--out", str(out), "--budget-minutes", "1", "--reserve-minutes", "1", "--min-train-minutes", "0.02",
           "--n", "12", "--device", "cpu", "--sample-batch", "4", "--speed-args", "skip",
           "--train-args", "--model tiny --batch-size 4 --save-every 0 --sample-every 0", *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out, proc


def test_gpu_check_script_trains_scores_and_sums_up_with_the_weights_in_two_halves(cifar10_dir: Path,
                                                                                   tmp_path: Path) -> None:
    """The device script end to end on a tiny CPU budget, its FID weights arriving as two halves
    (87 MB does not fit one transfer): trained, scored (FID, KID, class accuracy), checked for
    memorisation, the grid drawn and everything summed up in gpu_check.json."""
    import json

    from ddpm.scoring.inception import InceptionWeightsError, weights_path

    try:
        weights = weights_path().read_bytes()
    except InceptionWeightsError as e:
        pytest.skip(f"needs the Inception weights: {e}")
    halves = tmp_path / "carried" / "default_1.pt"
    halves.parent.mkdir()
    (halves.parent / "default_1.pt.part-a").write_bytes(weights[: len(weights) // 2])
    (halves.parent / "default_1.pt.part-b").write_bytes(weights[len(weights) // 2:])
    out, proc = _gpu_check(cifar10_dir, tmp_path, "--inception", str(halves))
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["eval"]["n"] == 12 and summary["eval"]["fid"] > 0 and "class_accuracy" in summary["eval"]
    assert summary["nearest"] is not None and summary["train"]["model"] == "tiny"
    assert summary["metrics_csv"].startswith("step,")
    assert (out / "cifar_ship_airplane.png").is_file() and "FID" in proc.stdout


def test_gpu_check_script_without_weights_returns_the_samples(cifar10_dir: Path, tmp_path: Path) -> None:
    import json
    import tarfile

    out, proc = _gpu_check(cifar10_dir, tmp_path, "--inception", str(tmp_path / "missing.pt"))
    assert "no FID, samples come back instead" in proc.stdout
    with tarfile.open(out / "samples.tar") as tar:
        assert len([m for m in tar.getmembers() if m.name.endswith(".png")]) == 4  # 2 classes x ceil(12 / 10)
    assert json.loads((out / "gpu_check.json").read_text())["eval"] is None
