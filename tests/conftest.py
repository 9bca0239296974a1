"""Shared fixtures: the offline image archives of ../shared/data, unpacked once per session."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Where the project's offline archives live: $DDPM_SHARED_DATA or ../shared/data."""
    return Path(os.environ.get("DDPM_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _unpack(archive: str, tmp_factory: pytest.TempPathFactory) -> Path:
    src = shared_data_dir() / archive
    if not src.exists():
        pytest.skip(f"offline data archive {src} is not available")
    dest = tmp_factory.mktemp(archive.split(".")[0])
    with tarfile.open(src) as tar:
        tar.extractall(dest, filter="data")
    return dest


@pytest.fixture(scope="session")
def cifar10_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared CIFAR-10 subset: ``<dir>/{train,test}/<class>/NNNN.jpg``."""
    return _unpack("cifar10.tar.gz", tmp_path_factory) / "cifar10"


@pytest.fixture(scope="session")
def landscapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared 1,800 landscape photographs at 64x64 (flat folder)."""
    return _unpack("landscapes64.tar.gz", tmp_path_factory) / "landscapes64"


def copy_subset(src_root: Path, dest: Path, classes: list[str] | None, per_class: int) -> Path:
    """Copy the first ``per_class`` images of each class (or of a flat folder) into ``dest``."""
    if classes is None:
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted(src_root.iterdir())[:per_class]:
            shutil.copy(f, dest / f.name)
        return dest
    for c in classes:
        (dest / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((src_root / c).iterdir())[:per_class]:
            shutil.copy(f, dest / c / f.name)
    return dest


@pytest.fixture(scope="module")
def one_thread():
    """Pin torch to one thread for a module of small-tensor tests, restored after.

    A second thread buys little on tiny tensors, and on a busy 2-core machine OpenMP threads
    spinning against other processes made them 10-40x slower (measured: a 1000-step ancestral
    chain took 2.5 s on one thread, 107 s on two).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every cache (decoded data, FID statistics) in a folder of this test session: tests neither
    read a user's ~/.cache/ddpm nor leave files in it. Subprocesses inherit it."""
    before = os.environ.get("DDPM_CACHE")
    os.environ["DDPM_CACHE"] = str(tmp_path_factory.mktemp("ddpm-cache"))
    yield Path(os.environ["DDPM_CACHE"])
    if before is None:
        os.environ.pop("DDPM_CACHE", None)
    else:
        os.environ["DDPM_CACHE"] = before


class FakeExtractor:
    """Stands in for the Inception network (the one stand-in of the tests): 12-d features, the
    2x2 average-pooled RGB of uint8 images [B, 3, H, W] (a list of mixed sizes is brought to
    8x8 first), as float64 [B, 12]; ``calls`` counts the batches it has seen."""

    calls = 0
    sha256 = "0" * 64

    def __init__(self, path=None, device=None) -> None:
        self.device = torch.device("cpu")

    def __call__(self, batch) -> np.ndarray:
        FakeExtractor.calls += 1
        if not isinstance(batch, torch.Tensor):
            batch = torch.stack([torch.nn.functional.interpolate(b[None].float(), size=(8, 8))[0] for b in batch])
        return torch.nn.functional.adaptive_avg_pool2d(batch.float(), 2).flatten(1).double().numpy()


@pytest.fixture
def fake_net(monkeypatch):
    """Scoring (``ddpm.scoring.evaluate`` and what builds on it) runs with :class:`FakeExtractor`."""
    from ddpm.scoring import evaluate

    monkeypatch.setattr(evaluate, "FeatureExtractor", FakeExtractor)
    FakeExtractor.calls = 0
    return FakeExtractor
