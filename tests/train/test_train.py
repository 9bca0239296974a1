"""End-to-end training on the shared real images: tiny models, a few steps, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import copy_subset
from ddpm.cli.app import TRAIN_HELP, main, run_info
from ddpm.errors import DDPMError
from ddpm.train import TrainConfig, train

CLASSES = ["airplane", "ship", "cat"]


def _tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="tiny", image_size=16, steps=4, batch_size=8, lr=1e-3,
                warmup=2, log_every=1, sample_every=0, save_every=0, sample_n=6, sample_steps=3,
                progress=False, tensorboard=False, precision="fp32", device="cpu", workers=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def cifar_small(cifar10_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_subset(cifar10_dir / "train", tmp_path_factory.mktemp("cifar_small"), CLASSES, 16)


@pytest.fixture(scope="module")
def landscapes_small(landscapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_subset(landscapes_dir, tmp_path_factory.mktemp("land_small"), None, 48)


def test_every_train_option_has_help() -> None:
    assert set(TRAIN_HELP) == set(TrainConfig.field_names())


def test_conditional_cifar_trains_samples_by_class_name(cifar_small: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_tiny(cifar_small, run, conditional=True, steps=3, save_every=2))
    info = run_info(str(run))
    assert info["step"] == 3 and info["classes"] == sorted(CLASSES)
    assert (run / "metrics.csv").exists() and (run / "loss.png").exists()
    assert (run / "samples" / "step_000000003.png").exists()
    out = tmp_path / "ships.png"
    assert main(["sample", "--run", str(run), "--n", "3", "--class", "ship", "airplane", "--out", str(out),
                 "--steps", "3", "--individual", str(tmp_path / "ind"), "--device", "cpu"]) == 0
    grid = Image.open(out)
    # 2 rows (classes) x 3 images of 16 px with 2 px padding
    assert grid.size == (3 * 18 + 2, 2 * 18 + 2)
    assert len(list((tmp_path / "ind").glob("*.png"))) == 6


def test_unknown_class_name_lists_valid_ones(cifar_small: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train(_tiny(cifar_small, run, conditional=True, steps=1))
    assert main(["sample", "--run", str(run), "--class", "boat", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown class 'boat'; this run's classes are: airplane, cat, ship"


def test_unconditional_landscapes_loss_falls(landscapes_small: Path, tmp_path: Path) -> None:
    losses: list[float] = []
    train(_tiny(landscapes_small, tmp_path / "run", steps=60, batch_size=16, lr=2e-3, warmup=5, log_every=10),
          on_step=lambda s, l: losses.append(l))
    assert len(losses) == 6
    # The zero-initialised output layer predicts eps = 0 at first, so the loss starts near
    # E[eps^2] = 1; a working model halves it within a few dozen steps.
    assert losses[0] > 0.4
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_is_bit_identical(cifar_small: Path, tmp_path: Path) -> None:
    # A constant rate, so that the 3-step run is the first half of the 6-step one (a decaying
    # rate depends on the planned length; the recipe test below interrupts a 6-step run instead).
    full, half = tmp_path / "full", tmp_path / "half"
    train(_tiny(cifar_small, full, conditional=True, steps=6, dropout=0.1, lr_schedule="constant"))
    train(_tiny(cifar_small, half, conditional=True, steps=3, dropout=0.1, lr_schedule="constant"))
    train(_tiny(cifar_small, half, conditional=True, steps=6, dropout=0.1, lr_schedule="constant", resume=True))
    a, b = run_info(str(full)), run_info(str(half))
    assert a["step"] == b["step"] == 6
    assert a["model_sha256"] == b["model_sha256"]
    assert a["ema_sha256"] == b["ema_sha256"]
    # and the runs did learn something different from a fresh model
    fresh = tmp_path / "fresh"
    train(_tiny(cifar_small, fresh, conditional=True, steps=1, dropout=0.1))
    assert run_info(str(fresh))["model_sha256"] != a["model_sha256"]


def test_resume_refuses_changed_settings_and_existing_run(cifar_small: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_tiny(cifar_small, run, conditional=True, steps=2))
    with pytest.raises(DDPMError, match="already holds a run"):
        train(_tiny(cifar_small, run, conditional=True, steps=4))
    with pytest.raises(DDPMError, match="--lr"):
        train(_tiny(cifar_small, run, conditional=True, steps=4, lr=5e-4, resume=True))


def test_keeps_last_k_checkpoints(cifar_small: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_tiny(cifar_small, run, steps=5, save_every=1, keep=2))
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["ckpt_000000004.safetensors", "ckpt_000000005.safetensors"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(cifar_small: Path, tmp_path: Path, monkeypatch) -> None:
    import ddpm.train.loss as train_mod  # where the trainer's loss calls diffusion_loss

    run = tmp_path / "run"
    real = train_mod.diffusion_loss
    calls = {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] > 2 else out

    monkeypatch.setattr(train_mod, "diffusion_loss", poisoned)
    with pytest.raises(DDPMError, match="loss became nan"):
        train(_tiny(cifar_small, run, steps=6, save_every=2))
    info = run_info(str(run))
    assert info["step"] == 2
    from ddpm.run.checkpoint import load_run

    r = load_run(run)
    assert all(np.isfinite(p.detach().numpy()).all() for p in r.model.parameters())


def test_checkpoint_has_no_pickle(cifar_small: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_tiny(cifar_small, run, steps=1))
    ckpt = next((run / "checkpoints").iterdir())
    header_len = int.from_bytes(ckpt.read_bytes()[:8], "little")
    header = json.loads(ckpt.read_bytes()[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "ddpm-checkpoint-1"
    assert b"\x80\x04\x95" not in ckpt.read_bytes()[: 8 + header_len]  # no pickle protocol header
    # atomic writes go through a private temporary file, but the result has normal permissions
    import os

    mask = os.umask(0)
    os.umask(mask)
    for f in (ckpt, run / "samples" / "step_000000001.png", run / "config.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_toml_config(cifar_small: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{cifar_small}"\nmodel = "tiny"\nimage-size = 16\nsteps = 2\nbatch_size = 4\n'
                   f'sample_every = 0\nsave_every = 0\nprogress = false\ntensorboard = false\nsample_steps = 2\n'
                   f'sample_n = 4\nprecision = "fp32"\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--steps", "3"]) == 0
    assert run_info(str(tmp_path / "run"))["step"] == 3
    bad = tmp_path / "bad.toml"
    bad.write_text('stepz = 3\n')
    assert main(["train", "--config", str(bad)]) == 2


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpm", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_bad_input_is_one_line_and_nonzero(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    cases = [
        (["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r1")], "does not exist"),
        (["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r2")], "no images found"),
        (["train", "--data", str(flat), "--conditional", "--out", str(tmp_path / "r3")], "class sub-folders"),
        (["train", "--data", str(flat), "--model", "huge", "--out", str(tmp_path / "r4")], "unknown model preset"),
        (["train", "--data", str(flat), "--batch-size", "0", "--out", str(tmp_path / "r5")], "--batch-size"),
        (["sample", "--run", str(tmp_path / "norun"), "--out", str(tmp_path / "x.png")], "does not exist"),
        (["info", str(tmp_path / "norun")], "does not exist"),
    ]
    # One interpreter for all cases keeps this fast; each case still goes through main().
    script = (
        "import sys, json\nfrom ddpm.cli.app import main\nimport contextlib, io\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        rc = main(args)\n"
        "    print(json.dumps([rc, err.getvalue()]))\n"
    )
    res = subprocess.run([sys.executable, "-c", script, json.dumps([c for c, _ in cases])], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    outputs = [json.loads(line) for line in res.stdout.strip().splitlines()]
    for (args, expected), (rc, err) in zip(cases, outputs):
        assert rc != 0, args
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (args, err)
        assert "Traceback" not in err


def test_python_m_ddpm_help_lists_defaults(tmp_path: Path) -> None:
    res = _cli("train", "--help", cwd=tmp_path)
    assert res.returncode == 0
    assert "--ema-decay" in res.stdout and "(default: 0.9999)" in res.stdout
    assert "--grad-checkpoint" in res.stdout


def test_resume_from_cli_needs_only_out_and_steps(cifar_small: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--data", str(cifar_small), "--out", str(run), "--conditional", "--model", "tiny",
                 "--image-size", "16", "--steps", "2", "--batch-size", "4", "--sample-every", "0", "--sample-steps",
                 "2", "--sample-n", "3", "--no-progress", "--no-tensorboard", "--precision", "fp32"]) == 0
    # every other option comes from the run's config.json
    assert main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    info = run_info(str(run))
    assert info["step"] == 3 and info["config"]["train"]["batch_size"] == 4


def test_config_file_forms_and_types(cifar_small: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data = "{cifar_small}"\nmodel = "tiny"\nimage_size = 16\nsteps = 1\nbatch_size = 4\n'
                   'sample_steps = 2\nsample_n = 2\nprogress = false\ntensorboard = false\nprecision = "fp32"\n')
    assert main(["train", f"--config={cfg}", "--out", str(tmp_path / "run")]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("batch_size = 4.5\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r2")]) == 2
    assert "option 'batch_size' must be int, got 4.5" in capsys.readouterr().err


def test_impossible_settings_are_errors(cifar_small: Path, tmp_path: Path) -> None:
    with pytest.raises(DDPMError, match="--lr must be a finite number"):
        train(_tiny(cifar_small, tmp_path / "a", lr=float("inf")))
    with pytest.raises(DDPMError, match="--sample-steps must be between 1 and --timesteps"):
        train(_tiny(cifar_small, tmp_path / "b", timesteps=10, sample_steps=25))
    with pytest.raises(DDPMError, match="inside --data"):
        train(_tiny(cifar_small, cifar_small / "run"))
    # a short schedule trains, saves and samples when the grid steps fit in it
    train(_tiny(cifar_small, tmp_path / "c", timesteps=10, sample_steps=5, steps=2))
    assert run_info(str(tmp_path / "c"))["step"] == 2
    assert main(["sample", "--run", str(tmp_path / "c"), "--n", "2", "--out", str(tmp_path / "c.png")]) == 0


RECIPE_ON = dict(prediction="v", schedule="sigmoid", logsnr_shift=-0.5, zero_terminal_snr=True,
                 loss_weighting="min-snr", t_sampling="lognormal", lr_schedule="cosine", ema_rampup=0.05,
                 ema_halflife_kimg=0.5)


def test_resume_is_bit_identical_with_every_recipe_option_on(cifar_small: Path, tmp_path: Path) -> None:
    full, half = tmp_path / "full", tmp_path / "half"
    train(_tiny(cifar_small, full, conditional=True, steps=6, **RECIPE_ON))

    class Killed(Exception):
        pass

    def kill_after_step_4(step: int, loss: float) -> None:
        if step == 4:
            raise Killed  # the learning rate decays over the planned 6 steps: stop the run, don't shorten it

    with pytest.raises(Killed):
        train(_tiny(cifar_small, half, conditional=True, steps=6, save_every=3, **RECIPE_ON), on_step=kill_after_step_4)
    train(_tiny(cifar_small, half, conditional=True, steps=6, resume=True, **RECIPE_ON))
    a, b = run_info(str(full)), run_info(str(half))
    assert a["step"] == b["step"] == 6
    assert a["model_sha256"] == b["model_sha256"] and a["ema_sha256"] == b["ema_sha256"]
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["prediction"] == "v" and cfg["schedule"]["kind"] == "sigmoid"
    assert cfg["schedule"]["zero_terminal_snr"] is True and cfg["schedule"]["logsnr_shift"] == -0.5
    # the run samples from its own schedule and target, every sampler, no flags
    for sampler in ("dpm-solver", "ddim", "ancestral", "langevin"):
        assert main(["sample", "--run", str(full), "--n", "2", "--class", "ship", "--sampler", sampler,
                     "--steps", "4", "--out", str(tmp_path / f"{sampler}.png")]) == 0


def test_a_run_saved_before_the_recipe_options_resumes_with_its_own_recipe(cifar_small: Path, tmp_path: Path) -> None:
    """config.json of a run from before the options existed has none of their keys: resuming it
    must keep training as it was trained (LEGACY_RECIPE), whatever today's defaults are."""
    from ddpm.train import LEGACY_RECIPE

    run = tmp_path / "old"
    # trained as before the options existed, then its config stripped of their keys
    train(_tiny(cifar_small, run, steps=2, prediction="eps", schedule="linear", **LEGACY_RECIPE))
    path = run / "config.json"
    cfg = json.loads(path.read_text())
    for key in LEGACY_RECIPE:
        cfg["train"].pop(key)
    path.write_text(json.dumps(cfg))
    assert main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    saved = json.loads(path.read_text())["train"]
    assert {k: saved[k] for k in LEGACY_RECIPE} == LEGACY_RECIPE
    assert saved["prediction"] == "eps" and saved["schedule"] == "linear"


def test_recipe_settings_are_checked(cifar_small: Path, tmp_path: Path) -> None:
    with pytest.raises(DDPMError, match="--zero-terminal-snr needs --prediction v or x0"):
        train(_tiny(cifar_small, tmp_path / "a", prediction="eps", zero_terminal_snr=True))
    with pytest.raises(DDPMError, match="unknown --lr-schedule 'step'; expected one of constant, cosine, linear"):
        train(_tiny(cifar_small, tmp_path / "b", lr_schedule="step"))
    with pytest.raises(DDPMError, match="unknown --schedule 'quadratic'"):
        train(_tiny(cifar_small, tmp_path / "c", schedule="quadratic"))
    with pytest.raises(DDPMError, match="--t-logsnr-std must be positive"):
        train(_tiny(cifar_small, tmp_path / "d", t_sampling="lognormal", t_logsnr_std=0.0))


def test_time_limit_counts_the_whole_run_across_resumes(cifar_small: Path, tmp_path: Path) -> None:
    from ddpm.run.checkpoint import latest_checkpoint, load_checkpoint

    run = tmp_path / "run"
    train(_tiny(cifar_small, run, steps=2))
    _, _, state = load_checkpoint(latest_checkpoint(run), only=("train_seconds",))
    used = state["train_seconds"]
    assert 0 < used < 600
    # a limit the run has already used up: a clear refusal, not a one-step session at lr 0
    with pytest.raises(DDPMError, match="has used its --time-limit"):
        train(_tiny(cifar_small, run, steps=4, resume=True, time_limit=used / 120))
    train(_tiny(cifar_small, run, steps=4, resume=True, time_limit=60.0))
    _, _, state = load_checkpoint(latest_checkpoint(run), only=("train_seconds",))
    assert state["train_seconds"] > used


def test_demo_trains_and_writes_its_grid(tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("tensorboard")
    from ddpm.cli.demo import run_demo

    grid = run_demo(tmp_path / "demo", steps=2, device="cpu")
    img = np.asarray(Image.open(grid))
    assert img.shape == (4 * (10 * 18 + 2), 4 * (10 * 18 + 2), 3)  # 10 x 10 digits of 16 px, padding 2, 4x
    assert run_info(str(tmp_path / "demo" / "run"))["step"] == 2
    out, err = capsys.readouterr()
    assert "demo: sampling 100 digits" in out and "sampling" in err  # progress while it samples
    last = out.strip().splitlines()[-1]
    assert str(grid) in last and f"tensorboard --logdir {tmp_path / 'demo' / 'run'}" in last
    assert list((tmp_path / "demo" / "run" / "tensorboard").glob("events.*"))


def test_demo_digits_are_sklearns_written_whole_with_normal_permissions(tmp_path: Path) -> None:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    import os
    import stat

    from ddpm.cli.demo import write_digits

    digits = sklearn_datasets.load_digits()
    root = tmp_path / "digits"
    old = os.umask(0o027)  # not the usual 022, so a hard-coded 0644 would show
    try:
        write_digits(root)
    finally:
        os.umask(old)
    files = sorted(root.rglob("*.png"))
    assert len(files) == 1797 and not list(root.rglob("*.tmp"))
    assert {p.parent.name for p in files} == {str(d) for d in range(10)}
    for d in range(10):
        assert len(list((root / str(d)).glob("*.png"))) == int((digits.target == d).sum())
    first = root / str(int(digits.target[0])) / "0000.png"
    arr = np.asarray(Image.open(first))
    assert arr.dtype == np.uint8 and arr.shape == (8, 8)
    # 17 grey levels 0..16 spread over 0..255: light ink on black.
    np.testing.assert_array_equal(arr, np.round(digits.images[0] / 16 * 255).astype(np.uint8))
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o640 for p in files + [root / ".complete"])

    # A folder left half-written (no marker) is rewritten; a complete one is left alone.
    first.unlink()
    write_digits(root)
    assert not first.exists()  # the marker says complete: nothing rewritten
    (root / ".complete").unlink()
    write_digits(root)
    assert first.is_file() and (root / ".complete").is_file()


def test_a_run_that_counted_hidden_images_is_told_why_it_cannot_resume(tmp_path: Path, capsys) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(data / f"{i}.png")
    train(_tiny(data, run, steps=1, batch_size=4))
    # As a run started by a version that counted hidden files (macOS's ._ copies, a .cache folder)
    # would have saved it: 4 images + 2 hidden.
    (data / "._0.png").write_bytes((data / "0.png").read_bytes())
    (data / ".cache").mkdir()
    (data / ".cache" / "x.png").write_bytes((data / "1.png").read_bytes())
    cfg = json.loads((run / "config.json").read_text())
    cfg["num_images"] = 6
    (run / "config.json").write_text(json.dumps(cfg))
    ckpt = sorted((run / "checkpoints").glob("*.safetensors"))[-1]
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ckpt), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta["config"] = json.dumps({**json.loads(meta["config"]), "num_images": 6})
    save_file(tensors, str(ckpt), metadata=meta)
    with pytest.raises(DDPMError, match=r"started counting 2 hidden image file\(s\).*start a new --out"):
        train(_tiny(data, run, steps=2, batch_size=4, resume=True))


def test_train_step_refuses_a_batch_that_does_not_split_into_its_micro_batches() -> None:
    """train_step() is public: a batch of 3 with --grad-accum 2 would silently drop an image, and
    a batch smaller than the micro-batch count would average an empty loss (NaN)."""
    import torch

    from ddpm.core.ema import EMA
    from ddpm.core.schedule import Schedule
    from ddpm.train import DiffusionLoss, StepSettings, TrainState, train_step
    from ddpm.core.unet import UNet, UNetConfig

    net = UNet(UNetConfig.preset("tiny", image_size=8))
    state = TrainState(net, EMA(net), torch.optim.AdamW(net.parameters()))
    loss_fn = DiffusionLoss(Schedule.linear(20))
    for batch, accum in ((3, 2), (1, 2)):
        with pytest.raises(ValueError, match=f"a batch of {batch} images does not split into {accum}"):
            train_step(net, state, loss_fn, torch.zeros(batch, 3, 8, 8), None, lr=1e-3, generator=None,
                       settings=StepSettings.from_config(TrainConfig(grad_accum=accum)))


def test_none_keeps_the_presets_value_and_old_spellings_still_mean_it(cifar_small: Path, tmp_path: Path) -> None:
    """--image-size, --base-channels, --dropout and --workers unset (None) keep the preset's value
    (auto for workers); a run saved when that was spelled 0 / -1 resumes, and a TOML file in the
    old spelling still means it."""
    from ddpm.train import config_from_dict

    run = tmp_path / "run"
    train(_tiny(cifar_small, run, steps=2, image_size=None, workers=None))
    path = run / "config.json"
    saved = json.loads(path.read_text())
    assert saved["image_size"] == 32 and saved["train"]["dropout"] is None and saved["train"]["image_size"] is None
    saved["train"].update(image_size=0, base_channels=0, dropout=-1.0, workers=-1)  # as runs saved them before
    path.write_text(json.dumps(saved))
    assert main(["train", "--out", str(run), "--resume", "--steps", "3"]) == 0
    assert run_info(str(run))["step"] == 3
    old = config_from_dict({"data": "x", "image_size": 0, "base_channels": 0, "dropout": -1.0, "workers": -1})
    assert (old.image_size, old.base_channels, old.dropout, old.workers) == (None, None, None, None)
    assert config_from_dict({"dropout": 0.2}).dropout == 0.2
