"""Robust Video Matting's float MobileNetV3-Large network, in plain PyTorch.

This is the full-precision model that BiMatting is measured against (its paper's
12.4x computation and 21.6x storage claims are relative to it). It is written here,
not imported from torchvision, so that it needs nothing beyond ``torch``; the module
tree reproduces RVM's ``MattingNetwork('mobilenetv3')`` exactly, so a published RVM
checkpoint (``rvm_mobilenetv3.pth``) loads with ``strict=True``:

========================  ===================================================
prefix                    part
========================  ===================================================
``backbone.features.*``   MobileNetV3-Large features 0..16 (torchvision layout:
                          ``features.0.{0,1}`` stem conv/BN, ``features.i.block.j``
                          inverted residuals, ``features.16.{0,1}`` 160->960 conv),
                          with the last stage dilated (stride 1, dilation 2)
``aspp.*``                LRASPP(960, 128): ``aspp1`` conv-BN-ReLU, ``aspp2``
                          global pool -> conv -> sigmoid
``decoder.*``             RecurrentDecoder([16, 24, 40, 128], [80, 40, 32, 16])
``project_mat.conv``      1x1 conv 16 -> 4 (fgr residual 3 + alpha 1)
``project_seg.conv``      1x1 conv 16 -> 1
``refiner.*``             Deep Guided Filter refiner (``box_filter``, ``conv``)
========================  ===================================================

Forward contract (RVM's)::

    fgr, pha, *rec = model(src, *rec, downsample_ratio=0.25)   # rec starts as [None] * 4
    seg, *rec = model(src, *rec, segmentation_pass=True)

``src`` is (B, T, 3, H, W) or (B, 3, H, W), float in [0, 1]; outputs keep the rank.
``fgr`` (.., 3, H, W), ``pha`` (.., 1, H, W); ``rec`` = r1..r4 of shape (B, C, h, w)
with C = 16, 20, 40, 64 at 1/2, 1/4, 1/8, 1/16 of the (downsampled) input.
A 4-D input is computed as the T = 1 case of a 5-D one.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.common import Projection, per_frame

__all__ = ["RVMMobileNetV3", "MobileNetV3LargeEncoder", "LRASPP", "RecurrentDecoder", "DeepGuidedFilterRefiner"]

# ImageNet statistics, applied inside the backbone (RVM feeds [0, 1] images).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def _conv_bn_act(
    cin: int,
    cout: int,
    k: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    act: Optional[Callable[[], nn.Module]] = None,
    bn_eps: float = 1e-3,
) -> nn.Sequential:
    """torchvision's ConvBNActivation: ``[Conv2d(no bias), BatchNorm2d, act]`` (keys ``.0``, ``.1``).

    Padding keeps the size at stride 1: ``(k - 1) // 2 * dilation``. ``act=None`` is
    the linear (Identity) projection of an inverted residual.
    """
    pad = (k - 1) // 2 * dilation
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, pad, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=bn_eps, momentum=0.01),
        act() if act is not None else nn.Identity(),
    )


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going more than 10% down.

    This is how MobileNet sizes its squeeze-excitation bottlenecks (e.g. 72 // 4 = 18 -> 24).
    """
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class SqueezeExcitation(nn.Module):
    """Channel gate ``x * hardsigmoid(fc2(relu(fc1(avgpool(x)))))``; fc1/fc2 are 1x1 convs with bias.

    Input (N, C, H, W) -> same shape; squeeze width ``_make_divisible(C // 4)``.
    """

    def __init__(self, channels: int):
        super().__init__()
        squeeze = _make_divisible(channels // 4)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.fc2(F.relu(self.fc1(s)))
        return x * F.hardsigmoid(s)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 linear projection (+ x).

    ``block`` holds the layers at torchvision's indices. The residual is added when
    the stride is 1 and the widths match. A dilated block runs at stride 1 (the
    stride is dropped, as torchvision does, so the output stays at 1/16).
    """

    def __init__(self, cin: int, k: int, exp: int, cout: int, se: bool, hswish: bool, stride: int, dilation: int):
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if exp != cin:
            layers.append(_conv_bn_act(cin, exp, 1, act=act))
        layers.append(
            _conv_bn_act(exp, exp, k, stride=1 if dilation > 1 else stride, dilation=dilation, groups=exp, act=act)
        )
        if se:
            layers.append(SqueezeExcitation(exp))
        layers.append(_conv_bn_act(exp, cout, 1))
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return y + x if self.use_residual else y


# MobileNetV3-Large's inverted residuals as RVM configures them:
# (in, kernel, expanded, out, squeeze-excite, hard-swish, stride, dilation).
# The last three (the 1/32 stage in the classifier) are dilated instead of strided.
_LARGE_SETTING: Sequence[tuple[int, int, int, int, bool, bool, int, int]] = (
    (16, 3, 16, 16, False, False, 1, 1),
    (16, 3, 64, 24, False, False, 2, 1),
    (24, 3, 72, 24, False, False, 1, 1),
    (24, 5, 72, 40, True, False, 2, 1),
    (40, 5, 120, 40, True, False, 1, 1),
    (40, 5, 120, 40, True, False, 1, 1),
    (40, 3, 240, 80, False, True, 2, 1),
    (80, 3, 200, 80, False, True, 1, 1),
    (80, 3, 184, 80, False, True, 1, 1),
    (80, 3, 184, 80, False, True, 1, 1),
    (80, 3, 480, 112, True, True, 1, 1),
    (112, 3, 672, 112, True, True, 1, 1),
    (112, 5, 672, 160, True, True, 2, 2),
    (160, 5, 960, 160, True, True, 1, 2),
    (160, 5, 960, 160, True, True, 1, 2),
)


class MobileNetV3LargeEncoder(nn.Module):
    """MobileNetV3-Large features (no classifier) returning f1..f4.

    Input (N, 3, H, W) or (B, T, 3, H, W) in [0, 1] (ImageNet-normalised here).
    Output [f1, f2, f3, f4] with 16, 24, 40, 960 channels at 1/2, 1/4, 1/8, 1/16
    (sizes rounded up at each stride-2 step), in the input's rank.
    """

    # Indices of ``features`` whose outputs are f1, f2, f3, f4.
    FEATURE_INDICES = (1, 3, 6, 16)

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = [_conv_bn_act(3, 16, 3, stride=2, act=nn.Hardswish)]
        layers += [InvertedResidual(*cfg) for cfg in _LARGE_SETTING]
        layers.append(_conv_bn_act(160, 960, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.register_buffer("_mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    def forward_single_frame(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = (x - self._mean.to(x.dtype)) / self._std.to(x.dtype)
        feats = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.FEATURE_INDICES:
                feats.append(x)
        return tuple(feats)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return per_frame(self.forward_single_frame, x)


class LRASPP(nn.Module):
    """Lite R-ASPP: ``aspp1(x) * aspp2(x)``; (N, Cin, h, w) -> (N, Cout, h, w), 4-D or 5-D.

    ``aspp1`` = 1x1 conv -> BN -> ReLU; ``aspp2`` = global average pool -> 1x1 conv -> sigmoid.
    """

    def __init__(self, in_channels: int = 960, out_channels: int = 128):
        super().__init__()
        self.aspp1 = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
        )
        self.aspp2 = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.Sigmoid()
        )

    def forward(self, x: Tensor) -> Tensor:
        return per_frame(lambda v: self.aspp1(v) * self.aspp2(v), x)


class ConvGRU(nn.Module):
    """Convolutional GRU over time on ``channels`` channels (3x3 convs with bias).

    Per frame: (r, z) = sigmoid(ih([x, h])) split in halves; c = tanh(hh([x, r*h]));
    h = (1 - z) * h + z * c. ``x``: (B, T, C, h, w) or (B, C, h, w); ``h``: (B, C, h, w)
    or None (zeros). Returns (outputs in x's rank, last h).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.ih = nn.Sequential(nn.Conv2d(2 * channels, 2 * channels, 3, padding=1), nn.Sigmoid())
        self.hh = nn.Sequential(nn.Conv2d(2 * channels, channels, 3, padding=1), nn.Tanh())

    def step(self, x: Tensor, h: Tensor) -> Tensor:
        r, z = self.ih(torch.cat([x, h], dim=1)).split(self.channels, dim=1)
        c = self.hh(torch.cat([x, r * h], dim=1))
        return (1 - z) * h + z * c

    def forward(self, x: Tensor, h: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        frames = x.unbind(1) if x.ndim == 5 else (x,)
        if h is None:
            h = frames[0].new_zeros(frames[0].shape)
        outs = []
        for xt in frames:
            h = self.step(xt, h)
            outs.append(h)
        out = torch.stack(outs, dim=1) if x.ndim == 5 else outs[0]
        return out, h


class BottleneckBlock(nn.Module):
    """``decode4``: the second half of f4's channels goes through a ConvGRU; (.., C, h, w) kept."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.gru = ConvGRU(channels // 2)

    def forward(self, x: Tensor, r: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        a, b = x.split(self.channels // 2, dim=-3)
        b, r = self.gru(b, r)
        return torch.cat([a, b], dim=-3), r


def _upsample_to(x: Tensor, ref: Tensor) -> Tensor:
    """Bilinear x2 upsampling (align_corners False) of (N, C, h, w), cropped to ref's (H, W)."""
    x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return x[:, :, : ref.shape[-2], : ref.shape[-1]]


class UpsamplingBlock(nn.Module):
    """``decode3/2/1``: upsample x, concat skip f and source s, conv3x3-BN-ReLU, ConvGRU on half.

    ``x``: (.., Cin, h, w); ``f``: (.., Cskip, 2h', 2w'); ``s``: (.., 3, 2h', 2w'); output
    (.., Cout, 2h', 2w') and the GRU state (B, Cout / 2, 2h', 2w').
    """

    def __init__(self, in_channels: int, skip_channels: int, src_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels + src_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )
        self.gru = ConvGRU(out_channels // 2)

    def _fuse(self, x: Tensor, f: Tensor, s: Tensor) -> Tensor:
        return self.conv(torch.cat([_upsample_to(x, s), f, s], dim=1))

    def forward(self, x: Tensor, f: Tensor, s: Tensor, r: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        x = per_frame(self._fuse, x, f, s)
        a, b = x.split(self.out_channels // 2, dim=-3)
        b, r = self.gru(b, r)
        return torch.cat([a, b], dim=-3), r


class OutputBlock(nn.Module):
    """``decode0``: upsample x to s0, concat s0, two conv3x3-BN-ReLU; (.., 16, H, W) out."""

    def __init__(self, in_channels: int, src_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels + src_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        return per_frame(lambda xv, sv: self.conv(torch.cat([_upsample_to(xv, sv), sv], dim=1)), x, s)


class RecurrentDecoder(nn.Module):
    """RVM's recurrent decoder. Inputs s0 (the source), f1..f4, states r1..r4 (None to start).

    Returns (hid, r1, r2, r3, r4) with hid (.., 16, H, W) at s0's size.
    """

    def __init__(self, feature_channels: Sequence[int] = (16, 24, 40, 128), decoder_channels=(80, 40, 32, 16)):
        super().__init__()
        fc, dc = feature_channels, decoder_channels
        self.decode4 = BottleneckBlock(fc[3])
        self.decode3 = UpsamplingBlock(fc[3], fc[2], 3, dc[0])
        self.decode2 = UpsamplingBlock(dc[0], fc[1], 3, dc[1])
        self.decode1 = UpsamplingBlock(dc[1], fc[0], 3, dc[2])
        self.decode0 = OutputBlock(dc[2], 3, dc[3])

    @staticmethod
    def _pyramid(s0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """s1, s2, s3: s0 average-pooled by 2, 4, 8 (2x2 windows, ceil mode, no padding counted)."""
        pool = lambda v: F.avg_pool2d(v, 2, 2, ceil_mode=True, count_include_pad=False)  # noqa: E731
        s1 = per_frame(pool, s0)
        s2 = per_frame(pool, s1)
        s3 = per_frame(pool, s2)
        return s1, s2, s3

    def forward(self, s0, f1, f2, f3, f4, r1=None, r2=None, r3=None, r4=None):
        s1, s2, s3 = self._pyramid(s0)
        x4, r4 = self.decode4(f4, r4)
        x3, r3 = self.decode3(x4, f3, s3, r3)
        x2, r2 = self.decode2(x3, f2, s2, r2)
        x1, r1 = self.decode1(x2, f1, s1, r1)
        x0 = self.decode0(x1, s0)
        return x0, r1, r2, r3, r4


class DeepGuidedFilterRefiner(nn.Module):
    """Deep Guided Filter upsampling of the coarse (fgr residual, alpha) to full resolution.

    Per frame, with x = [rgb, mean(rgb)] (4 channels) at both sizes and y = [fgr_res, pha]:
    mean_x, mean_y, cov_xy, var_x from the 3x3 depthwise ``box_filter`` (a parameter,
    initialised to 1/9); A = ``conv``([cov_xy, var_x, hid]) (1x1 conv-BN-ReLU twice, then
    1x1 conv 16 -> 4 with bias); b = mean_y - A * mean_x; out = up(A) * x_full + up(b)
    with bilinear resizing (align_corners False). Returns (fgr residual (.., 3, H, W),
    alpha (.., 1, H, W)).
    """

    def __init__(self, hid_channels: int = 16):
        super().__init__()
        self.box_filter = nn.Conv2d(4, 4, 3, padding=1, bias=False, groups=4)
        nn.init.constant_(self.box_filter.weight, 1 / 9)
        self.conv = nn.Sequential(
            nn.Conv2d(4 * 2 + hid_channels, hid_channels, 1, bias=False),
            nn.BatchNorm2d(hid_channels),
            nn.ReLU(),
            nn.Conv2d(hid_channels, hid_channels, 1, bias=False),
            nn.BatchNorm2d(hid_channels),
            nn.ReLU(),
            nn.Conv2d(hid_channels, 4, 1, bias=True),
        )

    def _single(self, fine_src, base_src, base_fgr, base_pha, base_hid):
        fine_x = torch.cat([fine_src, fine_src.mean(1, keepdim=True)], dim=1)
        base_x = torch.cat([base_src, base_src.mean(1, keepdim=True)], dim=1)
        base_y = torch.cat([base_fgr, base_pha], dim=1)
        mean_x = self.box_filter(base_x)
        mean_y = self.box_filter(base_y)
        cov_xy = self.box_filter(base_x * base_y) - mean_x * mean_y
        var_x = self.box_filter(base_x * base_x) - mean_x * mean_x
        a = self.conv(torch.cat([cov_xy, var_x, base_hid], dim=1))
        b = mean_y - a * mean_x
        size = fine_src.shape[-2:]
        a = F.interpolate(a, size, mode="bilinear", align_corners=False)
        b = F.interpolate(b, size, mode="bilinear", align_corners=False)
        out = a * fine_x + b
        return out[:, :3], out[:, 3:]

    def forward(self, fine_src, base_src, base_fgr, base_pha, base_hid):
        return per_frame(self._single, fine_src, base_src, base_fgr, base_pha, base_hid)


class RVMMobileNetV3(nn.Module):
    """Robust Video Matting, MobileNetV3-Large variant, float (RVM's ``MattingNetwork('mobilenetv3')``).

    ``refiner`` must be ``'deep_guided_filter'`` (the fast guided filter has no
    parameters and is not part of this baseline). See the module docstring for the
    forward contract; 3.75 M parameters.
    """

    def __init__(self, refiner: str = "deep_guided_filter"):
        super().__init__()
        if refiner != "deep_guided_filter":
            raise ValueError(f"refiner: only 'deep_guided_filter' is implemented for the RVM baseline, got {refiner!r}")
        self.backbone = MobileNetV3LargeEncoder()
        self.aspp = LRASPP(960, 128)
        self.decoder = RecurrentDecoder([16, 24, 40, 128], [80, 40, 32, 16])
        self.project_mat = Projection(16, 4)
        self.project_seg = Projection(16, 1)
        self.refiner = DeepGuidedFilterRefiner()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "RVMMobileNetV3":
        """Build the network and load an RVM MobileNetV3 checkpoint (a state_dict file), strictly,
        with the errors of :mod:`bimatting_triton.checkpoint` (missing / unexpected / mis-shaped
        keys named; DDP prefixes and ``{'model': ...}`` wrappers taken)."""
        from ..checkpoint import load_into, read_state_dict

        path = os.fspath(path)
        model = cls()
        load_into(model, read_state_dict(path, map_location), source=f"checkpoint {path!r}")
        return model.eval()

    def forward(
        self,
        src: Tensor,
        r1: Optional[Tensor] = None,
        r2: Optional[Tensor] = None,
        r3: Optional[Tensor] = None,
        r4: Optional[Tensor] = None,
        downsample_ratio: float = 1,
        segmentation_pass: bool = False,
    ) -> list[Tensor]:
        if src.ndim not in (4, 5) or src.shape[-3] != 3:
            raise ValueError(f"src: expected (B, 3, H, W) or (B, T, 3, H, W), got shape {tuple(src.shape)}")
        if not 0 < downsample_ratio <= 1:
            raise ValueError(f"downsample_ratio: expected a value in (0, 1], got {downsample_ratio}")
        if downsample_ratio != 1:
            src_sm = per_frame(
                lambda v: F.interpolate(
                    v, scale_factor=downsample_ratio, mode="bilinear", align_corners=False, recompute_scale_factor=False
                ),
                src,
            )
        else:
            src_sm = src
        f1, f2, f3, f4 = self.backbone(src_sm)
        f4 = self.aspp(f4)
        hid, *rec = self.decoder(src_sm, f1, f2, f3, f4, r1, r2, r3, r4)
        if segmentation_pass:
            return [self.project_seg(hid), *rec]
        fgr_res, pha = self.project_mat(hid).split([3, 1], dim=-3)
        if downsample_ratio != 1:
            fgr_res, pha = self.refiner(src, src_sm, fgr_res, pha, hid)
        fgr = (fgr_res + src).clamp(0.0, 1.0)
        return [fgr, pha.clamp(0.0, 1.0), *rec]
