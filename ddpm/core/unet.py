"""The denoising network: the UNet of Ho et al. 2020 (a PixelCNN++-style backbone with
residual blocks, GroupNorm, a sinusoidal time embedding and self-attention at chosen
resolutions), with optional class conditioning for classifier-free guidance.

The network knows nothing about schedules or losses: ``forward(x, t, y)`` maps a noisy batch,
its timesteps and optional labels to a prediction of the same shape as ``x``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .conv import Conv2d

__all__ = ["UNet", "UNetConfig", "PRESETS", "timestep_embedding"]


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet`; saved as JSON in every checkpoint.

    ``attention_resolutions`` are feature-map sizes (in pixels) at which self-attention is used;
    they are relative to ``image_size``. ``num_classes=None`` builds an unconditional network;
    otherwise one extra learned embedding (index ``num_classes``) is the null class used for
    unconditional passes of classifier-free guidance.

    The last three fields exist so that networks trained elsewhere in the same architecture
    (the original DDPM release, diffusers' ``UNet2DModel``; see :mod:`ddpm.interop.diffusers`) compute
    exactly what they computed there; the defaults are this project's conventions:

    - ``norm_eps``: the epsilon of every GroupNorm (the DDPM code and diffusers' DDPM models: 1e-6).
    - ``time_freq_shift``: the sinusoidal time embedding uses frequencies
      ``10000 ** (-i / (half - time_freq_shift))`` for ``i < half = base_channels // 2``; the
      DDPM code divides by ``half - 1`` (diffusers' ``freq_shift=1``).
    - ``downsample_padding``: 1 pads the strided 3x3 downsampling convolution by one pixel on
      every side; 0 pads one pixel on the right and bottom only, as TensorFlow's ``SAME``
      padding did in the DDPM code (diffusers' ``downsample_padding=0``).

    :meth:`to_dict` leaves these three out while they hold their defaults, so the configs saved
    by earlier versions and those saved now are the same JSON.
    """

    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 128
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = 1
    dropout: float = 0.1
    norm_groups: int = 32
    num_classes: int | None = None
    norm_eps: float = 1e-5
    time_freq_shift: float = 0.0
    downsample_padding: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        levels = len(self.channel_mults)
        if levels < 1:
            raise ValueError("channel_mults must name at least one level")
        if self.image_size < 1 or self.image_size % (2 ** (levels - 1)):
            raise ValueError(
                f"image_size {self.image_size} must be a positive multiple of 2**(levels-1) = {2 ** (levels - 1)}"
                f" for {levels} levels"
            )
        for m in self.channel_mults:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"channels {self.base_channels * m} are not divisible by norm_groups={self.norm_groups}"
                )
            if (self.base_channels * m) % self.num_heads:
                raise ValueError(f"channels {self.base_channels * m} are not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive or None, got {self.num_classes}")
        if not (math.isfinite(self.norm_eps) and self.norm_eps > 0):
            raise ValueError(f"norm_eps must be a positive number, got {self.norm_eps}")
        if not (math.isfinite(self.time_freq_shift) and self.time_freq_shift < self.base_channels // 2):
            raise ValueError(f"time_freq_shift must be a number below base_channels // 2 = {self.base_channels // 2}, "
                             f"got {self.time_freq_shift}")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 (right and bottom only) or 1 (every side), "
                             f"got {self.downsample_padding}")

    @property
    def conditional(self) -> bool:
        """Whether the network takes class labels."""
        return self.num_classes is not None

    @property
    def null_class(self) -> int | None:
        """The label index that means "no class" (the unconditional pass), or None."""
        return self.num_classes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        for name, default in _COMPAT_DEFAULTS.items():
            if d[name] == default:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error so typos don't pass silently."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown UNetConfig keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "UNetConfig":
        """A named configuration, with any field overridden (``image_size=64``, ``num_classes=10``).

        ``attention_resolutions`` of a preset scale with ``image_size`` when only the size is
        overridden, so ``preset("ddpm-cifar10", image_size=64)`` still attends at the same level.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
        base = PRESETS[name]
        if "image_size" in overrides and "attention_resolutions" not in overrides:
            scale = overrides["image_size"] / base.image_size
            overrides["attention_resolutions"] = tuple(int(r * scale) for r in base.attention_resolutions)
        return replace(base, **overrides)


# Fields that to_dict omits at these values (see UNetConfig's docstring).
_COMPAT_DEFAULTS: dict[str, Any] = {"norm_eps": 1e-5, "time_freq_shift": 0.0, "downsample_padding": 1}

PRESETS: dict[str, UNetConfig] = {
    # Ho et al. 2020, CIFAR-10: ch=128, mults (1,2,2,2), 2 blocks, attention at 16x16, dropout 0.1.
    "ddpm-cifar10": UNetConfig(),
    # 64x64 model for landscapes / CIFAR-10 upsampled: one more level so the bottleneck is 8x8,
    # attention at 16 and 8 as in improved-diffusion's 64x64 models.
    "ddpm-64": UNetConfig(
        image_size=64, base_channels=128, channel_mults=(1, 2, 2, 4), attention_resolutions=(16, 8), num_heads=4
    ),
    # A model that trains in minutes on a CPU: the same architecture, narrower and shallower.
    "small": UNetConfig(
        image_size=32, base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=1, attention_resolutions=(8,),
        dropout=0.1,
    ),
    # For tests: one step in well under a second on a CPU.
    "tiny": UNetConfig(
        image_size=32, base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(16,),
        dropout=0.0, norm_groups=8,
    ),
}


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: [B] -> [B, dim] float32, as in Transformers.

    Entries are ``[sin(t f_i), cos(t f_i)]`` with ``f_i = max_period ** (-i / (dim // 2 - freq_shift))``
    (``freq_shift=1`` is the DDPM code's convention), zero-padded when ``dim`` is odd.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, add the projected time embedding, GroupNorm -> SiLU -> dropout -> conv, plus skip."""

    def __init__(self, cin: int, cout: int, temb_dim: int, dropout: float, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(cout, cout, 3, padding=1)
        # Zero-initialised last conv: every block starts as the identity, which keeps deep
        # UNets stable early in training (the paper's code does the same).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _plain_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


class AttnBlock(nn.Module):
    """Multi-head self-attention over the spatial positions, through fused SDPA kernels.

    The 1x1 ``qkv`` and ``proj`` convolutions are applied as matmuls over a token view
    ``[B, HW, C]``: for a channels_last input that view is free and the output is channels_last
    again, so no layout copies are made (a 1x1 convolution is exactly this matmul).
    """

    def __init__(self, ch: int, heads: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch, eps=eps)
        self.qkv = Conv2d(ch, 3 * ch, 1)
        self.proj = Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> "AttnBlock":
        super()._apply(fn, recurse)
        # ``.to(memory_format=torch.channels_last)`` gives these [C', C, 1, 1] weights strides that
        # differ from plain contiguous ones only in the size-1 dims. forward() uses them through a
        # matmul view whose gradient has plain strides, and DDP compares the two exactly (it warns
        # and copies every step). The layout means nothing for a 1x1 kernel, so keep it plain.
        for conv in (self.qkv, self.proj):
            w = conv.weight
            if w.stride() != _plain_strides(w.shape):
                w.data = w.data.clone(memory_format=torch.contiguous_format)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        d = c // self.heads
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c)  # [B, HW, C]; a view if NHWC
        qkv = F.linear(tokens, self.qkv.weight.view(3 * c, c), self.qkv.bias)  # [B, HW, 3C]
        # Channel order of the conv's output is (q|k|v, head, d) -> [3, B, heads, HW, d]
        q, k, v = qkv.view(b, h * w, 3, self.heads, d).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
        out = out.transpose(1, 2).reshape(b, h * w, c)  # [B, HW, C] with channels ordered (head, d)
        out = F.linear(out, self.proj.weight.view(c, c), self.proj.bias)
        return x + out.view(b, h, w, c).permute(0, 3, 1, 2)  # back to [B, C, H, W], NHWC in memory


class Downsample(nn.Module):
    """Strided 3x3 convolution halving the resolution; ``padding`` as ``UNetConfig.downsample_padding``."""

    def __init__(self, ch: int, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour doubling followed by a 3x3 convolution."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """The blocks of one resolution level: res blocks, each optionally followed by attention."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()


class UNet(nn.Module):
    """DDPM UNet. ``forward(x [B,C,H,W], t [B] int or float, y [B] int or None) -> [B,C_out,H,W]``.

    For a conditional network, ``y=None`` (or entries equal to ``config.null_class``) gives the
    unconditional prediction.

    ``grad_checkpoint`` (also a plain attribute, settable at any time) turns on activation
    checkpointing in training: each residual block (with its attention) keeps only its input
    and recomputes its activations in the backward pass, trading about a third more compute for
    much less activation memory. It changes neither the weights nor the function, so it is not
    part of :class:`UNetConfig` and is not saved in checkpoints.
    """

    def __init__(self, config: UNetConfig, grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.config = cfg = config
        self.grad_checkpoint = bool(grad_checkpoint)
        ch = cfg.base_channels
        temb_dim = 4 * ch
        g, eps = cfg.norm_groups, cfg.norm_eps
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, temb_dim) if cfg.conditional else None
        self.conv_in = Conv2d(cfg.in_channels, ch, 3, padding=1)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch]
        cur, res = ch, cfg.image_size
        for i, mult in enumerate(cfg.channel_mults):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResBlock(cur, ch * mult, temb_dim, cfg.dropout, g, eps))
                cur = ch * mult
                level.attn.append(AttnBlock(cur, cfg.num_heads, g, eps) if res in cfg.attention_resolutions else nn.Identity())
                skips.append(cur)
            self.down.append(level)
            if i != len(cfg.channel_mults) - 1:
                self.downsample.append(Downsample(cur, cfg.downsample_padding))
                skips.append(cur)
                res //= 2

        self.mid_res1 = ResBlock(cur, cur, temb_dim, cfg.dropout, g, eps)
        self.mid_attn = AttnBlock(cur, cfg.num_heads, g, eps)
        self.mid_res2 = ResBlock(cur, cur, temb_dim, cfg.dropout, g, eps)

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mults))):
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResBlock(cur + skips.pop(), ch * mult, temb_dim, cfg.dropout, g, eps))
                cur = ch * mult
                level.attn.append(AttnBlock(cur, cfg.num_heads, g, eps) if res in cfg.attention_resolutions else nn.Identity())
            self.up.append(level)
            if i != 0:
                self.upsample.append(Upsample(cur))
                res *= 2

        self.norm_out = nn.GroupNorm(g, cur, eps=eps)
        self.conv_out = Conv2d(cur, cfg.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def num_classes(self) -> int | None:
        """Number of real classes (the null class excluded), or None if unconditional."""
        return self.config.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the network's target (noise, or v) for noisy images ``x`` at timesteps ``t``."""
        levels = len(self.config.channel_mults)
        if x.shape[-1] % (2 ** (levels - 1)) or x.shape[-2] % (2 ** (levels - 1)):
            raise ValueError(f"image size {tuple(x.shape[-2:])} must be a multiple of {2 ** (levels - 1)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        temb = self.time_mlp(timestep_embedding(t, self.config.base_channels, freq_shift=self.config.time_freq_shift)
                             .to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.config.null_class, device=x.device, dtype=torch.long)
            temb = temb + self.class_emb(y)
        elif y is not None:
            raise ValueError("this UNet is unconditional (num_classes=None) but labels were given")

        h = self.conv_in(x)
        hs = [h]
        for i, level in enumerate(self.down):
            for res, attn in zip(level.res, level.attn):
                h = self._block(res, attn, h, temb)
                hs.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                hs.append(h)
        h = self._block(self.mid_res1, self.mid_attn, h, temb)
        h = self._block(self.mid_res2, None, h, temb)
        for i, level in enumerate(self.up):
            for res, attn in zip(level.res, level.attn):
                h = self._block(res, attn, h, temb, skip=hs.pop())
            if i < len(self.upsample):
                h = self.upsample[i](h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _block(self, res: ResBlock, attn: nn.Module | None, h: torch.Tensor, temb: torch.Tensor,
               skip: torch.Tensor | None = None) -> torch.Tensor:
        """``attn(res(cat(h, skip), temb))``, recomputed in the backward pass when checkpointing."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            # Non-reentrant checkpointing: works with autocast, torch.compile and inputs that do not
            # require grad, and replays the saved RNG state so dropout masks match the forward pass.
            # The concatenation happens inside, so only h and the skip (kept anyway) are saved.
            return torch.utils.checkpoint.checkpoint(_res_attn, res, attn, h, temb, skip, use_reentrant=False)
        return _res_attn(res, attn, h, temb, skip)


def _res_attn(res: ResBlock, attn: nn.Module | None, h: torch.Tensor, temb: torch.Tensor,
              skip: torch.Tensor | None = None) -> torch.Tensor:
    if skip is not None:
        h = torch.cat([h, skip], dim=1)
    h = res(h, temb)
    return h if attn is None else attn(h)


def count_parameters(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())
