"""Shared fixtures: the offline image archives of ../shared/data, unpacked once per session."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

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
