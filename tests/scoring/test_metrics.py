"""Metrics maths (FID, KID, precision/recall, class probe) and the evaluation plumbing around it
(reference-statistics cache, one-line errors, evaluate_run / sweep with stand-in modules).

Nothing here runs the Inception network: a tiny deterministic stand-in extractor replaces it,
so these tests are fast and need no weights; tests/scoring/test_inception.py covers the real network.
"""

from __future__ import annotations

import json
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ddpm.scoring import evaluate
from ddpm.scoring import metrics
from ddpm.errors import DDPMError
from ddpm.runtime.policy import resolve_runtime
from ddpm.sample.spec import SampleSpec
from ddpm.scoring.metrics import LinearProbe, class_accuracy, fit_linear_probe, frechet_distance, gaussian_stats, kid
from conftest import FakeExtractor


def _rand_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / (rank or d) + (0 if rank else 0.1) * np.eye(d)


def _fd_independent(mu1, s1, mu2, s2) -> float:
    """Frechet distance with tr sqrt(S1 S2) from the eigenvalues of the *non-symmetric* product
    (np.linalg.eigvals, a different algorithm from the library's symmetric route)."""
    ev = np.linalg.eigvals(s1 @ s2)
    tr = np.sqrt(np.clip(ev.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr)


# ----------------------------------------------------------------------------------------- FID
@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_diagonal_closed_form(method):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_commuting_nondiagonal_closed_form(method):
    # Same eigenvectors, different eigenvalues: full, non-diagonal covariances that commute,
    # where tr sqrt(S1 S2) = sum sqrt(a_i b_i) exactly.
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    a, b = rng.uniform(0.1, 3, 32), rng.uniform(0.1, 3, 32)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2, method=method) == pytest.approx(expected, rel=1e-9)


def test_frechet_known_2d_case():
    # S1 = I: tr sqrt(S2) = sum of sqrt of S2's eigenvalues; S2 = [[2, 1], [1, 2]] has eigenvalues 1 and 3.
    s2 = np.array([[2.0, 1.0], [1.0, 2.0]])
    expected = 2 + 4 - 2 * (1 + np.sqrt(3))
    assert frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), s2) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("rank", [None, 20])
def test_frechet_general_matches_independent_computations(rank):
    rng = np.random.default_rng(2)
    d = 64
    s1, s2 = _rand_spd(rng, d, rank), _rand_spd(rng, d, rank)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fd_independent(mu1, s1, mu2, s2), rel=1e-6)
    # and against a plain scipy sqrtm of the product
    tr = np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert ours == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2, method="sqrtm") == pytest.approx(ours, rel=1e-6)


@pytest.mark.parametrize("n, tol", [(300, 1e-10), (40, 1e-6)])
def test_fid_of_a_set_with_itself_is_zero(n, tol):
    # Full-rank and rank-deficient (N < D) covariances. With N < D the covariance's ~1e-16
    # rounding in its null space becomes ~1e-8 under the square root, per null direction: any
    # method working from (mu, sigma) shares this floor, far below FID's meaningful digits.
    feats = np.random.default_rng(3).gamma(2.0, 1.0, (n, 128))
    mu, sigma = gaussian_stats(feats)
    for method in ("eigh", "sqrtm"):
        assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < tol * np.trace(sigma)


def test_fid_does_not_depend_on_sample_order():
    rng = np.random.default_rng(4)
    a, b = rng.gamma(2.0, 1.0, (200, 96)), rng.gamma(2.2, 1.0, (150, 96))
    base = metrics.fid_from_features(a, b)
    assert base > 0
    shuffled = metrics.fid_from_features(a[rng.permutation(200)], b[rng.permutation(150)])
    assert shuffled == pytest.approx(base, rel=1e-9)
    assert metrics.fid_from_features(b, a) == pytest.approx(base, rel=1e-9)  # symmetric too


def test_fid_agrees_with_pytorch_fid_on_synthetic_features():
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    rng = np.random.default_rng(5)
    a, b = rng.gamma(1.5, 0.3, (400, 256)), rng.gamma(1.6, 0.3, (400, 256))
    s_a, s_b = gaussian_stats(a), gaussian_stats(b)
    theirs = float(fid_score.calculate_frechet_distance(s_a[0], s_a[1], s_b[0], s_b[1]))
    assert frechet_distance(*s_a, *s_b) == pytest.approx(theirs, rel=5e-3)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# ----------------------------------------------------------------------------------------- KID
def _poly(a, b):
    return (a @ b.T / a.shape[1] + 1) ** 3


def test_kid_is_unbiased_against_closed_form():
    # P and Q are uniform over a few fixed points, so the population MMD^2 is an exact finite
    # sum. With fresh samples for every repetition (subset = whole sample, one subset) the
    # estimator's average must match it; the biased V-statistic, which keeps the diagonal,
    # is visibly off at this tiny sample size.
    rng = np.random.default_rng(6)
    d = 8
    p_pts, q_pts = rng.standard_normal((5, d)), rng.standard_normal((5, d)) + 0.5
    exact = _poly(p_pts, p_pts).mean() + _poly(q_pts, q_pts).mean() - 2 * _poly(p_pts, q_pts).mean()
    m, reps = 12, 1500
    ests, biased = np.empty(reps), np.empty(reps)
    for r in range(reps):
        x, y = p_pts[rng.integers(0, 5, m)], q_pts[rng.integers(0, 5, m)]
        ests[r], _ = kid(x, y, subset_size=m, num_subsets=1, seed=r)
        biased[r] = _poly(x, x).mean() + _poly(y, y).mean() - 2 * _poly(x, y).mean()
    se = ests.std() / np.sqrt(reps)
    assert abs(ests.mean() - exact) < 4 * se
    assert abs(biased.mean() - exact) > 8 * se


def test_kid_same_distribution_is_near_zero_and_shift_is_positive():
    rng = np.random.default_rng(7)
    x, y = rng.standard_normal((600, 32)), rng.standard_normal((600, 32))
    mean, std = kid(x, y, subset_size=200, num_subsets=50)
    assert abs(mean) < 3 * std
    shifted, _ = kid(x, y + 0.5, subset_size=200, num_subsets=50)
    assert shifted > 10 * std


def test_kid_full_gram_and_per_subset_paths_agree():
    rng = np.random.default_rng(8)
    x, y = rng.standard_normal((120, 16)), rng.standard_normal((90, 16)) + 0.2
    fast = kid(x, y, subset_size=50, num_subsets=20, seed=3)
    slow = kid(x, y, subset_size=50, num_subsets=20, seed=3, max_gram=0)
    assert fast == pytest.approx(slow, rel=1e-10)
    # subset size is capped at the smaller sample count
    assert kid(x[:90], y, subset_size=10_000, num_subsets=2)[1] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------- precision/recall
def test_precision_recall_known_cases():
    rng = np.random.default_rng(9)
    real = rng.standard_normal((200, 10))
    assert metrics.precision_recall(real, real.copy()) == (1.0, 1.0)
    far = rng.standard_normal((100, 10)) + 100.0
    p, r = metrics.precision_recall(real, far)
    assert p == 0.0 and r == 0.0
    half = np.concatenate([real[:100], far])  # half the samples are real points, half far away
    p, r = metrics.precision_recall(real, half)
    assert p == 0.5 and r >= 0.5


# ----------------------------------------------------------------------------------- probe
def _blobs(rng, n_per, classes=3, d=20, sep=4.0):
    centers = rng.standard_normal((classes, d)) * sep
    x = np.concatenate([centers[c] + rng.standard_normal((n_per, d)) for c in range(classes)])
    return x * 50 + 100, np.repeat(np.arange(classes), n_per)  # far from standardised on purpose


def test_linear_probe_fits_and_roundtrips(tmp_path):
    rng = np.random.default_rng(10)
    x, y = _blobs(rng, 60)
    xt, yt = _blobs(np.random.default_rng(10), 30)  # same centres: same generator seed
    probe = fit_linear_probe(x, y, ["a", "b", "c"])
    acc = class_accuracy(probe, xt, yt)
    assert acc["overall"] > 0.95 and set(acc["per_class"]) == {"a", "b", "c"} and acc["n"] == 90
    # the objective is strictly convex: sample order does not matter
    perm = rng.permutation(len(y))
    again = fit_linear_probe(x[perm], y[perm], ["a", "b", "c"])
    np.testing.assert_allclose(again.predict(xt), probe.predict(xt))
    probe.holdout_accuracy = 0.75
    probe.save(tmp_path / "p.npz")
    loaded = LinearProbe.load(tmp_path / "p.npz")
    assert loaded.classes == ["a", "b", "c"] and loaded.holdout_accuracy == 0.75
    np.testing.assert_array_equal(loaded.logits(xt), probe.logits(xt))


def test_class_accuracy_reports_missing_classes_as_none():
    probe = LinearProbe(np.eye(2), np.zeros(2), np.zeros(2), np.ones(2), ["x", "y"])
    acc = class_accuracy(probe, np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([0, 0]))
    assert acc["overall"] == 0.5 and acc["per_class"] == {"x": 0.5, "y": None}


# ------------------------------------------------------- reference cache with a stand-in net
QUIET = resolve_runtime("cpu", progress=False)


COLOURS = {"blue": (30, 60, 200), "red": (200, 40, 30)}


def _make_class_folder(root: Path, per_class: int = 12, size: int = 8) -> Path:
    rng = np.random.default_rng(11)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = np.clip(np.array(rgb) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / name / f"{i:03d}.png")
    return root


def test_reference_stats_labels_cache_hit_and_invalidation(tmp_path, fake_net):
    ref = _make_class_folder(tmp_path / "ref")
    cache = tmp_path / "cache"
    cached = evaluate.ReferenceSettings(cache_dir=cache)
    fs = evaluate.reference_stats(ref, image_size=8, settings=replace(cached, feature_batch_size=5), progress=False)
    assert fs.n == 24 and fs.classes == ["blue", "red"] and not fs.cached
    assert fs.features.dtype == np.float32 and fs.mu.dtype == np.float64
    np.testing.assert_array_equal(fs.labels, np.repeat([0, 1], 12))
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left behind
    calls = fake_net.calls
    hit = evaluate.reference_stats(ref, image_size=8, settings=cached, progress=False)
    assert hit.cached and fake_net.calls == calls  # the network did not run again
    np.testing.assert_array_equal(hit.features, fs.features)
    np.testing.assert_array_equal(hit.sigma, fs.sigma)
    # cache files load without pickles
    with np.load(files[0], allow_pickle=False) as z:
        assert {"mu", "sigma", "features", "labels", "classes", "key"} <= set(z.files)
    # a changed file list is a different key; a different image size too
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ref / "red" / "new.png")
    assert not evaluate.reference_stats(ref, image_size=8, settings=cached, progress=False).cached
    assert not evaluate.reference_stats(ref, image_size=4, settings=cached, progress=False).cached
    assert len(list(cache.iterdir())) == 3


def test_reference_cache_write_is_atomic(tmp_path, fake_net, monkeypatch):
    ref = _make_class_folder(tmp_path / "ref", per_class=3)
    cache = tmp_path / "cache"
    cached = evaluate.ReferenceSettings(cache_dir=cache)

    def broken_savez(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(evaluate.np, "savez", broken_savez)
    # The cache only saves time: a failed write is a warning, and the statistics still come back.
    with pytest.warns(UserWarning, match="disk full"):
        fs = evaluate.reference_stats(ref, image_size=8, settings=cached, progress=False)
    assert fs.n == 6 and fs.cache_path is None
    assert list(cache.iterdir()) == []  # neither a partial cache file nor a temp file
    monkeypatch.undo()
    monkeypatch.setattr(evaluate, "FeatureExtractor", FakeExtractor)
    assert not evaluate.reference_stats(ref, image_size=8, settings=cached, progress=False).cached


def test_corrupt_cache_file_is_recomputed(tmp_path, fake_net):
    ref = _make_class_folder(tmp_path / "ref", per_class=3)
    cache = tmp_path / "cache"
    cached = evaluate.ReferenceSettings(cache_dir=cache)
    fs = evaluate.reference_stats(ref, image_size=8, settings=cached, progress=False)
    fs.cache_path.write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unusable cache"):
        again = evaluate.reference_stats(ref, image_size=8, settings=cached, progress=False)
    assert not again.cached
    np.testing.assert_array_equal(again.features, fs.features)


def test_flat_folder_has_no_labels_and_npz_stats_are_accepted(tmp_path, fake_net):
    flat = tmp_path / "flat"
    flat.mkdir()
    cached = evaluate.ReferenceSettings(cache_dir=tmp_path / "c")
    for i in range(5):
        Image.fromarray(np.full((6, 10, 3), 40 * i, np.uint8)).save(flat / f"{i}.jpg")
    fs = evaluate.reference_stats(flat, settings=cached, progress=False)  # native, non-square sizes
    assert fs.labels is None and fs.classes is None and fs.n == 5
    np.savez(tmp_path / "stats.npz", mu=fs.mu, sigma=fs.sigma)  # pytorch-fid's statistics format
    st = evaluate.reference_stats(tmp_path / "stats.npz", settings=cached, progress=False)
    assert st.features is None and st.n == 0
    r = evaluate.fid_folders(flat, tmp_path / "stats.npz", QUIET, settings=cached)
    assert abs(r["fid"]) < 1e-6 * np.trace(fs.sigma) and "kid_mean" not in r


def test_reference_scores_as_the_metrics_do_and_as_ddpm_fid_does(tmp_path, fake_net):
    """One scoring path: Reference.score equals FID/KID/probe computed from the metrics module by
    hand, maps the generator's class order onto the reference's, and agrees with fid_folders."""
    ref = _make_class_folder(tmp_path / "ref")  # classes blue, red (sorted)
    rng = np.random.default_rng(3)
    rgb = torch.tensor([COLOURS["red"], COLOURS["blue"]] * 5, dtype=torch.float64)  # red, blue, red, ...
    images = (rgb[:, :, None, None] + torch.from_numpy(rng.normal(0, 25, (10, 3, 8, 8)))).clamp(0, 255).to(torch.uint8)
    settings = evaluate.ReferenceSettings(cache_dir=tmp_path / "cache", kid_subsets=5)
    reference = evaluate.Reference.build(ref, 8, QUIET, settings=settings, classes=["red", "blue"])
    labels = torch.arange(10) % 2  # the generator's order: 0 = red, 1 = blue
    got = reference.score(images, labels, pr=True)

    feats = FakeExtractor()(images).astype(np.float64)
    fs = reference.stats
    assert got["fid"] == pytest.approx(frechet_distance(*gaussian_stats(feats), fs.mu, fs.sigma), rel=1e-12)
    km, ks = kid(feats, fs.features.astype(np.float64), subset_size=10, num_subsets=5, seed=0)
    assert (got["kid_mean"], got["kid_std"], got["kid_subset_size"]) == (pytest.approx(km), pytest.approx(ks), 10)
    assert 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1
    assert got["class_accuracy"]["overall"] == 1.0 and got["class_accuracy"]["per_class"] == {"red": 1.0, "blue": 1.0}
    assert reference.score(images, 1 - labels)["class_accuracy"]["overall"] == 0.0  # red images called blue
    assert "class_accuracy" not in reference.score(images)  # no labels: FID and KID alone

    folder = tmp_path / "generated"
    folder.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")  # lossless: the same pixels
    both = evaluate.fid_folders(folder, ref, QUIET, settings=settings)
    assert both["fid"] == pytest.approx(got["fid"], rel=1e-9) and both["kid_mean"] == pytest.approx(got["kid_mean"])
    assert (both["n_a"], both["n_b"]) == (10, 24)


# ---------------------------------------------------------------------------- one-line errors
def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg
    return msg


def test_reference_errors_are_one_line(tmp_path, fake_net):
    cached = evaluate.ReferenceSettings(cache_dir=tmp_path)
    with pytest.raises(evaluate.ReferenceDataError) as e:
        evaluate.reference_stats(tmp_path / "nope", settings=cached, progress=False)
    assert "does not exist" in _one_line(e.value)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DDPMError) as e:
        evaluate.reference_stats(tmp_path / "empty", settings=cached, progress=False)
    assert "no images found" in _one_line(e.value)
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DDPMError) as e:
        evaluate.reference_stats(tmp_path / "bad.npz", settings=cached, progress=False)
    assert "cannot read reference statistics" in _one_line(e.value)
    np.savez(tmp_path / "other.npz", features=np.zeros((3, 2)))
    with pytest.raises(DDPMError, match="expected at least 'mu' and 'sigma'"):
        evaluate.reference_stats(tmp_path / "other.npz", settings=cached, progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"\x89PNG truncated")
    with pytest.warns(UserWarning, match="skipped 3 unreadable"), pytest.raises(DDPMError) as e:
        evaluate.reference_stats(broken, settings=cached, progress=False)
    assert "readable image" in _one_line(e.value)


def test_cli_prints_one_line_errors(tmp_path, capsys, fake_net):
    from ddpm.cli import evaluate as cli_eval

    assert cli_eval.main(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
    assert cli_eval.main(["eval", "--run", str(tmp_path / "nope"), "--ref", "cifar10"]) == 2
    assert "run folder" in capsys.readouterr().err
    assert cli_eval.main(["eval", "--run", str(tmp_path), "--ref", "x", "--n", "1"]) == 2
    assert "--n must be at least 2" in capsys.readouterr().err


def test_cli_help_shows_every_default():
    import argparse

    from ddpm.cli import evaluate as cli_eval

    parser = argparse.ArgumentParser()
    cli_eval.register(parser.add_subparsers())
    for name in ("eval", "fid"):
        sub = parser._subparsers._group_actions[0].choices[name]
        assert sub.formatter_class is not None and issubclass(sub.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
        assert callable(sub.get_default("func"))
        for action in sub._actions:
            if action.option_strings and action.help not in (None, argparse.SUPPRESS) and action.dest != "help":
                assert "%(default)" in sub.formatter_class("x")._get_help_string(action), action.dest


# ------------------------------------------------------------- evaluate_run with stand-ins
@pytest.fixture
def stub_run(tmp_path, monkeypatch, fake_net):
    """Stand-ins for ddpm.run.checkpoint.load_run and ddpm.sample.engine.generate with their contracts:
    a conditional 'run' whose 'samples' are the reference images of the asked-for class."""
    from ddpm.core.schedule import Schedule

    ref = _make_class_folder(tmp_path / "ref", per_class=10)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(in_channels=3)), ema_model=None, schedule=Schedule.linear(T=100), classes=["red", "blue"],
                                prediction="eps", step=7, image_size=8, config={}, run_dir=run_dir)
    seen: dict = {}

    def load_run(path, device="cpu", checkpoint=None):
        assert Path(path) == run_dir
        return run

    def generate(r, n, spec=None, runtime=None, processes=None, *, labels=None, callback=None):
        spec = spec if spec is not None else SampleSpec()
        seen.update(n=n, labels=labels, sampler=spec.sampler, steps=spec.steps, guidance=spec.guidance,
                    precision=None if runtime is None else runtime.precision)
        pix = {name: torch.from_numpy(np.array(Image.open(sorted((ref / name).iterdir())[0]))).permute(2, 0, 1)
               for name in COLOURS}
        g = torch.Generator().manual_seed(spec.seed)
        out = torch.stack([pix.get(r.classes[int(c)], pix["red"]) for c in labels]).int()
        return (out + torch.randint(-20, 21, out.shape, generator=g)).clamp(0, 255).to(torch.uint8)

    monkeypatch.setattr(evaluate, "load_run", load_run)
    monkeypatch.setattr(evaluate, "generate", generate)
    return types.SimpleNamespace(ref=ref, run_dir=run_dir, seen=seen)


def test_evaluate_run_with_stand_in_modules(stub_run, tmp_path, capsys):
    out = tmp_path / "res" / "eval.json"
    spec = SampleSpec(sampler="ddim", steps=5, guidance=2.0)
    r = evaluate.evaluate_run(stub_run.run_dir, stub_run.ref, n=21, spec=spec, runtime=QUIET,
                              settings=evaluate.ReferenceSettings(cache_dir=tmp_path / "cache", kid_subsets=5))
    assert capsys.readouterr().out == ""  # the result is returned; the CLI prints and writes it
    labels = stub_run.seen["labels"]
    assert labels.dtype == torch.int64 and torch.bincount(labels).tolist() == [11, 10]  # spread evenly
    assert stub_run.seen["sampler"] == "ddim" and stub_run.seen["guidance"] == 2.0
    assert r["class_accuracy"]["overall"] == 1.0 and set(r["class_accuracy"]["per_class"]) == {"red", "blue"}
    assert r["class_accuracy"]["real_holdout"] == 1.0
    assert r["nfe"] == 5 and r["network_passes_per_sample"] == 10 and r["step"] == 7
    for k in ("fid", "kid_mean", "kid_std", "precision", "recall", "timings", "reference"):
        assert k in r
    evaluate.write_json(out, r)  # as 'ddpm eval' writes it
    saved = json.loads(out.read_text())
    assert saved["fid"] == pytest.approx(r["fid"]) and saved["sampler"] == "ddim"
    summary = evaluate.format_summary(r)  # what 'ddpm eval' prints
    assert "FID" in summary and "class acc" in summary and "red" in summary


def test_sampler_sweep_writes_json_and_plot(stub_run, tmp_path):
    out = tmp_path / "sweep" / "sweep.json"
    rep = evaluate.sampler_sweep(stub_run.run_dir, stub_run.ref, n=10,
                                 grid=evaluate.SweepGrid(["ddim", "langevin"], [2, 4], [1.0, 3.0]), runtime=QUIET,
                                 out=out,
                                 settings=evaluate.ReferenceSettings(cache_dir=tmp_path / "cache", kid_subsets=3))
    assert len(rep["results"]) == 8
    nfes = {(r["sampler"], r["steps"]): r["nfe"] for r in rep["results"]}
    assert nfes[("langevin", 4)] == 7 and nfes[("ddim", 4)] == 4  # corrector steps counted
    assert json.loads(out.read_text())["results"][-1]["guidance"] == 3.0
    png = out.with_suffix(".png")
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_class_accuracy_skipped_when_classes_do_not_match(stub_run, tmp_path):
    run = evaluate.load_run(stub_run.run_dir)  # the stand-in
    run.classes = ["red", "green"]
    with pytest.warns(UserWarning, match="class accuracy skipped"):
        r = evaluate.evaluate_run(stub_run.run_dir, stub_run.ref, n=6, runtime=QUIET,
                                  settings=evaluate.ReferenceSettings(cache_dir=tmp_path / "cache", kid_subsets=2))
    assert r["class_accuracy"] is None and "green" in r["class_accuracy_note"]
