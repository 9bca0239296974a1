"""The decoded-data cache against today's decode, on generated photo-sized JPEGs (issue 23).

Generates ``--images`` JPEGs of ``--photo`` pixels (smooth gradients, waves and grain, about the
size and decode cost of photographs; 1,000 per sub-folder) into a temporary folder, then measures
at ``--image-size``:

1. first start: today's serial decode (``load_image_folder``, one process) against building the
   cache with each of ``--workers`` processes (``all`` = every core);
2. every later start: mapping the cache (scan, key, header and row checks) against today's decode
   (target: at least 50x faster), and the mapping time per 100,000 files;
3. torchrun with 2 processes (``torch.distributed.run``, gloo): rank 0 maps, then rank 1, as the
   trainer does; each reads every row through ``batches()``; reported per rank: images it
   decoded (target 0) and how much its private memory (RssAnon) grew against the set's size
   (target: far below it; the pixels are shared file pages);
4. loader throughput from the map: ``batches()`` of ``--batch-size`` in images/s (target:
   at least 20,000/s at 64x64);
5. a set larger than ``DDPM_DATA_MEMORY`` (set to a tenth of the set in a child process):
   without the cache it would be decoded every epoch; with it, one epoch of batches decodes
   nothing.

Today's serial decode of a large set takes long (7 ms per 1024x768 JPEG); ``--serial-limit N``
times the first N images and extrapolates, marked as such. Prints a table; ``--json`` writes it.

    python benchmarks/data_cache.py --images 20000 --workers 1,2,all
    python benchmarks/data_cache.py --images 200000 --distinct 20000 --serial-limit 20000 --workers 1,all
    python benchmarks/data_cache.py --images 200   # a check that the script works
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_PER_FOLDER = 1000


# ------------------------------------------------------------------------------ photographs
def _make_photos(task: tuple[str, int, int, int, int]) -> int:
    """Write images ``start..stop-1`` as JPEGs of ``w x h`` under ``folder``; returns the count."""
    from PIL import Image

    folder, start, stop, w, h = task
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        base = rng.uniform(40, 215, 3).astype(np.float32)
        gx, gy = rng.uniform(-0.25, 0.25, (2, 3)).astype(np.float32)
        period, phase = rng.uniform(15, 90), rng.uniform(0, 6.3, 3).astype(np.float32)
        img = base + x[..., None] * gx * (320 / w) + y[..., None] * gy * (240 / h)
        img += 35 * np.sin(x[..., None] / period + y[..., None] / (1.7 * period) + phase)
        img += rng.normal(0, 5, (h, w, 1)).astype(np.float32)  # grain, as sensors give
        sub = Path(folder) / f"{i // _PER_FOLDER:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(sub / f"img{i:07d}.jpg", quality=90)
    return stop - start


def generate(folder: Path, count: int, w: int, h: int, distinct: int | None = None) -> float:
    """Generate ``count`` photographs in parallel; returns the seconds it took.

    With ``distinct`` below ``count``, only that many are drawn and the rest are byte copies of
    them under their own names (separate files, so separate page-cache pages and their own decode):
    a 200,000-file folder then costs minutes to make instead of most of an hour of both cores.
    """
    start = time.perf_counter()
    drawn = count if distinct is None else min(distinct, count)
    step = 250
    tasks = [(str(folder), a, min(a + step, drawn), w, h) for a in range(0, drawn, step)]
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        done = sum(pool.map(_make_photos, tasks))
    assert done == drawn
    for i in range(drawn, count):
        src = folder / f"{(i % drawn) // _PER_FOLDER:04d}" / f"img{i % drawn:07d}.jpg"
        sub = folder / f"{i // _PER_FOLDER:04d}"
        sub.mkdir(exist_ok=True)
        shutil.copyfile(src, sub / f"img{i:07d}.jpg")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------ measurements
def _workers(spec: str) -> list[int | None]:
    return [None if w == "all" else int(w) for w in spec.split(",")]


def time_serial(folder: Path, size: int, limit: int | None) -> tuple[float, bool]:
    """Seconds today's serial decode takes for the whole folder (extrapolated from ``limit``)."""
    from ddpm.data.sets import load_image_folder
    from ddpm.files.images import scan_images

    files = scan_images(folder)
    if limit is None or limit >= len(files):
        start = time.perf_counter()
        load_image_folder(folder, size, progress=False, workers=1)
        return time.perf_counter() - start, False
    sub = Path(tempfile.mkdtemp(prefix="serial-", dir=folder.parent))
    for f in files[:limit]:
        os.link(f, sub / f.name)
    start = time.perf_counter()
    load_image_folder(sub, size, progress=False, workers=1)
    seconds = (time.perf_counter() - start) * len(files) / limit
    shutil.rmtree(sub)
    return seconds, True


def time_build(folder: Path, size: int, cache: Path, workers: int | None) -> float:
    from ddpm.data.cache import CacheSettings, open_training_set

    shutil.rmtree(cache, ignore_errors=True)
    start = time.perf_counter()
    open_training_set(folder, size, cache=CacheSettings(cache, workers=workers), progress=False)
    return time.perf_counter() - start


def time_map(folder: Path, size: int, cache: Path, repeats: int = 3) -> float:
    """Best of ``repeats`` later starts: the set opened from a cache that holds it."""
    from ddpm.data.cache import CacheSettings, open_training_set

    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data = open_training_set(folder, size, cache=CacheSettings(cache), progress=False)
        best = min(best, time.perf_counter() - start)
        assert isinstance(data.images, np.memmap)
    return best


def loader_throughput(folder: Path, size: int, cache: Path, batch: int, seconds: float = 3.0) -> float:
    """Images/s that ``batches()`` delivers from the mapped set (uint8 [b, 3, H, W], flips included)."""
    from ddpm.data.cache import CacheSettings, open_training_set
    from ddpm.data.sets import BatchStream, batches

    data = open_training_set(folder, size, cache=CacheSettings(cache), progress=False)
    it = batches(data, BatchStream(len(data), batch, seed=0))
    next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        n += next(it)[0].shape[0]
    return n / (time.perf_counter() - start)


_RANK = r"""
import json, os, sys, time
from pathlib import Path
import torch.distributed as dist
import ddpm.data.cache as cache
from ddpm.data.sets import BatchStream, batches

def rss():
    out = {}
    for line in open("/proc/self/status"):
        if line.startswith(("RssAnon", "RssFile")):
            out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out

decoded = [0]
real = cache.decode_items
def counting(listing, spec, bad):
    for item in real(listing, spec, bad):
        decoded[0] += 1
        yield item
cache.decode_items = counting

folder, size, where, batch = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
dist.init_process_group("gloo")
rank = dist.get_rank()
if rank:
    dist.barrier()  # as the trainer: rank 0 first, then the others
before = rss()
start = time.perf_counter()
data = cache.open_training_set(folder, size, cache=cache.CacheSettings(where), progress=False)
opened = time.perf_counter() - start
if not rank:
    dist.barrier()
stream = BatchStream(len(data), batch * 2, seed=0, rank=rank, world=2)
it = batches(data, stream)
for _ in range(-(-len(data) // (batch * 2))):  # one epoch: every row read
    next(it)
after = rss()
print(json.dumps({"rank": rank, "decoded": decoded[0], "open_s": opened, "images": len(data),
                  "set_bytes": int(data.images.nbytes), "anon_growth": after["RssAnon"] - before["RssAnon"],
                  "file_growth": after["RssFile"] - before["RssFile"]}), flush=True)
dist.destroy_process_group()
"""

_BIGGER_THAN_MEMORY = r"""
import json, sys, time
from pathlib import Path
import ddpm.data.cache as cache
import ddpm.data.sets as sets
from ddpm.data.sets import BatchStream, batches

calls = [0]
real = sets.load_image
def counting(*a, **k):
    calls[0] += 1
    return real(*a, **k)
sets.load_image = counting
folder, size, where, batch = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
data = cache.open_training_set(folder, size, cache=cache.CacheSettings(where), progress=False)
it = batches(data, BatchStream(len(data), batch, seed=0), workers=2)
start = time.perf_counter()
steps = -(-len(data) // batch)
for _ in range(steps):
    next(it)
print(json.dumps({"budget": sets.MEMORY_BUDGET, "set_bytes": int(data.images.nbytes), "decoded": calls[0],
                  "images_per_s": steps * batch / (time.perf_counter() - start)}), flush=True)
"""


def torchrun_two(folder: Path, size: int, cache: Path, batch: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           sys.executable, "-c", _RANK, str(folder), str(size), str(cache), str(batch)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"torchrun failed: {out.stderr[-2000:]}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda r: r["rank"])


def bigger_than_memory(folder: Path, size: int, cache: Path, batch: int, set_bytes: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDPM_DATA_MEMORY": str(max(1, set_bytes // 10))}
    out = subprocess.run([sys.executable, "-c", _BIGGER_THAN_MEMORY, str(folder), str(size), str(cache), str(batch)],
                         env=env, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"larger-than-memory check failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ main
def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run(args: argparse.Namespace, folder: Path, cache: Path) -> list[tuple[str, str, str]]:
    """Every measurement on the generated folder; rows of (measure, result, target)."""
    n, s = args.images, args.image_size
    rows = [("measure", "result", "target")]
    serial, extrapolated = time_serial(folder, s, args.serial_limit)
    rows.append(("first start, today (serial decode)", f"{serial:.1f} s{' (extrapolated)' if extrapolated else ''}"
                 f" = {n / serial:.0f} img/s", ""))
    for w in _workers(args.workers):
        t = time_build(folder, s, cache, w)
        rows.append((f"first start, cache build, {w or os.cpu_count()} worker(s)",
                     f"{t:.1f} s = {n / t:.0f} img/s ({serial / t:.1f}x today)", ""))
    mapped = time_map(folder, s, cache)
    rows.append(("later start, mapped cache", f"{mapped * 1000:.0f} ms ({serial / mapped:.0f}x today; "
                 f"{mapped * 100_000 / n:.2f} s per 100,000 files)", ">= 50x today; < 1 s per 100,000"))
    rows.append(("loader throughput from the map", f"{loader_throughput(folder, s, cache, args.batch_size):,.0f} "
                 f"img/s (batch {args.batch_size})", ">= 20,000 img/s at 64x64"))
    if not args.skip_torchrun:
        for r in torchrun_two(folder, s, cache, args.batch_size):
            rows.append((f"torchrun rank {r['rank']} of 2", f"decoded {r['decoded']}, opened in {r['open_s']:.2f} s, "
                         f"private memory +{r['anon_growth'] / 1e6:.1f} MB for a {r['set_bytes'] / 1e6:.1f} MB set "
                         f"(shared file pages +{r['file_growth'] / 1e6:.1f} MB)", "decoded 0; growth << set"))
    big = bigger_than_memory(folder, s, cache, args.batch_size, n * s * s * 3)
    rows.append(("set > DDPM_DATA_MEMORY, one epoch", f"budget {big['budget'] / 1e6:.1f} MB, set "
                 f"{big['set_bytes'] / 1e6:.1f} MB: decoded {big['decoded']}, {big['images_per_s']:,.0f} img/s",
                 "decoded 0"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000, help="photographs to generate")
    p.add_argument("--photo", default="640x480", help="generated photograph size, WxH")
    p.add_argument("--distinct", type=int, default=None,
                   help="draw only this many photographs and fill the rest with copies under new names (unset: all drawn)")
    p.add_argument("--image-size", type=int, default=64, help="training resolution")
    p.add_argument("--workers", default="1,2,all", help="comma-separated cache build worker counts ('all' = every core)")
    p.add_argument("--serial-limit", type=int, default=None,
                   help="time today's serial decode on this many images and extrapolate (unset: all)")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of the loader measurements")
    p.add_argument("--skip-torchrun", action="store_true", help="leave out the two-process measurement")
    p.add_argument("--dir", default=None, help="where to generate (unset: a temporary folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the generated folder and cache")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args()
    w, h = (int(v) for v in args.photo.lower().split("x"))
    base = Path(tempfile.mkdtemp(prefix="ddpm-data-cache-", dir=args.dir))
    folder, cache = base / "photos", base / "cache"
    try:
        gen = generate(folder, args.images, w, h, args.distinct)
        made = f" ({args.distinct} distinct, the rest copies)" if args.distinct and args.distinct < args.images else ""
        print(f"generated {args.images} {w}x{h} JPEGs{made} in {gen:.0f} s "
              f"({sum(f.stat().st_size for f in folder.rglob('*.jpg')) / args.images / 1e3:.0f} KB each)", flush=True)
        rows = run(args, folder, cache)
        print(_table(rows))
        if args.json:
            from ddpm.files.atomic import atomic_write_json

            atomic_write_json(args.json, {"args": vars(args), "rows": rows}, sort_keys=False)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
