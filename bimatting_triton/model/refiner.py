"""Guided-filter refiners: upsample the low-resolution matte to the full resolution.

Used only when ``downsample_ratio != 1``. Both take 5-D tensors (B, T, C, H, W):
``fine_src`` (full size, 3 ch), ``base_src`` (downsampled, 3 ch), ``base_fgr`` (fgr
residual, 3 ch), ``base_pha`` (1 ch), ``base_hid`` (16 ch) and return the refined
(fgr residual, alpha) at full size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import LearnableBias
from .common import binary_unit, per_frame, resize


def _with_gray(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 4, H, W): RGB plus their mean as a fourth guide channel."""
    return torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1)


class BiDeepGuidedFilterRefiner(nn.Module):
    """Deep guided filter (``refiner``) with a binary coefficient network.

    ``box_filter``: depthwise 3x3 conv (loaded weights, initialised to 1/9);
    ``conv``: LB(24) -> sign -> BiConv1x1(24->16) -> BN -> LB -> PReLU -> LB -> sign ->
    BiConv1x1(16->16) -> BN -> LB -> PReLU -> float Conv1x1(16->4, bias), predicting the
    local linear coefficients A from (cov_xy, var_x, hid).
    """

    def __init__(self, hid_channels: int = 16):
        super().__init__()
        self.box_filter = nn.Conv2d(4, 4, kernel_size=3, padding=1, bias=False, groups=4)
        self.box_filter.weight.data.fill_(1 / 9)
        self.conv = nn.Sequential(
            *binary_unit(4 * 2 + hid_channels, hid_channels, 1),
            nn.BatchNorm2d(hid_channels),
            LearnableBias(hid_channels),
            nn.PReLU(hid_channels),
            *binary_unit(hid_channels, hid_channels, 1),
            nn.BatchNorm2d(hid_channels),
            LearnableBias(hid_channels),
            nn.PReLU(hid_channels),
            nn.Conv2d(hid_channels, 4, kernel_size=1, bias=True),
        )

    def forward_single_frame(self, fine_src, base_src, base_fgr, base_pha, base_hid) -> tuple[Tensor, Tensor]:
        fine_x, base_x = _with_gray(fine_src), _with_gray(base_src)
        base_y = torch.cat([base_fgr, base_pha], dim=1)
        box = self.box_filter
        mean_x, mean_y = box(base_x), box(base_y)
        cov_xy = box(base_x * base_y) - mean_x * mean_y
        var_x = box(base_x * base_x) - mean_x * mean_x
        a = self.conv(torch.cat([cov_xy, var_x, base_hid], dim=1))
        b = mean_y - a * mean_x
        size = fine_src.shape[-2:]
        out = resize(a, size) * fine_x + resize(b, size)
        return out[:, :3], out[:, 3:]

    def forward(self, fine_src, base_src, base_fgr, base_pha, base_hid) -> tuple[Tensor, Tensor]:
        return per_frame(self.forward_single_frame, fine_src, base_src, base_fgr, base_pha, base_hid)


class FastGuidedFilterRefiner(nn.Module):
    """Parameter-free fast guided filter (radius 1, eps 1e-5); ``base_hid`` is ignored."""

    def __init__(self, radius: int = 1, eps: float = 1e-5):
        super().__init__()
        self.radius, self.eps = radius, eps

    def _box(self, x: Tensor) -> Tensor:
        # Mean over a (2r+1)^2 window with zero padding, always divided by the full window.
        k = 2 * self.radius + 1
        return F.avg_pool2d(x, k, stride=1, padding=self.radius, count_include_pad=True)

    def forward_single_frame(self, fine_src, base_src, base_fgr, base_pha) -> tuple[Tensor, Tensor]:
        fine_x, base_x = _with_gray(fine_src), _with_gray(base_src)
        base_y = torch.cat([base_fgr, base_pha], dim=1)
        mean_x, mean_y = self._box(base_x), self._box(base_y)
        cov_xy = self._box(base_x * base_y) - mean_x * mean_y
        var_x = self._box(base_x * base_x) - mean_x * mean_x
        a = cov_xy / (var_x + self.eps)
        b = mean_y - a * mean_x
        size = fine_src.shape[-2:]
        out = resize(a, size) * fine_x + resize(b, size)
        return out[:, :3], out[:, 3:]

    def forward(self, fine_src, base_src, base_fgr, base_pha, base_hid=None) -> tuple[Tensor, Tensor]:
        return per_frame(self.forward_single_frame, fine_src, base_src, base_fgr, base_pha)
