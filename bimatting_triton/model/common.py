"""Small shared pieces of the network: time folding and the binary conv unit."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import BiConv2d, BinaryActivation, LearnableBias


def per_frame(fn: Callable[..., Tensor | tuple[Tensor, ...]], *xs: Tensor):
    """Apply a per-frame function to (B, T, C, H, W) tensors by folding T into the batch.

    All ``xs`` share their leading dims. 4-D inputs (N, C, H, W) are passed through
    unchanged; 5-D inputs are flattened to (B*T, C, H, W), mapped, and ``fn``'s output
    (a tensor or a tuple of tensors) unflattened to (B, T, ...).
    """
    if xs[0].ndim != 5:
        return fn(*xs)
    b, t = xs[0].shape[:2]
    out = fn(*(x.flatten(0, 1) for x in xs))
    if isinstance(out, Tensor):
        return out.unflatten(0, (b, t))
    return tuple(o.unflatten(0, (b, t)) for o in out)


class Projection(nn.Module):
    """Float 1x1 conv head with bias, per frame (``project_mat``: 16 -> 4, ``project_seg``: 16 -> 1).

    (.., Cin, H, W) -> (.., Cout, H, W); state_dict key ``conv`` (as RVM's and BiMatting's).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return per_frame(self.conv, x)


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
