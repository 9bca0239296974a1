"""ddpm.runtime.policy helpers (precision, autocast, layout, optimiser, sampling wrapper) and the UNet's
activation checkpointing: behaviour, not timings (speed is measured by benchmarks/speed.py)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm import UNet, UNetConfig, count_parameters, guided
from ddpm.runtime import policy as perf
from ddpm.core import conv as core_conv
from ddpm.runtime import accounting
from ddpm.core.unet import AttnBlock


pytestmark = pytest.mark.usefixtures("one_thread")


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Default-initialise every conv (the UNet zero-initialises its last convs, so a fresh net outputs 0)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return model


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------- precision
def test_precision_resolution_and_validation():
    assert perf.resolve_precision("cpu", "fp32") == "fp32"
    assert perf.resolve_precision("cpu", "auto") == perf.default_precision("cpu")
    assert perf.default_precision("cpu") == ("bf16" if perf.bf16_supported("cpu") else "fp32")
    with pytest.raises(ValueError, match="precision"):
        perf.resolve_precision("cpu", "fp16")
    # devices without fast bf16
    assert perf.bf16_supported("meta") is False
    if not torch.cuda.is_available():
        assert perf.bf16_supported("cuda") is False
        assert perf.default_precision("cuda") == "fp32"


def test_resolve_device_is_the_one_reading_of_device(monkeypatch):
    from ddpm.errors import DDPMError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert perf.resolve_device("auto") == perf.resolve_device(None) == torch.device("cpu")
    assert perf.resolve_device("cpu") == perf.resolve_device(torch.device("cpu")) == torch.device("cpu")
    for name, words in (("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                        ("gpu", "unknown device 'gpu'")):
        with pytest.raises(DDPMError, match=words) as e:
            perf.resolve_device(name)
        assert "\n" not in str(e.value)
    # a machine with two GPUs (only the counting is faked: no CUDA call is made)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert perf.resolve_device("auto") == torch.device("cuda:0")
    assert perf.resolve_device("auto", local_rank=1, world=2) == torch.device("cuda:1")
    assert perf.resolve_device("cuda") == torch.device("cuda")  # one process: the current GPU
    assert perf.resolve_device("cuda", local_rank=1, world=2) == torch.device("cuda:1")  # torchrun: its own
    assert perf.resolve_device("cuda:1") == torch.device("cuda:1")
    # a rank's device resolved once (ddpm eval under torchrun) and read again by the next layer
    assert perf.resolve_device(perf.resolve_device("cuda", local_rank=1, world=2), local_rank=1,
                               world=2) == torch.device("cuda:1")
    for name, kw, words in (("cuda:2", {}, "has 2 GPU"),
                            ("cuda:1", {"local_rank": 0, "world": 2}, "every process on one GPU"),
                            ("auto", {"local_rank": 2, "world": 3}, "LOCAL_RANK=2 needs GPU 2"),
                            ("mps", {}, "unknown device 'mps'"), ("cpu:3", {}, "unknown device 'cpu:3'")):
        with pytest.raises(DDPMError, match=words):
            perf.resolve_device(name, **kw)


def test_bf16_counts_as_fast_only_on_gpus_with_bf16_tensor_cores(monkeypatch):
    # torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (T4, V100)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for capability, fast in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert perf.bf16_supported("cuda:0") is fast
        assert perf.default_precision("cuda:0") == ("bf16" if fast else "fp32")


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_resolve_runtime_says_what_really_runs(monkeypatch, fast_bf16):
    from ddpm.errors import DDPMError

    monkeypatch.setattr(perf, "bf16_supported", lambda device: fast_bf16)
    auto = perf.resolve_runtime("cpu")
    assert auto.device == torch.device("cpu") and auto.channels_last is True
    assert auto.precision == ("bf16" if fast_bf16 else "fp32")
    assert auto.describe() == ("bf16 autocast on cpu" if fast_bf16 else "fp32 on cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asked = perf.resolve_runtime("cpu", "bf16")
    # bf16 where it would not run is said and done as fp32, never printed as bf16
    assert asked.precision == ("bf16" if fast_bf16 else "fp32")
    assert bool(caught) is (not fast_bf16)
    assert perf.resolve_runtime("cpu", "fp32", channels_last=False) == perf.Runtime(torch.device("cpu"), "fp32", False)
    with pytest.raises(DDPMError, match="unknown precision 'fp16'"):
        perf.resolve_runtime("cpu", "fp16")


def test_cpu_bf16_detection_follows_the_cpu_flags():
    """bf16 is only called fast when the CPU has bf16 dot products, not merely AVX-512."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    if not caps:
        pytest.skip("this PyTorch cannot report CPU features")
    native = bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("amx_tile") or caps.get("bf16"))
    assert perf.bf16_supported("cpu") == native


def test_autocast_context_fp32_is_a_no_op():
    lin = nn.Linear(8, 8)
    with perf.autocast_context("cpu", "fp32"):
        assert lin(torch.randn(2, 8)).dtype == torch.float32
        assert not torch.is_autocast_enabled("cpu")


def test_autocast_context_bf16_runs_matmuls_in_bf16_on_a_bf16_cpu(monkeypatch):
    monkeypatch.setattr(perf, "_cpu_has_native_bf16", lambda: True)
    lin = nn.Linear(8, 8)
    with perf.autocast_context("cpu", "bf16"):
        out = lin(torch.randn(2, 8))
    assert out.dtype == torch.bfloat16
    assert lin.weight.dtype == torch.float32  # the weights stay float32
    assert perf.default_precision("cpu") == "bf16"


def test_bf16_on_a_cpu_without_bf16_falls_back_to_fp32_with_a_warning(monkeypatch):
    monkeypatch.setattr(perf, "_cpu_has_native_bf16", lambda: False)
    assert perf.default_precision("cpu") == "fp32"
    with pytest.warns(RuntimeWarning, match="fp32"):
        ctx = perf.autocast_context("cpu", "bf16")
    with ctx:
        assert nn.Linear(4, 4)(torch.randn(1, 4)).dtype == torch.float32


def test_bf16_autocast_changes_the_loss_of_the_unet_only_slightly(monkeypatch):
    """The same batch, timesteps and noise in fp32 and in bf16: losses agree to well under 1%."""
    monkeypatch.setattr(perf, "_cpu_has_native_bf16", lambda: True)  # correctness does not need fast bf16
    import ddpm

    model = randomised(UNet(UNetConfig.preset("tiny"))).eval()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 32, 32, generator=g)
    t = torch.tensor([0, 300, 600, 999])
    sched = ddpm.Schedule.linear()
    losses = {}
    for prec in ("fp32", "bf16"):
        def fwd(x, tt, prec=prec):
            with perf.autocast_context("cpu", prec):
                return model(x, tt)
        losses[prec] = ddpm.diffusion_loss(fwd, sched, x0, t=t, noise=noise)
    assert losses["bf16"].dtype == torch.float32  # the loss itself is float32
    rel = (losses["bf16"] - losses["fp32"]).abs() / losses["fp32"]
    assert rel.max() < 1e-2, rel


# ----------------------------------------------------------------------------- model, layout
def test_prepare_model_channels_last_keeps_the_function():
    model = randomised(UNet(UNetConfig.preset("tiny"))).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 700])
    with torch.no_grad():
        ref = model(x, t)
    same = perf.prepare_model(model, "cpu", channels_last=True, compile=False)
    assert same is model  # no wrapper without compile
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    xc = perf.to_memory_format(x, True)
    assert xc.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(xc, t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_to_memory_format_leaves_other_tensors_alone():
    x = torch.randn(2, 3, 4, 4)
    assert perf.to_memory_format(x, False) is x
    v = torch.randn(3, 4)
    assert perf.to_memory_format(v, True) is v


def test_prepare_model_compile_wraps_and_state_dict_keys_survive():
    if not perf.compile_supported("cpu"):
        pytest.skip("no C++ compiler for torch.compile")
    model = UNet(UNetConfig.preset("tiny"))
    compiled = perf.prepare_model(model, "cpu", channels_last=False, compile=True)  # lazy: nothing compiled yet
    assert getattr(compiled, "_orig_mod", None) is model
    assert list(model.state_dict()) == list(UNet(UNetConfig.preset("tiny")).state_dict())


def test_compile_supported_is_false_for_unknown_devices():
    assert perf.compile_supported("meta") is False


def test_make_optimizer_matches_plain_adamw():
    torch.manual_seed(0)
    a = nn.Linear(16, 4)
    b = nn.Linear(16, 4)
    b.load_state_dict(a.state_dict())
    opt_a = perf.make_optimizer(a.parameters(), "cpu", lr=1e-2, weight_decay=0.01)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01)
    if perf._torch_at_least(2, 4):
        assert opt_a.defaults.get("fused") is True
    x = torch.randn(8, 16)
    for _ in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_inference_model_returns_float32_nchw_and_works_with_guidance():
    net = randomised(UNet(UNetConfig.preset("tiny", num_classes=3))).eval()
    call = perf.inference_model(net, "cpu", "fp32", channels_last=True)
    assert call.num_classes == 3
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.tensor([0, 2])
    with torch.inference_mode():
        out = call(x, t, y)
        ref = net(x, t, y)
        g = guided(call, y, scale=2.0)(x, t)
        g_ref = guided(net, y, scale=2.0)(x, t)
    assert out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)


def test_max_rss_is_positive_and_never_falls():
    a = accounting.max_rss_bytes()
    big = torch.ones(8 * 2**20)  # 32 MiB, touched
    b = accounting.max_rss_bytes()
    del big
    assert 0 < a <= b <= accounting.max_rss_bytes()


# ------------------------------------------------------------------- attention memory layout
def _reference_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The textbook form: 1x1 convs on [B, C, H, W] and per-head softmax attention."""
    b, c, h, w = x.shape
    heads, d = block.heads, c // block.heads
    qkv = block.qkv(block.norm(x)).reshape(b, 3, heads, d, h * w)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # [B, heads, d, HW]
    attn = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(d), dim=-1)  # [B, heads, HW, HW]
    out = (v @ attn.transpose(-1, -2)).reshape(b, c, h, w)
    return x + block.proj(out)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_block_matches_the_textbook_form(heads, channels_last):
    torch.manual_seed(0)
    block = AttnBlock(32, heads, 8)
    nn.init.normal_(block.proj.weight, std=0.1)
    x = torch.randn(2, 32, 6, 5)
    ref = _reference_attention(block, x)
    if channels_last:
        block.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    out = block(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- activation checkpointing
def test_grad_checkpoint_is_not_part_of_the_config_or_the_weights():
    plain = UNet(UNetConfig.preset("tiny"))
    ckpt = UNet(UNetConfig.preset("tiny"), grad_checkpoint=True)
    assert ckpt.grad_checkpoint and not plain.grad_checkpoint
    assert "grad_checkpoint" not in UNetConfig.preset("tiny").to_dict()
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    assert count_parameters(plain) == count_parameters(ckpt)
    assert count_parameters(UNet(UNetConfig.preset("ddpm-cifar10"), grad_checkpoint=True)) == 35_746_307


def _loss_and_grads(model: UNet, seed: int = 1, autocast: bool = False) -> tuple[torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 3, 32, 32, generator=g, requires_grad=False)
    t = torch.tensor([1, 400, 999])
    y = torch.tensor([0, 1, 3]) if model.config.conditional else None
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # the same dropout masks in both runs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(x, t, y)
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("overrides", [{}, {"dropout": 0.2}, {"num_classes": 4, "num_heads": 2}])
def test_grad_checkpoint_gives_the_same_gradients(overrides):
    """Recomputation in backward (with the RNG state replayed for dropout) changes nothing."""
    model = randomised(UNet(UNetConfig.preset("tiny", **overrides))).train()
    loss_ref, g_ref = _loss_and_grads(model)
    model.grad_checkpoint = True
    loss_ck, g_ck = _loss_and_grads(model)
    torch.testing.assert_close(loss_ck, loss_ref, rtol=1e-6, atol=1e-7)
    assert g_ck.keys() == g_ref.keys() and len(g_ref) == len(list(model.parameters()))
    for name in g_ref:
        torch.testing.assert_close(g_ck[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_grad_checkpoint_under_bf16_autocast_gives_the_same_gradients():
    """The recomputation runs under the same autocast state as the forward pass."""
    model = randomised(UNet(UNetConfig.preset("tiny"))).train()
    loss_ref, g_ref = _loss_and_grads(model, autocast=True)
    model.grad_checkpoint = True
    loss_ck, g_ck = _loss_and_grads(model, autocast=True)
    torch.testing.assert_close(loss_ck, loss_ref)
    for name in g_ref:
        torch.testing.assert_close(g_ck[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=name)


def test_grad_checkpoint_saves_fewer_activations():
    """Bytes the autograd graph keeps for backward, counted through saved-tensor hooks."""
    def saved_bytes(model: UNet) -> int:
        total = 0
        params = {p.data_ptr() for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.data_ptr() not in params:  # weights are kept anyway
                total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4]))
        out.sum().backward()
        return total

    model = randomised(UNet(UNetConfig.preset("tiny"))).train()
    full = saved_bytes(model)
    model.grad_checkpoint = True
    ckpt = saved_bytes(model)  # the checkpointed blocks' inner activations are not counted: not saved
    assert ckpt < 0.5 * full, (ckpt, full)


def test_grad_checkpoint_is_inactive_in_eval_and_no_grad():
    model = randomised(UNet(UNetConfig.preset("tiny"), grad_checkpoint=True))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 30])
    model.eval()
    with torch.no_grad():
        a = model(x, t)
    model.grad_checkpoint = False
    with torch.no_grad():
        b = model(x, t)
    torch.testing.assert_close(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no checkpoint warnings about inputs without grad
        model.grad_checkpoint = True
        model.train()
        with torch.no_grad():
            model(x, t)


def test_grad_checkpoint_works_with_a_frozen_input_and_trains():
    """A step with checkpointing lowers the loss on a fixed batch like a step without it."""
    torch.manual_seed(0)
    model = UNet(UNetConfig.preset("tiny"), grad_checkpoint=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4,))
    target = torch.randn_like(x)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(x, t), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------- float32 weight gradients of small bf16 convolutions
@pytest.mark.parametrize("stride,size", [(1, 8), (2, 16), (1, 32)])
def test_perf_conv2d_matches_autocast_conv_and_gives_float32_weight_grads(stride, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, stride=stride, padding=1)
    x = torch.randn(2, 16, size, size).contiguous(memory_format=torch.channels_last)

    def run(fn):
        xx = x.clone().requires_grad_()
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(xx)
        y.float().square().mean().backward()
        return y.detach(), xx.grad, conv.weight.grad.clone(), conv.bias.grad.clone()

    y_ref, gx_ref, gw_ref, gb_ref = run(lambda xx: F.conv2d(xx, conv.weight, conv.bias, stride, 1))
    y, gx, gw, gb = run(lambda xx: core_conv.conv2d(xx, conv.weight, conv.bias, stride, 1))
    assert y.dtype == torch.bfloat16 and gw.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)  # the forward pass is the same bf16 convolution
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gw, gw_ref, rtol=2e-2, atol=1e-4)  # bf16 rounding of the reference
    torch.testing.assert_close(gb, gb_ref, rtol=2e-2, atol=1e-4)
    # and closer to the fp32 gradient than plain bf16 autocast
    xx = x.clone().requires_grad_()
    conv.zero_grad()
    F.conv2d(xx, conv.weight, conv.bias, stride, 1).square().mean().backward()
    gw32 = conv.weight.grad
    assert (gw - gw32).norm() <= (gw_ref - gw32).norm() * 1.01


def test_perf_conv2d_is_plain_conv2d_outside_cpu_bf16_training():
    torch.manual_seed(0)
    w, b = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    small, large = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 64, 64)  # 64 and 4096 output positions

    def kind(out: torch.Tensor) -> str:
        return "none" if out.grad_fn is None else type(out.grad_fn).__name__

    assert kind(core_conv.conv2d(small, w, b, 1, 1)).startswith("Convolution")  # fp32: untouched
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "Bf16ConvFp32WeightGrad" in kind(core_conv.conv2d(small, w, b, 1, 1))
        assert "Bf16ConvFp32WeightGrad" in kind(core_conv.conv2d(large, w, b, 2, 1))  # strided
        assert kind(core_conv.conv2d(large, w, b, 1, 1)).startswith("Convolution")  # large: oneDNN's bf16 is fine
        with torch.no_grad():
            assert kind(core_conv.conv2d(small, w, b, 1, 1)) == "none"
        assert kind(core_conv.conv2d(small, w.detach(), b.detach(), 1, 1)) == "none"  # no weight gradient wanted


def test_unet_uses_the_fp32_weight_gradient_path_only_under_bf16_autocast():
    model = randomised(UNet(UNetConfig.preset("tiny"))).train()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 500])
    names = set()

    def walk(fn):
        seen, stack = set(), [fn]
        while stack:
            f = stack.pop()
            if f is None or f in seen:
                continue
            seen.add(f)
            names.add(type(f).__name__)
            stack.extend(g for g, _ in f.next_functions)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        walk(model(x, t).grad_fn)
    assert any("Bf16ConvFp32WeightGrad" in n for n in names)  # the 8x8... and strided convs
    names.clear()
    walk(model(x, t).grad_fn)
    assert not any("Bf16ConvFp32WeightGrad" in n for n in names)


def test_use_fp32_weight_grad_for_small_convs_keeps_weights_and_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    ref = model(x)
    assert core_conv.use_fp32_weight_grad_for_small_convs(model) == 2
    assert all(type(m) is core_conv.Conv2d for m in model if isinstance(m, nn.Conv2d))
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(model(x), ref)
    assert core_conv.use_fp32_weight_grad_for_small_convs(model) == 0  # already converted
    assert isinstance(UNet(UNetConfig.preset("tiny")).conv_in, core_conv.Conv2d)


def test_resumed_fused_adamw_state_follows_channels_last_weights() -> None:
    """Checkpointed moments come back contiguous; the fused kernel needs them in the weight's layout."""
    import copy

    from ddpm.runtime.policy import load_optimizer_state, make_optimizer

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)

    def steps(opt: torch.optim.Optimizer, model: torch.nn.Module, first: int) -> None:
        for s in range(first, first + 3):
            g = torch.Generator().manual_seed(s)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=g).to(memory_format=torch.channels_last) if p.dim() == 4 \
                    else torch.randn(p.shape, generator=g)
            opt.step()

    a = copy.deepcopy(conv)
    opt_a = make_optimizer(a.parameters(), "cpu", lr=1e-2)
    steps(opt_a, a, 0)
    saved = copy.deepcopy(opt_a.state_dict())
    for st in saved["state"].values():  # what a safetensors round trip gives back
        for k in ("exp_avg", "exp_avg_sq"):
            st[k] = st[k].contiguous()
    b = copy.deepcopy(a)
    opt_b = make_optimizer(b.parameters(), "cpu", lr=1e-2)
    load_optimizer_state(opt_b, saved, "cpu")
    steps(opt_a, a, 3)
    steps(opt_b, b, 3)
    assert torch.equal(a.weight, b.weight)
    assert opt_b.state[b.weight]["exp_avg"].stride() == b.weight.stride()


@pytest.mark.parametrize("argv0, user_value, expected", [
    ("/venv/bin/ddpm", None, "PASSIVE"),      # the console command
    ("-m", None, "PASSIVE"),                  # python -m ddpm / torchrun -m ddpm, while the package loads
    ("/venv/bin/ddpm", "ACTIVE", "ACTIVE"),   # the user's own setting wins
    ("myscript.py", None, None),              # a library user's program keeps its environment
])
def test_the_ddpm_command_lets_openmp_threads_sleep_unless_the_user_chose(argv0: str, user_value: str | None,
                                                                           expected: str | None) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    code = (f"import sys; sys.argv[0] = {argv0!r}; import ddpm, os; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(expected), "True"]
