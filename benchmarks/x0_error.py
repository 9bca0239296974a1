"""How well a trained run predicts the clean image at each noise level: the evidence behind
the choice of network target.

For held-out images x0 and timesteps t across the chain, noise them (x_t = alpha x0 + sigma eps),
ask the run's EMA network for its prediction, convert it to x0 the way the samplers do, and report
per timestep: the log-SNR, the mean squared error of the predicted x0 (unclipped), the error of
the best constant guess (the data mean: what a network that knows nothing should say at pure
noise), and the share of predicted pixels outside [-1, 1] (what clipping turns into saturated
colour). An eps network must divide its error by alpha = sqrt(abar) to get x0, so at high noise
it is amplified by up to 1 / alpha (156x at the end of the linear schedule); v and x0 networks
are not.

    python benchmarks/x0_error.py RUN [RUN ...] --data ~/cifar10/test --n 256
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm.run.checkpoint import load_run  # noqa: E402
from ddpm.data.sets import load_image_folder, to_model_range  # noqa: E402
from ddpm.core.samplers import eps_model  # noqa: E402


@torch.inference_mode()
def x0_error_by_timestep(run_dir: str, images: torch.Tensor, timesteps: list[int], seed: int = 0) -> list[dict]:
    """Rows ``{t, log_snr, mse, mse_const, out_of_range}`` for ``images`` (float [N, 3, H, W] in [-1, 1])."""
    run = load_run(run_dir)
    net = (run.ema_model or run.model).eval()
    call = (lambda x, t: net(x, t, torch.full_like(t, net.num_classes))) if run.conditional else net
    denoiser = eps_model(call, run.schedule, run.prediction)
    g = torch.Generator().manual_seed(seed)
    mean = images.mean(0, keepdim=True)
    rows = []
    for t in timesteps:
        tt = torch.full((len(images),), t, dtype=torch.long)
        noise = torch.randn(images.shape, generator=g)
        x_t = run.schedule.add_noise(images, noise, tt)
        parts = []
        for i in range(0, len(images), 128):
            eps, x0 = denoiser.predict(x_t[i:i + 128], tt[i:i + 128])
            parts.append(x0 if x0 is not None else run.schedule.x0_from_eps(x_t[i:i + 128], tt[i:i + 128], eps))
        x0_hat = torch.cat(parts)
        rows.append({"t": t, "log_snr": float(run.schedule.log_snr[t]),
                     "mse": float((x0_hat - images).pow(2).mean()),
                     "mse_const": float((mean - images).pow(2).mean()),
                     "out_of_range": float((x0_hat.abs() > 1).float().mean())})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders written by 'ddpm train'")
    p.add_argument("--data", required=True, help="held-out images (a folder; class sub-folders are fine)")
    p.add_argument("--n", type=int, default=256, help="images")
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 950, 999])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    size = load_run(args.runs[0]).image_size
    data = load_image_folder(args.data, size, conditional=False, progress=False)
    idx = torch.linspace(0, len(data) - 1, args.n).long()
    pixels = torch.stack([torch.from_numpy(data.get(int(i))).permute(2, 0, 1) for i in idx])  # uint8 [N, 3, H, W]
    images = to_model_range(pixels)
    for run_dir in args.runs:
        run = load_run(run_dir)
        print(f"\n{run_dir}: step {run.step}, predicts {run.prediction}, schedule {run.schedule!r}")
        print(f"{'t':>5} {'logSNR':>7} {'x0 MSE':>9} {'const MSE':>9} {'|x0|>1':>7}")
        for r in x0_error_by_timestep(run_dir, images, args.timesteps):
            print(f"{r['t']:5d} {r['log_snr']:7.2f} {r['mse']:9.4f} {r['mse_const']:9.4f} {r['out_of_range']:7.3f}")


if __name__ == "__main__":
    main()
