"""BiRecurrentDecoder (``decoder``): recurrent binary decoder with the incoherence mask.

All tensors here are 5-D, (B, T, C, H, W); recurrent states are 4-D, (B, C, H, W).
The decoder's 3x3 binary branches only matter where the *incoherence mask* is set
(the pixels near the coarse alpha's edges): every decode level computes
``branch3x3 * mask + branch1x1`` (SPEC §2). The mask is per frame and per batch item.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import LearnableBias
from .common import binary_conv_bn_prelu, binary_unit, per_frame, resize, upsample2x

MASK_THRESHOLD = 0.01


def incoherence_mask(pha_coarse: Tensor) -> Tensor:
    """Mask of the pixels where the coarse alpha's support has an edge.

    ``pha_coarse``: (N, 1, h, w) coarse alpha in [0, 1]. The support ``m = (pha > 0)``
    is blurred by a bilinear round trip through half resolution; where the blur
    differs from ``m`` by at least 0.01 the pixel is "incoherent". Returns (N, 1, h, w)
    of 0./1. in float32: the published network builds the mask with ``.float()`` and
    resizes it in float32 whatever the model's dtype, and so does this one (callers cast
    the resized masks to the activations' dtype). Sizes below 2 keep one pixel in the
    round trip; the published code fails on them.
    """
    h, w = pha_coarse.shape[-2:]
    # (pha > 0).float() and (|support - blurred| >= threshold).float(), each comparison
    # written straight into a float32 tensor: the same values, two copy kernels fewer.
    support = torch.empty(pha_coarse.shape, dtype=torch.float32, device=pha_coarse.device)
    torch.gt(pha_coarse, 0, out=support)
    blurred = resize(resize(support, (max(h // 2, 1), max(w // 2, 1))), (h, w))
    return (support - blurred).abs_().ge_(MASK_THRESHOLD)


def pool_source(x: Tensor) -> Tensor:
    """AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) on (N, C, H, W)."""
    return F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)


def _crop_upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """x2 bilinear upsampling of (B, T, C, h, w), cropped to ``size`` (H, W)."""
    h, w = size
    return per_frame(lambda v: upsample2x(v)[..., :h, :w], x)


class ConvGRU(nn.Module):
    """Binary convolutional GRU of the bottleneck (``decode4.gru``).

    ``ih``: LB -> sign -> BiConv3x3(2c -> 2c, bias) -> sigmoid gives (reset, update);
    ``hh``: LB -> sign -> BiConv3x3(2c -> c, bias) -> tanh gives the candidate.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.ih = nn.Sequential(*binary_unit(2 * channels, 2 * channels, 3, bias=True), nn.Sigmoid())
        self.hh = nn.Sequential(*binary_unit(2 * channels, channels, 3, bias=True), nn.Tanh())

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        """One frame: x, h (N, c, H, W) -> new h (N, c, H, W)."""
        reset, update = self.ih(torch.cat([x, h], dim=1)).split(self.channels, dim=1)
        candidate = self.hh(torch.cat([x, reset * h], dim=1))
        return (1 - update) * h + update * candidate

    def forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, T, c, H, W), h (B, c, H, W) or None (zeros) -> (outputs (B, T, c, H, W), last h)."""
        if h is None:
            h = x.new_zeros(x.shape[0], *x.shape[2:])
        outputs = []
        for t in range(x.shape[1]):
            h = self.step(x[:, t], h)
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


def _gated_gru_branch(in_channels: int, out_channels: int, kernel_size: int, activation: nn.Module) -> nn.Sequential:
    """LB -> sign -> BiConv(k, bias) -> LB -> activation (``gru.ih`` / ``ih_1x1`` / ``hh`` / ``hh_1x1``)."""
    return nn.Sequential(
        *binary_unit(in_channels, out_channels, kernel_size, bias=True),
        LearnableBias(out_channels),
        activation,
    )


class MaskedConvGRU(nn.Module):
    """ConvGRU of the upsampling blocks: 3x3 branches gated by the mask, plus 1x1 branches.

    Per frame with mask m (N, 1, H, W):
    ``(r, z) = ih(g) * m + ih_1x1(g)`` with g = [x, h];
    ``cand = hh(g') * m + hh_1x1(g')`` with g' = [x, r * h]; ``h = (1 - z) h + z cand``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        c2 = 2 * channels
        self.ih = _gated_gru_branch(c2, c2, 3, nn.Sigmoid())
        self.ih_1x1 = _gated_gru_branch(c2, c2, 1, nn.Sigmoid())
        self.hh = _gated_gru_branch(c2, channels, 3, nn.Tanh())
        self.hh_1x1 = _gated_gru_branch(c2, channels, 1, nn.Tanh())

    def step(self, x: Tensor, h: Tensor, mask: Tensor) -> Tensor:
        """One frame: x, h (N, c, H, W), mask (N, 1, H, W) -> new h (N, c, H, W)."""
        g = torch.cat([x, h], dim=1)
        gates = self.ih(g) * mask + self.ih_1x1(g)
        reset, update = gates.split(self.channels, dim=1)
        g = torch.cat([x, reset * h], dim=1)
        candidate = self.hh(g) * mask + self.hh_1x1(g)
        return (1 - update) * h + update * candidate

    def forward(self, x: Tensor, h: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, T, c, H, W), h (B, c, H, W) or None, mask (B, T, 1, H, W) -> (outputs, last h)."""
        if h is None:
            h = x.new_zeros(x.shape[0], *x.shape[2:])
        outputs = []
        for t in range(x.shape[1]):
            h = self.step(x[:, t], h, mask[:, t])
            outputs.append(h)
        return torch.stack(outputs, dim=1), h


class BottleneckBlock(nn.Module):
    """``decode4``: GRU on the second half of the 128 ASPP channels, and the coarse head.

    ``conv`` (LB -> sign -> BiConv3x3 128 -> 16 -> BN -> LB -> PReLU) makes the 16-channel
    coarse features from which the coarse alpha and the incoherence mask are projected.
    """

    def __init__(self, channels: int = 128, coarse_channels: int = 16):
        super().__init__()
        self.channels = channels
        self.gru = ConvGRU(channels // 2)
        self.conv = binary_conv_bn_prelu(channels, coarse_channels, 3)

    def forward(self, x: Tensor, r: Tensor | None) -> tuple[Tensor, Tensor]:
        a, b = x.split(self.channels // 2, dim=2)
        b, r = self.gru(b, r)
        return torch.cat([a, b], dim=2), r

    def coarse(self, x: Tensor) -> Tensor:
        """(B, T, 128, h, w) -> coarse features (B, T, 16, h, w)."""
        return per_frame(self.conv, x)


class UpsamplingBlock(nn.Module):
    """``decode3/2/1``: upsample, concat skip and source, masked 3x3 + 1x1 binary convs, GRU."""

    def __init__(self, in_channels: int, skip_channels: int, src_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        cat_channels = in_channels + skip_channels + src_channels
        self.conv = binary_conv_bn_prelu(cat_channels, out_channels, 3)
        self.conv_1x1 = binary_conv_bn_prelu(cat_channels, out_channels, 1)
        self.gru = MaskedConvGRU(out_channels // 2)

    def forward(self, x: Tensor, f: Tensor, s: Tensor, r: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,T,Cin,h,w), f (B,T,Cskip,H,W), s (B,T,3,H,W), mask (B,T,1,H,W) -> (B,T,Cout,H,W), r."""
        x = _crop_upsample(x, s.shape[-2:])
        y = torch.cat([x, f, s], dim=2)
        y = per_frame(self.conv, y) * mask + per_frame(self.conv_1x1, y)
        a, b = y.split(self.out_channels // 2, dim=2)
        b, r = self.gru(b, r, mask)
        return torch.cat([a, b], dim=2), r


def _output_branch(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """LB -> sign -> BiConv(k) -> BN -> ReLU -> float Conv(k, no bias) -> BN -> ReLU."""
    return nn.Sequential(
        *binary_unit(in_channels, out_channels, kernel_size),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
        nn.Conv2d(out_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class OutputBlock(nn.Module):
    """``decode0``: upsample to the source size, concat the source, masked 3x3 + 1x1 branches."""

    def __init__(self, in_channels: int, src_channels: int, out_channels: int):
        super().__init__()
        self.conv = _output_branch(in_channels + src_channels, out_channels, 3)
        self.conv_1x1 = _output_branch(in_channels + src_channels, out_channels, 1)

    def forward(self, x: Tensor, s: Tensor, mask: Tensor) -> Tensor:
        """x (B,T,Cin,h,w), s (B,T,3,H,W), mask (B,T,1,H,W) -> (B,T,Cout,H,W)."""
        x = _crop_upsample(x, s.shape[-2:])
        y = torch.cat([x, s], dim=2)
        return per_frame(self.conv, y) * mask + per_frame(self.conv_1x1, y)


class BiRecurrentDecoder(nn.Module):
    """The decoder: bottleneck GRU, coarse alpha -> incoherence mask, three upsampling blocks, output block."""

    def __init__(self):
        super().__init__()
        self.decode4 = BottleneckBlock(128, 16)
        self.decode3 = UpsamplingBlock(128, 64, 3, 80)
        self.decode2 = UpsamplingBlock(80, 32, 3, 40)
        self.decode1 = UpsamplingBlock(40, 16, 3, 32)
        self.decode0 = OutputBlock(32, 3, 16)

    def forward(
        self,
        s0: Tensor,
        f1: Tensor,
        f2: Tensor,
        f3: Tensor,
        f4: Tensor,
        r1: Tensor | None,
        r2: Tensor | None,
        r3: Tensor | None,
        r4: Tensor | None,
        project_coarse: Callable[[Tensor], Tensor],
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Decode one clip.

        ``s0`` (B, T, 3, H, W) the (downsampled) source, ``f1..f4`` the backbone/ASPP
        features (B, T, C, h, w), ``r1..r4`` states or None, ``project_coarse`` the model's
        ``project_mat`` (16 -> 4 channels) used for the coarse alpha.
        Returns ``(hid, r1, r2, r3, r4, coarse, mask)``: hid (B, T, 16, H, W); coarse the
        projected coarse output (B, T, 4, h4, w4) (fgr residual, alpha); mask the
        incoherence mask (B, T, 1, h4, w4), float32.
        """
        s1 = per_frame(pool_source, s0)
        s2 = per_frame(pool_source, s1)
        s3 = per_frame(pool_source, s2)

        x4, r4 = self.decode4(f4, r4)
        coarse = project_coarse(self.decode4.coarse(x4))
        mask = per_frame(incoherence_mask, coarse[:, :, 3:4].clamp(0.0, 1.0))

        def mask_at(level_source: Tensor) -> Tensor:
            # Resized in float32 (the published numerics), then cast to the activations' dtype.
            return per_frame(lambda m: resize(m, level_source.shape[-2:]), mask).to(level_source.dtype)

        x3, r3 = self.decode3(x4, f3, s3, r3, mask_at(s3))
        x2, r2 = self.decode2(x3, f2, s2, r2, mask_at(s2))
        x1, r1 = self.decode1(x2, f1, s1, r1, mask_at(s1))
        hid = self.decode0(x1, s0, mask_at(s0))
        return hid, r1, r2, r3, r4, coarse, mask
