"""The UNet's convolution: ``F.conv2d`` with float32 weight gradients for small convolutions
under CPU bf16 autocast.

oneDNN's bf16 weight-gradient kernels for convolutions with few output positions (8x8 maps at
batch 16, strided convolutions) are fine on an idle machine, but when the cores are shared with
another process they became 10-40x slower (their threads appear to wait for each other by
spinning), which made a whole bf16 training step slower than float32. :func:`conv2d` computes
just those weight gradients in float32: a few percent slower on an idle machine, more than 2x
faster on a busy one (``docs/benchmarks.md``). The forward pass and the input gradient stay bf16.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["SMALL_CONV_POSITIONS", "conv2d", "Conv2d", "use_fp32_weight_grad_for_small_convs", "set_small_conv_weight_grad"]

# Output positions (batch x height x width) at or below which a bf16 CPU convolution gets its
# weight gradient in float32; strided convolutions always do. Measured on AMD EPYC (Zen 5),
# oneDNN 3.12: 16x8x8 = 1024 and 4x16x16 = 1024 collapse under contention, 16x12x12 = 2304 does not.
SMALL_CONV_POSITIONS = 2048


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    fp32_small_weight_grad: bool = True,
) -> torch.Tensor:
    """``F.conv2d``, except that under CPU bf16 autocast, for small or strided outputs, the weight
    gradient is computed in float32 (see the module docstring; the forward pass and the input
    gradient stay bf16, and the result is the same function to bf16 rounding).
    ``fp32_small_weight_grad=False`` is plain ``F.conv2d`` everywhere (oneDNN's bf16 weight
    gradients, for comparison in ``benchmarks/speed.py``)."""
    if (fp32_small_weight_grad and x.device.type == "cpu" and torch.is_grad_enabled() and weight.requires_grad
            and _cpu_autocast_dtype() == torch.bfloat16):
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        k = weight.shape[-2:]
        oh = (x.shape[-2] + 2 * padding[0] - dilation[0] * (k[0] - 1) - 1) // stride[0] + 1
        ow = (x.shape[-1] + 2 * padding[1] - dilation[1] * (k[1] - 1) - 1) // stride[1] + 1
        if max(stride) > 1 or x.shape[0] * oh * ow <= SMALL_CONV_POSITIONS:
            return _Bf16ConvFp32WeightGrad.apply(x.to(torch.bfloat16), weight, bias, stride, padding, dilation, groups)
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters, same function) that convolves through :func:`conv2d`, so its
    bf16 weight gradients on CPU are taken in float32 where oneDNN's bf16 kernels stall.
    Its ``fp32_small_weight_grad`` attribute (default True) is :func:`conv2d`'s switch;
    :func:`set_small_conv_weight_grad` sets it for a whole model."""

    fp32_small_weight_grad = True

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros" or isinstance(self.padding, str):
            return super()._conv_forward(input, weight, bias)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups,
                      self.fp32_small_weight_grad)


def use_fp32_weight_grad_for_small_convs(model: nn.Module) -> int:
    """Turn every plain ``nn.Conv2d`` of ``model`` into a :class:`Conv2d`, in place; returns how many.

    Only the class changes (parameters, buffers and state_dict keys stay), so this gives any
    model, e.g. a peer's UNet in the benchmark, the same float32 weight gradients for small
    convolutions under CPU bf16 autocast that :class:`ddpm.UNet` has built in.
    """
    n = 0
    for m in model.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = Conv2d
            n += 1
    return n


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The CPU autocast dtype if CPU autocast is on, else None."""
    try:
        if not torch.is_autocast_enabled("cpu"):
            return None
        return torch.get_autocast_dtype("cpu")
    except TypeError:  # PyTorch < 2.4 spelling
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


class _Bf16ConvFp32WeightGrad(torch.autograd.Function):
    """bf16 convolution whose weight (and bias) gradient is computed in float32."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                groups: int) -> torch.Tensor:
        w16 = weight.to(torch.bfloat16)
        b16 = None if bias is None else bias.to(torch.bfloat16)
        ctx.save_for_backward(x, w16)
        ctx.conv = (list(stride), list(padding), list(dilation), groups)
        ctx.bias_shape = None if bias is None else list(bias.shape)
        with torch.autocast("cpu", enabled=False):
            return torch.nn.functional.conv2d(x, w16, b16, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w16 = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # bf16, as plain autocast would
            gx = torch.ops.aten.convolution_backward(gy, x, w16, None, stride, padding, dilation, False, [0, 0],
                                                     groups, [True, False, False])[0]
        want_w, want_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2] and ctx.bias_shape is not None
        if want_w or want_b:
            gy32 = gy.float()
            _, gw, gb = torch.ops.aten.convolution_backward(gy32, x.float(), w16.float(), ctx.bias_shape, stride,
                                                            padding, dilation, False, [0, 0], groups,
                                                            [False, want_w, want_b])
        return gx, gw, gb, None, None, None, None




def set_small_conv_weight_grad(model: nn.Module, enabled: bool) -> int:
    """Set the float32 weight-gradient switch of every :class:`Conv2d` of ``model`` (True: the
    default; False: oneDNN's bf16 weight gradients, for comparison); returns how many it set."""
    n = 0
    for m in model.modules():
        if isinstance(m, Conv2d):
            m.fp32_small_weight_grad = enabled
            n += 1
    return n
