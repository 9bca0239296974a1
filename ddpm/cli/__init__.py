"""The command line: parsing and printing, a module per command group (``ddpm train``, ``sample``,
``info``, ``demo``, ``export``/``import`` in :mod:`.app`; ``eval`` and ``fid`` in :mod:`.evaluate`)."""

from .app import build_parser, main

__all__ = ["build_parser", "main"]
