"""The whole BiMatting network, a drop-in for Robust Video Matting's ``MattingNetwork``."""
from __future__ import annotations

import numbers
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import load_into, read_state_dict
from ..devices import current_cuda_device
from .aspp import BiLRASPP
from .backbone import BinaryBackbone
from .common import Projection, per_frame, resize
from .decoder import BiRecurrentDecoder
from .refiner import BiDeepGuidedFilterRefiner, FastGuidedFilterRefiner

REFINERS = {"deep_guided_filter": BiDeepGuidedFilterRefiner, "fast_guided_filter": FastGuidedFilterRefiner}
# "bimobilenet": the published BiMatting code's name for this same network (its only variant).
VARIANTS = ("bimatting", "bimobilenet")


class BiMatting(nn.Module):
    """Binarized robust video matting network (BiMatting, NeurIPS 2023).

    Same constructor and forward as RVM's ``MattingNetwork``:

    >>> model = BiMatting().eval()
    >>> rec = [None] * 4
    >>> fgr, pha, *rec = model(src, *rec, downsample_ratio=0.25)

    ``src``: (B, T, 3, H, W) or (B, 3, H, W), float in [0, 1] (any float dtype, any
    device). Returns ``[fgr, pha, r1, r2, r3, r4]`` with fgr (.., 3, H, W) and pha
    (.., 1, H, W) in [0, 1] in the input's rank, and the recurrent states r1..r4
    (B, C, h, w), C = 16, 20, 40, 64 at 1/2 .. 1/16 of the downsampled size.
    ``segmentation_pass=True`` returns ``[seg, r1, r2, r3, r4]`` (seg logits, .., 1, h, w
    at the downsampled size). ``return_coarse=True`` appends the coarse outputs
    ``fgr_s`` (.., 3, h4, w4) and ``pha_s`` (.., 1, h4, w4) at 1/16 of the downsampled size:
    ``fgr, pha, *rec, fgr_s, pha_s = model(src, return_coarse=True)``.
    """

    def __init__(self, variant: str = "bimatting", refiner: str = "deep_guided_filter", pretrained_backbone: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(
                f"variant={variant!r}: BiMatting has one architecture, 'bimatting' (or 'bimobilenet', its name in "
                "the published code; RVM's 'mobilenetv3' and "
                "'resnet50' are float networks; see bimatting_triton.baselines for RVM's MobileNetV3)"
            )
        if refiner not in REFINERS:
            raise ValueError(f"refiner={refiner!r}: expected one of {sorted(REFINERS)}")
        if pretrained_backbone:
            # RVM's training script passes pretrained_backbone=True: accept it, but say clearly
            # that there is nothing to download (a binary backbone has no ImageNet weights here).
            warnings.warn(
                "pretrained_backbone=True: no pretrained binary backbone is available, the backbone starts "
                "from random weights; load a full checkpoint with BiMatting.from_pretrained(path) to start "
                "from trained ones",
                stacklevel=2,
            )
        self.refiner_name = refiner
        self.backbone = BinaryBackbone()
        self.aspp = BiLRASPP(1024, 128)
        self.decoder = BiRecurrentDecoder()
        self.project_mat = Projection(16, 4)
        self.project_seg = Projection(16, 1)
        self.refiner = REFINERS[refiner]()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        refiner: str = "deep_guided_filter",
        map_location: str | torch.device = "cpu",
    ) -> "BiMatting":
        """A model with the weights of an official BiMatting checkpoint (or one of ours).

        Accepts a plain state_dict, ``{'state_dict': ...}`` / ``{'model': ...}`` and DDP
        ``module.`` prefixes; loads with ``weights_only=True``. With
        ``refiner='fast_guided_filter'`` (no parameters) the checkpoint's ``refiner.*``
        weights are ignored. Raises ``CheckpointError`` naming missing, unexpected or
        mis-shaped keys.
        """
        model = cls(refiner=refiner)
        model.load_checkpoint(path, map_location=map_location)
        return model

    def load_checkpoint(self, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "BiMatting":
        """Load a checkpoint file into this model in place (see :meth:`from_pretrained`)."""
        state_dict = read_state_dict(path, map_location=map_location)
        if not any(True for _ in self.refiner.parameters()):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("refiner.")}
        load_into(self, state_dict, source=f"checkpoint {os.fspath(path)!r}")
        return self

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        src: Tensor,
        r1: Tensor | None = None,
        r2: Tensor | None = None,
        r3: Tensor | None = None,
        r4: Tensor | None = None,
        downsample_ratio: float = 1,
        segmentation_pass: bool = False,
        return_coarse: bool = False,
    ) -> list[Tensor]:
        # (a numpy scalar or Fraction comes back as the float F.interpolate wants)
        downsample_ratio = _check_inputs(src, (r1, r2, r3, r4), downsample_ratio)
        with current_cuda_device(src.device):  # the fused model's Triton kernels launch on the current device
            return self._forward(src, r1, r2, r3, r4, downsample_ratio, segmentation_pass, return_coarse)

    def _forward(self, src, r1, r2, r3, r4, downsample_ratio: float, segmentation_pass: bool,
                 return_coarse: bool) -> list[Tensor]:
        single_frame = src.ndim == 4
        if single_frame:
            src = src.unsqueeze(1)

        src_sm = src if downsample_ratio == 1 else per_frame(lambda x: _downsample(x, downsample_ratio), src)
        b, t = src_sm.shape[:2]
        f1, f2, f3, f4 = (f.unflatten(0, (b, t)) for f in self.backbone(src_sm.flatten(0, 1)))
        f4 = self.aspp(f4)
        hid, r1, r2, r3, r4, coarse, _mask = self.decoder(src_sm, f1, f2, f3, f4, r1, r2, r3, r4, self.project_mat)
        rec = [r1, r2, r3, r4]

        if segmentation_pass:
            outputs = [self.project_seg(hid)]
        else:
            fgr_residual, pha = self.project_mat(hid).split([3, 1], dim=2)
            if downsample_ratio != 1:
                fgr_residual, pha = self.refiner(src, src_sm, fgr_residual, pha, hid)
            outputs = [(fgr_residual + src).clamp(0.0, 1.0), pha.clamp(0.0, 1.0)]
        outputs += rec
        if return_coarse:
            outputs += coarse_outputs(coarse, src)
        if single_frame:
            outputs = [x.squeeze(1) if x.ndim == 5 else x for x in outputs]
        return outputs


def coarse_outputs(coarse: Tensor, src: Tensor) -> list[Tensor]:
    """(fgr_s, pha_s) from the projected coarse output (B, T, 4, h, w) and the full-resolution source.

    ``fgr_s = clamp(residual + bilinear resize of src to (h, w), 0, 1)``, per frame: the
    published network resizes the full-resolution ``src`` (not the downsampled one; the two
    differ when ``downsample_ratio != 1``).
    """
    size = coarse.shape[-2:]
    src_small = per_frame(lambda x: resize(x, size), src)
    fgr_s = (coarse[:, :, :3] + src_small).clamp(0.0, 1.0)
    return [fgr_s, coarse[:, :, 3:].clamp(0.0, 1.0)]


def _downsample(x: Tensor, ratio: float) -> Tensor:
    return F.interpolate(x, scale_factor=ratio, mode="bilinear", align_corners=False, recompute_scale_factor=False)


def _autocast_on(src: Tensor) -> bool:
    try:
        return torch.is_autocast_enabled(src.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return False
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()


# Channels of the recurrent states r1..r4 (the decoder's GRUs at 1/2, 1/4, 1/8, 1/16 of the
# network's input size).
STATE_CHANNELS = (16, 20, 40, 64)


def _check_inputs(src: Tensor, rec: tuple, downsample_ratio: float) -> float:
    """Check the forward's inputs (errors name the argument); returns ``downsample_ratio`` as a float."""
    if not isinstance(src, Tensor):
        raise TypeError(f"src: expected a torch.Tensor, got {type(src).__name__}")
    if src.ndim not in (4, 5) or src.shape[-3] != 3 or 0 in src.shape:
        raise ValueError(
            f"src: expected shape (B, T, 3, H, W) or (B, 3, H, W) with no empty dimension, got {tuple(src.shape)}"
        )
    if not src.is_floating_point():
        raise TypeError(f"src: expected a floating point tensor with values in [0, 1], got dtype {src.dtype}")
    # numbers.Real takes numpy scalars and Fractions too; a bool is not a ratio.
    if not isinstance(downsample_ratio, numbers.Real) or isinstance(downsample_ratio, bool) or not 0 < downsample_ratio:
        raise ValueError(f"downsample_ratio: expected a number > 0, got {downsample_ratio!r}")
    downsample_ratio = float(downsample_ratio)  # as forward passes it to F.interpolate (a Fraction's or
    # float32's own product can round to another size than the float's)
    h, w = src.shape[-2:]
    if int(h * downsample_ratio) < 1 or int(w * downsample_ratio) < 1:
        raise ValueError(
            f"downsample_ratio: {downsample_ratio} turns the {w}x{h} frames into nothing; "
            "use a larger ratio, or leave it unset (None) for the automatic choice of convert_video and the "
            "bimatting command"
        )
    # F.interpolate floors the scaled size; each level below halves it, rounding up.
    size = (h, w) if downsample_ratio == 1 else (int(h * downsample_ratio), int(w * downsample_ratio))
    # Under autocast the returned states have the autocast dtype while src keeps its own:
    # feeding them back is RVM's streaming loop, so only the device must match then.
    for level, (name, r, channels) in enumerate(zip(("r1", "r2", "r3", "r4"), rec, STATE_CHANNELS), start=1):
        if r is None:
            continue
        expected = (src.shape[0], channels, -(-size[0] // 2**level), -(-size[1] // 2**level))
        if not isinstance(r, Tensor) or tuple(r.shape) != expected:
            shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise ValueError(
                f"{name}: expected the recurrent state of the previous call, shape {expected} for these frames "
                f"at downsample_ratio={downsample_ratio}, or None; got {shape}"
            )
        if r.device != src.device or (r.dtype != src.dtype and not (r.is_floating_point() and _autocast_on(src))):
            raise ValueError(f"{name}: on {r.device}/{r.dtype}, but src is on {src.device}/{src.dtype}")
    return downsample_ratio
