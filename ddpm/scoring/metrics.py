"""Sample-quality metrics on feature vectors: FID, KID, precision/recall, and a linear class probe.

Everything here is plain maths on float64 arrays [N, D] (Inception pool3 features in practice,
see :mod:`ddpm.scoring.inception`); nothing here touches images, models or files except the probe's
``save``/``load``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import scipy.linalg
import torch

from ..files.atomic import atomic_write_with

__all__ = ["gaussian_stats", "frechet_distance", "fid_from_features", "kid", "precision_recall",
           "LinearProbe", "fit_linear_probe", "class_accuracy"]


def _as2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D], got shape {x.shape}")
    return x


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64 (N >= 2)."""
    f = _as2d(feats, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    return f.mean(0), np.cov(f, rowvar=False)


# ----------------------------------------------------------------------------------------- FID
def _sym_sqrt(s: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix by eigendecomposition; tiny negative eigenvalues
    (rounding on rank-deficient covariances, e.g. N < D) are clipped to 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    # tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)), and S1 S2 is similar to the symmetric PSD matrix
    # sqrt(S1) S2 sqrt(S1) (same eigenvalues), whose eigenvalues eigvalsh finds stably and
    # real. No complex round-off, no failure when S1 S2 is singular.
    r = _sym_sqrt(s1)
    m = r @ s2 @ r
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    # The classic route (pytorch-fid, TTUR): Schur-based sqrtm of the non-symmetric product.
    # Singular products can give inf/nan; then retry with eps * I added to both covariances.
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((s1 + off) @ (s2 + off))
    if np.iscomplexobj(covmean):
        # Round-off makes a small imaginary part; a large one means the result is meaningless.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm gave a large imaginary component {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     method: str = "eigh", eps: float = 1e-6) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64:

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr sqrt(sigma1 sigma2)

    ``method="eigh"`` (default) gets ``tr sqrt(sigma1 sigma2)`` from the eigenvalues of the
    symmetric matrix ``sqrt(sigma1) sigma2 sqrt(sigma1)`` (two symmetric eigendecompositions):
    always real, robust to singular covariances (N < D), and at D = 2048 about 12x faster than
    sqrtm (1.4 s vs 17.8 s on two CPU cores). ``method="sqrtm"`` is the pytorch-fid route
    (scipy.linalg.sqrtm, imaginary-part check, ``eps`` diagonal offset when the result is not
    finite). On CIFAR-10 Inception statistics (1000 vs 1000 images) the two and pytorch-fid
    agree to 3e-7 relative. The result is not clipped at 0: with rank-deficient covariances an
    identical pair comes out at about +-1e-8 * trace rather than exactly 0.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    elif method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'eigh' or 'sqrtm'")
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray, method: str = "eigh") -> float:
    """FID between two feature sets [N1, D] and [N2, D]."""
    return frechet_distance(*gaussian_stats(feats1), *gaussian_stats(feats2), method=method)


# ----------------------------------------------------------------------------------------- KID
def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """k(x, y) = (x.y / d + 1)^3, the kernel of Binkowski et al. 2018 (KID)."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def _mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    # Unbiased MMD^2: drop the diagonals (k(x_i, x_i) is not an independent pair).
    m, n = kxx.shape[0], kyy.shape[0]
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(feats1: np.ndarray, feats2: np.ndarray, subset_size: int = 1000, num_subsets: int = 100,
        seed: int = 0, max_gram: int = 8000) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 with the cubic polynomial
    kernel over ``num_subsets`` random subsets (without replacement) of each set.

    ``subset_size`` is capped at the smaller sample count. When ``N1 + N2 <= max_gram`` the full
    kernel matrix is computed once and subsets index into it (the same numbers, far fewer flops).
    """
    x, y = _as2d(feats1, "feats1"), _as2d(feats2, "feats2")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    m = min(subset_size, x.shape[0], y.shape[0])
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    rng = np.random.default_rng(seed)
    nx = x.shape[0]
    gram = _poly_kernel(np.concatenate([x, y]), np.concatenate([x, y])) if nx + y.shape[0] <= max_gram else None
    vals = np.empty(num_subsets)
    for i in range(num_subsets):
        ix = rng.choice(nx, m, replace=False)
        iy = rng.choice(y.shape[0], m, replace=False)
        if gram is not None:
            jy = iy + nx
            vals[i] = _mmd2_unbiased(gram[np.ix_(ix, ix)], gram[np.ix_(jy, jy)], gram[np.ix_(ix, jy)])
        else:
            a, b = x[ix], y[iy]
            vals[i] = _mmd2_unbiased(_poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b))
    return float(vals.mean()), float(vals.std())


# ---------------------------------------------------------------------------- precision/recall
def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


def _knn_radii(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each row of x to its k-th nearest other row."""
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], chunk):
        d = _sq_dists(x[i:i + chunk], x)
        # index k, not k - 1: the point itself is at distance 0 and comes first
        out[i:i + chunk] = np.partition(d, k, axis=1)[:, k]
    return out


def _coverage(query: np.ndarray, support: np.ndarray, radii: np.ndarray, chunk: int) -> float:
    """Fraction of query points inside at least one support ball."""
    inside = np.zeros(query.shape[0], dtype=bool)
    for i in range(0, query.shape[0], chunk):
        inside[i:i + chunk] = (_sq_dists(query[i:i + chunk], support) <= radii[None, :]).any(1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, chunk: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls (default k = 3).

    Precision: the share of generated samples inside the real manifold (the union of balls around
    each real feature reaching its k-th nearest real neighbour); recall: the share of real samples
    inside the generated manifold.
    """
    r, f = _as2d(real, "real"), _as2d(fake, "fake")
    if min(r.shape[0], f.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    precision = _coverage(f, r, _knn_radii(r, k, chunk), chunk)
    recall = _coverage(r, f, _knn_radii(f, k, chunk), chunk)
    return precision, recall


# ----------------------------------------------------------------------------- class probe
@dataclass
class LinearProbe:
    """A softmax-regression classifier on standardised features: ``argmax(W z + b)`` with
    ``z = (x - mean) / scale``. Small enough to store as an .npz next to reference statistics."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]
    mean: np.ndarray  # [D]
    scale: np.ndarray  # [D]
    classes: list[str]
    holdout_accuracy: float | None = None  # accuracy on real images held out of a fit, if measured

    def logits(self, feats: np.ndarray) -> np.ndarray:
        z = (_as2d(feats, "features") - self.mean) / self.scale
        return z @ self.weight.T + self.bias

    def predict(self, feats: np.ndarray) -> np.ndarray:
        """Class indices [N] (int64)."""
        return self.logits(feats).argmax(1).astype(np.int64)

    def save(self, path: str | os.PathLike) -> None:
        """Write the probe to ``path`` as an ``.npz`` (no pickles), atomically
        (:func:`ddpm.files.atomic.atomic_write_with`, whose errors it raises)."""
        arrays = dict(weight=self.weight, bias=self.bias, mean=self.mean, scale=self.scale,
                      classes=np.array(self.classes, dtype=str),
                      holdout_accuracy=np.array(np.nan if self.holdout_accuracy is None else self.holdout_accuracy))
        atomic_write_with(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LinearProbe":
        with np.load(path, allow_pickle=False) as z:
            acc = float(z["holdout_accuracy"]) if "holdout_accuracy" in z.files else math.nan
            return cls(z["weight"], z["bias"], z["mean"], z["scale"], [str(c) for c in z["classes"]],
                       None if math.isnan(acc) else acc)


def fit_linear_probe(feats: np.ndarray, labels: np.ndarray, classes: Sequence[str] | None = None,
                     l2: float = 1e-2, max_iter: int = 300) -> LinearProbe:
    """Fit multinomial logistic regression, ``mean CE + l2/2 ||W||^2``, full-batch L-BFGS in
    float64 on standardised features (which makes one ``l2`` sensible for any feature scale and
    lets L-BFGS converge in a few hundred iterations). The problem is strictly convex, so the
    result does not depend on the initialisation or on sample order."""
    x = _as2d(feats, "features")
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (x.shape[0],):
        raise ValueError(f"need one label per feature vector: {y.shape} labels for {x.shape[0]} vectors")
    num_classes = len(classes) if classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    mean = x.mean(0)
    scale = np.maximum(x.std(0), 1e-6)  # some pool3 units are ~constant; don't divide by ~0
    z = torch.from_numpy((x - mean) / scale)
    yt = torch.from_numpy(y)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w.T + b, yt) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    # Small problems run on one thread: at this size OpenMP hand-offs cost more than the maths,
    # and on a busy machine two-thread L-BFGS was measured 100x slower than one thread.
    small = z.shape[0] * z.shape[1] * num_classes < 20_000_000
    threads = torch.get_num_threads()
    try:
        if small:
            torch.set_num_threads(1)
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    names = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    return LinearProbe(w.detach().numpy(), b.detach().numpy(), mean, scale, names)


def class_accuracy(probe: LinearProbe, feats: np.ndarray, labels: np.ndarray) -> dict:
    """Share of samples the probe assigns to their intended class, overall and per class name:
    ``{"overall": float, "per_class": {name: float | None}, "n": int}`` (None: no samples)."""
    y = np.asarray(labels, dtype=np.int64)
    correct = probe.predict(feats) == y
    per_class = {name: (float(correct[y == c].mean()) if (y == c).any() else None)
                 for c, name in enumerate(probe.classes)}
    return {"overall": float(correct.mean()), "per_class": per_class, "n": int(y.size)}
