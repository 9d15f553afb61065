"""Small shared pieces of the network: time folding and the binary conv unit."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import BiConv2d, BinaryActivation, LearnableBias


def per_frame(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a per-frame function to (B, T, C, H, W) by folding T into the batch.

    4-D inputs (N, C, H, W) are passed through unchanged; 5-D inputs are flattened
    to (B*T, C, H, W), mapped, and unflattened to (B, T, C', H', W').
    """
    if x.ndim == 5:
        b, t = x.shape[:2]
        y = fn(x.flatten(0, 1))
        return y.unflatten(0, (b, t))
    return fn(x)


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (N, C, H, W) to ``size`` = (h, w), align_corners=False."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def upsample2x(x: Tensor) -> Tensor:
    """Bilinear x2 upsampling of (N, C, H, W), align_corners=False."""
    return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


def binary_unit(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    bias: bool = False,
) -> list[nn.Module]:
    """``[LearnableBias(in), sign, BiConv2d(k)]``: the layers every binary conv starts with.

    Returned as a list so that callers splice it into an ``nn.Sequential`` whose
    indices match the official state_dict (``.0`` the bias, ``.2`` the conv).
    """
    return [
        LearnableBias(in_channels),
        BinaryActivation(),
        BiConv2d(in_channels, out_channels, kernel_size, stride=stride, bias=bias),
    ]


def binary_conv_bn_prelu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """LB -> sign -> BiConv2d(k) -> BN -> LB -> PReLU (indices 0..5 as in the checkpoints)."""
    return nn.Sequential(
        *binary_unit(in_channels, out_channels, kernel_size),
        nn.BatchNorm2d(out_channels),
        LearnableBias(out_channels),
        nn.PReLU(out_channels),
    )
