"""Evaluate trained runs: FID, KID, precision/recall and class accuracy against a reference set.

The pieces, each usable alone:

* :func:`reference_stats` - Inception features, mean and covariance (and labels) of a reference
  set (a folder of images, a ``.npz`` of statistics, or torchvision's CIFAR-10), cached on disk.
* :func:`reference_probe` - the linear class probe fitted on a labelled reference set, cached.
* :class:`Reference` - a reference built once (statistics, extractor, probe) that scores images
  or features: FID, KID, precision/recall, class accuracy (:func:`score_features` at its core).
  ``ddpm eval``, the sweep, ``ddpm fid``, the trainer's ``--eval-every`` and
  ``benchmarks/quality.py`` all score through it, with one :class:`ReferenceSettings`.
* :func:`evaluate_run` - sample from a run, score the samples, print a summary, write JSON.
* :func:`fid_folders` - FID between two folders, like pytorch-fid's command.
* :func:`sampler_sweep` - FID against network evaluations for every sampler, JSON and a plot.

Reference images are decoded exactly as the training data is (:func:`ddpm.files.images.load_image`:
short side resized to the run's image size, centre crop), so generated and real images reach
the Inception network through the same resize to 299x299.

Cache files (``$DDPM_CACHE/fid``, default ``~/.cache/ddpm/fid``) are ``.npz`` without pickles,
named by a hash of the reference's file list (absolute paths, sizes, mtimes), the image size,
the subset size and the extractor's sha256, and written atomically (temp file, then rename).
The cache only saves time: a cache folder that cannot be written (a read-only home in a
container or on a cluster) is one warning, and the figures are computed all the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..core.samplers import DIFFUSION_SAMPLERS, model_evaluations, resolve_steps
from ..data.cache import CacheSettings, ReferenceImages, open_reference_images
from ..data.sets import load_cifar10, remove_empty_classes
from ..errors import DDPMError, first_line
from ..files.atomic import atomic_write_json, atomic_write_with, check_writable
from ..files.images import IMAGE_EXTENSIONS, class_name, load_image, scan_images, to_rgb
from ..run.checkpoint import latest_checkpoint, load_run
from ..runtime.policy import Runtime, is_out_of_memory, out_of_memory_error, resolve_runtime
from ..runtime.processes import Dist, from_rank_0
from ..sample.engine import check_request, generate
from ..sample.spec import SampleSpec
from .inception import FeatureExtractor
from .metrics import (LinearProbe, class_accuracy, fit_linear_probe, frechet_distance, gaussian_stats, kid,
                      precision_recall)

__all__ = ["ReferenceDataError", "FeatureSet", "default_cache_dir", "reference_stats", "reference_probe",
           "evaluate_run", "fid_folders", "sampler_sweep", "SweepGrid", "sweep_steps", "DEFAULT_SWEEP_STEPS", "format_summary",
           "write_json", "check_reference", "fid_floor", "floor_is_lower_bound", "score_features", "ReferenceSettings",
           "Reference", "spread_labels", "reference_images"]

_CACHE_VERSION = 1


class ReferenceDataError(DDPMError):
    """A reference set (folder, statistics file, CIFAR-10) is missing, empty or unreadable."""


def default_cache_dir() -> Path:
    """``$DDPM_CACHE/fid``, else ``~/.cache/ddpm/fid`` (the data module keeps CIFAR-10 in
    ``$DDPM_CACHE/cifar10``, so one variable moves all of the project's caches)."""
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm").expanduser() / "fid"


# ------------------------------------------------------------------------------ small helpers
def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` to ``path`` as indented JSON in its own key order, atomically
    (:func:`ddpm.files.atomic.atomic_write_json`, whose errors it raises)."""
    atomic_write_json(path, obj, sort_keys=False)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")[:40] or "ref"



# Cache folders already warned about in this process: one warning each, however many writes fail.
_CACHE_WARNED: set[str] = set()


def _in_cache(path: Path) -> bool:
    """Whether a cache file is there to read (an unreadable cache folder counts as empty)."""
    return os.path.isfile(path)


def _write_cache(path: Path, write) -> bool:
    """Call ``write(path)``; True when the cache file was written.

    The cache only saves time, so a folder that cannot be written (a read-only home in a
    container or on a cluster, a full disk) costs a one-line warning, once per folder, and the
    result is still returned; the atomic writers leave no partial file behind.
    """
    try:
        write(path)
        return True
    except OSError as e:
        folder = str(path.parent)
        if folder not in _CACHE_WARNED:
            _CACHE_WARNED.add(folder)
            warnings.warn(f"cannot write the cache folder {folder!r} ({e.strerror or first_line(e, 160)}); continuing "
                          "without caching (--cache-dir or $DDPM_CACHE picks a writable folder, --no-cache skips it)")
        return False


# ----------------------------------------------------------------------- reference statistics
@dataclass
class FeatureSet:
    """Inception features of an image set and their Gaussian statistics.

    ``features`` is float32 [N, 2048] (the network's own precision, so storing float32 loses
    nothing); ``mu``/``sigma`` are float64, computed from them. ``labels`` int64 [N] and
    ``classes`` are set for class-folder and CIFAR-10 references. A statistics-only ``.npz``
    (pytorch-fid's format: ``mu``, ``sigma``) has ``features=None`` and supports FID only.
    """

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None
    labels: np.ndarray | None
    classes: list[str] | None
    source: str
    key: str
    cache_path: Path | None = None
    cached: bool = False  # True when read from the cache rather than computed

    @property
    def n(self) -> int:
        """Number of images (0 when only statistics are known)."""
        return 0 if self.features is None else int(self.features.shape[0])


@dataclass(frozen=True)
class ReferenceSettings:
    """How a reference set is built and how samples are scored against it: the one settings
    value of ``ddpm eval``, its sweep, ``ddpm fid``, the trainer's ``--eval-every`` and
    ``benchmarks/quality.py``.

    ``inception``: a weights file (None: the pinned default, :mod:`ddpm.scoring.inception`);
    ``cache_dir`` / ``use_cache``: the statistics and probe cache (None: :func:`default_cache_dir`);
    ``max_images``: a fixed random subset (seed 0) of the reference, in images;
    ``cifar_root``: where torchvision's CIFAR-10 lives for ``cifar10`` references;
    ``feature_batch_size``: images per Inception pass (speed and memory only);
    ``kid_subset`` / ``kid_subsets``: KID's subset size (images) and count;
    ``probe_l2``: the L2 penalty of the linear class probe;
    ``precision_recall``: also compute improved precision and recall (Kynkaanniemi et al. 2019);
    ``data_cache``: where a reference folder's decoded pixels are kept (the same file a training
    run on that folder maps: :mod:`ddpm.data.cache`; None: the default place).
    """

    inception: str | os.PathLike | None = None
    cache_dir: str | os.PathLike | None = None
    use_cache: bool = True
    max_images: int | None = None
    cifar_root: str | os.PathLike | None = None
    feature_batch_size: int = 50
    kid_subset: int = 1000
    kid_subsets: int = 100
    probe_l2: float = 1e-2
    precision_recall: bool = True
    data_cache: CacheSettings | None = None


def _list_folder(root: Path) -> tuple[list[Path], np.ndarray | None, list[str] | None]:
    """Image files under ``root`` (sorted, any depth, hidden files and folders skipped). If every
    image sits inside a top-level sub-folder, those sub-folders are classes (torchvision's
    ImageFolder convention)."""
    if not root.exists():
        raise ReferenceDataError(f"reference folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise ReferenceDataError(f"reference {str(root)!r} is a file; expected a folder of images, "
                                 "a .npz of statistics, or 'cifar10'")
    files = scan_images(root)
    if not files:
        raise ReferenceDataError(f"no images found under {str(root)!r}; expected files ending in "
                                 f"{', '.join(IMAGE_EXTENSIONS)}")
    tops = [p.relative_to(root).parts for p in files]
    if all(len(parts) > 1 for parts in tops):
        # Named as training names its classes, so a run's classes match the reference's.
        names = [class_name(parts[0]) for parts in tops]
        classes = sorted(set(names))
        index = {c: i for i, c in enumerate(classes)}
        return files, np.array([index[c] for c in names], dtype=np.int64), classes
    return files, None, None


def _decode(path: Path, image_size: int | None) -> torch.Tensor:
    """uint8 [3, H, W]: through the training pipeline's decoder when ``image_size`` is set,
    else at the file's own size (mode conversions as in :mod:`ddpm.files.images`)."""
    from PIL import Image, ImageOps

    if image_size is not None:
        arr = load_image(path, image_size)
    else:
        with Image.open(path) as img:
            img.load()
            img = to_rgb(ImageOps.exif_transpose(img))  # the project's one RGB conversion
        arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy


def _folder_batches(files: Sequence[Path], image_size: int | None, batch_size: int,
                    bad: list[tuple[Path, str]], good: list[int]) -> Iterator[torch.Tensor | list[torch.Tensor]]:
    """Decode ``files`` a batch at a time (memory stays at one batch). Unreadable files are
    recorded in ``bad`` and skipped; indices of decoded files go to ``good``."""
    from PIL import Image

    for start in range(0, len(files), batch_size):
        batch = []
        for i in range(start, min(start + batch_size, len(files))):
            try:
                batch.append(_decode(files[i], image_size))
                good.append(i)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                bad.append((files[i], first_line(e, 160)))
        if batch:
            same = all(b.shape == batch[0].shape for b in batch)
            yield torch.stack(batch) if same else batch


def _cached_batches(ref: ReferenceImages, files: Sequence[Path], batch_size: int, bad: list[tuple[Path, str]],
                    good: list[int]) -> Iterator[torch.Tensor]:
    """:func:`_folder_batches` from the decoded-data cache: the same batches, and the same
    ``bad`` and ``good`` lists, without decoding a file."""
    rows, reasons, pixels = ref.rows_for(files), dict(ref.skipped), np.asarray(ref.images)
    for start in range(0, len(files), batch_size):
        take = []
        for i in range(start, min(start + batch_size, len(files))):
            if rows[i] < 0:
                bad.append((files[i], reasons[str(files[i])]))
            else:
                good.append(i)
                take.append(rows[i])
        if take:
            yield torch.from_numpy(pixels[np.asarray(take)]).permute(0, 3, 1, 2).contiguous()


def _pixel_batches(path: Path, files: Sequence[Path], image_size: int | None, settings: ReferenceSettings,
                   progress: bool, bad: list[tuple[Path, str]], good: list[int]) -> Iterator[torch.Tensor | list[torch.Tensor]]:
    """The reference's images a batch at a time: from the decoded-data cache where it holds (or
    can build) the folder at ``image_size``, else decoded file by file. A subset (``max_images``)
    maps an existing cache but does not build one: decoding a few images beats the whole folder."""
    cached = None
    if image_size is not None:
        cached = open_reference_images(path, image_size, cache=settings.data_cache, progress=progress,
                                       build=settings.max_images is None)
    if cached is not None:
        return _cached_batches(cached, files, settings.feature_batch_size, bad, good)
    return _folder_batches(files, image_size, settings.feature_batch_size, bad, good)


def _warn_skipped(bad: list[tuple[Path, str]], total: int) -> None:
    names = ", ".join(f"{p} ({r})" for p, r in bad[:3])
    warnings.warn(f"skipped {len(bad)} unreadable image file(s) of {total}: {names}{' ...' if len(bad) > 3 else ''}")


def _extract(batches: Iterator, total: int, extractor: FeatureExtractor, progress: bool, desc: str) -> np.ndarray:
    from tqdm.auto import tqdm

    out = []
    with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for b in batches:
            try:
                out.append(extractor(b).astype(np.float32))
            except (RuntimeError, MemoryError) as e:
                if not is_out_of_memory(e):
                    raise
                # A reference's statistics are written only once complete: nothing is left half-made.
                raise out_of_memory_error(e, f"an Inception pass of {len(b)} images at 299x299 ({desc})",
                                          "lower ddpm eval's --feature-batch-size (ddpm fid: --batch-size), or "
                                          "run on another --device") from None
            bar.update(len(b))
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


def _save_featureset(fs: FeatureSet, path: Path) -> None:
    arrays: dict[str, np.ndarray] = {"mu": fs.mu, "sigma": fs.sigma, "key": np.array(fs.key),
                                     "source": np.array(fs.source)}
    if fs.features is not None:
        arrays["features"] = fs.features
    if fs.labels is not None:
        arrays["labels"] = fs.labels
        arrays["classes"] = np.array(fs.classes, dtype=str)
    atomic_write_with(path, lambda f: np.savez(f, **arrays))


def _load_featureset(path: Path, key: str | None = None) -> FeatureSet:
    """Read a cache file, or any ``.npz`` holding at least ``mu`` and ``sigma`` (pytorch-fid's
    statistics files). Raises ReferenceDataError naming the file when it can't be used."""
    try:
        with np.load(path, allow_pickle=False) as z:
            names = set(z.files)
            if not {"mu", "sigma"} <= names:
                raise ValueError(f"has {sorted(names)}, expected at least 'mu' and 'sigma'")
            stored_key = str(z["key"]) if "key" in names else ""
            if key is not None and stored_key != key:
                raise ValueError("cache key mismatch")
            fs = FeatureSet(
                mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
                features=z["features"] if "features" in names else None,
                labels=z["labels"].astype(np.int64) if "labels" in names else None,
                # Caches written before class names were escaped may hold raw non-UTF-8 names.
                classes=[class_name(str(c)) for c in z["classes"]] if "classes" in names else None,
                source=str(z["source"]) if "source" in names else str(path),
                key=stored_key or _hash(["npz", str(path.resolve())]), cache_path=path, cached=True)
    except Exception as e:  # zipfile, OSError, ValueError, KeyError: all mean "unusable"
        raise ReferenceDataError(f"cannot read reference statistics {str(path)!r}: {first_line(e, 160)}") from None
    if fs.mu.ndim != 1 or fs.sigma.shape != (fs.mu.shape[0],) * 2:
        raise ReferenceDataError(f"reference statistics {str(path)!r} have mu {fs.mu.shape} and sigma {fs.sigma.shape}")
    return fs


# A reference named by torchvision's CIFAR-10 split rather than by a path.
_CIFAR_REF = re.compile(r"cifar10(?::(train|test))?")


def _subset(count: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed random subset of ``size`` of ``count`` items (without
    replacement): every "use N of the reference images" picks its images this one way."""
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


def _cifar10_root(root: str | os.PathLike | None) -> Path:
    # Same default as ddpm.data.sets.load_cifar10, so a copy downloaded for training is found here too.
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("DDPM_CACHE") or Path.home() / ".cache" / "ddpm").expanduser() / "cifar10"


def reference_stats(
    ref: str | os.PathLike,
    *,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    settings: ReferenceSettings = ReferenceSettings(),
    progress: bool = True,
) -> FeatureSet:
    """Features and statistics of a reference set, from the cache when possible.

    ``ref`` is a folder of images (flat, nested, or class sub-folders giving labels), a ``.npz``
    with ``mu`` and ``sigma`` (used as is, FID only), ``"cifar10"`` / ``"cifar10:test"`` (torchvision's
    test split under ``cifar_root``) or ``"cifar10:train"``. Images are brought to
    ``image_size`` (short side + centre crop, as in training) when given, else used at their own
    size. ``settings`` gives the Inception weights, the cache, ``max_images`` (a fixed random
    subset, seed 0, of the sorted file list), where CIFAR-10 lives and the images per Inception
    batch. Features run on ``device`` (None: the default device).
    """
    max_images, use_cache = settings.max_images, settings.use_cache
    ref_s = str(ref)
    path = Path(ref_s).expanduser()
    if path.is_file() and path.suffix.lower() == ".npz":
        return _load_featureset(path)  # precomputed statistics need no network
    extractor = FeatureExtractor(settings.inception, device)  # verifies the weights; loads the net on first use
    cache = Path(settings.cache_dir).expanduser() if settings.cache_dir is not None else default_cache_dir()
    m = _CIFAR_REF.fullmatch(ref_s.lower())
    if m and not path.exists():
        return _cifar_stats(m.group(1) or "test", image_size, settings, extractor, progress)
    files, labels, classes = _list_folder(path)
    if max_images is not None and max_images < len(files):
        keep = _subset(len(files), max_images)
        files = [files[i] for i in keep]
        labels = labels[keep] if labels is not None else None
    try:
        listing = [[str(f.resolve()), (st := f.stat()).st_size, st.st_mtime_ns] for f in files]
    except OSError as e:
        raise ReferenceDataError(f"cannot read {e.filename!r}: {e.strerror}") from None
    key = _hash({"v": _CACHE_VERSION, "files": listing, "image_size": image_size, "max_images": max_images,
                 "extractor": extractor.sha256})
    cache_path = cache / f"{_slug(path.resolve().name)}-{image_size or 'native'}-{key[:20]}.npz"
    if use_cache and _in_cache(cache_path):
        try:
            return _load_featureset(cache_path, key)
        except ReferenceDataError as e:
            warnings.warn(f"ignoring unusable cache file ({e}); recomputing")
    bad: list[tuple[Path, str]] = []
    good: list[int] = []
    feats = _extract(_pixel_batches(path, files, image_size, settings, progress, bad, good), len(files), extractor,
                     progress, f"reference {path.name}")
    if bad:
        _warn_skipped(bad, len(files))
    if len(good) < 2:
        raise ReferenceDataError(f"only {len(good)} readable image(s) under {str(path)!r}; need at least 2 for statistics")
    if labels is not None:
        # A class with no readable image has no features to fit the probe on: leave it out, so a
        # run class of that name is reported as missing from the reference.
        classes, labels, empty = remove_empty_classes(classes, labels[good])
        if empty:
            warnings.warn(f"reference classes with no readable images left out: {', '.join(map(repr, empty[:5]))}"
                          f"{' ...' if len(empty) > 5 else ''}")
    mu, sigma = gaussian_stats(feats)
    fs = FeatureSet(mu, sigma, feats, labels, classes, str(path.resolve()), key, cache_path)
    if not (use_cache and _write_cache(cache_path, lambda p: _save_featureset(fs, p))):
        fs.cache_path = None
    return fs


def _cifar_stats(split: str, image_size: int | None, settings: ReferenceSettings, extractor: FeatureExtractor,
                 progress: bool) -> FeatureSet:
    max_images, batch_size, use_cache = settings.max_images, settings.feature_batch_size, settings.use_cache
    cache = Path(settings.cache_dir).expanduser() if settings.cache_dir is not None else default_cache_dir()
    root = _cifar10_root(settings.cifar_root)
    batch_dir = root / "cifar-10-batches-py"
    listing = ([[p.name, (st := p.stat()).st_size, st.st_mtime_ns] for p in sorted(batch_dir.iterdir())]
               if batch_dir.is_dir() else None)
    key = _hash({"v": _CACHE_VERSION, "cifar10": split, "files": listing, "image_size": image_size,
                 "max_images": max_images, "extractor": extractor.sha256})
    cache_path = cache / f"cifar10-{split}-{image_size or 32}-{key[:20]}.npz"
    if use_cache and listing is not None and _in_cache(cache_path):
        try:
            return _load_featureset(cache_path, key)
        except ReferenceDataError as e:
            warnings.warn(f"ignoring unusable cache file ({e}); recomputing")
    try:
        ds = load_cifar10(root, image_size or 32, train=split == "train", conditional=True)
    except DDPMError:
        raise ReferenceDataError(
            f"reference cifar10: torchvision's CIFAR-10 is not in {str(root)!r} and could not be downloaded; put "
            "cifar-10-batches-py there (--cifar-root), or pass --ref a folder of class sub-folders") from None
    images = torch.from_numpy(np.asarray(ds.images)).permute(0, 3, 1, 2)
    labels = np.asarray(ds.labels, dtype=np.int64)
    if max_images is not None and max_images < len(images):
        keep = _subset(len(images), max_images)
        images, labels = images[torch.from_numpy(keep)], labels[keep]
    if listing is None:  # just downloaded: key it by the files now present
        return _cifar_stats(split, image_size, settings, extractor, progress)
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    feats = _extract(batches, len(images), extractor, progress, f"reference cifar10:{split}")
    mu, sigma = gaussian_stats(feats)
    fs = FeatureSet(mu, sigma, feats, labels, list(ds.classes or []), f"cifar10:{split}", key, cache_path)
    if not (use_cache and _write_cache(cache_path, lambda p: _save_featureset(fs, p))):
        fs.cache_path = None
    return fs


# ------------------------------------------------------------------------------- class probe
def reference_probe(ref: FeatureSet, *, l2: float = 1e-2, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, holdout: float = 0.2) -> LinearProbe:
    """The linear class probe fitted on all of a labelled reference set, cached next to its
    statistics. Its ``holdout_accuracy`` (a probe fitted on ``1 - holdout`` of the set, scored
    on the rest) is the accuracy real images get: the ceiling to read generated accuracy against."""
    if ref.features is None or ref.labels is None or not ref.classes:
        raise ReferenceDataError(f"reference {ref.source!r} has no class labels; class accuracy needs "
                                 "class sub-folders (ref/<class>/*.jpg) or cifar10")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = cache / f"probe-{_hash([ref.key, l2, holdout, _CACHE_VERSION])[:20]}.npz"
    if use_cache and _in_cache(path):
        try:
            return LinearProbe.load(path)
        except Exception as e:
            warnings.warn(f"ignoring unusable probe cache {path} ({first_line(e, 160)}); refitting")
    feats = ref.features.astype(np.float64)
    acc = None
    if 0 < holdout < 1 and ref.n >= 20:
        test = np.zeros(ref.n, dtype=bool)
        test[np.random.default_rng(0).choice(ref.n, max(1, round(holdout * ref.n)), replace=False)] = True
        part = fit_linear_probe(feats[~test], ref.labels[~test], ref.classes, l2=l2)
        acc = float((part.predict(feats[test]) == ref.labels[test]).mean())
    probe = fit_linear_probe(feats, ref.labels, ref.classes, l2=l2)
    probe.holdout_accuracy = acc
    if use_cache:
        _write_cache(path, probe.save)
    return probe


# ----------------------------------------------------------------------------------- scoring
def score_features(gen: np.ndarray | FeatureSet, ref: FeatureSet, *, kid_subset: int = 1000, kid_subsets: int = 100,
                   pr: bool = False, seed: int = 0) -> dict:
    """FID, KID and (``pr``) precision/recall of generated Inception features against ``ref``.

    ``gen`` is float features [N, D] (N >= 2) or a :class:`FeatureSet` (whose statistics are
    used as they are, so a statistics-only one supports FID alone). Returns ``{"fid"}`` plus
    ``"kid_mean"``, ``"kid_std"``, ``"kid_subset_size"`` when both sides have features, and
    ``"precision"``, ``"recall"`` (k = 3, on equal-sized sets as in Kynkaanniemi et al. 2019,
    since the k-NN radii shrink as a set grows) when ``pr``. FID is Heusel et al. 2017, KID
    Binkowski et al. 2018 (polynomial kernel, ``kid_subsets`` subsets of ``kid_subset``, seeded).
    Raises ``ValueError`` for mismatched feature dimensions.
    """
    if isinstance(gen, FeatureSet):
        mu, sigma, feats = gen.mu, gen.sigma, gen.features
    else:
        feats = np.asarray(gen, dtype=np.float64)
        mu, sigma = gaussian_stats(feats)
    if mu.shape != ref.mu.shape:
        raise ValueError(f"feature dimensions differ: {mu.shape[0]} (generated) vs {ref.mu.shape[0]} ({ref.source})")
    out: dict[str, Any] = {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
    if ref.features is not None and feats is not None:
        real, g = ref.features.astype(np.float64), feats.astype(np.float64)
        out["kid_mean"], out["kid_std"] = kid(g, real, subset_size=kid_subset, num_subsets=kid_subsets, seed=seed)
        out["kid_subset_size"] = min(kid_subset, len(g), len(real))
        if pr and min(len(g), len(real)) > 3:
            m = min(len(g), len(real))
            rng = np.random.default_rng(seed)
            r = real[rng.choice(len(real), m, replace=False)] if len(real) > m else real
            g = g[rng.choice(len(g), m, replace=False)] if len(g) > m else g
            out["precision"], out["recall"] = precision_recall(r, g, k=3)
    return out


@dataclass
class Reference:
    """A reference set built once and the means to score images against it: its Inception
    statistics (``stats``), the feature extractor, and, for a generator with ``classes``, the
    linear probe and the map from the generator's class indices to the reference's.

    Build it with :meth:`build`; score with :meth:`score` (uint8 images) or
    :meth:`score_features`. ``probe_note`` says why class accuracy is unavailable (a reference
    without labels, or classes it lacks) when ``classes`` is set and ``probe`` is None.
    """

    stats: FeatureSet
    extractor: Any  # a FeatureExtractor, or any callable from uint8 [B, 3, H, W] to float [B, D]
    settings: ReferenceSettings = ReferenceSettings()
    classes: list[str] | None = None
    probe: LinearProbe | None = None
    label_map: np.ndarray | None = None  # generator class index -> reference class index
    probe_note: str | None = None

    @classmethod
    def build(cls, ref: str | os.PathLike, image_size: int | None, runtime: Runtime | None = None, *,
              settings: ReferenceSettings = ReferenceSettings(), classes: Sequence[str] | None = None) -> "Reference":
        """The reference ``ref`` (as for :func:`reference_stats`) at ``image_size`` pixels (None:
        the images' own size), with the extractor on ``runtime``'s device (None: the default
        device) and, when ``classes`` (the generator's class names, in label order) is given and
        the reference has those labelled classes, the cached linear probe. A missing class is a
        warning and no class accuracy. Raises :class:`ReferenceDataError` for an unusable
        reference and :class:`~ddpm.scoring.inception.InceptionWeightsError` for missing weights."""
        runtime = runtime if runtime is not None else resolve_runtime()
        dev = runtime.device
        fs = reference_stats(ref, image_size=image_size, device=dev, settings=settings, progress=runtime.progress)
        out = cls(fs, FeatureExtractor(settings.inception, dev), settings, list(classes) if classes else None)
        if out.classes:
            missing = [c for c in out.classes if c not in (fs.classes or [])]
            if fs.labels is None or fs.features is None:
                out.probe_note = "reference has no class labels"
            elif missing:
                out.probe_note = f"run classes not in the reference: {', '.join(missing[:5])}"
            else:
                out.probe = reference_probe(fs, l2=settings.probe_l2, cache_dir=settings.cache_dir,
                                            use_cache=settings.use_cache)
                out.label_map = np.array([fs.classes.index(c) for c in out.classes], dtype=np.int64)
            if out.probe_note:
                warnings.warn(f"class accuracy skipped: {out.probe_note}")
        return out

    def features(self, images: torch.Tensor, *, progress: bool = False) -> np.ndarray:
        """Inception features, float64 [N, D], of uint8 images [N, 3, H, W]."""
        b = self.settings.feature_batch_size
        batches = (images[i:i + b] for i in range(0, len(images), b))
        return _extract(batches, len(images), self.extractor, progress, "inception (samples)").astype(np.float64)

    def score_features(self, gen: np.ndarray, labels: torch.Tensor | np.ndarray | None = None, *,
                       pr: bool = False, seed: int = 0) -> dict:
        """:func:`score_features` with this reference's settings, plus, when ``labels`` (int64 [N],
        indices into ``classes``) are given, ``"class_accuracy"``: overall, per class name and
        the accuracy real held-out images get (None, with ``"class_accuracy_note"``, when the
        reference cannot say)."""
        s = self.settings
        out = score_features(gen, self.stats, kid_subset=s.kid_subset, kid_subsets=s.kid_subsets, pr=pr, seed=seed)
        if labels is not None and self.classes:
            if self.probe is not None:
                acc = class_accuracy(self.probe, gen, self.label_map[np.asarray(labels)])
                # per *generator* class name: the probe's own list may hold extra reference classes
                out["class_accuracy"] = {"overall": acc["overall"],
                                         "per_class": {c: acc["per_class"][c] for c in self.classes},
                                         "real_holdout": self.probe.holdout_accuracy}
            else:
                out["class_accuracy"] = None
                out["class_accuracy_note"] = self.probe_note
        return out

    def score(self, images: torch.Tensor, labels: torch.Tensor | np.ndarray | None = None, *, pr: bool = False,
              seed: int = 0, progress: bool = False) -> dict:
        """FID and KID (and class accuracy, with ``labels``) of uint8 images [N, 3, H, W], N >= 2:
        :meth:`score_features` of their :meth:`features`."""
        return self.score_features(self.features(images, progress=progress), labels, pr=pr, seed=seed)


# ------------------------------------------- pieces for training-time FID and the memorisation check
def check_reference(ref: str, what: str = "--ref") -> None:
    """Raise :class:`ReferenceDataError` unless ``ref`` can name a reference set: ``cifar10``,
    ``cifar10:train`` or ``cifar10:test``, an existing folder, or an existing ``.npz`` file.

    Nothing is read or decoded (a folder's images are checked when its statistics are computed),
    so commands call this before any work; ``what`` names the option in the message.
    """
    path = Path(ref).expanduser()
    expected = "expected a folder of images, a .npz of statistics, or cifar10"
    if _CIFAR_REF.fullmatch(ref.lower()) and not path.exists():
        return
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".npz"):
        return
    if path.exists():
        raise ReferenceDataError(f"{what} {ref!r} is a file that is not a .npz; {expected}")
    raise ReferenceDataError(f"{what} {ref!r} does not exist; {expected}")


def fid_floor(ref: FeatureSet, n: int, seed: int = 0) -> float | None:
    """The FID that ``n`` real images score against ``ref``: what a perfect model would get at
    sample size ``n``, to read an FID computed from ``n`` samples against.

    FID estimated from ``n`` samples is biased upward, by roughly a constant over ``n`` (Chong &
    Forsyth 2020, "Effectively unbiased FID and Inception Score and where to find them"): the
    sample covariance's error adds to ``tr(sigma)`` more than the ``tr sqrt`` term takes away.
    When the reference holds at least ``2n`` images (:func:`floor_is_lower_bound` is False), a
    fixed subset of ``n`` of them (``_subset``, seeded) is scored against the statistics of the
    remaining ones: images the reference statistics do not contain, as a model's samples are not.
    With fewer, ``n`` feature vectors are drawn with replacement (seeded) and scored against the
    whole reference's statistics, which contain them, so that floor is a lower bound. Returns
    None for a statistics-only reference (no features to draw from). Raises ``ValueError`` for
    ``n < 2``.
    """
    if n < 2:
        raise ValueError(f"the FID floor needs n >= 2 images, got {n}")
    if ref.features is None:
        return None
    if floor_is_lower_bound(ref, n):
        draw = np.random.default_rng(seed).integers(0, ref.n, n)
        mu, sigma = gaussian_stats(ref.features[draw].astype(np.float64))
        return frechet_distance(mu, sigma, ref.mu, ref.sigma)
    held = np.zeros(ref.n, dtype=bool)
    held[_subset(ref.n, n, seed)] = True
    mu, sigma = gaussian_stats(ref.features[held].astype(np.float64))
    mu_rest, sigma_rest = gaussian_stats(ref.features[~held].astype(np.float64))
    return frechet_distance(mu, sigma, mu_rest, sigma_rest)


def floor_is_lower_bound(ref: FeatureSet, n: int) -> bool:
    """Whether :func:`fid_floor` of ``n`` images against ``ref`` is only a lower bound: the
    reference has fewer than ``2n`` images, so the ``n`` are drawn from the images its
    statistics were computed from."""
    return ref.n < 2 * n


def spread_labels(n: int, classes: Sequence[str] | None) -> torch.Tensor | None:
    """Class labels of ``n`` samples scored together, int64 [n]: the classes in turn (``i % C``), so
    every class gets ``n / C`` samples give or take one. None for an unconditional run."""
    return torch.arange(n, dtype=torch.long) % len(classes) if classes else None


def reference_images(ref: str | os.PathLike, image_size: int, *, settings: ReferenceSettings = ReferenceSettings(),
                     progress: bool = True) -> torch.Tensor:
    """The pixels of a reference set as uint8 [N, 3, image_size, image_size], decoded as the
    training data is (short side resized, centre crop), from the decoded-data cache where it
    holds the folder.

    ``ref`` is a folder or ``cifar10[:train|:test]`` as for :func:`reference_stats`;
    ``settings.max_images`` takes the same fixed random subset (seed 0) that
    :func:`reference_stats` does, and ``settings.cifar_root`` says where CIFAR-10 lives.
    Unreadable files are skipped with one warning. Raises :class:`ReferenceDataError` for a
    statistics-only ``.npz`` (it has no images), a missing folder, or fewer than 2 readable images.
    """
    ref_s, max_images = str(ref), settings.max_images
    path = Path(ref_s).expanduser()
    if path.is_file():
        raise ReferenceDataError(f"reference {ref_s!r} is a file of statistics; this needs the images themselves "
                                 "(a folder or cifar10)")
    m = _CIFAR_REF.fullmatch(ref_s.lower())
    if m and not path.exists():
        split, root = m.group(1) or "test", _cifar10_root(settings.cifar_root)
        try:
            ds = load_cifar10(root, image_size, train=split == "train", conditional=False)
        except DDPMError:
            raise ReferenceDataError(f"reference {ref_s}: torchvision's CIFAR-10 is not in {str(root)!r} and could "
                                     "not be downloaded") from None
        pixels = torch.from_numpy(np.asarray(ds.images)).permute(0, 3, 1, 2)
        if max_images is not None and max_images < len(pixels):
            pixels = pixels[torch.from_numpy(_subset(len(pixels), max_images))]
        return pixels.contiguous()
    files, _, _ = _list_folder(path)
    if max_images is not None and max_images < len(files):
        files = [files[i] for i in _subset(len(files), max_images)]
    bad: list[tuple[Path, str]] = []
    good: list[int] = []
    parts = [b if isinstance(b, torch.Tensor) else torch.stack(b)
             for b in _pixel_batches(path, files, image_size, settings, progress, bad, good)]
    if bad:
        _warn_skipped(bad, len(files))
    if len(good) < 2:
        raise ReferenceDataError(f"only {len(good)} readable image(s) under {str(path)!r}; need at least 2")
    return torch.cat(parts)


# The sweep's default step counts; those above a run's T are dropped (with a warning).
DEFAULT_SWEEP_STEPS = (10, 20, 50, 100)


def sweep_steps(steps_list: Sequence[int] | None, T: int) -> list[int]:
    """The step counts a sweep runs on a schedule of ``T`` steps.

    ``None`` is :data:`DEFAULT_SWEEP_STEPS` without the counts above ``T`` (a warning names
    them; ``[T]`` if none is left). Counts given explicitly must all lie in ``1..T``, else
    :class:`DDPMError`.
    """
    if steps_list is not None:
        # The sampler only matters for a default count; an explicit one is checked against T alone.
        return [resolve_steps("ddim", k, T, "--sweep-steps") for k in steps_list]
    kept = [k for k in DEFAULT_SWEEP_STEPS if k <= T]
    if len(kept) < len(DEFAULT_SWEEP_STEPS):
        dropped = [k for k in DEFAULT_SWEEP_STEPS if k > T]
        kept = kept or [T]
        warnings.warn(f"sweep steps {', '.join(map(str, dropped))} exceed this run's {T} diffusion steps; sweeping "
                      f"{', '.join(map(str, kept))}")
    return kept


@dataclass
class _Context:
    """Everything loaded once and reused across evaluations of one run (e.g. a sweep)."""

    run: Any
    reference: Reference | None  # None on torchrun ranks other than 0, which only sample
    runtime: Runtime
    processes: Dist
    timings: dict[str, float]


def _prepare(run_dir: str | os.PathLike, ref: str | os.PathLike, runtime: Runtime, settings: ReferenceSettings,
             processes: Dist, checkpoint: str | os.PathLike | None, check_run: Callable[[Any], None]) -> _Context:
    """Load the run (rank 0's newest checkpoint on every rank, or ``checkpoint``), check the
    settings that depend on it (``check_run``, before the reference work), and on rank 0 build
    the reference."""
    t0 = time.perf_counter()
    if checkpoint is None and processes.world > 1:  # every rank scores rank 0's newest checkpoint
        checkpoint = from_rank_0(latest_checkpoint(run_dir), processes)
    run = load_run(run_dir, device=runtime.device, checkpoint=checkpoint)
    check_run(run)
    if not processes.main:  # under torchrun the other ranks only sample; rank 0 scores
        return _Context(run, None, runtime, processes, {"load_run_s": time.perf_counter() - t0})
    t1 = time.perf_counter()
    reference = Reference.build(ref, run.image_size, runtime, settings=settings, classes=run.classes)
    return _Context(run, reference, runtime, processes, {"load_run_s": t1 - t0, "reference_s": time.perf_counter() - t1})


def _evaluate(ctx: _Context, n: int, spec: SampleSpec, pr: bool) -> dict | None:
    """Sample ``n`` images as ``spec`` says and score them (rank 0; the other ranks return None)."""
    run = ctx.run
    spec = spec.for_run(run.schedule.T)
    conditional = bool(run.classes)
    labels = spread_labels(n, run.classes)
    t0 = time.perf_counter()
    # under torchrun each rank draws its block of image indices; rank 0 gathers them and scores
    images = generate(run, n, spec, ctx.runtime, ctx.processes, labels=labels)
    if images is None:
        return None
    t1 = time.perf_counter()
    gen = ctx.reference.features(images, progress=ctx.runtime.progress)
    t2 = time.perf_counter()
    scores = ctx.reference.score_features(gen, labels, pr=pr, seed=spec.seed)
    t3 = time.perf_counter()
    nfe = model_evaluations(spec.sampler, spec.steps)
    guided_batch = conditional and spec.guidance not in (0.0, 1.0)
    return {
        "sampler": spec.sampler, "steps": spec.steps, "nfe": nfe,
        # classifier-free guidance runs cond and uncond passes as one doubled batch
        "network_passes_per_sample": nfe * (2 if guided_batch else 1),
        "guidance": float(spec.guidance) if conditional else None, "n": n, "seed": spec.seed,
        "use_ema": spec.use_ema, **scores,
        "timings": {"generate_s": t1 - t0, "features_s": t2 - t1, "metrics_s": t3 - t2,
                    "images_per_s": n / max(t1 - t0, 1e-9)},
    }


def _header(ctx: _Context, ref: str | os.PathLike) -> dict:
    run, fs = ctx.run, ctx.reference.stats
    return {
        "run": str(run_dir_of(run)), "step": int(run.step), "image_size": int(run.image_size),
        "checkpoint": str(getattr(run, "checkpoint", "")) or None,
        "classes": run.classes, "prediction": run.prediction,
        "reference": {"ref": str(ref), "source": fs.source, "n": fs.n, "cache": str(fs.cache_path) if fs.cache_path else None,
                      "cached": fs.cached, "key": fs.key[:20]},
        "inception_sha256": ctx.reference.extractor.sha256, "device": str(ctx.runtime.device),
        "sampling_precision": ctx.runtime.precision, "torch": torch.__version__,
    }


def run_dir_of(run: Any) -> str:
    """The run folder a loaded run came from (``Run.run_dir``, if it has one)."""
    return str(getattr(run, "run_dir", ""))


def evaluate_run(
    run_dir: str | os.PathLike,
    ref: str | os.PathLike,
    n: int = 10_000,
    spec: SampleSpec = SampleSpec(),
    runtime: Runtime | None = None,
    *,
    settings: ReferenceSettings = ReferenceSettings(),
    processes: Dist = Dist(),
    checkpoint: str | os.PathLike | None = None,
) -> dict | None:
    """Sample ``n`` images from the run in ``run_dir`` as ``spec`` says and score them against ``ref``.

    Sampling is :func:`ddpm.sample.engine.generate` on ``runtime`` (None: the default device and
    precision); the reference is built and scored as ``settings`` says (:class:`Reference`).
    Conditional runs get ``n`` samples spread evenly over their classes (labels ``i % C``) and
    a class accuracy from the reference's linear probe, per class and overall. Returns a dict of
    settings, metrics and timings (:func:`format_summary` prints it, :func:`write_json` saves it).
    ``n < 2`` and steps above the run's T are a :class:`DDPMError` before any sampling or
    reference statistics. ``checkpoint`` scores that checkpoint file of the run instead of its
    newest (for a curve of quality over training). Under torchrun (``processes`` from
    :func:`ddpm.runtime.processes.init_distributed`) every rank samples its block of the ``n``
    image indices (the same images as one process) and rank 0 alone builds the reference,
    scores and returns the result; the other ranks return None.
    """
    if n < 2:
        raise DDPMError(f"--n must be at least 2 for FID statistics, got {n}")
    runtime = runtime if runtime is not None else resolve_runtime(local_rank=processes.local_rank, world=processes.world)
    t0 = time.perf_counter()
    ctx = _prepare(run_dir, ref, runtime if processes.main else runtime.quiet(), settings, processes, checkpoint,
                   lambda run: (spec.for_run(run.schedule.T), check_request(run, n, spec.seed)))
    res = _evaluate(ctx, n, spec, settings.precision_recall)
    if res is None:
        return None
    result = {**_header(ctx, ref), **res}
    result["timings"] = {**ctx.timings, **res["timings"], "total_s": time.perf_counter() - t0}
    return result


def format_summary(r: dict) -> str:
    """A readable multi-line summary of an :func:`evaluate_run` result."""
    ref = r["reference"]
    lines = [
        f"run        {r['run']} (step {r['step']}, {'EMA' if r['use_ema'] else 'raw'} weights, {r['image_size']}px)",
        f"sampling   {r['sampler']}, {r['steps']} steps = {r['nfe']} NFE, {r.get('sampling_precision', 'fp32')}"
        + (f", guidance {r['guidance']:g}" if r.get("guidance") is not None else "") + f", seed {r['seed']}",
        f"samples    {r['n']}" + (f" ({r['n'] / len(r['classes']):.0f} per class)" if r.get("classes") else ""),
        f"reference  {ref['source']} ({ref['n'] or 'statistics only'} images{', cached' if ref['cached'] else ''})",
        f"FID        {r['fid']:.3f}",
    ]
    if "kid_mean" in r:
        lines.append(f"KID        {r['kid_mean'] * 1e3:.3f} +- {r['kid_std'] * 1e3:.3f} (x1e-3, subsets of {r['kid_subset_size']})")
    if "precision" in r:
        lines.append(f"precision  {r['precision']:.3f}   recall {r['recall']:.3f}  (k=3)")
    acc = r.get("class_accuracy")
    if acc:
        real = f" (real held-out images: {acc['real_holdout']:.3f})" if acc.get("real_holdout") is not None else ""
        lines.append(f"class acc  {acc['overall']:.3f}{real}")
        items = [f"{c} {v:.2f}" for c, v in acc["per_class"].items() if v is not None]
        for i in range(0, len(items), 5):
            lines.append("           " + "  ".join(items[i:i + 5]))
    elif r.get("class_accuracy_note"):
        lines.append(f"class acc  skipped: {r['class_accuracy_note']}")
    t = r["timings"]
    lines.append(f"time       sampling {t['generate_s']:.1f}s ({t['images_per_s']:.2f} img/s), features "
                 f"{t['features_s']:.1f}s, reference {t.get('reference_s', 0):.1f}s, total {t.get('total_s', 0):.1f}s")
    if r.get("out"):
        lines.append(f"written    {r['out']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ fid_folders
def fid_folders(
    dir_a: str | os.PathLike,
    dir_b: str | os.PathLike,
    runtime: Runtime | None = None,
    *,
    settings: ReferenceSettings = ReferenceSettings(),
    image_size: int | None = None,
) -> dict:
    """FID (and KID when both sides have features) between two folders of images, or a folder
    and a ``.npz`` of statistics, like ``python -m pytorch_fid A B``: :func:`score_features` of
    one set's statistics against the other's. Images are used at their own sizes unless
    ``image_size`` (pixels) is given; ``settings`` as for :class:`Reference` (``max_images``
    applies to both sides); features run on ``runtime``'s device (None: the default device).
    Returns ``{"fid", "n_a", "n_b"}`` plus ``"kid_mean"``, ``"kid_std"``. Raises
    :class:`ReferenceDataError` for an unusable folder or mismatched feature dimensions."""
    runtime = runtime if runtime is not None else resolve_runtime()
    kw = dict(image_size=image_size, device=runtime.device, settings=settings, progress=runtime.progress)
    a, b = reference_stats(dir_a, **kw), reference_stats(dir_b, **kw)
    if a.mu.shape != b.mu.shape:
        raise ReferenceDataError(f"feature dimensions differ: {a.mu.shape[0]} ({dir_a}) vs {b.mu.shape[0]} ({dir_b})")
    scores = score_features(a, b, kid_subset=settings.kid_subset, kid_subsets=settings.kid_subsets)
    scores.pop("kid_subset_size", None)
    return {"fid": scores.pop("fid"), "n_a": a.n, "n_b": b.n, **scores}


# ----------------------------------------------------------------------------------- sweep
@dataclass(frozen=True)
class SweepGrid:
    """The configurations of :func:`sampler_sweep`: every sampler x step count x guidance scale.
    ``steps=None`` sweeps :data:`DEFAULT_SWEEP_STEPS`, leaving out (with a warning) those above a
    run's T; an explicit count above T is a :class:`DDPMError`."""

    samplers: Sequence[str] = DIFFUSION_SAMPLERS
    steps: Sequence[int] | None = None
    guidances: Sequence[float] = (1.0,)

    def specs(self, base: SampleSpec, T: int, conditional: bool) -> list[SampleSpec]:
        """One :class:`SampleSpec` per configuration, ``base`` giving seed, EMA and batch size;
        guidance is swept for conditional runs only."""
        steps = sweep_steps(self.steps, T)
        guidances = self.guidances if conditional else [1.0]
        return [base.with_(sampler=s, steps=k, guidance=float(g)) for g in guidances for s in self.samplers for k in steps]


def sampler_sweep(
    run_dir: str | os.PathLike,
    ref: str | os.PathLike,
    n: int = 2000,
    grid: SweepGrid = SweepGrid(),
    base: SampleSpec = SampleSpec(),
    runtime: Runtime | None = None,
    *,
    settings: ReferenceSettings = ReferenceSettings(),
    out: str | os.PathLike = "sweep.json",
) -> dict:
    """FID against network evaluations for each configuration of ``grid`` (sampler, step count,
    guidance scale), the other sampling settings from ``base``.

    Every configuration starts from the same seed (common random numbers make the comparison
    less noisy); the reference is built once, as ``settings`` says (:class:`Reference`). Writes
    ``out`` (JSON, rewritten after each configuration so an interrupted sweep keeps its results)
    and a plot next to it with the suffix ``.png``; prints a line per configuration when
    ``runtime.progress``. Steps above the run's T and an unwritable ``out`` are a
    :class:`DDPMError` before any work.
    """
    if n < 2:
        raise DDPMError(f"--n must be at least 2 for FID statistics, got {n}")
    out = Path(out)
    check_writable(out, "--out", is_file=True)
    check_writable(out.with_suffix(".png"), "the sweep plot", is_file=True)
    runtime = runtime if runtime is not None else resolve_runtime()
    specs: list[SampleSpec] = []

    def check_run(run: Any) -> None:
        specs[:] = grid.specs(base, run.schedule.T, bool(run.classes))
        check_request(run, n, base.seed)

    ctx = _prepare(run_dir, ref, runtime, settings, Dist(), None, check_run)
    report = {**_header(ctx, ref), "n": n, "seed": base.seed, "use_ema": base.use_ema, "results": []}
    for spec in specs:
        r = _evaluate(ctx, n, spec, False)
        report["results"].append(r)
        write_json(out, report)
        if runtime.progress:
            acc = r.get("class_accuracy")
            print(f"{spec.sampler:>10} steps {spec.steps:>4} NFE {r['nfe']:>4} guidance {spec.guidance:g}: "
                  f"FID {r['fid']:.3f}" + (f", class acc {acc['overall']:.3f}" if acc else ""), flush=True)
    report["plot"] = str(out.with_suffix(".png"))
    write_json(out, report)
    plot_sweep(report, out.with_suffix(".png"))
    return report


def plot_sweep(report: dict, path: str | os.PathLike) -> None:
    """FID vs NFE (log x), one line per sampler, one panel per guidance scale; written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's import
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = report["results"]
    gs = sorted({r["guidance"] for r in rows}, key=lambda g: (g is None, g or 0))
    fig, axes = plt.subplots(1, len(gs), figsize=(5 * len(gs), 4), squeeze=False, sharey=True)
    for ax, g in zip(axes[0], gs):
        for s in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["nfe"], r["fid"]) for r in rows if r["sampler"] == s and r["guidance"] == g)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["nfe"] for r in rows}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_title(f"guidance {g:g}" if g is not None else "unconditional")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"FID ({report['n']} samples)")
    axes[0][0].legend()
    fig.suptitle(f"{Path(report['run']).name} step {report['step']}: FID vs sampling cost")
    fig.tight_layout()
    try:
        atomic_write_with(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
