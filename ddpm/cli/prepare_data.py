"""``ddpm prepare-data SRC OUT``: decode a data set once, into the file ``ddpm train --data OUT`` maps."""

from __future__ import annotations

import argparse

from ..data.cache import describe_data_file, prepare_data
from ..data.sources import DecodeSpec
from ..errors import DDPMError
from .common import Formatter

__all__ = ["register"]

_DESCRIPTION = """\
Decode every image of SRC once, on every core, at the training resolution, into OUT: one file of
raw uint8 pixels plus its file list, classes and a checksum, written atomically. 'ddpm train
--data OUT' then maps it read-only instead of decoding (on this machine or, copied, on another:
build it on a login node before a cluster job), and every process of a torchrun job shares it.
Training from SRC itself does the same automatically in $DDPM_CACHE/data; this command chooses
the place and the moment.

How big OUT will be: IMAGE_SIZE x IMAGE_SIZE x 3 bytes per image, uncompressed, so
  32 px: 3 KB per image      (50,000 images: 154 MB)
  64 px: 12 KB per image     (200,000 images: 2.5 GB; 1,000,000: 12.3 GB)
 128 px: 49 KB per image     (200,000 images: 9.8 GB)
 256 px: 197 KB per image    (200,000 images: 39.3 GB)
plus a header of about 100 bytes per image. With --random-crop each image keeps its resized long
side: 4:3 photographs take a third more, 16:9 ones 78% more. The estimate for SRC is printed
before decoding starts; with centre crops a disk without room for it is an error at once."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``prepare-data`` subcommand (``func(args) -> int``) to ``ddpm``'s subparsers."""
    p = subparsers.add_parser(
        "prepare-data", formatter_class=Formatter, description=_DESCRIPTION,
        help="decode a data set once into one file that 'ddpm train --data FILE' maps (size: see its help)")
    p.add_argument("src", metavar="SRC",
                   help="a folder of images (class sub-folders for --conditional), a .zip of images (EDM's "
                        "dataset_tool layout; labels from its dataset.json), or a Parquet file or folder of them "
                        "(Hugging Face's layout: an image-bytes column and an optional label column)")
    p.add_argument("out", metavar="OUT", help="the file to write, e.g. data-64.ddpmdata")
    p.add_argument("--image-size", type=int, required=True,
                   help="training resolution in pixels: the run must train at this size")
    p.add_argument("--random-crop", action="store_true",
                   help="keep each image's resized long side, for 'ddpm train --random-crop'")
    p.add_argument("--conditional", action="store_true",
                   help="keep only images that have a class (those in class sub-folders; SRC's labels), so "
                        "every one can train --conditional; unset: every image, with its class where it has one")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (unset: one per core)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable image instead of skipping it with a warning")
    p.add_argument("--force", action="store_true", help="decode again even when OUT already holds this data")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_prepare_data)


def _cmd_prepare_data(args: argparse.Namespace) -> int:
    if args.image_size < 1:
        raise DDPMError(f"--image-size {args.image_size}: expected a positive number of pixels, e.g. 64")
    if args.workers is not None and args.workers < 1:
        raise DDPMError(f"--workers {args.workers}: expected at least 1 decoding process")
    spec = DecodeSpec(args.image_size, args.random_crop, args.strict, args.workers, not args.quiet)
    found, written = prepare_data(args.src, args.out, spec, conditional=args.conditional, force=args.force)
    if not written:
        print(f"{args.out} already holds this data (same files, size and decoder); --force decodes it again")
    for line in describe_data_file(found):
        print(line)
    h = found.header
    labelled = bool(h["groups"]) and all(g is not None for g in h["groups"])
    print(f"train from it with: ddpm train --data {args.out} --image-size {h['image_size']}"
          f"{' --random-crop' if h['random_crop'] else ''}{' [--conditional]' if labelled else ''}")
    return 0
