"""generate()'s seeding: every image has a generator of its own, seeded by (seed, image index),
so an image never depends on the batch it is sampled in (issue 10; EDM's StackedRandomGenerator).

Two networks, built in memory, 16x16, a few steps, CPU, fp32:

* a stand-in network whose arithmetic is elementwise, so that a batch of 1 and a batch of 64 run
  the same floating-point operations on each image: any difference in its images is the seeding's,
  and the tests ask for ``torch.equal``;
* the tiny UNet preset with random weights. Its convolutions and matrix products round a batch of
  1 and a batch of 9 slightly differently (measured: up to 3e-6 in eps, which moved 1 of 6912
  uint8 values by one level for one weight draw in six), so the tests ask for the same images up to
  that: at most one level at a handful of values, where other seeds differ everywhere.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ddpm import samplers as S
from ddpm.run.checkpoint import Run
from ddpm.runtime.policy import Runtime, resolve_runtime
from ddpm.sample.engine import Draw, generate, sample_draw, starting_noise
from ddpm.sample.pictures import guidance_sweep
from ddpm.sample.spec import SampleSpec
from ddpm.core.schedule import Schedule
from ddpm.core.unet import UNet, UNetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16


class ElementwiseNet(nn.Module):
    """An eps network of plain elementwise arithmetic (multiply, add, clamp): each image's output
    is computed with the same float operations whatever the batch. Labels shift the output, so
    guidance changes the images."""

    def __init__(self, num_classes: int | None = None) -> None:
        super().__init__()
        self.config = SimpleNamespace(in_channels=3, image_size=SIZE, num_classes=num_classes,
                                      null_class=num_classes, conditional=num_classes is not None)
        self.num_classes = num_classes
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(0.5 + 0.1 * torch.randn(3, SIZE, SIZE, generator=g), requires_grad=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        out = x.clamp(-1.5, 1.5) * self.weight + (t.float() / 40).view(-1, 1, 1, 1)
        if y is not None:
            out = out + (y.float() * 0.3 - 0.2).view(-1, 1, 1, 1)
        return out


def _run(net: nn.Module, classes: list[str] | None = None) -> Run:
    net.eval().requires_grad_(False)
    return Run(model=net, ema_model=None, schedule=Schedule.linear(20), classes=classes, prediction="eps",
               image_size=SIZE, run_dir=Path("in-memory"), step=0, config={}, checkpoint=Path("in-memory"))


@pytest.fixture(scope="module")
def run() -> Run:
    return _run(ElementwiseNet())


@pytest.fixture(scope="module")
def cond_run() -> Run:
    return _run(ElementwiseNet(num_classes=2), ["a", "b"])


@pytest.fixture(scope="module")
def unet_run() -> Run:
    """The tiny preset, weights drawn from fixed seeds (the output convolutions too, which
    training starts at zero), so the network shapes every image."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = UNet(UNetConfig.preset("tiny", image_size=SIZE))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return _run(net)


# Deterministic (dpm-solver, ddim eta 0) and stochastic (ancestral, ddim eta > 0, langevin) samplers.
# fp32 on the CPU: the tests are about the seeding, not about how autocast rounds.
SAMPLERS = [
    ("dpm-solver", dict(sampler="dpm-solver", steps=3)),
    ("ddim-eta0", dict(sampler="ddim", steps=3, eta=0.0)),
    ("ancestral", dict(sampler="ancestral", steps=3)),
    ("ddim-eta1", dict(sampler="ddim", steps=3, eta=1.0)),
    ("langevin", dict(sampler="langevin", steps=2)),
]
FIXED = resolve_runtime("cpu", "fp32", progress=False)


def _with_noise(run: Run, n: int, noise: torch.Tensor, spec: SampleSpec) -> torch.Tensor:
    """``generate`` with the starting noise replaced (what ``generate(noise=...)`` was)."""
    return sample_draw(run, Draw(n, noise=noise), spec.for_run(run.schedule.T), FIXED)


@pytest.mark.parametrize("name,opts", SAMPLERS, ids=[s[0] for s in SAMPLERS])
def test_the_same_seed_gives_the_same_images_at_any_batch_size(run: Run, name: str, opts: dict) -> None:
    images = [generate(run, 9, SampleSpec(seed=5, batch_size=b, **opts), FIXED) for b in (1, 7, 64)]
    assert images[0].dtype == torch.uint8 and images[0].shape == (9, 3, SIZE, SIZE)
    for other in images[1:]:
        assert torch.equal(other, images[0])
    # prefix stability: image i of n = 3 is image i of n = 9
    assert torch.equal(generate(run, 3, SampleSpec(seed=5, batch_size=2, **opts), FIXED), images[0][:3])
    # another seed, other images; within a call, every image its own
    other_seed = generate(run, 9, SampleSpec(seed=6, batch_size=64, **opts), FIXED)
    assert all(not torch.equal(a, b) for a, b in zip(other_seed, images[0]))
    assert all(not torch.equal(images[0][i], images[0][j]) for i in range(9) for j in range(i))


@pytest.mark.parametrize("name,opts", [SAMPLERS[0], SAMPLERS[2]], ids=["dpm-solver", "ancestral"])
def test_a_unet_gives_the_same_images_at_any_batch_size_up_to_its_rounding(unet_run: Run, name: str,
                                                                           opts: dict) -> None:
    images = [generate(unet_run, 9, SampleSpec(seed=5, batch_size=b, **opts), FIXED) for b in (1, 7, 64)]
    prefix = generate(unet_run, 3, SampleSpec(seed=5, **opts), FIXED)  # image i of n = 3 is image i of n = 9
    other_seed = generate(unet_run, 9, SampleSpec(seed=6, **opts), FIXED)
    for other, same in [(images[1], images[0]), (images[2], images[0]), (prefix, images[0][:3])]:
        diff = (other.int() - same.int()).abs()
        assert diff.max() <= 1 and (diff > 0).sum() <= 10, (int(diff.max()), int((diff > 0).sum()))
    assert ((other_seed.int() - images[0].int()).abs() > 1).float().mean() > 0.5  # other seeds: other images


def test_stochastic_noise_comes_from_the_image_generator_too(run: Run) -> None:
    # The seed's own starting noise given as `noise`: the same images as without it, since each
    # image's generator still draws (and drops) its starting noise before the step noise.
    opts = dict(sampler="ancestral", steps=3)
    x_T = starting_noise(run, 5, seed=3)
    plain = generate(run, 5, SampleSpec(seed=3, **opts), FIXED)
    assert torch.equal(_with_noise(run, 5, x_T, SampleSpec(seed=3, batch_size=2, **opts)), plain)
    # ... and the same starting noise with another seed's step noise gives other images
    assert not torch.equal(_with_noise(run, 5, x_T, SampleSpec(seed=4, **opts)), plain)


def test_starting_noise_depends_on_the_seed_and_the_image_alone(run: Run) -> None:
    x = starting_noise(run, 9, seed=2)
    assert x.dtype == torch.float32 and x.shape == (9, 3, SIZE, SIZE) and x.device.type == "cpu"
    assert torch.equal(starting_noise(run, 4, seed=2), x[:4])
    # what generate() draws at any batch size: given as the starting noise of a deterministic
    # sampler at batch size 2, the images are those generate() draws itself in one batch
    det = SampleSpec(seed=2, sampler="dpm-solver", steps=3)
    assert torch.equal(_with_noise(run, 9, x, det.with_(batch_size=2)), generate(run, 9, det, FIXED))
    # image i: the first draw of a CPU generator seeded seed * 1_000_003 + i
    g = torch.Generator().manual_seed(2 * 1_000_003 + 7)
    assert torch.equal(x[7], torch.randn(3, SIZE, SIZE, generator=g))
    assert not torch.equal(starting_noise(run, 1, seed=3)[0], x[0])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guided_batches_draw_noise_once_per_image(cond_run: Run, guidance: float) -> None:
    # Guidance other than 0 and 1 doubles the network's batch; the noise stays one draw per image.
    labels = torch.tensor([0, 1, 1, 0, 1])
    spec = SampleSpec(guidance=guidance, sampler="ancestral", steps=3, seed=1)
    whole = generate(cond_run, 5, spec.with_(batch_size=64), FIXED, labels=labels)
    assert torch.equal(generate(cond_run, 5, spec.with_(batch_size=2), FIXED, labels=labels), whole)
    assert torch.equal(generate(cond_run, 2, spec, FIXED, labels=labels[:2]), whole[:2])
    # the sweep ignores spec.guidance: its scales are the sweep's
    assert torch.equal(guidance_sweep(cond_run, [guidance], labels, spec.with_(guidance=0.0, batch_size=3), FIXED),
                       whole)
    if guidance != 1.0:  # guidance changes the images (the stand-in's labels shift its output)
        assert not torch.equal(generate(cond_run, 5, spec.with_(guidance=1.0), FIXED, labels=labels), whole)


def test_image_generators_stack_one_draw_per_image() -> None:
    gens = S.ImageGenerators.seeded(4, 3, start=2)
    assert len(gens) == 3 and len(gens[1:]) == 2
    x = gens.randn((2, 5))
    assert x.shape == (3, 2, 5) and x.dtype == torch.float32
    for row, i in zip(x, range(2, 5)):
        assert torch.equal(row, torch.randn(2, 5, generator=torch.Generator().manual_seed(S.image_seed(4, i))))
    # the same objects: a slice advances the whole's generators
    again = S.ImageGenerators.seeded(4, 3, start=2)
    again[1:].randn((2, 5))
    again[:1].randn((2, 5))
    assert torch.equal(again.randn((2, 5)), gens.randn((2, 5)))
    with pytest.raises(ValueError, match="2 image generators for a batch of 3"):
        S._randn_like(torch.zeros(3, 1), S.ImageGenerators.seeded(0, 2))


def test_samplers_take_image_generators_or_a_torch_generator() -> None:
    sched = Schedule.linear(50)

    def model(x, t):
        return 0.5 * x.clamp(-1, 1)

    x_T = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for sampler, kw in ((S.ancestral, dict(steps=5)), (S.ddim, dict(steps=5, eta=0.5)),
                        (S.langevin, dict(steps=3))):
        whole = sampler(model, x_T, sched, generator=S.ImageGenerators.seeded(9, 4), **kw)
        parts = torch.cat([sampler(model, x_T[:1], sched, generator=S.ImageGenerators.seeded(9, 1), **kw),
                           sampler(model, x_T[1:], sched, generator=S.ImageGenerators.seeded(9, 3, start=1), **kw)])
        assert torch.equal(whole, parts)
        # a plain torch.Generator still draws the batch at once, as before
        a = sampler(model, x_T, sched, generator=torch.Generator().manual_seed(9), **kw)
        b = sampler(model, x_T, sched, generator=torch.Generator().manual_seed(9), **kw)
        assert torch.equal(a, b) and not torch.equal(a, whole)


def test_generate_leaves_the_callers_network_as_it_found_it() -> None:
    """generate() samples in eval mode and in the device's layout, but the caller's network (the
    trainer's, mid-training) keeps its train mode, its NCHW weights and their values; the images
    are those of the same network handed over in eval mode."""
    from ddpm.run.checkpoint import Sampleable
    from ddpm.core.unet import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", image_size=8, num_classes=2, dropout=0.3)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    run = Sampleable(model=net, ema_model=None, schedule=Schedule.linear(20), classes=["a", "b"], prediction="eps",
                     image_size=8)
    images = generate(run, 3, SampleSpec(guidance=2.0, steps=3), FIXED, labels=torch.tensor([0, 1, 1]))
    assert net.training, "generate() left the caller's network in eval mode"
    conv = next(p for p in net.parameters() if p.dim() == 4 and p.shape[-1] == 3)
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)  # not re-laid
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    again = generate(run, 3, SampleSpec(guidance=2.0, steps=3), FIXED, labels=torch.tensor([0, 1, 1]))
    assert torch.equal(images, again)  # dropout was off while sampling: the same images twice


def test_the_sampling_copy_is_made_on_the_target_device_not_beside_the_weights(monkeypatch) -> None:
    """When generate() must copy the network (to move or re-lay it), no tensor is duplicated
    where the weights live: each goes straight to the target device (a GPU run sampled on the
    CPU would otherwise need twice its GPU memory for a moment)."""
    from ddpm.core.unet import UNet, UNetConfig

    net = UNet(UNetConfig.preset("tiny", image_size=8))
    net.register_buffer("counts", torch.arange(3.0))  # buffers too

    def refuse(self, memo):
        raise AssertionError("a tensor was deep-copied where it lives")

    monkeypatch.setattr(torch.Tensor, "__deepcopy__", refuse)
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__", refuse)
    runtime = Runtime(torch.device("cpu"), "fp32", channels_last=True)  # NCHW weights: force a re-laid copy
    copy = runtime.sampling_network(net)
    assert copy is not net
    pairs = list(zip(net.state_dict().values(), copy.state_dict().values()))
    assert len(pairs) == len(net.state_dict()) and all(torch.equal(a, b) for a, b in pairs)
    assert all(a.data_ptr() != b.data_ptr() for a, b in pairs)  # copies, not shared storage
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in copy.parameters())
