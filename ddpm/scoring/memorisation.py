"""Memorisation check: does a model copy its training images?

For every generated image we find its nearest training images in two spaces:

* Inception features (pool3, 2048-d, the FID network of :mod:`ddpm.scoring.inception`): near for images
  that look alike, also after a small shift or a change of colour;
* pixels: the root-mean-square difference in grey levels (0-255), near only when the pixels
  themselves are nearly the same.

A model that generalises puts its samples about as far from the training set as real images it
never saw; a model that copies puts some of them much closer. So the nearest-neighbour distances
of the generated images are compared with those of *held-out* real images (real images that are
not training images: ``ddpm eval --ref``, e.g. the CIFAR-10 test split for a CIFAR-10 run).

The near-copy rule (the one place it is decided, :func:`near_copy_thresholds`): a generated image
is a near-copy when, in either space, its distance to its nearest training image is below
:data:`NEAR_COPY_FACTOR` (one half) of the :data:`HELDOUT_PERCENTILE` (1st) percentile of the
held-out images' nearest-training-image distances. Unseen real images come that close in 1 case
in 100; half that distance lies far out in the tail of their distances (nearest-neighbour
distances in thousands of dimensions vary little from image to image), and an exact copy
(distance 0) is always caught. On CIFAR-10, none of 500 unseen test images came within 1.5x
of the threshold in either space (docs/training-runs.md). The idea of judging a sample's
nearest-neighbour distance against a scale set by other images follows Carlini et al. 2023
("Extracting training data from diffusion models", which normalise a sample's l2 distance to its
nearest training image by its distances to other nearby training images), and comparing with
held-out images follows Somepalli et al. 2023 ("Diffusion art or digital forgery?", who use SSCD
copy-detection features); the held-out percentile and the factor are this project's choice.

Runs trained with horizontal flips saw mirrored training images as well, so for them a query's
distance to a training image is the smaller of its own and its mirror image's, for generated and
held-out images alike; the grid shows a neighbour found through the mirror mirrored.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from ..data.cache import open_training_set
from ..data.sets import load_dataset, names_cifar10
from ..errors import DDPMError
from ..files.atomic import check_writable
from ..run.checkpoint import load_run
from ..runtime.policy import Runtime, resolve_runtime
from ..sample.engine import generate
from ..sample.pictures import make_grid, save_png
from ..sample.spec import SampleSpec
from . import evaluate
from .evaluate import ReferenceSettings

__all__ = ["NEAR_COPY_FACTOR", "HELDOUT_PERCENTILE", "HELDOUT_MAX", "SAME_IMAGE_RMS", "RULE", "nearest_neighbours",
           "near_copy_thresholds", "MemorisationReport", "memorisation_check", "nearest_grid", "format_report",
           "NearestOptions", "check_run"]

NEAR_COPY_FACTOR = 0.5
HELDOUT_PERCENTILE = 1.0
# Held-out images used when no count is given: enough for a stable 1st percentile (its 10
# smallest distances) at a minute of Inception work on a CPU.
HELDOUT_MAX = 1000
# A held-out image this close to a training image in pixels (RMS, grey levels) *is* that image
# (the reference overlaps the training set); it is left out of the calibration, with a warning.
SAME_IMAGE_RMS = 0.5
RULE = (f"near-copy: distance to the nearest training image below {NEAR_COPY_FACTOR:g} x percentile "
        f"{HELDOUT_PERCENTILE:g} of the held-out real images' distances to theirs, in Inception features or in "
        "pixels (RMS grey levels)")
_QUANTILES = (0.0, 1.0, 5.0, 50.0)
_CHUNK = 2048

Extractor = Callable[[torch.Tensor], np.ndarray]


# ------------------------------------------------------------------------------------ distances
def nearest_neighbours(queries: torch.Tensor, base: Iterator[torch.Tensor] | torch.Tensor, k: int,
                       chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``base`` to each query, by Euclidean distance.

    ``queries`` is float [V, M, D]: M queries seen in V views (1, or 2 with the mirror image); a
    query's distance to a base row is the smallest over its views. ``base`` is a float tensor
    [N, D] or an iterator of chunks [B, D] (read once, so a data set decoded on the fly is decoded
    once). Distances are computed in float64 (``torch.cdist``), so an exact copy comes out at
    about 1e-6 of the vectors' scale, not at float32's rounding noise.

    Returns ``(dist, index, view)``, each [M, k'] with ``k' = min(k, N)``, nearest first: float64
    distances, int64 base row indices, int64 view indices. Raises ``ValueError`` for an empty base.
    """
    if queries.ndim != 3:
        raise ValueError(f"queries must be [views, M, D], got shape {tuple(queries.shape)}")
    views, m, _ = queries.shape
    best_d = torch.full((m, k), math.inf, dtype=torch.float64)  # running k best, nearest first
    best_i = torch.zeros((m, k), dtype=torch.long)
    best_v = torch.zeros((m, k), dtype=torch.long)
    offset = 0
    # A tensor base is read in chunks too: one [M, N] float64 distance matrix of a large set is
    # gigabytes, a chunk of rows of it is bounded.
    for block in (base.split(chunk) if isinstance(base, torch.Tensor) else base):
        b = block.to(torch.float64).reshape(len(block), -1)
        for start in range(0, m, chunk):
            rows = slice(start, start + chunk)
            q = queries[:, rows].to(torch.float64)
            d, v = torch.stack([torch.cdist(q[j], b) for j in range(views)]).min(0)  # [mq, B]
            idx = torch.arange(offset, offset + len(b)).expand_as(d)
            top_d, pos = torch.cat([best_d[rows], d], 1).topk(k, dim=1, largest=False)
            best_i[rows] = torch.cat([best_i[rows], idx], 1).gather(1, pos)
            best_v[rows] = torch.cat([best_v[rows], v], 1).gather(1, pos)
            best_d[rows] = top_d
        offset += len(b)
    if offset == 0:
        raise ValueError("nearest neighbours in an empty set")
    kk = min(k, offset)
    return best_d[:, :kk].numpy(), best_i[:, :kk].numpy(), best_v[:, :kk].numpy()


def near_copy_thresholds(heldout_d1: np.ndarray) -> float:
    """The near-copy threshold of one space: :data:`NEAR_COPY_FACTOR` times the
    :data:`HELDOUT_PERCENTILE` percentile of the held-out images' nearest-neighbour distances
    (float64 [R], R >= 1). A generated image whose distance is below it is a near-copy."""
    return float(NEAR_COPY_FACTOR * np.percentile(heldout_d1, HELDOUT_PERCENTILE))


# ---------------------------------------------------------------------------------- the check
@dataclass
class SpaceResult:
    """Nearest-training-image distances in one space (features, or pixels as RMS grey levels)."""

    name: str
    generated: np.ndarray  # float64 [M, k]: distances to the k nearest training images, nearest first
    index: np.ndarray  # int64 [M, k]: their training-set indices
    mirrored: np.ndarray  # bool [M, k]: found through the generated image's mirror image
    heldout: np.ndarray  # float64 [R]: each held-out image's distance to its nearest training image
    threshold: float

    @property
    def near(self) -> np.ndarray:
        """bool [M]: generated images closer to a training image than the threshold."""
        return self.generated[:, 0] < self.threshold

    def summary(self) -> dict[str, Any]:
        """Quantiles (``p0``, ``p1``, ``p5``, ``p50``) of both distributions, the threshold, the
        count below it, and the share of samples below the held-out percentile of the rule."""
        return {
            "threshold": self.threshold,
            "heldout": {f"p{p:g}": float(np.percentile(self.heldout, p)) for p in _QUANTILES},
            "generated": {f"p{p:g}": float(np.percentile(self.generated[:, 0], p)) for p in _QUANTILES},
            "near_copies": int(self.near.sum()),
            # Without copying, about HELDOUT_PERCENTILE % of the samples fall below this percentile.
            "generated_below_heldout_percentile": float(
                (self.generated[:, 0] < np.percentile(self.heldout, HELDOUT_PERCENTILE)).mean()),
        }


@dataclass
class MemorisationReport:
    """What :func:`memorisation_check` found; :meth:`to_dict` is its JSON form."""

    features: SpaceResult
    pixels: SpaceResult
    n_train: int
    n_heldout: int
    heldout_excluded: int  # held-out images left out for being training images themselves
    mirrored: bool
    shown: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # int64: grid rows, in order

    @property
    def near_copy(self) -> np.ndarray:
        """bool [M]: the near-copy rule, either space."""
        return self.features.near | self.pixels.near

    @property
    def reading(self) -> str:
        """The one-line verdict."""
        m, k = len(self.near_copy), int(self.near_copy.sum())
        if k == 0:
            return f"no sign of copying: none of the {m} samples is a near-copy of a training image"
        return f"{k} of {m} samples {'is a near-copy' if k == 1 else 'are near-copies'} of training images"

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON summary: rule, thresholds, distance quantiles, near-copy indices, grid rows."""
        near = np.flatnonzero(self.near_copy)
        rows = []
        for i in self.shown:
            rows.append({"sample": int(i), "near_copy": bool(self.near_copy[i]),
                         **{s.name: {"train_index": s.index[i].tolist(), "distance": s.generated[i].tolist(),
                                     "mirrored": s.mirrored[i].tolist()} for s in (self.features, self.pixels)}})
        return {
            "rule": RULE,
            "reading": self.reading,
            "n_generated": int(len(self.near_copy)), "n_train": self.n_train, "n_heldout": self.n_heldout,
            "heldout_excluded": self.heldout_excluded, "mirrored": self.mirrored,
            "features": self.features.summary(), "pixels": self.pixels.summary(),
            "near_copies": near.tolist(), "shown": rows,
        }


def _views(images: torch.Tensor, mirrored: bool) -> list[torch.Tensor]:
    return [images, images.flip(-1)] if mirrored else [images]


def _features(images: torch.Tensor, extractor: Extractor, mirrored: bool, batch: int = 50) -> torch.Tensor:
    """float32 [V, N, D] features of uint8 images [N, 3, H, W] and (mirrored) their mirror images."""
    out = []
    for view in _views(images, mirrored):
        parts = [np.asarray(extractor(view[i:i + batch]), dtype=np.float32) for i in range(0, len(view), batch)]
        out.append(torch.from_numpy(np.concatenate(parts)))
    return torch.stack(out)


def _pixels(images: torch.Tensor, mirrored: bool) -> torch.Tensor:
    """float32 [V, N, 3HW] grey levels (exact integers, so identical images subtract to 0)."""
    return torch.stack([v.reshape(len(v), -1).float() for v in _views(images, mirrored)])


def _image_chunks(train: Any, chunk: int = _CHUNK) -> Iterator[torch.Tensor]:
    """uint8 [B, 3, H, W] chunks of a training set: a uint8 tensor [N, 3, H, W], or an
    :class:`~ddpm.data.sets.ImageSet` (in memory, or decoded from its files one chunk at a time)."""
    if isinstance(train, torch.Tensor):
        yield from train.split(chunk)
        return
    for start in range(0, len(train), chunk):
        stop = min(start + chunk, len(train))
        if isinstance(train.images, np.ndarray):
            block = train.images[start:stop]
        else:
            block = np.stack([train.get(i) for i in range(start, stop)])
        # a copy: the rows of a mapped cache file are read-only, which torch tensors must not be
        yield torch.from_numpy(np.array(block)).permute(0, 3, 1, 2)


def _train_image(train: Any, index: int) -> torch.Tensor:
    """uint8 [3, H, W]: training image ``index``."""
    if isinstance(train, torch.Tensor):
        return train[index]
    return torch.from_numpy(np.array(train.get(index))).permute(2, 0, 1)  # a writable copy (see above)


def memorisation_check(generated: torch.Tensor, train: Any, heldout: torch.Tensor, extractor: Extractor, *,
                       train_features: np.ndarray | None = None, k: int = 3, mirrored: bool = False,
                       show: int = 8) -> MemorisationReport:
    """Compare generated images' nearest training images with held-out real images' (module docstring).

    ``generated`` uint8 [M, 3, H, W], ``heldout`` uint8 [R, 3, H, W] (R >= 2) and ``train`` (a uint8
    tensor [N, 3, H, W] or an :class:`~ddpm.data.sets.ImageSet`) share one size. ``extractor`` maps a uint8
    batch to features [B, D] (an Inception :class:`~ddpm.scoring.inception.FeatureExtractor`);
    ``train_features`` float [N, D], when given (cached reference features), must be the training
    images' features in the same order, else they are computed. ``mirrored``: the run trained
    with horizontal flips. ``show``: how many generated images :attr:`MemorisationReport.shown`
    lists for the grid, near-copies first, then the closest to the training set.

    Raises :class:`DDPMError` when fewer than 2 held-out images remain after leaving out those
    that are training images themselves, or the image sizes or feature counts disagree.
    """
    size = tuple(generated.shape[1:])
    first = next(_image_chunks(train, 1))
    if tuple(heldout.shape[1:]) != size or tuple(first.shape[1:]) != size:
        raise DDPMError(f"generated {size}, held-out {tuple(heldout.shape[1:])} and training {tuple(first.shape[1:])} "
                        "images must have one size")
    m = len(generated)
    n_train = len(train)
    # One pass over the training set answers both query sets: generated first, then held-out.
    queries = torch.cat([generated, heldout])
    pix_d, pix_i, pix_v = nearest_neighbours(_pixels(queries, mirrored), (c.reshape(len(c), -1)
                                             for c in _image_chunks(train)), k)
    pix_d = pix_d / math.sqrt(int(np.prod(size)))  # l2 over 3HW values -> RMS per value
    same = pix_d[m:, 0] < SAME_IMAGE_RMS
    keep = np.concatenate([np.ones(m, bool), ~same])
    if (~same).sum() < 2:
        raise DDPMError(f"{int(same.sum())} of the {len(heldout)} held-out images are training images themselves; "
                        "the check needs real images the model never saw (for a CIFAR-10 run: --ref cifar10, the "
                        "test split)")
    if same.any():
        warnings.warn(f"left out {int(same.sum())} held-out image(s) identical to training images")
    feats = _features(queries[torch.from_numpy(keep)], extractor, mirrored)
    if train_features is None:
        base = torch.cat([_features(c, extractor, False)[0] for c in _image_chunks(train)])
    else:
        base = torch.from_numpy(np.asarray(train_features, dtype=np.float32))
    if len(base) != n_train:
        raise DDPMError(f"{len(base)} training feature vectors for {n_train} training images")
    feat_d, feat_i, feat_v = nearest_neighbours(feats, base, k)
    pix_d, pix_i, pix_v = pix_d[keep], pix_i[keep], pix_v[keep]
    spaces = []
    for name, d, i, v in (("features", feat_d, feat_i, feat_v), ("pixels", pix_d, pix_i, pix_v)):
        held = d[m:, 0]
        spaces.append(SpaceResult(name, d[:m], i[:m], v[:m].astype(bool), held, near_copy_thresholds(held)))
    report = MemorisationReport(spaces[0], spaces[1], n_train, int((~same).sum()), int(same.sum()), mirrored)
    # Most suspicious first: near-copies, then by distance relative to the threshold, either space.
    closeness = np.minimum(report.features.generated[:, 0] / max(report.features.threshold, 1e-12),
                           report.pixels.generated[:, 0] / max(report.pixels.threshold, 1e-12))
    order = np.lexsort((closeness, ~report.near_copy))
    report.shown = order[:max(0, show)].astype(np.int64)
    return report


# ----------------------------------------------------------------------------------- the grid
def nearest_grid(report: MemorisationReport, generated: torch.Tensor, train: Any, min_size: int = 64) -> np.ndarray:
    """The picture: one row per shown generated image, HWC uint8.

    Each row: the generated image (framed in red when it is a near-copy), a gap, its k nearest
    training images in Inception feature space, a gap, its k nearest in pixel space. Neighbours
    found through the mirror image are shown mirrored, as they match. Images are enlarged
    (nearest-neighbour, a whole factor) to at least ``min_size`` pixels.
    """
    if not len(report.shown):
        raise ValueError("the report shows no samples (memorisation_check(show=0))")
    c, h, w = generated.shape[1:]
    k = report.features.index.shape[1]
    blank = torch.full((c, h, w), 255, dtype=torch.uint8)
    tiles = []
    for i in report.shown:
        g = generated[i].clone()
        if report.near_copy[i]:
            g[:, [0, -1], :] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
            g[:, :, [0, -1]] = torch.tensor([255, 0, 0], dtype=torch.uint8)[:, None, None]
        row = [g, blank]
        for space in (report.features, report.pixels):
            for j in range(k):
                img = _train_image(train, int(space.index[i, j]))
                row.append(img.flip(-1) if space.mirrored[i, j] else img)
            row.append(blank)
        tiles.extend(row[:-1])
    images = torch.stack(tiles)
    factor = max(1, math.ceil(min_size / max(h, w)))
    if factor > 1:
        images = images.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    return make_grid(images, nrow=3 + 2 * k)


def format_report(report: MemorisationReport, header: Sequence[str] = ()) -> str:
    """A readable summary: distance quantiles of held-out and generated images in both spaces,
    the thresholds, and the reading."""
    lines = list(header)
    lines.append(f"{'nearest training image':<28}{'min':>9}{'1%':>9}{'5%':>9}{'median':>9}")
    for space, unit in ((report.features, "Inception features"), (report.pixels, "pixels, RMS grey levels")):
        s = space.summary()
        lines.append(f"  {unit}")
        for who, label in (("heldout", f"held-out real ({report.n_heldout})"),
                           ("generated", f"generated ({len(space.generated)})")):
            q = s[who]
            lines.append(f"    {label:<24}" + "".join(f"{q[f'p{p:g}']:>9.2f}" for p in _QUANTILES))
        lines.append(f"    near-copy threshold {space.threshold:.2f}: {s['near_copies']} sample(s) below; "
                     f"{100 * s['generated_below_heldout_percentile']:.1f}% below the held-out "
                     f"{HELDOUT_PERCENTILE:g}% (about {HELDOUT_PERCENTILE:g}% without copying)")
    if report.heldout_excluded:
        lines.append(f"  ({report.heldout_excluded} held-out image(s) identical to training images left out)")
    lines.append(f"rule: {RULE}")
    lines.append(f"reading: {report.reading}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ a trained run
@dataclass(frozen=True)
class NearestOptions:
    """What the memorisation check of a run shows: ``k`` training neighbours per sample and space,
    ``show`` samples in the grid (near-copies first), and ``train_data``, the run's training images
    when they are no longer where the run's config says (None: the run's ``--data``)."""

    k: int = 3
    show: int = 8
    train_data: str | None = None


def check_run(run_dir: str | os.PathLike, ref: str, n: int = 1000, spec: SampleSpec = SampleSpec(),
              runtime: Runtime | None = None, *, settings: ReferenceSettings = ReferenceSettings(),
              options: NearestOptions = NearestOptions(), out: str | os.PathLike | None = None) -> dict:
    """The memorisation check of a run: ``n`` samples (drawn as ``spec`` says, on ``runtime``)
    against the run's training images and held-out real images from ``ref`` (a folder or
    ``cifar10[:test]`` that holds no training images; ``settings.max_images``, default
    :data:`HELDOUT_MAX`, of them).

    The training images are the run's ``--data`` (or ``options.train_data``), decoded at the run's
    size as training did (centre crops); their Inception features come from
    :func:`ddpm.scoring.evaluate.reference_stats` with ``settings``, so they share its cache with
    ``ddpm eval`` and ``ddpm train --eval-every``. Writes ``out`` (JSON) and the grid beside it
    (``.png``) when given; returns the JSON dict, with ``"summary"``, the report as text (and
    ``"grid"``). Raises :class:`DDPMError` before any sampling when the training data is not
    there, ``ref`` is the training data, or ``out`` can't be written.
    """
    if n < 2:
        raise DDPMError(f"--n must be at least 2, got {n}")
    grid_path = None if out is None else Path(out).with_suffix(".png")
    if out is not None:
        check_writable(out, "--out", is_file=True)
        check_writable(grid_path, "the nearest-neighbour grid", is_file=True)
    runtime = runtime if runtime is not None else resolve_runtime()
    run = load_run(run_dir, device=runtime.device)
    spec = spec.for_run(run.schedule.T)
    data, train_ref = _training_data(run, ref, options)
    size = run.image_size
    heldout = evaluate.reference_images(ref, size, settings=replace(settings, max_images=settings.max_images or HELDOUT_MAX),
                                        progress=runtime.progress)
    data_root = run.config.train.get("data_root") or None
    # the run's own decoded-data cache when it has one: the pixels training saw, not decoded again
    train = (load_dataset(data, size, conditional=False, data_root=data_root, progress=runtime.progress)
             if names_cifar10(data) else
             open_training_set(data, size, cache=settings.data_cache, progress=runtime.progress))
    train_fs = evaluate.reference_stats(train_ref, image_size=size, device=runtime.device, progress=runtime.progress,
                                        settings=replace(settings, max_images=None, cifar_root=data_root))
    if train_fs.features is None or len(train_fs.features) != len(train):
        raise DDPMError(f"the training images changed while they were read ({len(train)} images, "
                        f"{train_fs.n} feature vectors); run the check again")
    extractor = evaluate.FeatureExtractor(settings.inception, runtime.device)
    images = generate(run, n, spec, runtime, labels=evaluate.spread_labels(n, run.classes))
    mirrored = bool(run.config.train.get("hflip", True))
    report = memorisation_check(images, train, heldout, extractor, train_features=train_fs.features, k=options.k,
                                mirrored=mirrored, show=options.show)
    result = {"run": str(run_dir), "step": int(run.step), "reference": ref, "train_data": data,
              "sampler": spec.sampler, "steps": spec.steps, "guidance": float(spec.guidance) if run.classes else None,
              "seed": spec.seed, "use_ema": spec.use_ema, **report.to_dict()}
    header = [f"run        {run_dir} (step {run.step}, {'EMA' if spec.use_ema else 'raw'} weights); {n} samples, "
              f"{spec.sampler} {spec.steps} steps",
              f"training   {data} ({len(train)} images{', and their mirror images' if mirrored else ''})",
              f"held-out   {ref} ({report.n_heldout} images)"]
    summary = format_report(report, header)
    if out is not None and grid_path is not None:
        save_png(nearest_grid(report, images, train), grid_path)
        evaluate.write_json(out, result)
        result["out"], result["grid"] = str(out), str(grid_path)
        summary += (f"\nwrote {out} and {grid_path} (rows: {len(report.shown)} samples, near-copies first, each beside "
                    f"its {options.k} nearest training images in Inception features, then in pixels)")
    result["summary"] = summary
    return result


def _training_data(run: Any, ref: str, options: NearestOptions) -> tuple[str, str]:
    """The run's training images (a folder or ``cifar10``) and their reference name; raises
    :class:`DDPMError` when they are not there or ``ref`` names them."""
    data = options.train_data or run.config.train.get("data") or ""
    if not data or not (names_cifar10(data) or Path(data).expanduser().is_dir()):
        raise DDPMError(f"the run's training images {data!r} are not there; pass --train-data with the folder it was "
                        "trained on")
    train_ref = "cifar10:train" if names_cifar10(data) else data
    evaluate.check_reference(ref, "--ref")
    same = (train_ref == "cifar10:train" and ref.lower() == "cifar10:train") or (
        not names_cifar10(data) and Path(ref).expanduser().resolve() == Path(data).expanduser().resolve())
    if same:
        raise DDPMError(f"--ref {ref!r} is the run's training data; the check needs held-out real images the model "
                        "never saw (for a CIFAR-10 run: --ref cifar10, the test split)")
    return data, train_ref
