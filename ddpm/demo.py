"""``ddpm demo``: the whole pipeline on data that needs no download.

scikit-learn ships 1,797 handwritten digits as 8x8 images with 17 grey levels. The demo writes
them as PNGs into class folders (``0`` .. ``9``), which is exactly the layout of a user's own
class-conditional data, trains the ``tiny`` class-conditional model on them at 16x16 for a few
minutes on a CPU, and samples a guided grid with one row per digit.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import DDPMError

__all__ = ["write_digits", "run_demo"]


def write_digits(root: str | Path) -> Path:
    """Write scikit-learn's 8x8 digits as ``root/<digit>/<n>.png`` (8-bit grey, 8x8); returns root."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DDPMError("the demo needs scikit-learn for its bundled digits: pip install scikit-learn "
                        "(or pip install -e .[demo])") from None
    from PIL import Image

    root = Path(root)
    digits = load_digits()
    done = root / ".complete"
    if done.exists():
        return root
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        d = root / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        # 0..16 ink -> 255..0 would be dark-on-light; keep light digits on black like MNIST.
        arr = np.clip(img / 16.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
        Image.fromarray(arr, "L").save(d / f"{i:04d}.png")
    done.touch()
    return root


def run_demo(out: str | Path = "runs/demo", *, steps: int = 800, seed: int = 0, device: str = "auto",
             model: str = "tiny") -> Path:
    """Train the demo model into ``out`` and write ``out/demo_grid.png``; returns the grid's path."""
    import torch

    from .checkpoint import latest_checkpoint, load_run
    from .generate import generate, make_grid, save_png
    from .train import TrainConfig, train

    from .outputs import check_writable

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
    train(cfg)
    run = load_run(run_dir, "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    per = 10
    labels = torch.arange(10).repeat_interleave(per)
    # The default sampler (DPM-Solver++, 20 steps): with the v target it is clean after minutes
    # of training (an eps model left colour speckle here; see docs/benchmarks.md).
    images = generate(run, len(labels), labels=labels, guidance=2.0, seed=seed, progress=False)
    grid_path = out / "demo_grid.png"
    # Upscale 4x (nearest) so the 16x16 digits are visible in an image viewer.
    grid = make_grid(images, nrow=per)
    grid = np.repeat(np.repeat(grid, 4, axis=0), 4, axis=1)
    save_png(grid, grid_path)
    print(f"demo: done in {time.time() - t0:.0f} s; guided samples (one row per digit 0-9) in {grid_path}")
    return grid_path
