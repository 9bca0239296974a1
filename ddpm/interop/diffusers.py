"""Hugging Face diffusers interoperability, offline: runs to ``DDPMPipeline`` folders and back.

``export_diffusers(run, dir)`` writes the layout diffusers' pipelines load::

    dir/model_index.json                                  DDPMPipeline: unet + scheduler
    dir/unet/config.json                                  UNet2DModel config
    dir/unet/diffusion_pytorch_model.safetensors          the weights (EMA by default)
    dir/scheduler/scheduler_config.json                   DDPMScheduler: our betas and target
    dir/ddpm_export.json                                  what diffusers has no field for (classes, exact schedule)

so that ``DDPMPipeline.from_pretrained(dir)`` or ``UNet2DModel.from_pretrained(dir, subfolder="unet")``
works without network access and predicts what the run predicts.

``import_diffusers(dir, run)`` does the reverse for ``UNet2DModel`` folders in the DDPM
architecture (Ho et al. 2020; the layout of the original DDPM CIFAR-10 weights,
``google/ddpm-cifar10-32``): it writes a run folder that ``ddpm sample``, ``ddpm info``,
``ddpm eval`` and ``ddpm train --resume`` accept. Configurations that compute something our
:class:`~ddpm.core.unet.UNet` cannot (other block types, scale-shift time conditioning, learned
variances, ...) are refused with a one-line :class:`~ddpm.errors.DDPMError` naming the config
field and its value.

The two networks are the same function with different module names. Per block (diffusers'
name on the right):

- time MLP ``time_mlp.0 / .2`` = ``time_embedding.linear_1 / linear_2``; the sinusoidal
  embedding's ``[sin, cos]`` order is diffusers' ``flip_sin_to_cos=False`` (a flipped one is
  imported by swapping the two halves of ``linear_1``'s input columns), and
  ``UNetConfig.time_freq_shift`` is its ``freq_shift``;
- residual blocks ``norm1, conv1, temb, norm2, conv2, skip`` = ``ResnetBlock2D``'s ``norm1,
  conv1, time_emb_proj, norm2, conv2, conv_shortcut`` (``resnet_time_scale_shift="default"``:
  the projected embedding is added after ``conv1``);
- attention: our fused 1x1 ``qkv`` convolution ``[3C, C, 1, 1]`` is diffusers' ``to_q``,
  ``to_k``, ``to_v`` ``[C, C]`` stacked in that order, ``proj`` is ``to_out.0`` and ``norm``
  is ``group_norm``; heads split the channels in the same (head, channel) order;
- levels: ``down.i`` / ``downsample.i`` = ``down_blocks.i.resnets`` (+ ``attentions``) /
  ``down_blocks.i.downsamplers.0``; ``up.i`` / ``upsample.i`` likewise for ``up_blocks.i``;
  ``mid_res1, mid_attn, mid_res2`` = ``mid_block.resnets.0, attentions.0, resnets.1``;
  ``norm_out`` = ``conv_norm_out``.

Class-conditional runs export ``num_class_embeds = num_classes + 1``: diffusers' plain class
embedding is added to the time embedding exactly as ours, and the last index is our null
class (the unconditional pass of classifier-free guidance). ``UNet2DModel`` then needs
``class_labels`` on every call, which ``DDPMPipeline`` does not pass: call the UNet yourself
(``class_labels=num_classes`` for the unconditional prediction). Such folders import back
with their class names; other diffusers class-conditional models have no null class and are
refused.

Only safetensors are read or written; a ``.bin`` pickle is refused with the command that
converts it (pickles can run code when loaded). Nothing here imports diffusers.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import DDPMError, first_line
from ..files.atomic import atomic_write_json, check_writable, process_umask
from ..core.schedule import Schedule, _reshape_abar
from ..core.unet import UNet, UNetConfig
from ..run.checkpoint import load_run, save_checkpoint, save_safetensors
from ..run.config import RunConfig
from ..run.folder import RunFolder
from ..train.config import IMPORTED, TrainConfig

__all__ = ["export_diffusers", "import_diffusers", "unet_config_to_diffusers", "unet_config_from_diffusers",
           "state_dict_to_diffusers", "state_dict_from_diffusers", "scheduler_config_to_diffusers",
           "schedule_from_diffusers", "PREDICTION_TYPES", "EXPORT_META"]

# Our ``prediction`` (the run config's network target) <-> DDPMScheduler's ``prediction_type``.
PREDICTION_TYPES: dict[str, str] = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
EXPORT_META = "ddpm_export.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Written into configs when diffusers is not installed: the oldest release the tests support.
_FALLBACK_DIFFUSERS_VERSION = "0.25.0"

# UNet2DModel's constructor defaults: a config.json may leave out any field, and diffusers then
# builds the model with these values, so the import must read a missing field the same way.
_UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0, "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu",
    "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
# DDPMScheduler's defaults, for the same reason.
_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "variance_type": "fixed_small", "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False,
}

# Residual block: our submodule -> ResnetBlock2D's.
_RES_NAMES = {"norm1": "norm1", "conv1": "conv1", "temb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
              "skip": "conv_shortcut"}


def _diffusers_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return _FALLBACK_DIFFUSERS_VERSION


# ------------------------------------------------------------------------------- UNet configs
def _attends(cfg: UNetConfig, level: int) -> bool:
    return cfg.image_size // 2 ** level in cfg.attention_resolutions


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """diffusers ``UNet2DModel`` config (the ``unet/config.json`` dict) computing what ``UNet(cfg)`` computes.

    Levels with attention become ``AttnDownBlock2D`` / ``AttnUpBlock2D``, the others
    ``DownBlock2D`` / ``UpBlock2D``; ``norm_eps``, ``freq_shift`` and ``downsample_padding``
    carry :class:`UNetConfig`'s fields; a conditional network gets ``num_class_embeds =
    num_classes + 1`` (the last one is the null class). Raises :class:`DDPMError` when
    ``num_heads > 1`` would need heads of different widths at different attention blocks
    (``UNet2DModel`` has a single ``attention_head_dim``), or when ``channel_mults[0] != 1``
    (its stem and time embedding are as wide as its first level).
    """
    if cfg.channel_mults[0] != 1:
        # UNet2DModel's input convolution and time embedding are as wide as its first level; ours
        # are base_channels wide whatever the first multiplier.
        raise DDPMError(f"cannot export channel_mults={list(cfg.channel_mults)}: diffusers' UNet2DModel needs the "
                        "first multiplier to be 1 (its stem and time embedding are as wide as the first level)")
    levels = len(cfg.channel_mults)
    chans = [cfg.base_channels * m for m in cfg.channel_mults]
    attn = [_attends(cfg, i) for i in range(levels)]
    sites = sorted({c for c, a in zip(chans, attn) if a} | {chans[-1]})  # the middle block always attends
    head_dim: int | None = None  # None: every attention block is one head as wide as its channels
    if cfg.num_heads > 1:
        if len(sites) > 1:
            raise DDPMError(f"cannot export num_heads={cfg.num_heads}: it splits attention over {sites} channels into "
                            "heads of different widths, but diffusers' UNet2DModel has one attention_head_dim for "
                            "all attention blocks")
        head_dim = sites[0] // cfg.num_heads
    shift = cfg.time_freq_shift
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": _diffusers_version(),
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "time_embedding_dim": None,
        "freq_shift": int(shift) if float(shift).is_integer() else shift,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": chans,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": cfg.downsample_padding,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "attention_head_dim": head_dim,
        "norm_num_groups": cfg.norm_groups,
        "attn_norm_num_groups": None,
        "norm_eps": cfg.norm_eps,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.conditional else None,
    }


def _unmappable(field: str, value: Any, why: str) -> DDPMError:
    return DDPMError(f"UNet2DModel config {field}={json.dumps(value)} does not map onto ddpm's UNet: {why}")


def unet_config_from_diffusers(config: dict[str, Any], *, null_class: bool = False) -> UNetConfig:
    """The :class:`UNetConfig` of a diffusers ``UNet2DModel`` config in the DDPM architecture.

    ``config`` is the parsed ``unet/config.json``; fields it leaves out take ``UNet2DModel``'s
    defaults, as in diffusers. ``null_class=True`` says that the last of ``num_class_embeds``
    embeddings is a null class (folders written by :func:`export_diffusers`), so the network
    has ``num_class_embeds - 1`` classes. Raises :class:`DDPMError` naming the first field
    whose value our UNet cannot compute: block types other than (Attn)DownBlock2D /
    (Attn)UpBlock2D or unmirrored ones, ``resnet_time_scale_shift`` other than default, learned
    variances (``out_channels != in_channels``), non-positional time embeddings, attention
    head widths that differ between blocks, class embeddings without a null class, and so on.
    """
    c = {**_UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise _unmappable("_class_name", config.get("_class_name"), "only UNet2DModel folders import")
    _check_fixed_fields(c)
    chans, attn = _block_layout(c)
    base = chans[0]
    groups = _check_layer_fields(c, attn, base)
    size = _sample_size(c)
    heads = _attention_heads(c, chans, attn)
    num_classes = _num_classes(c, null_class)
    try:
        return UNetConfig(
            image_size=size, in_channels=c["in_channels"], out_channels=c["out_channels"], base_channels=base,
            channel_mults=tuple(x // base for x in chans), num_res_blocks=c["layers_per_block"],
            attention_resolutions=tuple(size // 2 ** i for i, a in enumerate(attn) if a), num_heads=heads,
            dropout=float(c["dropout"]), norm_groups=groups, num_classes=num_classes, norm_eps=float(c["norm_eps"]),
            time_freq_shift=float(c["freq_shift"]), downsample_padding=c["downsample_padding"])
    except (ValueError, TypeError) as e:
        raise DDPMError(f"UNet2DModel config does not map onto ddpm's UNet: {e}") from None




def _check_fixed_fields(c: dict[str, Any]) -> None:
    """The fields whose value ddpm's architecture fixes."""
    fixed = [("center_input_sample", False, "ddpm models take inputs in [-1, 1] as they are"),
             ("time_embedding_type", "positional", "ddpm uses the sinusoidal (positional) time embedding"),
             ("mid_block_type", "UNetMidBlock2D", "the middle block is residual-attention-residual"),
             ("add_attention", True, "the middle block always attends"),
             ("resnet_time_scale_shift", "default", "residual blocks add the time embedding after conv1"),
             ("class_embed_type", None, "ddpm's class embedding is a learned table (num_class_embeds)")]
    for field, want, why in fixed:
        if c[field] != want:
            raise _unmappable(field, c[field], why)
    if c["act_fn"] not in ("silu", "swish"):
        raise _unmappable("act_fn", c["act_fn"], "ddpm's UNet uses SiLU")
    if c["mid_block_scale_factor"] != 1:
        raise _unmappable("mid_block_scale_factor", c["mid_block_scale_factor"], "ddpm's middle block does not rescale")


def _block_layout(c: dict[str, Any]) -> tuple[list[int], list[bool]]:
    """``(block widths, whether each level attends)`` of mirrored (Attn)Down/UpBlock2D stacks."""
    chans = c["block_out_channels"]
    down = [t[7:] if t.startswith("UNetRes") else t for t in c["down_block_types"]]
    up = [t[7:] if t.startswith("UNetRes") else t for t in c["up_block_types"]]
    if not (isinstance(chans, (list, tuple)) and chans and all(isinstance(x, int) and x > 0 for x in chans)):
        raise _unmappable("block_out_channels", chans, "expected a list of positive channel counts")
    if len(down) != len(chans) or len(up) != len(chans):
        raise _unmappable("down_block_types", c["down_block_types"],
                          f"expected one down and one up block per entry of block_out_channels ({len(chans)})")
    base = chans[0]
    if any(x % base for x in chans):
        raise _unmappable("block_out_channels", chans, f"every width must be a multiple of the first ({base})")
    for i, t in enumerate(down):
        if t not in ("DownBlock2D", "AttnDownBlock2D"):
            raise _unmappable("down_block_types", c["down_block_types"],
                              f"entry {i} ({t}) is neither DownBlock2D nor AttnDownBlock2D")
    for i, t in enumerate(up):
        if t not in ("UpBlock2D", "AttnUpBlock2D"):
            raise _unmappable("up_block_types", c["up_block_types"],
                              f"entry {i} ({t}) is neither UpBlock2D nor AttnUpBlock2D")
    attn = [t == "AttnDownBlock2D" for t in down]
    for i, t in enumerate(up):
        if (t == "AttnUpBlock2D") != attn[len(chans) - 1 - i]:
            raise _unmappable("up_block_types", c["up_block_types"],
                              f"ddpm's UNet attends at the same resolutions on both sides (down: {c['down_block_types']})")
    return chans, attn


def _check_layer_fields(c: dict[str, Any], attn: list[bool], base: int) -> int:
    """Resampling, embedding, normalisation and output fields; returns the norm groups."""
    if any(attn[:-1]) and c["downsample_type"] != "conv":
        raise _unmappable("downsample_type", c["downsample_type"], "ddpm downsamples with a strided convolution")
    if any(attn[1:]) and c["upsample_type"] != "conv":
        raise _unmappable("upsample_type", c["upsample_type"], "ddpm upsamples with nearest neighbours and a convolution")
    if c["downsample_padding"] not in (0, 1):
        raise _unmappable("downsample_padding", c["downsample_padding"], "expected 0 or 1")
    if c["time_embedding_dim"] not in (None, 4 * base):
        raise _unmappable("time_embedding_dim", c["time_embedding_dim"], f"ddpm's time embedding is 4 x {base} wide")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int):
        raise _unmappable("norm_num_groups", groups, "expected a number of groups")
    if c["attn_norm_num_groups"] not in (None, groups):
        raise _unmappable("attn_norm_num_groups", c["attn_norm_num_groups"],
                          f"ddpm's attention blocks normalise with norm_num_groups ({groups}) groups")
    if c["out_channels"] != c["in_channels"]:
        why = ("the network also predicts variances (learned-variance models)" if c["out_channels"] == 2 * c["in_channels"]
               else "the prediction must have the input's shape")
        raise _unmappable("out_channels", c["out_channels"], f"{why}; ddpm expects out_channels == in_channels")
    return groups


def _sample_size(c: dict[str, Any]) -> int:
    """The square training resolution in pixels."""
    size = c["sample_size"]
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int):
        raise _unmappable("sample_size", c["sample_size"], "expected the square training resolution in pixels")
    return size


def _attention_heads(c: dict[str, Any], chans: list[int], attn: list[bool]) -> int:
    """Heads per attention block (the same at every block)."""
    # Heads per attention block: diffusers splits C channels into C // attention_head_dim heads.
    head_dim = c["attention_head_dim"]
    sites = [x for x, a in zip(chans, attn) if a] + [chans[-1]]
    if head_dim is None:
        heads = 1
    else:
        if not isinstance(head_dim, int) or head_dim < 1:
            raise _unmappable("attention_head_dim", head_dim, "expected a positive integer or null")
        if any(x % head_dim for x in sites) or len({x // head_dim for x in sites}) > 1:
            raise _unmappable("attention_head_dim", head_dim,
                              f"ddpm needs the same number of heads, each head_dim wide, at every attention block "
                              f"(widths {sorted(set(sites))})")
        heads = sites[0] // head_dim
    return heads


def _num_classes(c: dict[str, Any], null_class: bool) -> int | None:
    """Classes of a conditional network (its last embedding is the null class), else None."""
    num_classes = None
    if c["num_class_embeds"] is not None:
        n = c["num_class_embeds"]
        if not null_class:
            raise _unmappable("num_class_embeds", n, "ddpm's conditional models reserve their last class embedding "
                              f"as the null class of classifier-free guidance, which only folders written by "
                              f"'ddpm export' ({EXPORT_META}) mark")
        if not isinstance(n, int) or n < 2:
            raise _unmappable("num_class_embeds", n, "expected at least one class plus the null class")
        num_classes = n - 1
    return num_classes


# -------------------------------------------------------------------------------- weights
def _blocks(cfg: UNetConfig) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module with weights; kind says how to map."""
    pairs = [("time_mlp.0", "time_embedding.linear_1", "time"), ("time_mlp.2", "time_embedding.linear_2", "plain"),
             ("conv_in", "conv_in", "plain")]
    if cfg.conditional:
        pairs.append(("class_emb", "class_embedding", "plain"))
    levels = len(cfg.channel_mults)
    for i in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"down.{i}.res.{j}", f"down_blocks.{i}.resnets.{j}", "res"))
            if _attends(cfg, i):
                pairs.append((f"down.{i}.attn.{j}", f"down_blocks.{i}.attentions.{j}", "attn"))
        if i != levels - 1:
            pairs.append((f"downsample.{i}.conv", f"down_blocks.{i}.downsamplers.0.conv", "plain"))
    pairs += [("mid_res1", "mid_block.resnets.0", "res"), ("mid_attn", "mid_block.attentions.0", "attn"),
              ("mid_res2", "mid_block.resnets.1", "res")]
    for k in range(levels):  # up block k works at level levels - 1 - k
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"up.{k}.res.{j}", f"up_blocks.{k}.resnets.{j}", "res"))
            if _attends(cfg, levels - 1 - k):
                pairs.append((f"up.{k}.attn.{j}", f"up_blocks.{k}.attentions.{j}", "attn"))
        if k != levels - 1:
            pairs.append((f"upsample.{k}.conv", f"up_blocks.{k}.upsamplers.0.conv", "plain"))
    pairs += [("norm_out", "conv_norm_out", "plain"), ("conv_out", "conv_out", "plain")]
    return pairs


def state_dict_to_diffusers(state_dict: dict[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our ``UNet(cfg).state_dict()`` renamed and reshaped into ``UNet2DModel``'s (see the module docstring).

    Tensors keep their dtype and device; each output tensor owns its memory (safetensors
    refuses shared storage). The attention ``qkv`` weight ``[3C, C, 1, 1]`` becomes
    ``to_q / to_k / to_v`` ``[C, C]`` each, ``proj`` ``[C, C, 1, 1]`` becomes ``to_out.0``
    ``[C, C]``. Raises :class:`DDPMError` if ``state_dict`` lacks a weight of ``cfg``'s network
    or holds one it does not have.
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in state_dict:
            raise DDPMError(f"the weights lack {name!r}, which the network of this config has")
        used.add(name)
        return state_dict[name]

    def put(name: str, t: torch.Tensor) -> None:
        out[name] = t.contiguous().clone()

    for ours, theirs, kind in _blocks(cfg):
        if kind == "attn":
            qkv_w, qkv_b = take(f"{ours}.qkv.weight"), take(f"{ours}.qkv.bias")
            ch = qkv_w.shape[1]
            for part, w, b in zip(("to_q", "to_k", "to_v"), qkv_w.reshape(3, ch, ch), qkv_b.reshape(3, ch)):
                put(f"{theirs}.{part}.weight", w)
                put(f"{theirs}.{part}.bias", b)
            put(f"{theirs}.to_out.0.weight", take(f"{ours}.proj.weight").reshape(ch, ch))
            put(f"{theirs}.to_out.0.bias", take(f"{ours}.proj.bias"))
            put(f"{theirs}.group_norm.weight", take(f"{ours}.norm.weight"))
            put(f"{theirs}.group_norm.bias", take(f"{ours}.norm.bias"))
        elif kind == "res":
            for a, b in _RES_NAMES.items():
                if a == "skip" and f"{ours}.skip.weight" not in state_dict:
                    continue  # equal widths: an identity skip, no weights
                put(f"{theirs}.{b}.weight", take(f"{ours}.{a}.weight"))
                put(f"{theirs}.{b}.bias", take(f"{ours}.{a}.bias"))
        else:
            put(f"{theirs}.weight", take(f"{ours}.weight"))
            if f"{ours}.bias" in state_dict:
                put(f"{theirs}.bias", take(f"{ours}.bias"))
    extra = sorted(set(state_dict) - used)
    if extra:
        raise DDPMError(f"the weights hold {len(extra)} tensor(s) this config's network lacks, e.g. {extra[0]!r}")
    return out


def _legacy_attention_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Folders saved by diffusers before 0.14 name the attention projections query / key / value /
    # proj_attn; diffusers still renames them on load, and so do we.
    renames = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for name, t in tensors.items():
        head, _, last = name.rpartition(".")
        path, _, module = head.rpartition(".")
        if ".attentions." in f".{path}" and module in renames:
            name = f"{path}.{renames[module]}.{last}"
        out[name] = t
    return out


def state_dict_from_diffusers(tensors: dict[str, torch.Tensor], config: dict[str, Any], *,
                              null_class: bool = False) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """``(UNetConfig, state dict)`` of our UNet from a ``UNet2DModel``'s weights and config.

    ``tensors`` are the safetensors contents (current or pre-0.14 attention names);
    ``config`` and ``null_class`` are as for :func:`unet_config_from_diffusers`. The weights
    come back as float32 CPU tensors that ``UNet(cfg).load_state_dict`` accepts. Raises
    :class:`DDPMError` for an unmappable config, and for missing, unexpected or wrongly
    shaped weights (naming the first one).
    """
    cfg = unet_config_from_diffusers(config, null_class=null_class)
    tensors = _legacy_attention_names(tensors)
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        expected = state_dict_to_diffusers(UNet(cfg).state_dict(), cfg)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise DDPMError(f"the UNet2DModel weights lack {len(missing)} tensor(s) its config implies, e.g. {missing[0]!r}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise DDPMError(f"the UNet2DModel weights hold {len(extra)} tensor(s) its config does not explain, "
                        f"e.g. {extra[0]!r}; the folder is not in the DDPM architecture")
    for k, t in expected.items():
        if tuple(tensors[k].shape) != tuple(t.shape):
            raise DDPMError(f"UNet2DModel weight {k!r} has shape {list(tensors[k].shape)}; its config implies "
                            f"{list(t.shape)}")
        if not tensors[k].is_floating_point():
            raise DDPMError(f"UNet2DModel weight {k!r} is {tensors[k].dtype}, expected floating point")
    src = {k: t.detach().to("cpu", torch.float32) for k, t in tensors.items()}
    flip = bool(config.get("flip_sin_to_cos", _UNET2D_DEFAULTS["flip_sin_to_cos"]))
    out: dict[str, torch.Tensor] = {}
    for ours, theirs, kind in _blocks(cfg):
        if kind == "attn":
            ch = src[f"{theirs}.to_q.weight"].shape[0]
            out[f"{ours}.qkv.weight"] = torch.cat(
                [src[f"{theirs}.{p}.weight"] for p in ("to_q", "to_k", "to_v")]).reshape(3 * ch, ch, 1, 1)
            out[f"{ours}.qkv.bias"] = torch.cat([src[f"{theirs}.{p}.bias"] for p in ("to_q", "to_k", "to_v")])
            out[f"{ours}.proj.weight"] = src[f"{theirs}.to_out.0.weight"].reshape(ch, ch, 1, 1).clone()
            out[f"{ours}.proj.bias"] = src[f"{theirs}.to_out.0.bias"].clone()
            out[f"{ours}.norm.weight"] = src[f"{theirs}.group_norm.weight"].clone()
            out[f"{ours}.norm.bias"] = src[f"{theirs}.group_norm.bias"].clone()
        elif kind == "res":
            for a, b in _RES_NAMES.items():
                if f"{theirs}.{b}.weight" in src:
                    out[f"{ours}.{a}.weight"] = src[f"{theirs}.{b}.weight"].clone()
                    out[f"{ours}.{a}.bias"] = src[f"{theirs}.{b}.bias"].clone()
        else:
            for p in ("weight", "bias"):
                if f"{theirs}.{p}" in src:
                    out[f"{ours}.{p}"] = src[f"{theirs}.{p}"].clone()
    if flip:
        # diffusers' flipped embedding is [cos, sin]; ours is [sin, cos]: swap the input columns.
        w, half = out["time_mlp.0.weight"], cfg.base_channels // 2
        out["time_mlp.0.weight"] = torch.cat([w[:, half:2 * half], w[:, :half], w[:, 2 * half:]], dim=1)
    return cfg, out


# ------------------------------------------------------------------------------ schedules
def scheduler_config_to_diffusers(schedule: Schedule, prediction: str) -> dict[str, Any]:
    """A ``DDPMScheduler`` config (``scheduler/scheduler_config.json``) for ``schedule`` and target ``prediction``.

    The DDPM paper's linear schedule and the cosine schedule of Nichol & Dhariwal with its
    usual ``s = 0.008``, ``max_beta = 0.999`` are written by name (``linear``,
    ``squaredcos_cap_v2``); every other schedule (sigmoid, log-SNR shifted, zero terminal SNR,
    custom) as its exact betas in ``trained_betas`` (diffusers' ``sigmoid`` is a different
    schedule). diffusers keeps its tables in float32, so its ``alphas_cumprod`` equals ours to
    float32 rounding. ``prediction`` (``eps`` / ``v`` / ``x0``) becomes ``prediction_type``
    (``epsilon`` / ``v_prediction`` / ``sample``); sampling settings are those of ``ddpm sample
    --sampler ancestral``: fixed small variances, x0 clipped to [-1, 1], linspace timesteps.
    Raises :class:`DDPMError` for an unknown ``prediction``.
    """
    if prediction not in PREDICTION_TYPES:
        raise DDPMError(f"unknown prediction {prediction!r}; expected one of {', '.join(PREDICTION_TYPES)}")
    p = schedule.params
    plain = not p.get("logsnr_shift") and not p.get("zero_terminal_snr")
    betas: dict[str, Any]
    if schedule.kind == "linear" and plain:
        betas = {"beta_schedule": "linear", "beta_start": p["beta_start"], "beta_end": p["beta_end"], "trained_betas": None}
    elif schedule.kind == "cosine" and plain and p.get("s") == 0.008 and p.get("max_beta") == 0.999:
        betas = {"beta_schedule": "squaredcos_cap_v2", "beta_start": 0.0001, "beta_end": 0.02, "trained_betas": None}
    else:
        b = schedule.betas.tolist()
        betas = {"beta_schedule": "linear", "beta_start": b[0], "beta_end": b[-1], "trained_betas": b}
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": _diffusers_version(),
        "num_train_timesteps": schedule.T,
        **betas,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": PREDICTION_TYPES[prediction],
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "sample_max_value": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def schedule_from_diffusers(config: dict[str, Any]) -> tuple[Schedule, str]:
    """``(schedule, prediction)`` from a diffusers scheduler config (DDPMScheduler, DDIMScheduler, ...).

    Reads ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``,
    ``squaredcos_cap_v2``, diffusers' GeoDiff ``sigmoid``) with ``beta_start`` / ``beta_end``,
    or ``trained_betas``, then ``rescale_betas_zero_snr`` and ``prediction_type``; missing fields
    take DDPMScheduler's defaults. The betas are recomputed in float64 from the same formulas.
    Raises :class:`DDPMError` naming the field for anything else, including learned variances.
    """
    c = {**_SCHEDULER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}

    def bad(field: str, why: str) -> DDPMError:
        return DDPMError(f"scheduler config {field}={json.dumps(c[field])} does not map: {why}")

    T = c["num_train_timesteps"]
    if not isinstance(T, int) or T < 2:
        raise bad("num_train_timesteps", "expected at least 2 steps")
    kind = c["beta_schedule"]
    zero = bool(c["rescale_betas_zero_snr"])
    try:
        if c["trained_betas"] is not None:
            betas = torch.as_tensor(c["trained_betas"], dtype=torch.float64)
            if betas.ndim != 1 or betas.numel() != T:
                raise bad("trained_betas", f"expected {T} values (num_train_timesteps)")
            if zero:
                betas = _reshape_abar(betas, 0.0, True)
            schedule = Schedule.from_betas(betas)
        elif kind == "linear":
            schedule = Schedule.linear(T, float(c["beta_start"]), float(c["beta_end"]), zero_terminal_snr=zero)
        elif kind == "squaredcos_cap_v2":
            schedule = Schedule.cosine(T, zero_terminal_snr=zero)
        elif kind in ("scaled_linear", "sigmoid"):
            start, end = float(c["beta_start"]), float(c["beta_end"])
            if kind == "scaled_linear":
                betas = torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2
            else:
                betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (end - start) + start
            schedule = Schedule.from_betas(_reshape_abar(betas, 0.0, True) if zero else betas)
        else:
            raise bad("beta_schedule", "expected linear, scaled_linear, squaredcos_cap_v2, sigmoid or trained_betas")
    except (ValueError, TypeError) as e:  # betas outside (0, 1), or fields that are not numbers
        raise DDPMError(f"scheduler config gives no valid schedule: {e}") from None
    if str(c["variance_type"]).startswith("learned"):
        raise bad("variance_type", "the network would predict variances; ddpm samples with fixed ones")
    by_type = {v: k for k, v in PREDICTION_TYPES.items()}
    if c["prediction_type"] not in by_type:
        raise bad("prediction_type", f"expected one of {', '.join(by_type)}")
    return schedule, by_type[c["prediction_type"]]


# ------------------------------------------------------------------------------ folders
@contextmanager
def _new_folder(target: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside ``target`` that becomes ``target`` in one rename when the block
    succeeds, and is removed when it fails: readers never see a half-written folder."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DDPMError(f"{what} {str(target)!r} already exists; choose a new folder (or remove it)")
    parent = target.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent))
    except OSError as e:
        raise DDPMError(f"cannot write {what} {str(target)!r}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp's 0700 -> what mkdir would give
        if target.is_dir():
            target.rmdir()  # empty (checked above); rename cannot replace a folder everywhere
        os.rename(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DDPMError(f"cannot write {what} {str(target)!r}: {e.strerror or e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except OSError as e:
        raise DDPMError(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None
    except ValueError as e:
        raise DDPMError(f"{what} {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise DDPMError(f"{what} {str(path)!r} must hold a JSON object")
    return obj


# ------------------------------------------------------------------------------- export
def export_diffusers(run_dir: str | Path, out_dir: str | Path, *, use_ema: bool = True,
                     checkpoint: str | Path | None = None) -> Path:
    """Write run ``run_dir`` as a diffusers ``DDPMPipeline`` folder ``out_dir``; returns its path.

    The folder (layout in the module docstring) holds the EMA weights (``use_ema=False``: the
    raw weights; a run without EMA weights exports its raw ones) of the newest checkpoint, or
    of ``checkpoint``, as a float32 ``UNet2DModel``, and the run's schedule and target as a
    ``DDPMScheduler`` (:func:`scheduler_config_to_diffusers`). ``ddpm_export.json`` records the
    source, the step, which weights, the exact schedule and, for conditional runs, the class
    names and null class (see the module docstring for what conditional exports map to).
    ``out_dir`` must not exist or be empty; it is built beside itself and renamed into place.
    Raises :class:`DDPMError` for an unreadable run, an unexportable attention layout, or an
    unwritable ``out_dir``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DDPMError(f"export folder {str(out_dir)!r} already exists; choose a new folder (or remove it)")
    # Before the weights are read: the folder is built beside out_dir and renamed into place.
    check_writable(out_dir.absolute().parent, "the export folder's parent")
    run = load_run(run_dir, "cpu", checkpoint=checkpoint)
    ema = use_ema and run.ema_model is not None
    model = run.ema_model if ema else run.model
    cfg = model.config
    unet_config = unet_config_to_diffusers(cfg)
    tensors = state_dict_to_diffusers({k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()},
                                      cfg)
    scheduler = scheduler_config_to_diffusers(run.schedule, run.prediction)
    meta = {
        "format": "ddpm-diffusers-export-1",
        "source_run": Path(run_dir).absolute().name,  # the name only: exports get shared, local paths need not
        "checkpoint": run.checkpoint.name,
        "step": run.step,
        "weights": "ema" if ema else "raw",
        "prediction": run.prediction,
        "schedule": run.schedule.to_dict(),
        "model": cfg.to_dict(),
        "classes": run.classes if cfg.conditional else None,
        "null_class": cfg.null_class,
    }
    version = unet_config["_diffusers_version"]
    with _new_folder(out_dir, "export folder") as tmp:
        atomic_write_json(tmp / "model_index.json", {"_class_name": "DDPMPipeline", "_diffusers_version": version,
                                               "scheduler": ["diffusers", "DDPMScheduler"],
                                               "unet": ["diffusers", "UNet2DModel"]})
        atomic_write_json(tmp / "unet" / "config.json", unet_config)
        save_safetensors(tmp / "unet" / WEIGHTS, tensors, {"format": "pt"})
        atomic_write_json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        atomic_write_json(tmp / EXPORT_META, meta)
    return out_dir


# ------------------------------------------------------------------------------- import
def _find_unet(src: Path) -> tuple[Path, Path]:
    """(the UNet2DModel folder, the folder around it) of a pipeline folder or a bare UNet folder."""
    if not src.is_dir():
        raise DDPMError(f"diffusers folder {str(src)!r} does not exist or is not a folder")
    if (src / "unet" / "config.json").is_file():
        return src / "unet", src
    if (src / "config.json").is_file():
        return src, src.parent if src.name == "unet" else src
    raise DDPMError(f"{str(src)!r} has neither unet/config.json nor config.json; expected a diffusers DDPMPipeline "
                    "folder or a UNet2DModel folder")


def _read_weights(unet_dir: Path) -> dict[str, torch.Tensor]:
    """The UNet's tensors from safetensors only (single file, an index of shards, or one variant)."""
    from safetensors.torch import load_file

    single = unet_dir / WEIGHTS
    index = unet_dir / f"{WEIGHTS}.index.json"
    files: list[Path]
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index, "weights index").get("weight_map", {})
        files = [unet_dir / name for name in sorted(set(weight_map.values()))]
    else:
        variants = sorted(p for p in unet_dir.glob("diffusion_pytorch_model.*.safetensors"))
        pickles = sorted(unet_dir.glob("diffusion_pytorch_model*.bin"))
        if len(variants) == 1:
            files = variants
        elif pickles:
            b = pickles[0]
            raise DDPMError(
                f"{str(b)!r} is a pickle, which can run code when loaded; ddpm reads only safetensors. If you trust its "
                f"source, convert it once: python -c \"import torch; from safetensors.torch import save_file; "
                f"save_file({{k: v.contiguous() for k, v in torch.load('{b}', weights_only=True).items()}}, "
                f"'{unet_dir / WEIGHTS}')\"")
        else:
            raise DDPMError(f"no {WEIGHTS} in {str(unet_dir)!r}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for truncated or foreign files
            raise DDPMError(f"cannot read weights {str(f)!r}: {first_line(e)}") from None
    return tensors


def _find_scheduler(unet_dir: Path, root: Path) -> Path | None:
    for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json",
              unet_dir.parent / "scheduler" / "scheduler_config.json"):
        if p.is_file():
            return p
    return None


def import_diffusers(src: str | Path, out_dir: str | Path, *, scheduler: str | Path | None = None) -> Path:
    """Write a run folder ``out_dir`` from a diffusers ``UNet2DModel`` folder ``src``; returns its path.

    ``src`` is a pipeline folder (``src/unet/`` + ``src/scheduler/scheduler_config.json``, as
    written by :func:`export_diffusers` or ``DDPMPipeline.save_pretrained``) or a bare UNet
    folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, with
    ``scheduler_config.json`` beside it or in ``../scheduler/``); ``scheduler`` names a
    scheduler config explicitly. Weights are read with safetensors only; a ``.bin`` pickle is
    refused with the command that converts it. The run (``config.json`` + a step-0 checkpoint
    whose model and EMA weights are the imported ones, float32) is sampled by ``ddpm sample``,
    described by ``ddpm info``, and fine-tuned by ``ddpm train --out RUN --resume --data ...``
    (its architecture and schedule are read from the run: ``model`` is ``"imported"``; the
    first training session may choose every other option). Folders written by
    :func:`export_diffusers` get their class names and exact schedule back.
    Raises :class:`DDPMError` for a missing or unmappable config (naming the field and value),
    unreadable or mismatched weights, or an ``out_dir`` that exists and is not empty.
    """
    src, out_dir = Path(src), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DDPMError(f"--out {str(out_dir)!r} already exists; choose a new run folder")
    # Before the weights are read: the run is built beside out_dir and renamed into place.
    check_writable(out_dir.absolute().parent, "--out's parent folder")
    unet_dir, root = _find_unet(src)
    config = _read_json(unet_dir / "config.json", "UNet config")
    meta_path = root / EXPORT_META
    meta = _read_json(meta_path, "export record") if meta_path.is_file() else {}
    sched_path = Path(scheduler) if scheduler is not None else _find_scheduler(unet_dir, root)
    if sched_path is None:
        raise DDPMError(f"no scheduler_config.json found with {str(src)!r} (looked in scheduler/ and beside the UNet); "
                        "pass --scheduler FILE, e.g. the DDPM paper's: beta_schedule linear, 1e-4 to 0.02, "
                        "1000 steps, prediction_type epsilon")
    schedule, prediction = schedule_from_diffusers(_read_json(sched_path, "scheduler config"))
    n_embeds = config.get("num_class_embeds")
    classes = meta.get("classes")
    null_class = (n_embeds is not None and isinstance(classes, list) and len(classes) == n_embeds - 1
                  and meta.get("null_class") == n_embeds - 1)
    cfg, state = state_dict_from_diffusers(_read_weights(unet_dir), config, null_class=null_class)
    try:
        # Our export also recorded the schedule exactly (kind and parameters): keep it when it is
        # the one the scheduler config describes, to float32 rounding.
        exact = Schedule.from_dict(meta["schedule"]) if "schedule" in meta else None
    except (ValueError, TypeError, KeyError):
        exact = None
    if exact is not None and exact.T == schedule.T and torch.allclose(
            exact.alphas_cumprod, schedule.alphas_cumprod, rtol=1e-5, atol=1e-7):
        schedule = exact
    with torch.device("meta"):  # names and shapes: the mapping covers exactly the network's weights
        UNet(cfg).load_state_dict(state, strict=True, assign=True)

    p = schedule.params
    train = TrainConfig(
        data="", out=str(out_dir), conditional=cfg.conditional, image_size=cfg.image_size, model=IMPORTED,
        base_channels=cfg.base_channels, dropout=cfg.dropout, schedule=schedule.kind,
        logsnr_shift=float(p.get("logsnr_shift", 0.0)), zero_terminal_snr=schedule.zero_terminal_snr,
        timesteps=schedule.T, prediction=prediction)
    run_config = RunConfig(
        model=cfg, schedule=schedule, prediction=prediction, classes=list(classes) if cfg.conditional else None,
        num_images=None, train=asdict(train),
        imported={"from": str(src.absolute()), "format": "diffusers UNet2DModel",
                  "diffusers_version": config.get("_diffusers_version"), "scheduler": str(sched_path.absolute())})
    # No optimiser state and no EMA settings: the first training session starts them afresh
    # from its own options.
    ckpt_state = {"model": state, "ema": {"weights": state, "num_updates": 0}, "train_seconds": 0.0}
    with _new_folder(out_dir, "--out") as tmp:
        run_config.write(RunFolder(tmp))
        save_checkpoint(tmp, 0, run_config, ckpt_state, keep=1)
    return out_dir
