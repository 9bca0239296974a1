"""``ddpm demo``: the whole pipeline on data that needs no download.

scikit-learn ships 1,797 handwritten digits as 8x8 images with 17 grey levels. The demo writes
them as PNGs into class folders (``0`` .. ``9``), which is exactly the layout of a user's own
class-conditional data, trains the ``tiny`` class-conditional model on them at 16x16 for a few
minutes on a CPU, and samples a guided grid with one row per digit. Its last line names the grid
and the command that shows the run's curves and sample grids in TensorBoard.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DDPMError, StoppedEarly
from ..files.atomic import atomic_write_text, check_writable
from ..run.checkpoint import latest_checkpoint, load_run
from ..runtime.policy import resolve_runtime
from ..sample.engine import generate
from ..sample.pictures import make_grid, save_png
from ..sample.spec import SampleSpec
from ..train import TrainConfig, train

__all__ = ["write_digits", "run_demo"]


def write_digits(root: str | Path) -> Path:
    """Write scikit-learn's 1,797 digits as ``root/<digit>/<n>.png`` (8-bit grey, 8x8 pixels); returns root.

    A folder already holding ``.complete`` is left as it is. Raises :class:`DDPMError` when
    scikit-learn is missing and :class:`ddpm.files.atomic.OutputWriteError` when a file cannot be written.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DDPMError("the demo needs scikit-learn for its bundled digits: pip install scikit-learn "
                        "(or pip install -e .[demo])") from None
    root = Path(root)
    digits = load_digits()
    # Each PNG is written whole (ddpm.files.atomic); the marker, written last, says the folder is too,
    # so a demo stopped half-way rewrites the digits instead of training on part of them.
    done = root / ".complete"
    if done.exists():
        return root
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        # 0..16 ink -> 255..0 would be dark-on-light; keep light digits on black like MNIST.
        arr = np.clip(img / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
        save_png(arr, d / f"{i:04d}.png")
    atomic_write_text(done, "1797 digits\n")
    return root


def run_demo(out: str | Path = "runs/demo", *, steps: int = 800, seed: int = 0, device: str = "auto",
             model: str = "tiny") -> Path:
    """Train the demo model into ``out/run`` and write ``out/demo_grid.png``; returns the grid's path.

    Prints what it does, a progress bar while it trains and while it samples (on stderr), and as
    its last line where the grid is and how to open the TensorBoard log (``tensorboard --logdir``).
    Raises :class:`DDPMError` when ``out`` cannot be written or scikit-learn is missing.
    """
    out = check_writable(out, "--out")
    data_dir = write_digits(out / "digits")
    run_dir = out / "run"
    cfg = TrainConfig(
        data=str(data_dir), out=str(run_dir), conditional=True, image_size=16, model=model,
        steps=steps, batch_size=64, lr=1e-3, warmup=100, p_uncond=0.1, seed=seed,
        hflip=False,  # a mirrored 2 or 7 is not a digit
        sample_every=0, save_every=500, log_every=25, sample_n=80, device=device,
        resume=latest_checkpoint(run_dir) is not None, dropout=0.0,
    )
    t0 = time.time()
    print(f"demo: training a class-conditional model on 1,797 digits at 16x16 for {steps} steps")
    if not train(cfg).finished:  # asked to stop (SIGTERM): no sampling from a half-trained model
        raise StoppedEarly("demo stopped during training")
    # Sampling is the demo's second command: its runtime is resolved here, as 'ddpm sample' would.
    runtime = resolve_runtime(device, progress=False)
    run = load_run(run_dir, runtime.device)
    per = 10
    labels = torch.arange(10).repeat_interleave(per)
    # The default sampler (DPM-Solver++, 20 steps): with the v target it is clean after minutes
    # of training (an eps model left colour speckle here; see docs/benchmarks.md).
    spec = SampleSpec(guidance=2.0, seed=seed).for_run(run.schedule.T)
    print(f"demo: sampling {len(labels)} digits ({per} of each, guidance 2, DPM-Solver++ with {spec.steps} steps)")
    batches = math.ceil(len(labels) / spec.batch_size)
    with tqdm(total=spec.steps * batches, desc="sampling", unit="step", dynamic_ncols=True) as bar:
        images = generate(run, len(labels), spec, runtime, labels=labels, callback=lambda *_: bar.update(1))
    grid_path = out / "demo_grid.png"
    # Upscale 4x (nearest) so the 16x16 digits are visible in an image viewer.
    grid = make_grid(images, nrow=per)
    grid = np.repeat(np.repeat(grid, 4, axis=0), 4, axis=1)
    save_png(grid, grid_path)
    logdir = f"tensorboard --logdir {shlex.quote(str(run_dir))}"
    # Without the package the trainer wrote no TensorBoard log (metrics.csv and loss.png only).
    board = (f"curves and sample grids: {logdir}" if importlib.util.find_spec("tensorboard") is not None else
             f"TensorBoard is not installed (pip install tensorboard), so the curves are in {run_dir / 'loss.png'} "
             f"and the sample grids in {run_dir / 'samples'}")
    print(f"demo: done in {time.time() - t0:.0f} s; guided samples (one row per digit 0-9) in {grid_path} "
          f"(open it in an image viewer); {board}")
    return grid_path
