"""Sample quality for a fixed training budget: ours against lucidrains' denoising-diffusion-pytorch
and a plain diffusers UNet2DModel + DDPMScheduler loop.

Each trainer gets the same wall-clock budget, data (the shared CIFAR-10 train subset at 32x32),
batch size, learning rate, EMA and threads; each is sampled with DDIM at the same number of
steps (each peer with its own sampler), and scored with FID and KID against the test subset.
Ours is trained class-conditionally (10% label dropout) and sampled unconditionally (guidance 0)
for the comparison, which handicaps it (only one batch element in ten trains the unconditional
model); it is then sampled at guidance 1, 2, 3 and 5 for class accuracy (a linear probe on
Inception features fitted on the reference set). ``--trainers ours-uncond`` trains ours
unconditionally, like the peers, for the like-for-like comparison.

    python benchmarks/quality.py --minutes 20 --out docs/quality.json

The CIFAR images here are JPEG-compressed and the subsets small, so the FIDs are not comparable
with published ones; they compare the three trainers under identical conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ddpm  # noqa: E402
import ddpm.checkpoint  # noqa: E402
import ddpm.generate  # noqa: E402
import ddpm.train  # noqa: E402
from ddpm.data import BatchStream, batches, load_image_folder, to_model_range, to_uint8  # noqa: E402
from ddpm.ema import EMA  # noqa: E402


def unpack_cifar(cache: Path) -> Path:
    root = cache / "cifar10"
    if not (root / "test").is_dir():
        src = Path(os.environ.get("DDPM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "cifar10.tar.gz"
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tar:
            tar.extractall(cache, filter="data")
    return root


# ----------------------------------------------------------------------------- peers
def lucidrains_model(dim: int, mults: tuple[int, ...]):
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    net = Unet(dim=dim, dim_mults=mults, flash_attn=False)
    # Its defaults: v-prediction, sigmoid schedule, DDIM when sampling_timesteps < timesteps.
    return GaussianDiffusion(net, image_size=32, timesteps=1000, sampling_timesteps=50)


def diffusers_model(channels: tuple[int, ...]):
    from diffusers import UNet2DModel

    n = len(channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    down[1], up[-2] = "AttnDownBlock2D", "AttnUpBlock2D"  # attention at 16x16, like the DDPM model
    return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=channels, down_block_types=tuple(down), up_block_types=tuple(up))


def train_peer(kind: str, model, data, args) -> tuple[torch.nn.Module, int]:
    """A plain loop with the same batch, lr, warm-up, clipping and EMA as ours."""
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ema = EMA(model, args.ema_decay)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    it = batches(data, BatchStream(len(data), args.batch_size, args.seed))
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < 60 * args.minutes:
        x = to_model_range(next(it)[0])
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        if kind == "lucidrains":
            loss = model(x)
        else:
            noise = torch.randn_like(x)
            t = torch.randint(0, 1000, (x.shape[0],))
            loss = torch.nn.functional.mse_loss(model(sched.add_noise(x, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        if step % 50 == 0:
            print(f"  {kind} step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return ema.module, step


@torch.inference_mode()
def sample_peer(kind: str, model, n: int, steps: int, seed: int, batch: int = 100) -> torch.Tensor:
    out = []
    for k in range(0, n, batch):
        b = min(batch, n - k)
        torch.manual_seed(seed + k)
        if kind == "lucidrains":
            x = model.sample(batch_size=b) * 2 - 1  # it returns [0, 1]
        else:
            from diffusers import DDIMScheduler

            s = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
            s.set_timesteps(steps)
            x = torch.randn(b, 3, 32, 32)
            for t in s.timesteps:
                x = s.step(model(x, t).sample, t, x).prev_sample
        out.append(to_uint8(x))
    return torch.cat(out)


# ------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget per trainer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4 * 5)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--steps", type=int, default=50, help="DDIM sampling steps for every model")
    p.add_argument("--n", type=int, default=500, help="samples per model for FID/KID")
    p.add_argument("--n-guided", type=int, default=100, help="samples per guidance scale (class accuracy)")
    p.add_argument("--ref-n", type=int, default=1000, help="test images used as the reference")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 5.0])
    p.add_argument("--trainers", nargs="+", default=["ours", "lucidrains", "diffusers"],
                   choices=["ours", "ours-uncond", "lucidrains", "diffusers"],
                   help="ours trains class-conditionally (for class accuracy), ours-uncond unconditionally")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "ddpm" / "quality"))
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cifar = unpack_cifar(work)

    from ddpm.evaluate import reference_stats, reference_probe
    from ddpm.inception import features as inception_features
    from ddpm.metrics import class_accuracy, frechet_distance, gaussian_stats, kid

    ref = reference_stats(cifar / "test", max_images=args.ref_n, progress=True)
    probe = reference_probe(ref)

    def score(images: torch.Tensor) -> dict:
        feats = inception_features(images, batch_size=50, device="cpu")
        mu, sigma = gaussian_stats(feats)
        km, ks = kid(feats, ref.features, subset_size=min(len(feats), len(ref.features), 1000))
        return {"fid": frechet_distance(mu, sigma, ref.mu, ref.sigma), "kid_mean": km, "kid_std": ks, "feats": feats}

    data = load_image_folder(cifar / "train", 32, conditional=True, progress=False)
    results: dict = {"settings": vars(args), "torch": torch.__version__, "machine": os.uname().machine,
                     "reference": f"{len(ref.features)} CIFAR-10 test-subset images (JPEG)", "trainers": {}}
    for kind in args.trainers:
        print(f"== {kind}: training for {args.minutes} min", flush=True)
        t0 = time.perf_counter()
        if kind in ("ours", "ours-uncond"):
            conditional = kind == "ours"
            run_dir = work / f"{kind.replace('-', '_')}_run"
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = ddpm.train.TrainConfig(
                data=str(cifar / "train"), out=str(run_dir), conditional=conditional, model="small", steps=10**9,
                batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, ema_decay=args.ema_decay, seed=args.seed,
                time_limit=args.minutes, sample_every=0, save_every=0, log_every=50, progress=False,
                tensorboard=False, device="cpu")
            ddpm.train.train(cfg)
            run = ddpm.checkpoint.load_run(run_dir)
            steps_done, params = run.step, ddpm.count_parameters(run.model)
            train_s = time.perf_counter() - t0
            labels = torch.zeros(args.n, dtype=torch.long) if conditional else None  # guidance 0: unconditional
            images = ddpm.generate.generate(run, args.n, labels=labels, sampler="ddim", steps=args.steps,
                                            guidance=0.0, seed=args.seed, batch_size=100)
            entry = {"params": params, "steps": steps_done, "train_s": train_s, "images_per_s": steps_done * args.batch_size / train_s}
            s = score(images)
            entry.update({k: v for k, v in s.items() if k != "feats"})
            entry["guided"] = {}
            for g in args.guidance if conditional else []:
                labels = torch.arange(args.n_guided) % 10
                imgs = ddpm.generate.generate(run, args.n_guided, labels=labels, sampler="ddim", steps=args.steps,
                                              guidance=g, seed=args.seed + 1, batch_size=100)
                feats = inception_features(imgs, batch_size=50, device="cpu")
                acc = class_accuracy(probe, feats, labels.numpy())
                mu, sigma = gaussian_stats(feats)
                entry["guided"][str(g)] = {"class_accuracy": acc["overall"], "per_class": acc["per_class"],
                                           "fid_small_n": frechet_distance(mu, sigma, ref.mu, ref.sigma)}
        else:
            model = lucidrains_model(64, (1, 2, 2)) if kind == "lucidrains" else diffusers_model((64, 128, 128))
            params = sum(p.numel() for p in model.parameters())
            ema_model, steps_done = train_peer(kind, model, data, args)
            train_s = time.perf_counter() - t0
            images = sample_peer(kind, ema_model, args.n, args.steps, args.seed)
            entry = {"params": params, "steps": steps_done, "train_s": train_s, "images_per_s": steps_done * args.batch_size / train_s}
            s = score(images)
            entry.update({k: v for k, v in s.items() if k != "feats"})
        ddpm.generate.save_png(ddpm.generate.make_grid(images[:64], nrow=8), work / f"grid_{kind}.png")
        results["trainers"][kind] = entry
        print(json.dumps({kind: entry}, indent=1), flush=True)
    print("\ntrainer      params   steps   img/s    FID      KID")
    for kind, e in results["trainers"].items():
        print(f"{kind:<11} {e['params'] / 1e6:5.2f}M {e['steps']:7d} {e['images_per_s']:7.1f} {e['fid']:8.2f} "
              f"{e['kid_mean']:.4f}±{e['kid_std']:.4f}")
    if "ours" in results["trainers"]:
        for g, e in results["trainers"]["ours"]["guided"].items():
            print(f"ours guidance {g}: class accuracy {e['class_accuracy']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
