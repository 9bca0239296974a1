"""FID during training (``ddpm train --eval-every``) and the memorisation check (``ddpm eval --nearest``).

Most tests stand a 12-d feature extractor (2x2 average-pooled RGB) in for the Inception network,
as tests/scoring/test_metrics.py does, so they run in seconds; the last one goes through the real
network end to end on a handful of images.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.runtime.policy import resolve_runtime
from ddpm.sample.spec import SampleSpec
from ddpm.scoring import evaluate
from ddpm.scoring import memorisation as nearest
from ddpm.train import monitor as train_module
from ddpm.cli.app import main, run_info
from ddpm.errors import DDPMError
from ddpm.train import TrainConfig, train
from conftest import FakeExtractor


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch) -> Path:
    """Reference statistics are cached in a folder of the test's own."""
    monkeypatch.setenv("DDPM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "fid"


def _images(folder: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    """``n`` images: a random base colour per image plus pixel noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = np.clip(rng.integers(30, 220, 3) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{seed:02d}_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("data"), 8)


def _tiny(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), model="tiny", image_size=16, steps=6, batch_size=4, lr=1e-3,
                warmup=2, log_every=1, sample_every=0, save_every=0, sample_n=2, sample_steps=3, timesteps=20,
                dropout=0.1, progress=False, tensorboard=False, precision="fp32", device="cpu", workers=0)
    base.update(kw)
    return TrainConfig(**base)


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _eval_steps(run: Path) -> list[int]:
    return [int(float(r["step"])) for r in _rows(run) if r["fid"]]


class Killed(Exception):
    pass


# ------------------------------------------------------------------------- FID during training
def test_eval_every_logs_fid_and_kid_rows_the_curve_and_the_floor(data: Path, tmp_path: Path, fake_net, capsys) -> None:
    run = tmp_path / "run"
    train(_tiny(data, run, steps=5, eval_every=2, eval_n=4, tensorboard=True))
    out = capsys.readouterr().out
    # steps 2 and 4, and the last step
    assert _eval_steps(run) == [2, 4, 5]
    rows = _rows(run)
    assert [int(float(r["step"])) for r in rows if r["loss"]] == [1, 2, 3, 4, 5]  # the loss rows are all there
    for r in rows:
        assert bool(r["loss"]) != bool(r["fid"])  # one kind per row
        if r["fid"]:
            assert float(r["fid"]) > 0 and r["kid"] != ""
    floor = json.loads((run / "fid_floor.json").read_text())
    assert floor["n"] == 4 and floor["fid_floor"] > 0
    assert "biased upward" in out and f"{floor['fid_floor']:.2f}" in out and "against the training images" in out
    assert out.count("step 4: FID ") == 1
    assert (run / "fid.png").stat().st_size > 0 and (run / "loss.png").exists()
    events = b"".join(p.read_bytes() for p in (run / "tensorboard").glob("events*"))
    assert b"fid" in events and b"kid" in events


def test_eval_does_not_change_training_and_resume_keeps_one_row_per_eval_step(data: Path, tmp_path: Path,
                                                                             fake_net) -> None:
    plain, evald = tmp_path / "plain", tmp_path / "evald"
    train(_tiny(data, plain))

    def kill_at_step_4(step: int, loss: float) -> None:
        if step == 4:
            raise Killed  # after its loss row, before its checkpoint and evaluation

    with pytest.raises(Killed):
        train(_tiny(data, evald, eval_every=2, eval_n=4, save_every=3), on_step=kill_at_step_4)
    assert _eval_steps(evald) == [2]
    train(_tiny(data, evald, eval_every=2, eval_n=4, save_every=3, resume=True))
    assert _eval_steps(evald) == [2, 4, 6]
    a, b = run_info(str(plain)), run_info(str(evald))
    assert a["step"] == b["step"] == 6
    assert a["model_sha256"] == b["model_sha256"] and a["ema_sha256"] == b["ema_sha256"]


@pytest.mark.parametrize("conditional", [False, True])
def test_in_training_fid_is_what_ddpm_eval_gives_for_that_checkpoint(data: Path, tmp_path: Path, fake_net,
                                                                    conditional: bool) -> None:
    """One sampling path: the FID logged at a step is the one ``ddpm eval`` computes for that
    step's checkpoint with the same --n, --seed and guidance (both draw their images with
    generate(): the same per-image seeds, class labels, null class, sampler and steps)."""
    if conditional:
        source = tmp_path / "classes"
        _images(source / "a", 4, seed=1)
        _images(source / "b", 4, seed=2)
    else:
        source = data
    run = tmp_path / "run"
    train(_tiny(source, run, steps=3, eval_every=3, eval_n=6, seed=5, conditional=conditional, sample_guidance=2.0))
    logged = float(next(r for r in _rows(run) if r["fid"])["fid"])
    scored = evaluate.evaluate_run(run, ref=str(source), n=6,
                                   spec=SampleSpec(seed=5, guidance=2.0 if conditional else 1.0, batch_size=4),
                                   runtime=resolve_runtime("cpu", "fp32", progress=False),
                                   settings=evaluate.ReferenceSettings(precision_recall=False))
    assert scored["step"] == 3 and logged == pytest.approx(scored["fid"], rel=1e-9, abs=1e-9)


def test_a_run_killed_during_an_evaluation_evaluates_that_step_on_resume(data: Path, tmp_path: Path, fake_net,
                                                                         monkeypatch) -> None:
    run = tmp_path / "run"
    real_call = train_module._TrainingEval.__call__
    floors = []
    real_floor = evaluate.fid_floor
    monkeypatch.setattr(evaluate, "fid_floor", lambda *a, **k: floors.append(1) or real_floor(*a, **k))

    def dies_at_step_4(self, step, *a, **k):
        if step == 4:
            raise Killed  # the checkpoint of step 4 is written, its evaluation is not
        return real_call(self, step, *a, **k)

    monkeypatch.setattr(train_module._TrainingEval, "__call__", dies_at_step_4)
    with pytest.raises(Killed):
        train(_tiny(data, run, eval_every=2, eval_n=4, save_every=2))
    assert _eval_steps(run) == [2] and run_info(str(run))["step"] == 4
    # and its row cut short by the kill: a 3 in the fid column, no line end
    cut = ["4.0" if k == "step" else "3" if k == "fid" else "" for k in train_module._Logger.FIELDS]
    with open(run / "metrics.csv", "a", newline="") as f:
        f.write(",".join(cut[:train_module._Logger.FIELDS.index("fid") + 1]))
    monkeypatch.setattr(train_module._TrainingEval, "__call__", real_call)
    train(_tiny(data, run, eval_every=2, eval_n=4, save_every=2, resume=True))
    assert _eval_steps(run) == [2, 4, 6]
    row4 = next(r for r in _rows(run) if r["fid"] and float(r["step"]) == 4)
    assert float(row4["fid"]) != 3 and row4["kid"] != ""
    assert floors == [1]  # computed once, then read back from RUN/fid_floor.json


def test_a_run_killed_before_its_final_evaluation_evaluates_it_on_resume(data: Path, tmp_path: Path, fake_net,
                                                                        monkeypatch, capsys) -> None:
    run = tmp_path / "run"
    real_call = train_module._TrainingEval.__call__

    def dies_at_the_last_step(self, step, *a, **k):
        if step == 5:
            raise Killed  # the last checkpoint is written, the final evaluation is not
        return real_call(self, step, *a, **k)

    monkeypatch.setattr(train_module._TrainingEval, "__call__", dies_at_the_last_step)
    with pytest.raises(Killed):
        train(_tiny(data, run, steps=5, eval_every=2, eval_n=4))
    assert _eval_steps(run) == [2, 4] and run_info(str(run))["step"] == 5
    monkeypatch.setattr(train_module._TrainingEval, "__call__", real_call)
    capsys.readouterr()
    train(_tiny(data, run, steps=5, eval_every=2, eval_n=4, resume=True))
    assert "nothing to do" not in capsys.readouterr().out
    assert _eval_steps(run) == [2, 4, 5] and run_info(str(run))["step"] == 5
    train(_tiny(data, run, steps=5, eval_every=2, eval_n=4, resume=True))  # now evaluated: nothing to do
    assert "nothing to do" in capsys.readouterr().out and _eval_steps(run) == [2, 4, 5]


def test_evaluation_time_is_not_training_time(data: Path, tmp_path: Path, fake_net, monkeypatch) -> None:
    import time

    from ddpm.run.checkpoint import latest_checkpoint, load_checkpoint

    run = tmp_path / "run"
    real_call = train_module._TrainingEval.__call__

    def slow(self, *a, **k):  # an evaluation of a second: more than the whole --time-limit
        time.sleep(1.0)
        return real_call(self, *a, **k)

    monkeypatch.setattr(train_module._TrainingEval, "__call__", slow)
    # 4 evaluations (4 s) under a limit of 3.6 s: counted as training, they would stop the run early.
    train(_tiny(data, run, steps=4, eval_every=1, eval_n=4, time_limit=0.06))
    assert run_info(str(run))["step"] == 4 and _eval_steps(run) == [1, 2, 3, 4]
    _, _, state = load_checkpoint(latest_checkpoint(run), "cpu")
    assert float(state["train_seconds"]) < 3.6  # the checkpoint's training time leaves them out too


def test_metrics_csv_of_an_older_run_resumes_with_evaluation(data: Path, tmp_path: Path, fake_net) -> None:
    run = tmp_path / "run"
    train(_tiny(data, run, steps=2, save_every=2))
    # metrics.csv as runs wrote it before the fid and kid columns, with a last row cut short
    old = ["step,loss,lr,images_per_s,epoch", "1,0.9,0.0005,10.0,0.5", "2,0.8,0.001,10.0,1.0"]
    (run / "metrics.csv").write_text("\r\n".join(old) + "\r\n3,0.7")
    cfg = json.loads((run / "config.json").read_text())
    for key in ("eval_every", "eval_n", "eval_ref"):  # and a config.json from before the options
        cfg["train"].pop(key)
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--eval-every", "2", "--eval-n", "4",
                 "--no-progress"]) == 0
    rows = _rows(run)
    assert [(r["step"], r["loss"]) for r in rows[:2]] == [("1.0", "0.9"), ("2.0", "0.8")]
    # step 2 was an evaluation step the old run never evaluated: it is evaluated on resume
    assert _eval_steps(run) == [2, 4]
    assert [int(float(r["step"])) for r in rows if r["loss"]] == [1, 2, 3, 4]


def test_eval_options_are_checked_before_any_work(data: Path, tmp_path: Path, capsys) -> None:
    cases = [(["--eval-every", "10", "--eval-n", "1"], "--eval-n must be at least 2 for FID statistics, got 1"),
             (["--eval-every", "-1"], "--eval-every must be >= 0 steps"),
             (["--eval-every", "10", "--eval-ref", str(tmp_path / "nowhere")], "--eval-ref"),
             (["--eval-every", "10", "--eval-ref", str(data / "00_000.png")], "is a file that is not a .npz")]
    for extra, message in cases:
        run = tmp_path / "run"
        code = main(["train", "--data", str(data), "--out", str(run), "--model", "tiny", "--image-size", "16",
                     "--steps", "1", "--device", "cpu", "--no-progress", *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
        assert not run.exists()  # nothing written, nothing decoded
    with pytest.raises(DDPMError, match="does not exist; expected a folder of images, a .npz of statistics, or cifar10"):
        train(_tiny(data, tmp_path / "r", eval_every=1, eval_ref=str(tmp_path / "missing")))


# ------------------------------------------------------------------------- memorisation check
def _tensor(n: int, seed: int, size: int = 8) -> torch.Tensor:
    # Pixel noise dominates, so nearest-neighbour distances concentrate in both spaces, as they
    # do for real images in Inception's 2048 dimensions.
    rng = np.random.default_rng(seed)
    arr = np.clip(rng.integers(100, 156, (n, 1, 1, 3)) + rng.normal(0, 40, (n, size, size, 3)), 0, 255)
    return torch.from_numpy(arr.astype(np.uint8)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def sets() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training images, held-out real images and more real images, all from one distribution."""
    return _tensor(60, 1), _tensor(40, 2), _tensor(10, 3)


def test_nearest_flags_a_planted_copy_and_its_mirror_image(sets) -> None:
    train_set, heldout, fresh = sets
    generated = torch.cat([fresh[:6], train_set[7:8], train_set[20:21].flip(-1)])  # a copy and a mirrored copy
    report = nearest.memorisation_check(generated, train_set, heldout, FakeExtractor(), k=3, mirrored=True, show=4)
    assert report.near_copy.tolist() == [False] * 6 + [True, True]
    assert report.features.index[6, 0] == 7 and report.pixels.index[7, 0] == 20 and report.pixels.mirrored[7, 0]
    assert report.pixels.generated[6, 0] < 1e-6  # exactly the same pixels
    assert report.reading.startswith("2 of 8 samples are near-copies of training images")
    assert set(report.shown[:2].tolist()) == {6, 7} and len(report.shown) == 4  # near-copies first
    summary = report.to_dict()
    assert summary["near_copies"] == [6, 7] and summary["shown"][0]["near_copy"]
    json.dumps(summary)  # plain JSON
    grid = nearest.nearest_grid(report, generated, train_set)
    # 4 rows of 1 + 1 + 3 + 1 + 3 tiles, each 8 px enlarged 8x to 64 px, 2 px padding
    assert grid.shape == (4 * 66 + 2, 9 * 66 + 2, 3)
    # without mirroring the mirrored copy is just another image
    plain = nearest.memorisation_check(generated, train_set, heldout, FakeExtractor(), mirrored=False)
    assert plain.near_copy.tolist() == [False] * 6 + [True, False]


def test_nearest_does_not_flag_held_out_real_images(sets) -> None:
    train_set, heldout, fresh = sets
    for mirrored in (False, True):
        report = nearest.memorisation_check(fresh, train_set, heldout, FakeExtractor(), mirrored=mirrored)
        assert not report.near_copy.any(), report.to_dict()
        assert report.reading == "no sign of copying: none of the 10 samples is a near-copy of a training image"
        text = nearest.format_report(report)
        assert "held-out real (40)" in text and text.endswith(report.reading)


def test_held_out_images_that_are_training_images_are_left_out(sets) -> None:
    train_set, heldout, fresh = sets
    with pytest.warns(UserWarning, match="left out 3 held-out image"):
        report = nearest.memorisation_check(fresh, train_set, torch.cat([heldout, train_set[:3]]), FakeExtractor())
    assert report.heldout_excluded == 3 and report.n_heldout == 40 and not report.near_copy.any()
    with pytest.raises(DDPMError, match="held-out images are training images themselves"):
        nearest.memorisation_check(fresh, train_set, train_set[:10], FakeExtractor())


def test_fid_floor_holds_out_n_reference_images_or_says_it_is_a_lower_bound() -> None:
    from ddpm.scoring.metrics import frechet_distance, gaussian_stats

    feats = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
    mu, sigma = gaussian_stats(feats.astype(np.float64))
    ref = evaluate.FeatureSet(mu=mu, sigma=sigma, features=feats, labels=None, classes=None, source="x", key="x")
    # 12 >= 2 * 6: a fixed subset of 6 against the statistics of the other 6, none drawn twice
    held = evaluate._subset(12, 6)
    rest = np.setdiff1d(np.arange(12), held)
    want = frechet_distance(*gaussian_stats(feats[held].astype(np.float64)),
                            *gaussian_stats(feats[rest].astype(np.float64)))
    assert not evaluate.floor_is_lower_bound(ref, 6)
    assert evaluate.fid_floor(ref, 6) == pytest.approx(want)
    # 12 < 2 * 7: drawn with replacement against the whole reference, which holds them: a lower bound
    assert evaluate.floor_is_lower_bound(ref, 7)
    draw = np.random.default_rng(0).integers(0, 12, 7)
    assert evaluate.fid_floor(ref, 7) == pytest.approx(
        frechet_distance(*gaussian_stats(feats[draw].astype(np.float64)), mu, sigma))


def test_a_floor_from_too_small_a_reference_is_labelled_a_lower_bound(data: Path, tmp_path: Path, fake_net,
                                                                       capsys) -> None:
    run = tmp_path / "run"
    train(_tiny(data, run, steps=2, eval_every=2, eval_n=5))  # 8 training images < 2 * 5
    floor = json.loads((run / "fid_floor.json").read_text())
    assert floor["lower_bound"] is True and "lower bound" in floor["method"]
    out = capsys.readouterr().out
    assert "a lower bound: the reference has fewer than 10 images" in out and "(a lower bound)" in out


def test_nearest_neighbours_match_a_brute_force_search() -> None:
    g = torch.Generator().manual_seed(0)
    q, base = torch.randn(2, 7, 5, generator=g), torch.randn(30, 5, generator=g)
    full = torch.stack([torch.cdist(q[0].double(), base.double()), torch.cdist(q[1].double(), base.double())])
    want_d, want_i = full.min(0).values.topk(3, largest=False)
    # an iterator of blocks, and a tensor base split into chunks smaller than it (memory bound)
    for b in (iter(base.split(4)), base):
        d, i, v = nearest.nearest_neighbours(q, b, k=3, chunk=3)
        assert np.allclose(d, want_d.numpy()) and (i == want_i.numpy()).all()
        assert (v == full.argmin(0).gather(1, want_i).numpy()).all()


def test_eval_nearest_checks_its_options_before_work(data: Path, tmp_path: Path, fake_net, capsys) -> None:
    run = tmp_path / "run"
    train(_tiny(data, run, steps=1))
    base = ["eval", "--run", str(run), "--nearest", "--n", "2", "--device", "cpu", "--quiet"]
    cases = [(["--ref", str(data)], "is the run's training data"),
             (["--ref", str(tmp_path / "nowhere")], "--ref"),
             (["--ref", str(data), "--nearest-n", "0"], "--nearest-n must be at least 1"),
             (["--ref", str(data), "--sweep"], "--nearest and --sweep are separate checks"),
             (["--ref", str(data), "--train-data", str(tmp_path / "gone")], "pass --train-data")]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (run / "eval").exists()


def test_eval_n_defaults_to_1000_samples_for_nearest_and_10000_for_fid(data: Path, tmp_path: Path, fake_net,
                                                                        monkeypatch) -> None:
    run, seen = tmp_path / "run", {}
    train(_tiny(data, run, steps=1))

    # Stand-ins with the real signatures, less n's default (the CLI must pass it): the CLI prints
    # check_run's "summary"; evaluate_run's None (what a torchrun rank other than 0 gets) leaves it
    # nothing to write or print.
    def check_run(run_dir, ref, n, spec=None, runtime=None, *, settings=None, options=None, out=None):
        seen.setdefault("nearest", n)
        return {"summary": ""}

    def evaluate_run(run_dir, ref, n, spec=None, runtime=None, *, settings=None, processes=None,
                     checkpoint=None):
        seen.setdefault("fid", n)  # and returns None

    monkeypatch.setattr(nearest, "check_run", check_run)
    monkeypatch.setattr(evaluate, "evaluate_run", evaluate_run)
    ref = str(tmp_path / "heldout")
    _images(Path(ref), 2)
    assert main(["eval", "--run", str(run), "--ref", ref, "--nearest", "--device", "cpu", "--quiet"]) == 0
    assert seen["nearest"] == 1_000
    assert main(["eval", "--run", str(run), "--ref", ref, "--device", "cpu", "--quiet"]) == 0
    assert seen["fid"] == 10_000


# ------------------------------------------------------------------ the real Inception network
def test_real_inception_end_to_end_training_fid_then_nearest(tmp_path: Path, cache: Path, capsys) -> None:
    """A handful of images through the real network: FID during a 2-step run, then the
    memorisation check of that run, which reuses the cached training features."""
    from ddpm.scoring.inception import InceptionWeightsError, weights_path

    try:
        weights_path()
    except InceptionWeightsError as e:
        pytest.skip(str(e))
    torch.set_num_threads(1)
    data, held = _images(tmp_path / "data", 6), _images(tmp_path / "held", 4, seed=5)
    run = tmp_path / "run"
    train(_tiny(data, run, steps=2, eval_every=2, eval_n=3))
    assert _eval_steps(run) == [2]
    assert len(list(cache.glob("*.npz"))) == 1  # the training images' statistics, cached
    out = tmp_path / "nearest.json"
    assert main(["eval", "--run", str(run), "--ref", str(held), "--nearest", "--n", "2", "--nearest-n", "2",
                 "--nearest-k", "2", "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["n_generated"] == 2 and result["n_train"] == 6 and result["n_heldout"] == 4 and result["mirrored"]
    assert result["reading"] in printed and "reading: " in printed
    assert Image.open(out.with_suffix(".png")).size == (7 * 66 + 2, 2 * 66 + 2)
    assert len(list(cache.glob("*.npz"))) == 1  # the check found the training features in that cache


@pytest.mark.slow
def test_two_gloo_ranks_rank_0_evaluates_and_the_others_wait(tmp_path: Path, cache: Path) -> None:
    """Under torchrun rank 0 alone evaluates (one row, one log line), through the real network
    (a subprocess can't take the stand-in), and the ranks still end with identical weights."""
    import os
    import subprocess
    import sys

    from ddpm.scoring.inception import InceptionWeightsError, weights_path

    try:
        weights_path()
    except InceptionWeightsError as e:
        pytest.skip(str(e))
    data, run = _images(tmp_path / "data", 8), tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddpm", "train",
           "--data", str(data), "--out", str(run), "--model", "tiny", "--image-size", "16", "--steps", "2",
           "--batch-size", "8", "--timesteps", "20", "--sample-steps", "3", "--log-every", "1", "--sample-every", "0",
           "--sample-n", "2", "--no-progress", "--no-tensorboard", "--precision", "fp32", "--device", "cpu",
           "--eval-every", "2", "--eval-n", "3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "all 2 processes hold identical model and EMA weights" in res.stdout
    assert res.stdout.count("step 2: FID ") == 1 and res.stdout.count("FID every 2 steps") == 1
    assert _eval_steps(run) == [2]


def test_training_curve_scores_kept_checkpoints_oldest_first(data: Path, tmp_path: Path, fake_net) -> None:
    """benchmarks/training_curve.py: the chosen checkpoints (spread evenly, the newest included)
    are each scored as 'ddpm eval --checkpoint' scores them, and drawn against images seen."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("training_curve", Path(__file__).resolve().parents[2]
                                                  / "benchmarks" / "training_curve.py")
    curve = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curve)
    assert curve.pick(list(range(5)), 3) == [0, 2, 4] and curve.pick(list(range(5)), 1) == [4]
    assert curve.pick(list(range(2)), 4) == [0, 1]

    run = tmp_path / "run"
    train(_tiny(data, run, steps=6, save_every=2))
    out_png, out_json = tmp_path / "curve.png", tmp_path / "curve.json"
    assert curve.main(["--run", str(run), "--ref", str(data), "--n", "4", "--checkpoints", "2", "--device", "cpu",
                       "--batch-size", "4", "--plot", str(out_png), "--json", str(out_json)]) == 0
    points = json.loads(out_json.read_text())["points"]
    assert [p["step"] for p in points] == [2, 6] and [p["images_seen"] for p in points] == [8, 24]
    assert all(p["fid"] > 0 for p in points) and points[0]["fid"] != points[1]["fid"]
    assert Image.open(out_png).size[0] > 100
    single = evaluate.evaluate_run(run, str(data), n=4, spec=SampleSpec(batch_size=4),
                                   runtime=resolve_runtime("cpu", progress=False), checkpoint=points[0]["checkpoint"],
                                   settings=evaluate.ReferenceSettings(precision_recall=False))
    assert single["step"] == 2 and single["fid"] == points[0]["fid"]
