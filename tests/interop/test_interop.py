"""diffusers interop: ``ddpm export`` / ``ddpm import`` and the weight and schedule mappings.

Everything runs on small randomly initialised networks (no downloads, no network access):
ours -> diffusers -> ours is the identity on weights; the exported ``UNet2DModel`` and an
imported one predict what our UNet predicts, to float32 rounding; the exported scheduler's
tables are ours; configs our UNet cannot compute are one-line errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only, never the Hub

from ddpm import Schedule, UNet, UNetConfig  # noqa: E402
from ddpm.run.checkpoint import load_run, save_checkpoint, weights_sha256  # noqa: E402
from ddpm.cli.app import main  # noqa: E402
from ddpm.errors import DDPMError  # noqa: E402
from ddpm.interop.diffusers import (  # noqa: E402
    export_diffusers,
    import_diffusers,
    schedule_from_diffusers,
    scheduler_config_to_diffusers,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    unet_config_from_diffusers,
    unet_config_to_diffusers,
)

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LOCAL = {"local_files_only": True}
TIMESTEPS = torch.tensor([0, 1, 250, 999])
# Outputs are O(1); the two networks run the same float32 operations in different groupings
# (one fused qkv matmul against three, other kernel blockings): measured <= 2e-6.
ATOL, RTOL = 2e-5, 1e-5

TINY = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), dropout=0.0, norm_groups=8)
CONFIGS = {
    "tiny": TINY,
    "conditional": UNetConfig(**{**TINY.to_dict(), "num_classes": 3}),
    # the original DDPM conventions, attention on the outer level, two heads of equal width everywhere
    "ddpm-original": UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=2,
                                attention_resolutions=(8, 4), num_heads=2, dropout=0.1, norm_groups=8,
                                norm_eps=1e-6, time_freq_shift=1.0, downsample_padding=0),
}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (our zero-initialised layers would make every output 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def inputs(cfg: UNetConfig, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(TIMESTEPS), cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)


def make_run(path: Path, cfg: UNetConfig, schedule: Schedule | None = None, prediction: str = "eps",
             seed: int = 0) -> tuple[Path, UNet, UNet]:
    """A run folder with random model and (different) EMA weights, as 'ddpm train' writes it."""
    model, ema = randomize(UNet(cfg), seed), randomize(UNet(cfg), seed + 1)
    schedule = schedule or Schedule.linear(1000)
    classes = [f"class{i}" for i in range(cfg.num_classes)] if cfg.conditional else None
    config = {"model": cfg.to_dict(), "schedule": schedule.to_dict(), "prediction": prediction, "classes": classes,
              "image_size": cfg.image_size, "train": {"model": "tiny"}}
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    save_checkpoint(path, 7, config, {"model": model.state_dict(), "ema": {"weights": ema.state_dict(),
                                                                          "num_updates": 7}})
    return path, model, ema


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # earlier commands' output (progress bars) is not part of this error
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------------------- weights
def test_config_fields_for_imported_networks_stay_out_of_old_configs():
    """norm_eps, time_freq_shift and downsample_padding are saved only when they differ from the
    defaults, so every config written before they existed (or with the defaults) is unchanged."""
    assert not {"norm_eps", "time_freq_shift", "downsample_padding"} & set(TINY.to_dict())
    d = CONFIGS["ddpm-original"].to_dict()
    assert (d["norm_eps"], d["time_freq_shift"], d["downsample_padding"]) == (1e-6, 1.0, 0)
    assert UNetConfig.from_dict(json.loads(json.dumps(d))) == CONFIGS["ddpm-original"]
    for bad in ({"downsample_padding": 2}, {"norm_eps": 0.0}, {"time_freq_shift": 8.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            UNetConfig(**{**TINY.to_dict(), **bad})


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_diffusers_to_ours_gives_identical_weights(name):
    cfg = CONFIGS[name]
    state = randomize(UNet(cfg), 3).state_dict()
    config = unet_config_to_diffusers(cfg)
    theirs = state_dict_to_diffusers(state, cfg)
    back_cfg, back = state_dict_from_diffusers(theirs, config, null_class=cfg.conditional)
    assert back_cfg == cfg
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k
    # and the diffusers model built from the config takes exactly these weights
    UNet2DModel.from_config(config).load_state_dict(theirs, strict=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_unet2dmodel_predicts_like_ours(tmp_path, name):
    cfg = CONFIGS[name]
    run, _, ema = make_run(tmp_path / "run", cfg)
    out = export_diffusers(run, tmp_path / "export")
    unet = UNet2DModel.from_pretrained(out / "unet", use_safetensors=True, **LOCAL).eval()
    x = inputs(cfg)
    labels = torch.tensor([0, 2, 3, 1]) if cfg.conditional else None  # 3 = the null class
    with torch.no_grad():
        theirs = unet(x, TIMESTEPS, class_labels=labels).sample
        ours = ema(x, TIMESTEPS, labels)
    assert ours.abs().mean() > 0.1  # a real function, not zeros
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=RTOL)
    meta = json.loads((out / "ddpm_export.json").read_text())
    assert meta["weights"] == "ema" and meta["step"] == 7


def test_export_raw_weights_and_pipeline_loads_and_samples(tmp_path):
    run, model, ema = make_run(tmp_path / "run", TINY)
    assert main(["export", str(run), str(tmp_path / "raw"), "--format", "diffusers", "--no-ema"]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "raw", use_safetensors=True, **LOCAL)
    state = {k: v for k, v in pipe.unet.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in state_dict_to_diffusers(model.state_dict(), TINY).items())
    assert not torch.equal(state["conv_out.weight"], ema.state_dict()["conv_out.weight"])
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and (images >= 0).all() and (images <= 1).all()


# ----------------------------------------------------------------------------- schedules
SCHEDULES = {
    "linear-eps": (Schedule.linear(1000), "eps", "linear"),
    "cosine-eps": (Schedule.cosine(1000), "eps", "squaredcos_cap_v2"),
    "sigmoid-v": (Schedule.sigmoid(1000), "v", None),
    "shifted-linear-x0": (Schedule.linear(500, logsnr_shift=-1.0), "x0", None),
    "zero-snr-cosine-v": (Schedule.cosine(1000, zero_terminal_snr=True), "v", None),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_exported_scheduler_alphas_cumprod_equal_ours(tmp_path, name):
    schedule, prediction, beta_schedule = SCHEDULES[name]
    run, _, _ = make_run(tmp_path / "run", TINY, schedule, prediction)
    out = export_diffusers(run, tmp_path / "export")
    sched = DDPMScheduler.from_pretrained(out, subfolder="scheduler", **LOCAL)
    cfg = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    if beta_schedule is None:  # anything diffusers has no name for travels as its exact betas
        assert cfg["trained_betas"] is not None
    else:
        assert cfg["beta_schedule"] == beta_schedule and cfg["trained_betas"] is None
    assert sched.config.prediction_type == {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[prediction]
    assert sched.config.num_train_timesteps == schedule.T
    # diffusers keeps float32 tables: equal to float32 rounding of betas and of the product. Where
    # betas near max_beta = 0.999 (cosine, sigmoid), alpha = 1 - beta is ~1e-3 and its float32
    # rounding is ~3e-5 of it relatively: measured 1.3e-5 there, 4e-7 elsewhere.
    ours, theirs = schedule.alphas_cumprod, sched.alphas_cumprod.double()
    assert theirs.dtype == torch.float64 and len(theirs) == len(ours)
    torch.testing.assert_close(theirs, ours, rtol=2e-5, atol=1e-9)
    if schedule.zero_terminal_snr:
        assert theirs[-1] == 0
    # and the scheduler config reads back as the same schedule
    back, back_prediction = schedule_from_diffusers(cfg)
    assert back_prediction == prediction
    torch.testing.assert_close(back.alphas_cumprod, ours, rtol=1e-12, atol=0)


def test_scheduler_configs_of_other_schedules_import():
    lin, pred = schedule_from_diffusers({"beta_schedule": "linear"})  # DDPMScheduler's defaults
    assert lin == Schedule.linear(1000) and lin.kind == "linear" and pred == "eps"
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    s, _ = schedule_from_diffusers(dict(ref.config))
    torch.testing.assert_close(s.alphas_cumprod, ref.alphas_cumprod.double(), rtol=2e-5, atol=0)
    with pytest.raises(DDPMError, match=r"variance_type=\"learned_range\""):
        schedule_from_diffusers({"variance_type": "learned_range"})
    with pytest.raises(DDPMError, match=r"prediction_type=\"flow\""):
        schedule_from_diffusers({"prediction_type": "flow"})
    with pytest.raises(DDPMError, match=r"beta_schedule=\"laplace\""):
        schedule_from_diffusers({"beta_schedule": "laplace"})
    assert scheduler_config_to_diffusers(Schedule.linear(10, 1e-3, 0.1), "v")["beta_end"] == 0.1


# -------------------------------------------------------------------------------- import
def ddpm_architecture(**overrides) -> UNet2DModel:
    """A small UNet2DModel in google/ddpm-cifar10-32's layout (channels cut down)."""
    config = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                  attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6, freq_shift=1, flip_sin_to_cos=False,
                  downsample_padding=0, center_input_sample=False, time_embedding_type="positional",
                  mid_block_scale_factor=1, act_fn="silu")
    config.update(overrides)
    torch.manual_seed(0)
    return randomize(UNet2DModel(**config), 5)


def save_pipeline(unet: UNet2DModel, path: Path, **scheduler) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.parametrize("overrides", [{}, {"flip_sin_to_cos": True}, {"attention_head_dim": 8},
                                       {"downsample_padding": 1, "norm_eps": 1e-5, "freq_shift": 0}])
def test_diffusers_ddpm_architecture_imports_and_predicts_the_same(tmp_path, capsys, overrides):
    unet = ddpm_architecture(**overrides)
    src = save_pipeline(unet, tmp_path / "hub")
    assert main(["import", str(src), "--out", str(tmp_path / "run")]) == 0
    assert "wrote run" in capsys.readouterr().out
    run = load_run(tmp_path / "run")
    assert run.prediction == "eps" and run.schedule == Schedule.linear(1000) and run.step == 0
    assert run.model.config.num_heads == (32 // 8 if overrides.get("attention_head_dim") else 1)
    x = inputs(run.model.config, seed=1)
    with torch.no_grad():
        theirs = unet(x, TIMESTEPS).sample
        ours, ours_ema = run.model(x, TIMESTEPS), run.ema_model(x, TIMESTEPS)
    assert theirs.abs().mean() > 0.1
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)
    assert torch.equal(ours, ours_ema)


def test_import_reads_legacy_attention_names_and_bare_unet_folders(tmp_path):
    from safetensors.torch import load_file, save_file

    unet = ddpm_architecture()
    src = save_pipeline(unet, tmp_path / "hub", beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    weights = src / "unet" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in load_file(weights).items():
        for new, legacy in old.items():
            k = k.replace(f".{new}.", f".{legacy}.")
        renamed[k] = v
    assert any(".query." in k for k in renamed)
    save_file(renamed, weights)
    # the UNet folder itself, with the scheduler found in ../scheduler
    out = import_diffusers(src / "unet", tmp_path / "run")
    run = load_run(out)
    assert run.prediction == "v" and run.schedule == Schedule.cosine(1000)
    x = inputs(run.model.config, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(run.model(x, TIMESTEPS), unet(x, TIMESTEPS).sample, atol=ATOL, rtol=RTOL)


def test_export_then_import_round_trips_a_conditional_run(tmp_path, capsys):
    cfg = CONFIGS["conditional"]
    run, _, ema = make_run(tmp_path / "run", cfg, Schedule.sigmoid(1000), "v")
    assert main(["export", str(run), str(tmp_path / "export")]) == 0
    assert "class_labels" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "export"), "--out", str(tmp_path / "back")]) == 0
    back = load_run(tmp_path / "back")
    assert back.classes == ["class0", "class1", "class2"] and back.prediction == "v"
    assert back.schedule.kind == "sigmoid" and back.schedule == Schedule.sigmoid(1000)  # the exact schedule
    assert back.model.config == cfg
    assert weights_sha256(back.model.state_dict()) == weights_sha256(ema.state_dict())


def test_imported_run_samples_reports_and_fine_tunes(tmp_path, capsys):
    from PIL import Image

    src = save_pipeline(ddpm_architecture(), tmp_path / "hub")
    run = tmp_path / "run"
    assert main(["import", str(src), "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["info", str(run), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 0 and info["prediction"] == "eps" and info["config"]["train"]["model"] == "imported"
    assert main(["sample", "--run", str(run), "--n", "1", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert (tmp_path / "grid.png").is_file()

    data = tmp_path / "images"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(data / f"{i}.png")
    common = ["--device", "cpu", "--precision", "fp32", "--workers", "0", "--no-progress", "--no-tensorboard",
              "--sample-every", "0", "--sample-n", "1", "--sample-steps", "1", "--batch-size", "2"]
    # The first session chooses its own training options (lr, warm-up, ...), but not the target.
    one_line_error(capsys, ["train", "--out", str(run), "--resume", "--data", str(data), "--steps", "1",
                            "--prediction", "v", *common])
    assert main(["train", "--out", str(run), "--resume", "--data", str(data), "--steps", "1", "--lr", "1e-5",
                 "--warmup", "0", *common]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert "imported" in saved and saved["train"]["lr"] == 1e-5 and saved["model"]["norm_eps"] == 1e-6
    # later sessions are ordinary resumes: same options, more steps
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", *common]) == 0
    assert load_run(run).step == 2
    one_line_error(capsys, ["train", "--out", str(run), "--resume", "--steps", "3", "--lr", "1e-3", *common])
    capsys.readouterr()


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("field,value", [
    ("resnet_time_scale_shift", "scale_shift"),
    ("out_channels", 6),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("down_block_types", ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D"]),
    ("attention_head_dim", 12),
    ("time_embedding_type", "fourier"),
    ("center_input_sample", True),
    ("mid_block_scale_factor", 2),
])
def test_unmappable_configs_give_a_one_line_error_naming_the_field(field, value):
    config = dict(ddpm_architecture().config)
    config[field] = value
    with pytest.raises(DDPMError) as e:
        unet_config_from_diffusers(config)
    msg = str(e.value)
    assert "\n" not in msg and field in msg and json.dumps(value) in msg, msg


def test_unmappable_folder_via_cli_writes_nothing(tmp_path, capsys):
    unet = ddpm_architecture()
    src = save_pipeline(unet, tmp_path / "hub")
    config = json.loads((src / "unet" / "config.json").read_text())
    config["resnet_time_scale_shift"] = "scale_shift"
    (src / "unet" / "config.json").write_text(json.dumps(config))
    err = one_line_error(capsys, ["import", str(src), "--out", str(tmp_path / "run")])
    assert 'resnet_time_scale_shift="scale_shift"' in err
    assert not (tmp_path / "run").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hub"]


def test_bin_pickles_are_refused_without_loading_them(tmp_path, capsys):
    src = save_pipeline(ddpm_architecture(), tmp_path / "hub")
    (src / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (src / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not even a pickle")
    err = one_line_error(capsys, ["import", str(src), "--out", str(tmp_path / "run")])
    assert "pickle" in err and "safetensors" in err and "weights_only=True" in err
    assert not (tmp_path / "run").exists()


def test_missing_scheduler_and_unexportable_heads_and_existing_outputs(tmp_path, capsys):
    src = save_pipeline(ddpm_architecture(), tmp_path / "hub")
    bare = tmp_path / "bare"
    (src / "unet").rename(bare)
    err = one_line_error(capsys, ["import", str(bare), "--out", str(tmp_path / "run")])
    assert "--scheduler" in err
    assert main(["import", str(bare), "--out", str(tmp_path / "run"),
                 "--scheduler", str(src / "scheduler" / "scheduler_config.json")]) == 0
    err = one_line_error(capsys, ["import", str(bare), "--out", str(tmp_path / "run")])
    assert "already exists" in err
    err = one_line_error(capsys, ["export", str(tmp_path / "run"), str(src)])
    assert "already exists" in err

    # heads of different widths: UNet2DModel has a single attention_head_dim
    cfg = UNetConfig(image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                     attention_resolutions=(16,), num_heads=2, dropout=0.0, norm_groups=8)
    run, _, _ = make_run(tmp_path / "heads", cfg)
    err = one_line_error(capsys, ["export", str(run), str(tmp_path / "heads-export")])
    assert "attention_head_dim" in err and "num_heads=2" in err
    assert not (tmp_path / "heads-export").exists()
    # a first level wider than the stem: UNet2DModel's stem is as wide as its first level
    with pytest.raises(DDPMError, match=r"channel_mults=\[2, 2\]"):
        unet_config_to_diffusers(UNetConfig(**{**TINY.to_dict(), "channel_mults": (2, 2)}))


def test_a_failed_write_leaves_no_folder_behind(tmp_path, monkeypatch):
    import ddpm.interop.diffusers

    src = save_pipeline(ddpm_architecture(), tmp_path / "hub")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ddpm.interop.diffusers, "save_checkpoint", disk_full)
    with pytest.raises(DDPMError, match="No space left on device"):
        import_diffusers(src, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]  # no run, no temporary folder


def test_an_unwritable_output_location_is_refused_before_weights_are_read(tmp_path, capsys, monkeypatch):
    import ddpm.interop.diffusers

    src = save_pipeline(ddpm_architecture(), tmp_path / "hub")
    run, _, _ = make_run(tmp_path / "run", TINY)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a file where the output's parent folder must go

    def never(*args, **kwargs):
        raise AssertionError("weights read before the output location was checked")

    monkeypatch.setattr(ddpm.interop.diffusers, "load_run", never)
    monkeypatch.setattr(ddpm.interop.diffusers, "_read_weights", never)
    err = one_line_error(capsys, ["export", str(run), str(blocker / "export")])
    assert "a-file" in err and "not a folder" in err
    err = one_line_error(capsys, ["import", str(src), "--out", str(blocker / "imported")])
    assert "a-file" in err and "not a folder" in err
