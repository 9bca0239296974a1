"""Pictures people look at: TensorBoard images and scalars of a training run, and the sampling
animation, guidance sweep and interpolation of 'ddpm sample'. Tiny models, 16x16, a few steps, CPU."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from ddpm.runtime import policy as perf
from ddpm.runtime import accounting
from ddpm.run.checkpoint import load_run
from ddpm.cli.app import main
from ddpm.sample.engine import generate, starting_noise
from ddpm.sample.pictures import ChainRecorder, guidance_sweep, interpolate, slerp
from ddpm.sample.spec import SampleSpec
from ddpm.train import TrainConfig, train
from ddpm.core.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
TILE = SIZE + 2  # make_grid's padding of 2 pixels


def _images(root: Path, classes: list[str] | None, per: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for c in classes or [""]:
        d = root / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="tiny", image_size=SIZE, steps=2, batch_size=4, lr=1e-3,
                warmup=1, log_every=1, sample_every=0, save_every=0, sample_n=4, sample_steps=2, timesteps=20,
                progress=False, tensorboard=False, precision="fp32", device="cpu", workers=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conditional run (classes 'a', 'b') whose TensorBoard log has a sample grid at steps 1 and 2."""
    root = tmp_path_factory.mktemp("pictures")
    out = root / "run"
    train(_config(_images(root / "data", ["a", "b"]), out, conditional=True, sample_every=1, tensorboard=True))
    return out


@pytest.fixture(scope="module")
def uncond_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pictures_uncond")
    out = root / "run"
    train(_config(_images(root / "data", None), out, steps=1))
    return out


def _one_line_error(capsys, argv: list[str], *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err


# ------------------------------------------------------------------------------- TensorBoard
def _events(run: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def test_tensorboard_has_a_sample_grid_per_sample_step_and_the_csv_scalars(cond_run: Path) -> None:
    acc = _events(cond_run)
    assert acc.Tags()["images"] == ["samples"]
    shots = acc.Images("samples")
    assert [s.step for s in shots] == [1, 2]
    for s in shots:  # the PNG of RUN/samples: one row per class (2) of sample_n // 2 = 2 images
        png = Image.open(cond_run / "samples" / f"step_{s.step:09d}.png")
        assert (s.width, s.height) == png.size == (2 * TILE + 2, 2 * TILE + 2)

    scalars = set(acc.Tags()["scalars"])
    assert {"loss", "lr", "images_per_s", "epoch", "ema_decay", "grad_norm"} <= scalars
    assert "mfu" not in scalars  # a CPU has no known peak, so no fraction of it is made up
    with open(cond_run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["step"])) for r in rows] == [1, 2] and all(r["mfu"] == "" for r in rows)
    for r in rows:  # metrics.csv and TensorBoard hold the same numbers
        for key, value in r.items():
            if key != "step" and value != "":
                tb = {e.step: e.value for e in acc.Scalars(key)}
                assert math.isclose(tb[int(float(r["step"]))], float(value), rel_tol=1e-6), key
    # EDM's EMA starts with a half-life of 0 images: the first update copies the weights (decay 0).
    assert [float(r["ema_decay"]) for r in rows][0] == 0.0 and 0 < float(rows[1]["ema_decay"]) < 1
    assert all(float(r["grad_norm"]) > 0 for r in rows)


def test_a_resume_keeps_the_tensorboard_events_of_its_own_step(tmp_path: Path) -> None:
    # The grid and scalars of the checkpointed step were made with its weights and are not redone.
    data, run = _images(tmp_path / "data", None), tmp_path / "run"
    train(_config(data, run, tensorboard=True, sample_every=1, save_every=1))
    train(_config(data, run, tensorboard=True, sample_every=1, save_every=1, steps=3, resume=True))
    acc = _events(run)
    assert [s.step for s in acc.Images("samples")] == [1, 2, 3]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


def test_a_failing_tensorboard_writer_warns_once_and_training_goes_on(tmp_path: Path, monkeypatch) -> None:
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def full_disk(self, *a, **kw):  # what the background writer re-raises after a failed write
        calls.append(a)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", full_disk)
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="cannot write the TensorBoard log in .*; continuing without it") as w:
        train(_config(_images(tmp_path / "data", None), run, tensorboard=True, sample_every=1, steps=3))
    assert len([x for x in w if "TensorBoard" in str(x.message)]) == 1 and len(calls) == 1
    with open(run / "metrics.csv", newline="") as f:  # the CSV log is whole
        assert [int(float(r["step"])) for r in csv.DictReader(f)] == [1, 2, 3]


def test_model_flops_utilisation_is_logged_where_the_peak_is_known(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(accounting, "peak_flops", lambda device, precision: 1e12)
    run = tmp_path / "run"
    train(_config(_images(tmp_path / "data", None), run, tensorboard=True, steps=1, grad_clip=0.0))
    with open(run / "metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    cfg = UNetConfig.preset("tiny", image_size=SIZE)
    with torch.device("meta"):
        net, x, t = UNet(cfg), torch.zeros(1, 3, SIZE, SIZE), torch.zeros(1, dtype=torch.long)
    expected = float(row["images_per_s"]) * accounting.train_flops_per_image(net, x, t) / 1e12
    assert math.isclose(float(row["mfu"]), expected, rel_tol=1e-6)
    assert [e.value for e in _events(run).Scalars("mfu")] == pytest.approx([expected], rel=1e-6)
    assert float(row["grad_norm"]) > 0  # measured with --grad-clip 0 too


def test_flops_count_on_meta_equals_real_and_peaks_come_from_data_sheets(monkeypatch) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    cfg = UNetConfig.preset("tiny", image_size=SIZE, num_classes=2)
    args = (torch.zeros(2, 3, SIZE, SIZE), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    # FlopCounterMode has no formula for the CPU's fused attention kernel; on meta (as on CUDA)
    # attention is counted, as the plain matrix products of the math kernel are.
    with sdpa_kernel(SDPBackend.MATH):
        real = accounting.train_flops_per_image(UNet(cfg), *args)
    with torch.device("meta"):
        meta = accounting.train_flops_per_image(UNet(cfg), *(a.to("meta") for a in args))
    assert real == meta > 0

    assert accounting.peak_flops("cpu", "bf16") is None and accounting.peak_flops("cpu", "fp32") is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    peaks = {"NVIDIA H100 80GB HBM3": 989.5e12, "NVIDIA H100 PCIe": 756.5e12, "NVIDIA H200": 989.5e12,
             "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA H200 NVL": None, "NVIDIA GeForce RTX 4090": None}
    for name, peak in peaks.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert accounting.peak_flops("cuda", "bf16") == peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-PCIE-40GB")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default: convolutions in TF32
    assert accounting.peak_flops("cuda", "fp32") == 156e12
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert accounting.peak_flops("cuda", "fp32") == 19.5e12


# ----------------------------------------------------------------------------------- animation
def test_animate_writes_a_gif_of_x_t_beside_x0(cond_run: Path, tmp_path: Path, capsys) -> None:
    gif, png = tmp_path / "chain.gif", tmp_path / "grid.png"
    assert main(["sample", "--run", str(cond_run), "--n", "3", "--sampler", "ddim", "--steps", "5", "--animate",
                 str(gif), "--animate-every", "2", "--device", "cpu", "--out", str(png)]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(gif) as im:
        frames = list(ImageSequence.Iterator(im))
        # steps 2, 4 and the last (5); 3 tiles of [x_t | x0] (32 x 16 px), 2 per row
        assert len(frames) == math.ceil(5 / 2) == 3
        assert im.size == (2 * (2 * SIZE + 2) + 2, 2 * TILE + 2)
    assert Image.open(png).size == (2 * TILE + 2, 2 * TILE + 2)

    # Without --animate-every: every step of a short chain.
    assert main(["sample", "--run", str(cond_run), "--n", "2", "--class", "a", "b", "--steps", "4", "--animate",
                 str(gif), "--device", "cpu", "--out", str(png)]) == 0
    with Image.open(gif) as im:
        assert sum(1 for _ in ImageSequence.Iterator(im)) == 4
        assert im.size == (2 * (2 * SIZE + 2) + 2, 2 * TILE + 2)  # a row per class, 2 images each


def test_the_chain_ends_at_the_samples_and_costs_nothing_unrecorded(cond_run: Path) -> None:
    run = load_run(cond_run, "cpu")
    quiet = perf.resolve_runtime("cpu", progress=False)
    for sampler in ("ddim", "dpm-solver"):
        rec = ChainRecorder(every=3, steps=7)
        spec = SampleSpec(sampler=sampler, steps=7, batch_size=2)
        images = generate(run, 5, spec, quiet, callback=rec)
        chain = rec.chain(images)
        assert chain.steps == [2, 5, 6] and chain.x_t.shape == chain.x0.shape == (3, 5, 3, SIZE, SIZE)
        assert torch.equal(chain.x_t[-1], images)  # the last x_t is the sample, batches in order
        plain = generate(run, 5, spec, quiet)
        assert torch.equal(plain, images)  # recording does not change what is sampled


# ------------------------------------------------------------------------------ guidance sweep
def test_guidance_sweep_grid_has_a_row_per_class_and_a_column_per_scale(cond_run: Path, tmp_path: Path,
                                                                           capsys) -> None:
    out = tmp_path / "sweep.png"
    assert main(["sample", "--run", str(cond_run), "--guidance-sweep", "0", "1", "3", "--steps", "3",
                 "--device", "cpu", "--out", str(out)]) == 0
    assert "guidance 0, 1, 3" in capsys.readouterr().out
    assert Image.open(out).size == (3 * TILE + 2, 2 * TILE + 2)
    assert main(["sample", "--run", str(cond_run), "--guidance-sweep", "1", "2", "--class", "b", "--n", "2",
                 "--steps", "3", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).size == (2 * TILE + 2, 2 * TILE + 2)  # 2 rows of class b x 2 scales

    # Column j is exactly what plain sampling at scale j gives: each row keeps its starting noise.
    run = load_run(cond_run, "cpu")
    quiet = perf.resolve_runtime("cpu", progress=False)
    labels = torch.tensor([0, 1])
    scales = [0.0, 2.0, 5.0]
    spec = SampleSpec(steps=3, seed=4)
    grid = guidance_sweep(run, scales, labels, spec, quiet).view(2, 3, 3, SIZE, SIZE)
    for j, s in enumerate(scales):
        assert torch.equal(grid[:, j], generate(run, 2, spec.with_(guidance=s), quiet, labels=labels))


def test_guidance_sweep_and_animation_refuse_what_they_cannot_do(cond_run: Path, uncond_run: Path, tmp_path: Path,
                                                                 capsys) -> None:
    out = str(tmp_path / "x.png")
    base = ["sample", "--run", str(cond_run), "--device", "cpu", "--out", out]
    _one_line_error(capsys, ["sample", "--run", str(uncond_run), "--guidance-sweep", "1", "2", "--device", "cpu",
                             "--out", out], "--guidance-sweep", "class-conditional")
    _one_line_error(capsys, base + ["--guidance-sweep", "1", "--interpolate"], "choose one")
    _one_line_error(capsys, base + ["--guidance-sweep", "1", "--animate", str(tmp_path / "a.gif")], "--animate")
    _one_line_error(capsys, base + ["--guidance-sweep", "1", "nan"], "finite")
    _one_line_error(capsys, base + ["--animate", str(tmp_path / "a.png")], "--animate", ".gif")
    _one_line_error(capsys, base + ["--animate", str(tmp_path / "a.gif"), "--animate-every", "0"], "--animate-every")
    _one_line_error(capsys, base + ["--animate-every", "2"], "--animate-every", "--animate")
    _one_line_error(capsys, base + ["--interpolate", "--n", "1"], "--interpolate", "at least 2")
    _one_line_error(capsys, base + ["--interpolate", "--class", "a", "b"], "--interpolate", "one class")
    _one_line_error(capsys, base + ["--interpolate", "--nrow", "3"], "--nrow")
    blocked = tmp_path / "file"
    blocked.write_text("")
    _one_line_error(capsys, base + ["--animate", str(blocked / "a.gif")], "--animate", "not a folder")
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.gif"))  # checked before any work


def test_seeds_out_of_range_and_image_counts_beyond_memory_are_one_line(cond_run: Path, tmp_path: Path, monkeypatch,
                                                                         capsys) -> None:
    """--seed takes 0 .. MAX_SEED in every command (a negative or 64-bit-overflowing seed was a
    traceback from torch.Generator); an --n whose pixels cannot fit in memory is refused before
    anything of size n is built (it was an allocation failure)."""
    from ddpm.core.samplers import MAX_SEED

    out = str(tmp_path / "x.png")
    base = ["sample", "--run", str(cond_run), "--device", "cpu", "--out", out, "--steps", "2"]
    _one_line_error(capsys, base + ["--seed", "-1"], "--seed must be from 0 to", str(MAX_SEED))
    _one_line_error(capsys, base + ["--seed", str(2**64)], "--seed", str(2**64))
    _one_line_error(capsys, base + ["--n", str(10**12), "--class", "a", "b"], "--n", "GiB", "ask for fewer")
    from ddpm.sample import engine

    for where in (accounting, engine):  # room for four images (engine imports the function itself)
        monkeypatch.setattr(where, "host_memory_bytes", lambda: 4 * 2 * 3 * SIZE**2)
    assert main(base + ["--n", "4", "--seed", str(MAX_SEED)]) == 0  # the largest seed samples
    capsys.readouterr()
    _one_line_error(capsys, base + ["--n", "5"], f"--n 5 images of {SIZE}x{SIZE} need 7.5 KiB", "has 6.0 KiB")
    _one_line_error(capsys, ["eval", "--run", str(cond_run), "--ref", str(tmp_path), "--n", "5", "--device", "cpu"],
                    f"--n 5 images of {SIZE}x{SIZE}")
    _one_line_error(capsys, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--seed", "-1"], "--seed")


# -------------------------------------------------------------------------------- interpolation
def test_slerp_has_exact_ends_and_keeps_the_norm() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    path = slerp(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (5, 3, 8, 8) and torch.equal(path[0], a) and torch.equal(path[-1], b)
    u, v = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    mid = slerp(u, v, [0.5])[0]
    assert torch.allclose(mid, torch.tensor([0.5**0.5, 0.5**0.5])) and math.isclose(float(mid.norm()), 1.0, rel_tol=1e-6)
    assert torch.allclose(slerp(u, u, [0.3])[0], u)  # parallel: no division by sin(0)


def test_interpolation_row_layout_and_its_ends_are_the_plain_samples(cond_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "walk.png"
    assert main(["sample", "--run", str(cond_run), "--interpolate", "--n", "5", "--sampler", "ddim", "--steps", "3",
                 "--seed", "2", "--device", "cpu", "--out", str(out)]) == 0
    assert Image.open(out).size == (5 * TILE + 2, TILE + 2)
    assert main(["sample", "--run", str(cond_run), "--interpolate", "--class", "b", "--device", "cpu", "--steps", "2",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (8 * TILE + 2, TILE + 2)  # the default --n of a row

    run = load_run(cond_run, "cpu")
    quiet = perf.resolve_runtime("cpu", progress=False)
    assert torch.equal(starting_noise(run, 1, seed=2)[0], slerp(*(starting_noise(run, 1, seed=s)[0] for s in (2, 3)),
                                                                 [0.0])[0])
    for sampler in ("ddim", "dpm-solver"):
        spec = SampleSpec(sampler=sampler, steps=3, seed=2)
        ends = [generate(run, 1, spec.with_(seed=s), quiet)[0] for s in (2, 3)]
        exact = interpolate(run, 5, spec.with_(batch_size=1), quiet)  # each image alone: the same arithmetic
        assert torch.equal(exact[0], ends[0]) and torch.equal(exact[-1], ends[1])
        batched = interpolate(run, 5, spec, quiet)  # one batch may round a little differently
        for got, want in ((batched[0], ends[0]), (batched[-1], ends[1])):
            assert (got.int() - want.int()).abs().max() <= 1
    with pytest.warns(UserWarning, match="not a smooth path"):
        interpolate(run, 2, SampleSpec(seed=0, sampler="ancestral", steps=2), quiet)


# ------------------------------------------------------------------------------- runtime policy
def test_train_sample_and_eval_use_one_precision_policy(uncond_run: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """'ddpm sample' and 'ddpm eval' sample in the precision 'ddpm train' chooses (bf16 where the
    device runs it fast), and each says so; --precision fp32 overrides it."""
    from ddpm.scoring import evaluate

    monkeypatch.setattr(perf, "bf16_supported", lambda device: True)  # any CPU: as on one with native bf16
    seen: list[str] = []
    real = perf.inference_model

    def spy(net, device, precision="auto", channels_last=None):
        seen.append(precision)  # what the command passed: resolved once, never "auto" here
        return real(net, device, precision, channels_last)

    monkeypatch.setattr(perf, "inference_model", spy)
    out = tmp_path / "g.png"
    assert main(["sample", "--run", str(uncond_run), "--n", "2", "--steps", "2", "--out", str(out),
                 "--device", "cpu"]) == 0
    assert seen == ["bf16"] and "bf16 autocast on cpu" in capsys.readouterr().out
    assert main(["sample", "--run", str(uncond_run), "--n", "2", "--steps", "2", "--out", str(out),
                 "--device", "cpu", "--precision", "fp32"]) == 0
    assert seen == ["bf16", "fp32"] and "fp32 on cpu" in capsys.readouterr().out
    # eval: the same default, reported in its JSON; a stand-in extractor keeps Inception out of it
    ref = _images(tmp_path / "ref", None, per=6)

    class Features:
        sha256 = "stand-in"

        def __init__(self, *args, **kwargs) -> None:
            pass

        def __call__(self, batch) -> np.ndarray:
            x = torch.stack(list(batch)).float() if isinstance(batch, list) else batch.float()
            return x.flatten(1)[:, :8].double().numpy() + np.arange(8)

    monkeypatch.setattr(evaluate, "FeatureExtractor", Features)
    from ddpm.scoring.metrics import gaussian_stats

    feats = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    fs = evaluate.FeatureSet(*gaussian_stats(feats.astype(np.float64)), feats, None, None, str(ref), "stand-in")
    monkeypatch.setattr(evaluate, "reference_stats", lambda *a, **k: fs)
    r = evaluate.evaluate_run(uncond_run, str(ref), n=3, spec=SampleSpec(steps=2),
                              runtime=perf.resolve_runtime("cpu", progress=False),
                              settings=evaluate.ReferenceSettings(use_cache=False, kid_subset=2, kid_subsets=2,
                                                                  precision_recall=False))
    assert r["sampling_precision"] == "bf16" and seen[-1] == "bf16"
    # the CLI's result file names the precision that ran, so a bf16 and an fp32 score never overwrite each other
    scoring = ["eval", "--run", str(uncond_run), "--ref", str(ref), "--n", "3", "--steps", "2", "--device", "cpu",
               "--no-pr", "--no-cache", "--quiet", "--kid-subset", "2", "--kid-subsets", "2"]
    assert main(scoring) == 0 and main([*scoring, "--precision", "fp32"]) == 0
    names = sorted(p.name for p in (uncond_run / "eval").glob("eval-*.json"))
    assert names == ["eval-dpm-solver-2steps-g1-n3-seed0-bf16.json", "eval-dpm-solver-2steps-g1-n3-seed0-fp32.json"]
    assert [json.loads((uncond_run / "eval" / n).read_text())["sampling_precision"] for n in names] == ["bf16", "fp32"]
    # without --steps the name says the steps that ran: DDIM's default 50, capped at this run's T of 20
    at = scoring.index("--steps")
    assert main([*scoring[:at], *scoring[at + 2:], "--sampler", "ddim"]) == 0
    ran = uncond_run / "eval" / "eval-ddim-20steps-g1-n3-seed0-bf16.json"
    assert json.loads(ran.read_text())["steps"] == 20
