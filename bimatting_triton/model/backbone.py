"""The binary backbone of BiMatting: a float stem and 17 binary BasicBlocks.

State_dict prefix ``backbone.feature.{0..17}`` (SPEC §2). Input (N, 3, H, W) in [0, 1];
output the four feature maps f1 (16 ch, 1/2), f2 (32, 1/4), f3 (64, 1/8), f4 (1024, 1/16),
with ceil rounding of odd sizes.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nn import BiConv2d, BinaryActivation, LearnableBias

# Channel width after each feature stage (index 0 is the stem).
WIDTHS = [16, 32, 64, 32, 64, 128, 64, 64, 128, 64, 128, 256, 128, 128, 256, 128, 256, 1024]
STRIDE2_BLOCKS = {2, 5, 11}
# (source block, target block): pool(source output) is added to the target's output.
DENSE_SHORTCUTS = {3: 1, 6: 4, 12: 10}
FEATURE_BLOCKS = (0, 3, 9, 17)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pool2x(x: Tensor) -> Tensor:
    """AvgPool2d(2, 2, ceil_mode=True): halves H and W, rounding up."""
    return nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True)


class Stem(nn.Module):
    """``feature.0``: float Conv 3->16, 3x3, stride 2 (``conv1``) then BN (``bn1``)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn1(self.conv1(x))


class BasicBlock(nn.Module):
    """Binary block ``C_in -> C_out``: a 3x3 binary conv then a 1x1 binary "pointwise" stage.

    The 1x1 stage has three forms, chosen by the width ratio:
    ``C_out == C_in`` one conv (``binary_pw``, ``bn2``); ``C_out == n * C_in`` with n in
    {2, 4} ("dense") n convs ``C_in -> C_in`` (``binary_pw_down{j}``, ``bn2_{j}``) whose
    outputs, each plus the residual, are concatenated; ``C_out == C_in / 2``
    ("shrinkable") one conv ``C_in -> C_out`` whose residual is the mean of the two
    channel halves of the input.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        c = in_channels
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.move11 = LearnableBias(c)
        self.binary_3x3 = BiConv2d(c, c, 3, stride=stride)
        self.bn1 = nn.BatchNorm2d(c)
        self.move12 = LearnableBias(c)
        self.prelu1 = nn.PReLU(c)
        self.move13 = LearnableBias(c)
        self.move21 = LearnableBias(c)
        if out_channels == c:
            self.mode, self.branches = "same", 1
            self.binary_pw = BiConv2d(c, c, 1)
            self.bn2 = nn.BatchNorm2d(c)
        elif out_channels % c == 0 and out_channels // c in (2, 4):
            self.mode, self.branches = "dense", out_channels // c
            # Registration order (all convs, then all BNs) is the checkpoints' key order.
            for j in range(1, self.branches + 1):
                self.add_module(f"binary_pw_down{j}", BiConv2d(c, c, 1))
            for j in range(1, self.branches + 1):
                self.add_module(f"bn2_{j}", nn.BatchNorm2d(c))
        elif 2 * out_channels == c:
            self.mode, self.branches = "shrink", 1
            self.binary_pw_down1 = BiConv2d(c, out_channels, 1)
            self.bn2_1 = nn.BatchNorm2d(out_channels)
        else:
            raise ValueError(f"BasicBlock: unsupported widths {in_channels} -> {out_channels}")
        self.move22 = LearnableBias(out_channels)
        self.prelu2 = nn.PReLU(out_channels)
        self.move23 = LearnableBias(out_channels)
        self.sign = BinaryActivation()

    def pointwise_branches(self) -> list[tuple[BiConv2d, nn.BatchNorm2d]]:
        """The (1x1 conv, BN) pairs of the pointwise stage, in concatenation order."""
        if self.mode == "same":
            return [(self.binary_pw, self.bn2)]
        return [(getattr(self, f"binary_pw_down{j}"), getattr(self, f"bn2_{j}")) for j in range(1, self.branches + 1)]

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.bn1(self.binary_3x3(self.sign(self.move11(x))))
        out1 = out1 + (pool2x(x) if self.stride == 2 else x)
        out1 = self.move13(self.prelu1(self.move12(out1)))

        a = self.sign(self.move21(out1))
        if self.mode == "shrink":
            half = self.out_channels
            residual = (out1[:, :half] + out1[:, half:]) / 2
            out2 = self.bn2_1(self.binary_pw_down1(a)) + residual
        else:
            out2 = torch.cat([bn(conv(a)) + out1 for conv, bn in self.pointwise_branches()], dim=1)
        return self.move23(self.prelu2(self.move22(out2)))


class BinaryBackbone(nn.Module):
    """``backbone``: ImageNet normalisation, stem, 17 BasicBlocks, dense shortcuts.

    forward(x: (N, 3, H, W) float in [0, 1]) -> (f1, f2, f3, f4).
    """

    def __init__(self):
        super().__init__()
        blocks: list[nn.Module] = [Stem()]
        for i in range(1, len(WIDTHS)):
            stride = 2 if i in STRIDE2_BLOCKS else 1
            blocks.append(BasicBlock(WIDTHS[i - 1], WIDTHS[i], stride))
        self.feature = nn.Sequential(*blocks)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        outputs: list[Tensor] = []
        for i, block in enumerate(self.feature):
            x = block(x)
            if i in DENSE_SHORTCUTS:
                x = x + pool2x(outputs[DENSE_SHORTCUTS[i]])
            outputs.append(x)
        f1, f2, f3, f4 = (outputs[i] for i in FEATURE_BLOCKS)
        return f1, f2, f3, f4
