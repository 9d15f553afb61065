"""BiLRASPP (``aspp``): the binary lite R-ASPP head on the 1024-channel features."""
from __future__ import annotations

from torch import Tensor, nn

from .common import binary_conv_bn_prelu, binary_unit, per_frame


class BiLRASPP(nn.Module):
    """``aspp1(x) * aspp2(x)``: a binary 1x1 projection gated by a global-context sigmoid.

    Input (N, 1024, h, w) or (B, T, 1024, h, w); output the same layout with 128 channels.
    ``aspp1`` = LB -> sign -> BiConv1x1 -> BN -> LB -> PReLU;
    ``aspp2`` = global average pool -> LB -> sign -> BiConv1x1 -> sigmoid.
    """

    def __init__(self, in_channels: int = 1024, out_channels: int = 128):
        super().__init__()
        self.aspp1 = binary_conv_bn_prelu(in_channels, out_channels, 1)
        self.aspp2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), *binary_unit(in_channels, out_channels, 1), nn.Sigmoid())

    def forward_single_frame(self, x: Tensor) -> Tensor:
        return self.aspp1(x) * self.aspp2(x)

    def forward(self, x: Tensor) -> Tensor:
        return per_frame(self.forward_single_frame, x)
