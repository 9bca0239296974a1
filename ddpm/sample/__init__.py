"""Sampling a trained network: the sampling request, the one generation path, and pictures (grids, GIF chains, guidance sweeps, interpolation)."""
