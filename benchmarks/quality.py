"""Sample quality for a fixed training budget: ours against lucidrains' denoising-diffusion-pytorch
and a plain diffusers UNet2DModel + DDPMScheduler loop.

Each trainer gets the same wall-clock budget, data (the shared CIFAR-10 train subset at 32x32),
batch size and threads, and is scored with FID and KID of ``--n`` samples against the test subset.
The trainers of ours are *arms* of a recipe ablation (``ARMS`` below: network target, schedule,
loss weighting, noise-level density, learning-rate and EMA schedules); each is sampled with our
default sampler (``--sampler``, ``--sample-steps``) and, with ``--also``, with other samplers on
the same checkpoint. Conditional arms (``-cond``) are sampled unconditionally (guidance 0) for FID
and at ``--guidance`` scales for class accuracy (a linear probe on Inception features fitted on
the reference set). The peers keep their libraries' defaults and are sampled with DDIM at
``--peer-steps`` steps (each with its own sampler). Arms run strictly one after another; results
are appended to ``--out`` after each, so an interrupted ablation keeps what it measured.

    python benchmarks/quality.py --minutes 10 --trainers baseline recipe lucidrains --out q.json

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

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ddpm  # noqa: E402
from ddpm.run.checkpoint import load_run  # noqa: E402
from ddpm.data.sets import BatchStream, batches, load_image_folder, to_model_range, to_uint8  # noqa: E402
from ddpm.core.ema import EMA  # noqa: E402
from ddpm.files.atomic import atomic_write_text  # noqa: E402

# Our samples are drawn in float32 whatever the device's default: every figure in
# docs/benchmarks.md was measured so, and the peers sample in float32 too.
SAMPLING_PRECISION = "fp32"


def unpack_cifar(cache: Path) -> Path:
    root = cache / "cifar10"
    if not (root / "test").is_dir():
        src = Path(os.environ.get("DDPM_SHARED_DATA", ROOT.parent / "shared" / "data")) / "cifar10.tar.gz"
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(src) as tar:
            tar.extractall(cache, filter="data")
    return root


# ----------------------------------------------------------------------------- peers
# The recipe ablation's arms: TrainConfig fields on top of COMMON. "baseline" is the recipe of the
# 20-minute benchmark of 2026-11-26 (the DDPM paper's eps / linear / uniform, constant lr).
LEGACY = {"prediction": "eps", "schedule": "linear", "loss_weighting": "uniform", "t_sampling": "uniform",
          "lr_schedule": "constant", "ema_rampup": 0.0, "warmup": 200, "ema_decay": 0.999}
ARMS: dict[str, dict] = {
    "baseline": dict(LEGACY),
    "v": {**LEGACY, "prediction": "v"},
    "v-sigmoid": {**LEGACY, "prediction": "v", "schedule": "sigmoid"},
    "v-cosine": {**LEGACY, "prediction": "v", "schedule": "cosine"},
    "v-sigmoid-decay": {**LEGACY, "prediction": "v", "schedule": "sigmoid", "lr_schedule": "cosine", "warmup": 100,
                        "ema_rampup": 0.05},
    "v-sigmoid-minsnr": {**LEGACY, "prediction": "v", "schedule": "sigmoid", "loss_weighting": "min-snr"},
    "v-sigmoid-decay-lognormal": {**LEGACY, "prediction": "v", "schedule": "sigmoid", "lr_schedule": "cosine",
                                  "warmup": 100, "ema_rampup": 0.05, "t_sampling": "lognormal"},
    "v-sigmoid-decay-minsnr": {**LEGACY, "prediction": "v", "schedule": "sigmoid", "lr_schedule": "cosine",
                               "warmup": 100, "ema_rampup": 0.05, "loss_weighting": "min-snr"},
    "v-sigmoid-lognormal": {**LEGACY, "prediction": "v", "schedule": "sigmoid", "t_sampling": "lognormal"},
    "x0-sigmoid": {**LEGACY, "prediction": "x0", "schedule": "sigmoid", "loss_weighting": "min-snr"},
    "v-sigmoid-ztsnr": {**LEGACY, "prediction": "v", "schedule": "sigmoid", "zero_terminal_snr": True},
    "v-sigmoid-decay-nodrop": {**LEGACY, "prediction": "v", "schedule": "sigmoid", "lr_schedule": "cosine",
                               "warmup": 100, "ema_rampup": 0.05, "dropout": 0.0},
    "recipe": {},  # today's defaults of `ddpm train`
}


def arm_settings(name: str) -> tuple[bool, dict]:
    """``(conditional, TrainConfig overrides)`` of arm ``name`` (``NAME`` or ``NAME-cond``)."""
    conditional = name.endswith("-cond")
    return conditional, dict(ARMS[name.removesuffix("-cond")])


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
        if kind == "lucidrains":
            x = (x + 1) / 2  # GaussianDiffusion takes [0, 1] and normalises to [-1, 1] itself
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
    p.add_argument("--lr", default="1e-3",
                   help="learning rate of every trainer; 'default': ours without --lr (ddpm.train.config.default_lr "
                        "of --model at --batch-size), the peers at that same rate")
    p.add_argument("--warmup", type=int, default=200, help="the peers' warm-up steps (arms set their own)")
    p.add_argument("--ema-decay", type=float, default=0.999, help="the peers' EMA decay (arms set their own)")
    p.add_argument("--model", default="small", help="our UNet preset")
    p.add_argument("--sampler", default="dpm-solver", help="our sampler for FID")
    p.add_argument("--sample-steps", type=int, default=20, help="its steps")
    p.add_argument("--also", nargs="*", default=[], metavar="SAMPLER:STEPS",
                   help="more of our samplers scored on the same checkpoint, e.g. ancestral:250 ddim:50")
    p.add_argument("--also-n", type=int, default=None,
                   help="samples for the --also samplers (default: --n); the default sampler is then also scored on "
                        "its first ALSO_N samples, so that the comparison is at equal sample count")
    p.add_argument("--peer-steps", type=int, default=50, help="DDIM steps of the peers' own samplers")
    p.add_argument("--n", type=int, default=1000, help="samples per model for FID/KID")
    p.add_argument("--n-guided", type=int, default=200, help="samples per guidance scale (class accuracy)")
    p.add_argument("--ref-n", type=int, default=2000, help="test images used as the reference")
    p.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    p.add_argument("--trainers", nargs="+", default=["baseline", "recipe", "lucidrains", "diffusers"],
                   help=f"arms of ours ({', '.join(ARMS)}; NAME-cond trains with labels) and peers "
                        "(lucidrains, diffusers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "ddpm" / "quality"))
    p.add_argument("--out", default=None, help="JSON results, rewritten after each trainer")
    args = p.parse_args()
    for kind in args.trainers:
        if kind not in ("lucidrains", "diffusers") and kind.removesuffix("-cond") not in ARMS:
            p.error(f"unknown trainer {kind!r}")
    from ddpm.train.config import default_lr

    ours_lr = None if args.lr == "default" else float(args.lr)  # None: what `ddpm train` picks unasked
    args.lr = default_lr(args.model, args.batch_size) if ours_lr is None else ours_lr
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cifar = unpack_cifar(work)

    from ddpm.runtime.policy import resolve_runtime
    from ddpm.train import TrainConfig, train
    from ddpm.sample.engine import generate
    from ddpm.sample.pictures import make_grid, save_png
    from ddpm.sample.spec import SampleSpec
    from ddpm.scoring.evaluate import Reference, ReferenceSettings

    # Scored as 'ddpm eval' scores (ddpm.scoring.evaluate.Reference), at the data's own 32x32.
    classes = sorted(p.name for p in (cifar / "train").iterdir() if p.is_dir())
    runtime = resolve_runtime("cpu", SAMPLING_PRECISION, progress=False)
    reference = Reference.build(cifar / "test", None, runtime, settings=ReferenceSettings(max_images=args.ref_n),
                                classes=classes)

    def score(images: torch.Tensor) -> dict:
        t0 = time.perf_counter()
        r = reference.score(images)
        return {"fid": r["fid"], "kid_mean": r["kid_mean"], "kid_std": r["kid_std"], "score_s": time.perf_counter() - t0}

    data = load_image_folder(cifar / "train", 32, conditional=True, progress=False)
    results: dict = {"settings": vars(args), "torch": torch.__version__, "machine": os.uname().machine,
                     "reference": f"{reference.stats.n} CIFAR-10 test-subset images (JPEG)", "trainers": {}}
    if args.out and Path(args.out).is_file():  # add to an earlier sequence of arms
        results["trainers"] = json.loads(Path(args.out).read_text()).get("trainers", {})
    for kind in args.trainers:
        print(f"== {kind}: training for {args.minutes} min", flush=True)
        t0 = time.perf_counter()
        if kind not in ("lucidrains", "diffusers"):
            conditional, overrides = arm_settings(kind)
            run_dir = work / f"arm_{kind}_s{args.seed}"
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)
            cfg = TrainConfig(
                data=str(cifar / "train"), out=str(run_dir), conditional=conditional, model=args.model, steps=10**9,
                batch_size=args.batch_size, lr=ours_lr, seed=args.seed, time_limit=args.minutes, sample_every=0,
                save_every=0, log_every=50, progress=False, tensorboard=False, device="cpu", **overrides)
            train(cfg)
            run = load_run(run_dir)
            steps_done, params = run.step, ddpm.count_parameters(run.model)
            train_s = time.perf_counter() - t0
            entry = {"settings": overrides, "lr": run.config.train["lr"], "conditional": conditional, "params": params,
                     "steps": steps_done,
                     "train_s": train_s, "images_per_s": steps_done * args.batch_size / train_s, "samplers": {}}
            labels = torch.zeros(args.n, dtype=torch.long) if conditional else None  # guidance 0: unconditional
            default_spec = f"{args.sampler}:{args.sample_steps}"
            for label in [default_spec, *args.also]:  # "SAMPLER:STEPS", the key of its figures
                name, _, st = label.partition(":")
                n = args.n if label == default_spec or args.also_n is None else args.also_n
                t1 = time.perf_counter()
                spec = SampleSpec(name, int(st) if st else None, guidance=0.0, seed=args.seed, batch_size=100)
                imgs = generate(run, n, spec, runtime, labels=labels[:n] if labels is not None else None)
                sample_s = time.perf_counter() - t1
                entry["samplers"][label] = {**score(imgs), "sample_s": sample_s, "n": n}
                if label == default_spec:
                    images = imgs
                    entry.update({k: entry["samplers"][label][k] for k in ("fid", "kid_mean", "kid_std")})
                    if args.also and args.also_n is not None and args.also_n < n:
                        entry["samplers"][f"{label}@n{args.also_n}"] = {**score(imgs[:args.also_n]), "n": args.also_n}
                print(f"  {kind} {label}: FID {entry['samplers'][label]['fid']:.2f} ({sample_s:.0f} s sampling)", flush=True)
            entry["guided"] = {}
            for g in args.guidance if conditional else []:
                labels_g = torch.arange(args.n_guided) % 10
                spec = SampleSpec(args.sampler, args.sample_steps, guidance=g, seed=args.seed + 1, batch_size=100)
                imgs = generate(run, args.n_guided, spec, runtime, labels=labels_g)
                acc = reference.score(imgs, labels_g)["class_accuracy"]
                entry["guided"][str(g)] = {"class_accuracy": acc["overall"], "per_class": acc["per_class"]}
                save_png(make_grid(imgs[:100], nrow=10), work / f"grid_{kind}_g{g:g}.png")
        else:
            model = lucidrains_model(64, (1, 2, 2)) if kind == "lucidrains" else diffusers_model((64, 128, 128))
            params = sum(p.numel() for p in model.parameters())
            ema_model, steps_done = train_peer(kind, model, data, args)
            train_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            images = sample_peer(kind, ema_model, args.n, args.peer_steps, args.seed)
            entry = {"params": params, "steps": steps_done, "train_s": train_s,
                     "images_per_s": steps_done * args.batch_size / train_s, "sample_s": time.perf_counter() - t1}
            entry.update(score(images))
        save_png(make_grid(images[:64], nrow=8), work / f"grid_{kind}.png")
        results["trainers"][f"{kind}" if args.seed == 0 else f"{kind}@seed{args.seed}"] = entry
        print(json.dumps({kind: entry}, indent=1, default=float), flush=True)
        if args.out:
            atomic_write_text(args.out, json.dumps(results, indent=2, default=float) + "\n")
    print("\ntrainer                 params   steps   img/s    FID      KID     class acc")
    for kind, e in results["trainers"].items():
        acc = " ".join(f"g{g}:{v['class_accuracy']:.3f}" for g, v in e.get("guided", {}).items())
        print(f"{kind:<22} {e['params'] / 1e6:5.2f}M {e['steps']:7d} {e['images_per_s']:7.1f} {e['fid']:8.2f} "
              f"{e['kid_mean']:.4f}±{e['kid_std']:.4f} {acc}")


if __name__ == "__main__":
    main()
