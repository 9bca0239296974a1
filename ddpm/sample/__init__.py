"""Sampling a trained network: the sampling request (:class:`SampleSpec`), the one generation
path (:func:`generate`), and pictures (grids, GIF chains, guidance sweeps, interpolation)."""

from .engine import generate, starting_noise
from .spec import SampleSpec

__all__ = ["SampleSpec", "generate", "starting_noise"]
