"""Training losses of BiMatting (Robust Video Matting's, plus the coarse outputs).

All prediction / target tensors are float, (B, T, C, H, W): alpha has C = 1, foreground
C = 3, values in [0, 1]. Every function returns a dict of named scalar terms whose
``'total'`` entry is the weighted sum to back-propagate; the other entries are detached
copies for logging.

* alpha: ``L1 + Laplacian pyramid (5 band levels) + 5 * temporal coherence`` (MSE between the frame-to-
  frame differences of prediction and target);
* foreground: ``L1 + 5 * temporal coherence``, both on pixels where the true alpha > 0
  (elsewhere the foreground colour is undefined);
* coarse outputs (``fgr_s, pha_s`` at 1/16 size): the same matting loss, with a one-level
  Laplacian, against the targets resized bilinearly to that size, weighted 0.25, as in
  BiMatting's ``train.py`` (:func:`coarse_matting_loss`);
* segmentation passes: binary cross-entropy on the logits (:func:`segmentation_loss`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "temporal_coherence_loss",
    "laplacian_pyramid",
    "laplacian_loss",
    "matting_loss",
    "coarse_matting_loss",
    "segmentation_loss",
    "COHERENCE_WEIGHT",
]

COHERENCE_WEIGHT = 5.0
LAPLACIAN_LEVELS = 5


def _check_pair(name: str, pred: Tensor, true: Tensor, channels: int | None = None) -> None:
    if pred.shape != true.shape:
        raise ValueError(f"{name}: prediction {tuple(pred.shape)} and target {tuple(true.shape)} must have the same shape")
    if pred.ndim != 5:
        raise ValueError(f"{name}: expected (B, T, C, H, W) tensors, got {tuple(pred.shape)}")
    if channels is not None and pred.shape[2] != channels:
        raise ValueError(f"{name}: expected C = {channels}, got shape {tuple(pred.shape)}")


def temporal_coherence_loss(pred: Tensor, true: Tensor) -> Tensor:
    """``MSE(pred[:, 1:] - pred[:, :-1], true[:, 1:] - true[:, :-1])`` (unweighted).

    (B, T, C, H, W) each; 0 when T = 1 (there is no frame pair).
    """
    if pred.shape[1] < 2:
        return pred.new_zeros(())
    return F.mse_loss(pred[:, 1:] - pred[:, :-1], true[:, 1:] - true[:, :-1])


def _gaussian_kernel(channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # 5x5 binomial kernel (outer product of [1, 4, 6, 4, 1] / 16), one copy per channel.
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=dtype, device=device) / 16
    return (k[:, None] * k[None, :]).expand(channels, 1, 5, 5).contiguous()


def _blur(x: Tensor, kernel: Tensor) -> Tensor:
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel, groups=x.shape[1])


def laplacian_pyramid(x: Tensor, levels: int = LAPLACIAN_LEVELS) -> list[Tensor]:
    """Laplacian pyramid of ``x`` (N, C, H, W): ``levels`` band-pass tensors, finest first,
    then the remaining low-pass image.

    Band i is ``g_i - expand(reduce(g_i))`` with ``reduce`` = 5x5 binomial blur (reflect
    padding) then keeping every other row and column, and ``expand`` = zero insertion back
    to ``g_i``'s size then the same blur times 4; ``g_{i+1} = reduce(g_i)``. Collapsing the
    pyramid (expand and add, coarse to fine) gives ``x`` back exactly. Bands stop early
    (fewer of them) once an image side is below 4 pixels.
    """
    kernel = _gaussian_kernel(x.shape[1], x.dtype, x.device)
    pyramid = []
    current = x
    for _ in range(levels):
        h, w = current.shape[-2:]
        if min(h, w) < 4:
            break
        down = _blur(current, kernel)[..., ::2, ::2]
        pyramid.append(current - _expand(down, (h, w), kernel))
        current = down
    pyramid.append(current)
    return pyramid


def _expand(x: Tensor, size: tuple[int, int], kernel: Tensor) -> Tensor:
    # Zero insertion on the even grid of a (2h, 2w) canvas, cropped to `size`, then 4 x blur:
    # with the binomial kernel every output is a weighted mean of its known neighbours.
    up = x.new_zeros(*x.shape[:2], 2 * x.shape[-2], 2 * x.shape[-1])
    up[..., ::2, ::2] = x
    return _blur(up[..., : size[0], : size[1]], kernel * 4)


def laplacian_loss(pred: Tensor, true: Tensor, levels: int = LAPLACIAN_LEVELS) -> Tensor:
    """``sum_i 2**i * mean|band_i(pred) - band_i(true)| / levels`` over the band-pass levels.

    As in RVM: ``levels`` = 5 band-pass levels weighted 2**i (coarser bands count more),
    the low-pass remainder left out, the sum divided by ``levels`` (also when a small image
    has fewer bands). ``pred``, ``true``: (B, T, C, H, W) or (N, C, H, W); frames independent.
    """
    if pred.shape != true.shape:
        raise ValueError(f"laplacian_loss: prediction {tuple(pred.shape)} and target {tuple(true.shape)} differ")
    if pred.ndim == 5:
        pred, true = pred.flatten(0, 1), true.flatten(0, 1)
    loss = pred.new_zeros(())
    bands = zip(laplacian_pyramid(pred, levels)[:-1], laplacian_pyramid(true, levels)[:-1])
    for level, (p, t) in enumerate(bands):
        loss = loss + (2**level) * F.l1_loss(p, t)
    return loss / levels


def matting_loss(
    pred_fgr: Tensor, pred_pha: Tensor, true_fgr: Tensor, true_pha: Tensor, laplacian_levels: int = LAPLACIAN_LEVELS
) -> dict[str, Tensor]:
    """Alpha and foreground losses (see the module docstring); (B, T, C, H, W) inputs.

    ``laplacian_levels``: band-pass levels of the Laplacian term (5; the coarse outputs use 1).

    Returns ``{'pha_l1', 'pha_laplacian', 'pha_coherence', 'fgr_l1', 'fgr_coherence',
    'total'}``; the coherence entries already carry their weight of 5, ``total`` is the
    plain sum of the five.
    """
    _check_pair("pha", pred_pha, true_pha, channels=1)
    _check_pair("fgr", pred_fgr, true_fgr, channels=3)
    if pred_pha.shape[:2] != pred_fgr.shape[:2] or pred_pha.shape[-2:] != pred_fgr.shape[-2:]:
        raise ValueError(f"fgr {tuple(pred_fgr.shape)} and pha {tuple(pred_pha.shape)} must share B, T, H, W")
    terms = {
        "pha_l1": F.l1_loss(pred_pha, true_pha),
        "pha_laplacian": laplacian_loss(pred_pha, true_pha, laplacian_levels),
        "pha_coherence": COHERENCE_WEIGHT * temporal_coherence_loss(pred_pha, true_pha),
    }
    # Foreground colour only matters where there is some foreground: zero both elsewhere
    # (the mean still runs over all pixels, as in RVM).
    known = (true_pha > 0).to(pred_fgr.dtype)
    pred_fgr, true_fgr = pred_fgr * known, true_fgr * known
    terms["fgr_l1"] = F.l1_loss(pred_fgr, true_fgr)
    terms["fgr_coherence"] = COHERENCE_WEIGHT * temporal_coherence_loss(pred_fgr, true_fgr)
    return _with_total(terms)


def _resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    # Targets shrink to the coarse grid as in BiMatting's train.py: bilinear, align_corners=False
    # (no antialiasing, so not the mean of each cell).
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.flatten(0, 1), size=size, mode="bilinear", align_corners=False).unflatten(0, x.shape[:2])


def coarse_matting_loss(
    pred_fgr_s: Tensor, pred_pha_s: Tensor, true_fgr: Tensor, true_pha: Tensor, weight: float = 0.25
) -> dict[str, Tensor]:
    """:func:`matting_loss` of the coarse outputs (one Laplacian level), times ``weight``, as
    ``coarse_*`` terms; BiMatting's ``matting_loss(pred_*_s, true_*_s, lvl=1)['total'] * 0.25``.

    ``pred_fgr_s`` (B, T, 3, h, w), ``pred_pha_s`` (B, T, 1, h, w) at the coarse size; the
    full-size targets are resized bilinearly (``align_corners=False``) to (h, w) (alpha > 0
    of the resized alpha marks the known foreground).
    """
    size = tuple(pred_pha_s.shape[-2:])
    terms = matting_loss(
        pred_fgr_s, pred_pha_s, _resize_to(true_fgr, size), _resize_to(true_pha, size), laplacian_levels=1
    )
    return {f"coarse_{k}": v * weight for k, v in terms.items()}


def segmentation_loss(pred_seg: Tensor, true_seg: Tensor) -> dict[str, Tensor]:
    """Binary cross-entropy of segmentation logits (any shape) against targets in [0, 1]."""
    if pred_seg.shape != true_seg.shape:
        raise ValueError(f"seg: logits {tuple(pred_seg.shape)} and target {tuple(true_seg.shape)} must have the same shape")
    return _with_total({"seg_bce": F.binary_cross_entropy_with_logits(pred_seg, true_seg.to(pred_seg.dtype))})


def _with_total(terms: dict[str, Tensor]) -> dict[str, Tensor]:
    total = sum(terms.values())
    out = {k: v.detach() for k, v in terms.items()}
    out["total"] = total
    return out
