"""EMA (warm-up, averaging, state_dict) and the training objective (label dropout, diffusion_loss)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ddpm import EMA, Schedule, diffusion_loss, drop_labels


pytestmark = pytest.mark.usefixtures("one_thread")


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(value + i)


# ---------------------------------------------------------------------------------------- EMA
def test_warmup_decay_formula():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    expected = [min(0.999, (1 + n) / (10 + n)) for n in range(2000)]
    assert expected[0] == 0.1 and expected[1] == pytest.approx(2 / 11)
    got = []
    for _ in range(2000):
        got.append(ema.current_decay())
        ema.update(ema.module)
    assert got == expected
    assert ema.num_updates == 2000
    # the warm-up reaches the target decay when (1 + n) / (10 + n) >= 0.999, i.e. n >= 8990
    ema.num_updates = 8989
    assert ema.current_decay() < 0.999
    ema.num_updates = 8991
    assert ema.current_decay() == 0.999
    assert EMA(nn.Linear(2, 2), decay=0.9, warmup=False).current_decay() == 0.9


@pytest.mark.parametrize("warmup", [True, False])
def test_shadow_is_the_hand_computed_average(warmup):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    _set(model, 0.0)
    ema = EMA(model, decay=0.9, warmup=warmup)
    shadow = [p.detach().clone() for p in model.parameters()]
    for k, value in enumerate([1.0, -2.0, 5.0, 0.5, 3.0]):
        _set(model, value)
        d = min(0.9, (1 + k) / (10 + k)) if warmup else 0.9
        shadow = [d * s + (1 - d) * p.detach() for s, p in zip(shadow, model.parameters())]
        ema.update(model)
    for s, e in zip(shadow, ema.module.parameters()):
        assert torch.allclose(e, s, atol=1e-6, rtol=1e-6)
    # warm-up numbers by hand for the first weight after two updates: s = 0.1*0 + 0.9*1 = 0.9, then
    # d = 2/11: 2/11 * 0.9 + 9/11 * (-2)
    if warmup:
        ema2 = EMA(nn.Linear(1, 1, bias=False), decay=0.9)
        ema2.module.weight.data.fill_(0.0)
        src = nn.Linear(1, 1, bias=False)
        for v in (1.0, -2.0):
            src.weight.data.fill_(v)
            ema2.update(src)
        assert ema2.module.weight.item() == pytest.approx(2 / 11 * 0.9 + 9 / 11 * -2.0)


def test_ema_is_a_detached_eval_copy_and_copies_buffers():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)).train()
    ema = EMA(model, decay=0.5, warmup=False)
    assert not ema.module.training and model.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert ema.module[0].weight.data_ptr() != model[0].weight.data_ptr()
    model(torch.randn(16, 2))  # updates the BatchNorm running statistics
    ema.update(model)
    # buffers are copied, not averaged
    assert torch.equal(ema.module[1].running_mean, model[1].running_mean)
    assert torch.equal(ema.module[1].num_batches_tracked, model[1].num_batches_tracked)


def test_state_dict_round_trip_and_resume():
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    ema = EMA(model, decay=0.99)
    for _ in range(7):
        with torch.no_grad():
            model.weight.add_(torch.randn(4, 4))
        ema.update(model)
    state = copy.deepcopy(ema.state_dict())
    assert state["num_updates"] == 7 and state["decay"] == 0.99 and state["warmup"] is True
    fresh = EMA(nn.Linear(4, 4), decay=0.5, warmup=False)
    fresh.load_state_dict(state)
    assert fresh.num_updates == 7 and fresh.decay == 0.99 and fresh.warmup is True
    for a, b in zip(fresh.module.state_dict().values(), ema.module.state_dict().values()):
        assert torch.equal(a, b)
    # both continue identically
    for e in (ema, fresh):
        e.update(model)
    for a, b in zip(fresh.module.parameters(), ema.module.parameters()):
        assert torch.equal(a, b)


def test_ema_unwraps_wrappers():
    class Wrapper(nn.Module):  # the shape of DistributedDataParallel: the real model in .module
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.module = inner

    inner = nn.Linear(2, 2)
    ema = EMA(Wrapper(inner), decay=0.0, warmup=False)
    assert isinstance(ema.module, nn.Linear)
    with torch.no_grad():
        inner.weight.fill_(3.0)
    ema.update(Wrapper(inner))  # decay 0: the average is the current weights
    assert torch.equal(ema.module.weight, inner.weight)


@pytest.mark.parametrize("decay", [-0.1, 1.5])
def test_bad_decay_raises(decay):
    with pytest.raises(ValueError, match="EMA decay must be in"):
        EMA(nn.Linear(1, 1), decay=decay)


# --------------------------------------------------------------------------------- drop_labels
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_drop_labels_drops_each_sample_with_probability_p(p):
    n, null = 40_000, 10
    y = torch.arange(n) % 10
    out = drop_labels(y, p, null, torch.Generator().manual_seed(0))
    dropped = out == null
    # kept labels are untouched; dropped ones are exactly the null class
    assert torch.equal(out[~dropped], y[~dropped])
    # the count is Binomial(n, p): within 4 standard deviations sqrt(n p (1 - p))
    sd = math.sqrt(n * p * (1 - p))
    assert abs(dropped.sum().item() - n * p) < 4 * sd
    # per sample, not per batch: the dropped fraction of a batch of 32 has sd sqrt(p (1 - p) / 32)
    # (<= 0.09); all-or-nothing dropout per batch would give sqrt(p (1 - p)) (>= 0.3)
    per_batch = dropped.reshape(-1, 32).float().mean(1)
    assert per_batch.std().item() == pytest.approx(math.sqrt(p * (1 - p) / 32), rel=0.15)


def test_drop_labels_edge_cases():
    y = torch.tensor([0, 1, 2, 3])
    assert torch.equal(drop_labels(y, 0.0, 9), y)
    assert torch.equal(drop_labels(y, 1.0, 9), torch.full_like(y, 9))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    big = torch.zeros(1000, dtype=torch.long)
    assert torch.equal(drop_labels(big, 0.3, 7, g1), drop_labels(big, 0.3, 7, g2))
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError, match=r"p_uncond must be in \[0, 1\]"):
            drop_labels(y, p, 9)


# ------------------------------------------------------------------------------ diffusion_loss
@pytest.fixture(scope="module")
def sched() -> Schedule:
    return Schedule.linear()


class ZeroModel:
    """Predicts zero; records what it was called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y=None):
        self.calls.append((x.clone(), t.clone(), None if y is None else y.clone()))
        return torch.zeros_like(x)


def _x0(b: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loss_is_per_sample_and_reproducible_with_a_generator(sched):
    x0 = _x0()
    model = ZeroModel()
    a = diffusion_loss(model, sched, x0, generator=torch.Generator().manual_seed(1))
    b = diffusion_loss(model, sched, x0, generator=torch.Generator().manual_seed(1))
    c = diffusion_loss(model, sched, x0, generator=torch.Generator().manual_seed(2))
    assert a.shape == (8,) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same t and x_t were fed to the model both times
    assert torch.equal(model.calls[0][1], model.calls[1][1]) and torch.equal(model.calls[0][0], model.calls[1][0])
    assert not torch.equal(model.calls[0][1], model.calls[2][1])


def test_zero_model_eps_loss_is_the_mean_square_of_the_noise(sched):
    x0 = _x0(64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(4))
    loss = diffusion_loss(ZeroModel(), sched, x0, t=t, noise=noise)
    assert torch.allclose(loss, noise.pow(2).flatten(1).mean(1))
    # and with the noise drawn inside: E = 1, sd of the batch mean sqrt(2 / (64 * 768))
    loss = diffusion_loss(ZeroModel(), sched, x0, generator=torch.Generator().manual_seed(5))
    assert loss.mean().item() == pytest.approx(1.0, abs=5 * math.sqrt(2 / (64 * 768)))


def test_loss_targets_eps_and_v(sched):
    x0 = _x0(6)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(6))
    t = torch.tensor([0, 1, 100, 500, 998, 999])
    x_t = sched.add_noise(x0, noise, t)
    v = sched.v_from_eps(x0, noise, t)
    seen = {}

    def oracle(target):
        def model(x, tt, y=None):
            seen["x"], seen["t"] = x, tt
            return target
        return model

    # the model sees x_t = sqrt(abar) x0 + sqrt(1 - abar) noise at t
    assert diffusion_loss(oracle(noise), sched, x0, t=t, noise=noise).abs().max() == 0
    assert torch.equal(seen["t"], t) and torch.allclose(seen["x"], x_t)
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022), written out here
    a = sched.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
    v_by_hand = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert torch.allclose(v, v_by_hand, atol=1e-6)
    assert diffusion_loss(oracle(v_by_hand), sched, x0, t=t, noise=noise, prediction="v").max() < 1e-10
    # and the eps target is not the v target (they agree only where abar ~ 1)
    loss = diffusion_loss(oracle(noise), sched, x0, t=t, noise=noise, prediction="v")
    assert torch.allclose(loss, (noise - v_by_hand).pow(2).flatten(1).mean(1), atol=1e-6)
    assert loss[2:].min() > 1e-2
    zero_v = diffusion_loss(ZeroModel(), sched, x0, t=t, noise=noise, prediction="v")
    assert torch.allclose(zero_v, v_by_hand.pow(2).flatten(1).mean(1), atol=1e-6)


def test_timesteps_are_uniform_over_the_chain(sched):
    model = ZeroModel()
    diffusion_loss(model, sched, torch.zeros(20_000, 1), generator=torch.Generator().manual_seed(7))
    t = model.calls[0][1]
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    # uniform on 0..999: mean 499.5, sd 288.7, so the mean of 20,000 draws has sd 2.04
    assert abs(t.float().mean().item() - 499.5) < 4 * 288.7 / math.sqrt(20_000)
    assert t.min() < 10 and t.max() > 990


def test_labels_are_dropped_per_sample_and_passed_to_the_model(sched):
    model = ZeroModel()
    y = torch.arange(4000) % 10
    diffusion_loss(model, sched, torch.zeros(4000, 1), y, p_uncond=0.2, null_class=10,
                   generator=torch.Generator().manual_seed(8))
    seen = model.calls[0][2]
    dropped = seen == 10
    assert torch.equal(seen[~dropped], y[~dropped])
    assert abs(dropped.float().mean().item() - 0.2) < 4 * math.sqrt(0.2 * 0.8 / 4000)
    model = ZeroModel()
    diffusion_loss(model, sched, torch.zeros(4, 1), torch.tensor([1, 2, 3, 4]), p_uncond=0.0, null_class=10)
    assert torch.equal(model.calls[0][2], torch.tensor([1, 2, 3, 4]))
    model = ZeroModel()
    diffusion_loss(model, sched, torch.zeros(4, 1))
    assert model.calls[0][2] is None  # unconditional: the model is called as model(x, t)


def test_loss_trains_a_real_network(sched):
    """The loss is differentiable end to end and its gradient reaches every layer."""
    from ddpm import UNet, UNetConfig

    torch.manual_seed(0)
    net = UNet(UNetConfig.preset("tiny", num_classes=3))
    x0 = _x0(4)
    loss = diffusion_loss(net, sched, x0, torch.tensor([0, 1, 2, 0]), null_class=3,
                          generator=torch.Generator().manual_seed(9))
    loss.mean().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0  # zero-initialised, but it gets a gradient
    # a fresh UNet outputs 0, so its loss is the mean square of the noise: ~1
    assert loss.mean().item() == pytest.approx(1.0, abs=0.1)


def test_bad_loss_arguments_raise(sched):
    with pytest.raises(ValueError, match="unknown prediction 'score'"):
        diffusion_loss(ZeroModel(), sched, _x0(2), prediction="score")
    with pytest.raises(ValueError, match="labels were given but null_class is None"):
        diffusion_loss(ZeroModel(), sched, _x0(2), torch.tensor([0, 1]))
