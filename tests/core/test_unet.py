"""UNet: presets, shapes at any valid size, the DDPM parameter count, class conditioning and
classifier-free guidance, config serialisation and validation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ddpm import PRESETS, UNet, UNetConfig, count_parameters, guided
from ddpm.core.unet import timestep_embedding


pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-initialise every conv with PyTorch's default init: the UNet zero-initialises its output
    conv (and each block's last conv), so a fresh network outputs exactly zero whatever y is."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return model.eval()


def tiny_conditional(num_classes: int = 10) -> UNet:
    return randomised(UNet(UNetConfig.preset("tiny", num_classes=num_classes)))


# ------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("name", ["ddpm-cifar10", "ddpm-64", "small", "tiny"])
def test_every_preset_maps_images_to_the_same_shape(name):
    cfg = UNetConfig.preset(name)
    big = name.startswith("ddpm")
    model = UNet(cfg).eval()
    b = 1 if big else 2
    x = torch.randn(b, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        out = model(x, torch.randint(0, 1000, (b,)))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.isfinite(out).all()
    assert cfg == PRESETS[name]


@pytest.mark.parametrize("name,sizes", [("tiny", [(16, 16), (48, 48), (16, 40)]),
                                        ("small", [(16, 16), (48, 48), (24, 64)])])
def test_any_multiple_of_the_downsampling_factor_works(name, sizes):
    model = randomised(UNet(UNetConfig.preset(name)))
    for h, w in sizes:
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            out = model(x, torch.tensor([3, 900]))
        assert out.shape == x.shape, (h, w)
        assert out.abs().mean() > 0


def test_ddpm_cifar10_has_the_papers_35_7m_parameters():
    model = UNet(UNetConfig.preset("ddpm-cifar10"))
    assert count_parameters(model) == 35_746_307
    assert sum(p.numel() for p in model.parameters()) == 35_746_307


def test_presets_scale_attention_with_image_size():
    cfg = UNetConfig.preset("ddpm-cifar10", image_size=64)
    assert cfg.image_size == 64 and cfg.attention_resolutions == (32,)
    assert UNetConfig.preset("ddpm-64", image_size=128).attention_resolutions == (32, 16)
    # explicit attention wins; other fields are plain overrides
    assert UNetConfig.preset("tiny", image_size=64, attention_resolutions=(8,)).attention_resolutions == (8,)
    assert UNetConfig.preset("small", num_classes=10).num_classes == 10
    assert UNetConfig.preset("small", num_classes=10).attention_resolutions == PRESETS["small"].attention_resolutions


def test_attention_is_built_at_the_configured_resolutions():
    def n_attn(cfg: UNetConfig) -> int:
        return sum(1 for m in UNet(cfg).modules() if type(m).__name__ == "AttnBlock")

    base = UNetConfig.preset("tiny", attention_resolutions=())
    # only the middle block attends: 1
    assert n_attn(base) == 1
    # at 16 (level 2 of 2): num_res_blocks down + (num_res_blocks + 1) up = 1 + 2
    assert n_attn(UNetConfig.preset("tiny", attention_resolutions=(16,))) == 1 + 3
    assert n_attn(UNetConfig.preset("tiny", attention_resolutions=(32, 16))) == 1 + 6


# --------------------------------------------------------------------------------- behaviour
def test_output_depends_on_x_and_t_and_accepts_scalar_or_float_t():
    model = randomised(UNet(UNetConfig.preset("tiny")))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(x, torch.tensor([10, 10]))
        assert not torch.allclose(a, model(x, torch.tensor([500, 500])))
        assert not torch.allclose(a, model(x + 0.1, torch.tensor([10, 10])))
        assert torch.allclose(a, model(x, torch.tensor(10)))  # a 0-d t is broadcast over the batch
        assert torch.allclose(a, model(x, torch.tensor([10.0, 10.0])))
        # samples do not interact (GroupNorm is per sample): a batch equals its parts
        assert torch.allclose(a[:1], model(x[:1], torch.tensor([10])), atol=1e-5)


def test_every_parameter_receives_a_gradient():
    model = randomised(UNet(UNetConfig.preset("tiny", num_classes=3))).train()
    x = torch.randn(2, 3, 16, 16)
    model(x, torch.tensor([1, 2]), torch.tensor([0, 3])).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "class_emb.weight":
            assert p.grad.abs().sum() > 0, name
    used = model.class_emb.weight.grad.abs().sum(1)
    assert used[0] > 0 and used[3] > 0 and used[1] == 0 and used[2] == 0


def test_timestep_embedding():
    t = torch.tensor([0, 1, 999])
    e = timestep_embedding(t, 8)
    assert e.shape == (3, 8)
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin 0, cos 0
    assert torch.allclose(e[1, 0], torch.sin(torch.tensor(1.0)))  # the first frequency is 1
    assert timestep_embedding(t, 7).shape == (3, 7) and timestep_embedding(t, 7)[:, -1].abs().max() == 0


# ------------------------------------------------------------------ conditioning and guidance
def test_conditional_output_depends_on_the_label_and_none_is_the_null_class():
    model = tiny_conditional(10)
    assert model.num_classes == 10 and model.config.null_class == 10
    assert model.class_emb.num_embeddings == 11  # 10 classes + the learned null class
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([5, 300, 999])
    with torch.no_grad():
        a = model(x, t, torch.tensor([0, 0, 0]))
        b = model(x, t, torch.tensor([1, 1, 1]))
        assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # every sample changes with its label
        assert torch.equal(model(x, t), model(x, t, torch.full((3,), 10)))
        # labels act per sample
        mixed = model(x, t, torch.tensor([0, 1, 0]))
        assert torch.allclose(mixed[0], a[0], atol=1e-6) and torch.allclose(mixed[1], b[1], atol=1e-6)


class Recorder:
    """Counts the batches a guided model sends to the network."""

    def __init__(self, model: UNet):
        self.model, self.batches = model, []
        self.num_classes = model.num_classes

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        return self.model(x, t, y)


@pytest.mark.parametrize("scale", [0.0, 1.0, 0.5, 3.0, -1.0])
def test_guidance_is_the_cfg_combination_of_two_passes(scale):
    model = tiny_conditional(10)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 16, 16, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 3, 9, 3])
    rec = Recorder(model)
    with torch.no_grad():
        out = guided(rec, y, scale)(x, t)
        eps_c = model(x, t, y)  # two separate passes
        eps_u = model(x, t, None)
    assert out.shape == x.shape
    if scale == 1.0:  # plain conditional, one pass of B
        assert torch.equal(out, eps_c) and rec.batches == [4]
    elif scale == 0.0:  # plain unconditional, one pass of B
        assert torch.equal(out, eps_u) and rec.batches == [4]
    else:  # one batched pass of 2B
        assert rec.batches == [8]
        assert torch.allclose(out, eps_u + scale * (eps_c - eps_u), atol=1e-5, rtol=1e-5)
    assert out.abs().mean() > 1e-3  # the networks really produce something (randomised weights)


def test_guidance_composes_with_samplers_and_counts_nfes():
    from ddpm import Schedule
    from ddpm.core.samplers import ddim, model_evaluations

    model = tiny_conditional(4)
    rec = Recorder(model)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    out = ddim(guided(rec, torch.tensor([1, 2]), 2.0), x_T, Schedule.linear(), steps=3)
    assert out.shape == x_T.shape and torch.isfinite(out).all()
    assert len(rec.batches) == model_evaluations("ddim", 3) and set(rec.batches) == {4}


def test_guidance_rejects_bad_labels_and_unconditional_models():
    model = tiny_conditional(5)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        guided(model, torch.tensor([0, 5]), 2.0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        guided(model, torch.tensor([-1]), 2.0)
    with pytest.raises(ValueError, match="1-D tensor"):
        guided(model, torch.tensor([[0, 1]]), 2.0)
    with pytest.raises(ValueError, match="2 labels for a batch of 3"):
        guided(model, torch.tensor([0, 1]), 2.0)(torch.randn(3, 3, 16, 16), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="class-conditional model"):
        guided(UNet(UNetConfig.preset("tiny")), torch.tensor([0]), 2.0)
    # an explicit null class works with any callable: eps_c = 2, eps_u = 5, 5 + 3 (2 - 5) = -4
    f = guided(lambda x, t, y: x * y.float().reshape(-1, 1), torch.tensor([2]), 3.0, null_class=5)
    assert torch.allclose(f(torch.ones(1, 1), torch.zeros(1, dtype=torch.long)), torch.tensor([[-4.0]]))


def test_unconditional_unet_given_labels_raises():
    model = UNet(UNetConfig.preset("tiny"))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(1, 3, 16, 16), torch.tensor([1]), torch.tensor([0]))


# ------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("cfg", [UNetConfig(), UNetConfig.preset("ddpm-64"), UNetConfig.preset("tiny", num_classes=10),
                                 UNetConfig(image_size=24, channel_mults=[1, 3], attention_resolutions=[], dropout=0.0,
                                            num_heads=2, norm_groups=16, in_channels=1, out_channels=2)])
def test_config_to_dict_from_dict_round_trip(cfg):
    d = cfg.to_dict()
    assert isinstance(d["channel_mults"], list) and isinstance(d["attention_resolutions"], list)
    for back in (UNetConfig.from_dict(d), UNetConfig.from_dict(json.loads(json.dumps(d)))):
        assert back == cfg and back.to_dict() == d
        assert isinstance(back.channel_mults, tuple) and isinstance(back.attention_resolutions, tuple)
    if cfg.base_channels <= 64:  # the same config builds the same architecture (big ones: too slow to build twice)
        a, b = UNet(UNetConfig.from_dict(d)).state_dict(), UNet(cfg).state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}


def test_in_and_out_channels():
    model = UNet(UNetConfig(image_size=16, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=(), norm_groups=8, in_channels=1, out_channels=2))
    assert model(torch.randn(2, 1, 16, 16), torch.tensor([0, 1])).shape == (2, 2, 16, 16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(image_size=30), r"image_size 30 must be a positive multiple of 2\*\*\(levels-1\) = 8"),
    (dict(image_size=0), "image_size 0 must be a positive multiple"),
    (dict(channel_mults=()), "at least one level"),
    (dict(norm_groups=48), "not divisible by norm_groups=48"),
    (dict(num_heads=3), "not divisible by num_heads=3"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    (dict(num_classes=0), "num_classes must be positive or None"),
])
def test_invalid_configs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_bad_preset_keys_and_sizes_raise_value_error():
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        UNetConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown UNetConfig keys: chanels"):
        UNetConfig.from_dict({**UNetConfig().to_dict(), "chanels": 3})
    model = UNet(UNetConfig.preset("small"))  # 3 levels: sizes must be multiples of 4
    with pytest.raises(ValueError, match=r"image size \(18, 16\) must be a multiple of 4"):
        model(torch.randn(1, 3, 18, 16), torch.tensor([0]))


def test_channels_last_keeps_attention_weights_plain_so_ddp_sees_matching_grad_strides(tmp_path) -> None:
    """DDP compares gradient and parameter strides exactly and warns (and copies every step) when
    they differ; the attention's 1x1 weights, used through a matmul view, must stay plain."""
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from ddpm.core.unet import AttnBlock

    model = randomised(UNet(UNetConfig.preset("tiny"))).train()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    expected = model(x, t)
    model.to(memory_format=torch.channels_last)
    blocks = [m for m in model.modules() if isinstance(m, AttnBlock)]
    assert blocks and all(m.qkv.weight.stride() == (m.qkv.weight.shape[1], 1, 1, 1) for m in blocks)
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last), t), expected)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DDP(model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp(x.contiguous(memory_format=torch.channels_last), t).square().mean().backward()
        assert not [w for w in caught if "strides" in str(w.message)], [str(w.message) for w in caught]
    finally:
        dist.destroy_process_group()
