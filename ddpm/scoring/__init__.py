"""Scoring images: the Inception network, FID/KID/precision/recall, references, run evaluation and the memorisation check."""
