"""Training losses against hand-computed values and a plain NumPy Laplacian pyramid."""
import math

import numpy as np
import pytest
import torch

from bimatting_triton.train.losses import (
    coarse_matting_loss,
    laplacian_loss,
    laplacian_pyramid,
    matting_loss,
    segmentation_loss,
    temporal_coherence_loss,
)


def _frames(values, h=8, w=8, c=1):
    """(1, T, c, h, w) clip whose frame t is the constant values[t]."""
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1, 1).expand(1, len(values), c, h, w).clone()


def test_temporal_coherence_hand_computed():
    pred = torch.tensor([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]], dtype=torch.float64).view(1, 3, 1, 1, 2)
    true = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64).view(1, 3, 1, 1, 2)
    # pred diffs: (0.5, -0.5), (0.5, -0.5); true diffs: (1, 0), (0, 1)
    # errors: (-0.5, -0.5), (0.5, -1.5) -> mean square (0.25 + 0.25 + 0.25 + 2.25) / 4
    assert temporal_coherence_loss(pred, true).item() == pytest.approx(0.75)
    assert temporal_coherence_loss(pred[:, :1], true[:, :1]).item() == 0.0


def test_laplacian_hand_computed_constant_and_checkerboard():
    # Constant images live only in the low-pass remainder, which the loss leaves out.
    a, b = _frames([0.7], 16, 16), _frames([0.2], 16, 16)
    pyr = laplacian_pyramid(a.flatten(0, 1))
    assert [p.shape[-1] for p in pyr] == [16, 8, 4, 2]  # bands at 16, 8, 4 (2 < 4 stops), remainder
    for band in pyr[:-1]:
        assert band.abs().max().item() < 1e-12
    assert laplacian_loss(a, b).item() < 1e-12
    # The binomial blur cancels a checkerboard exactly ((1 - 4 + 6 - 4 + 1) / 16 = 0, also
    # with reflect padding): all of it sits in band 0, weight 2**0, divided by 5 levels.
    i = torch.arange(16)
    checker = ((-1.0) ** (i[:, None] + i[None, :])).double().view(1, 1, 1, 16, 16) * 0.3
    assert laplacian_loss(checker, torch.zeros_like(checker)).item() == pytest.approx(0.3 / 5)


def test_laplacian_band_weights_grow_with_the_level():
    # Odd sizes: fewer bands than 5, still divided by 5; band i weighs 2**i.
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(2, 1, 33, 40, generator=g), torch.rand(2, 1, 33, 40, generator=g)
    pa, pb = laplacian_pyramid(a), laplacian_pyramid(b)
    assert len(pa) == 5 and pa[-1].shape[-2:] == (3, 3)  # bands at 33, 17, 9, 5, then 3 < 4 stops
    expected = sum(2**i * (x - y).abs().mean() for i, (x, y) in enumerate(zip(pa[:-1], pb[:-1]))) / 5
    assert laplacian_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-6)


def _numpy_pyramid(x: np.ndarray, levels: int) -> list:
    """Plain loops: 5x5 binomial blur with reflect padding, decimation, zero-insert expand."""
    k1 = np.array([1, 4, 6, 4, 1], dtype=np.float64) / 16
    kernel = np.outer(k1, k1)

    def blur(img, gain=1.0):
        h, w = img.shape
        padded = np.pad(img, 2, mode="reflect")
        out = np.zeros_like(img)
        for i in range(h):
            for j in range(w):
                out[i, j] = gain * (padded[i : i + 5, j : j + 5] * kernel).sum()
        return out

    pyr, cur = [], x
    for _ in range(levels):
        h, w = cur.shape
        if min(h, w) < 4:
            break
        down = blur(cur)[::2, ::2]
        up = np.zeros((2 * down.shape[0], 2 * down.shape[1]))
        up[::2, ::2] = down
        pyr.append(cur - blur(up[:h, :w], 4.0))
        cur = down
    pyr.append(cur)
    return pyr


@pytest.mark.parametrize("shape", [(12, 12), (11, 9), (5, 6)])
def test_laplacian_pyramid_matches_numpy_reference_and_reconstructs(shape):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 1, *shape, generator=g, dtype=torch.float64)
    ours = laplacian_pyramid(x, levels=5)
    ref = _numpy_pyramid(x[0, 0].numpy(), 5)
    assert len(ours) == len(ref)
    for o, r in zip(ours, ref):
        np.testing.assert_allclose(o[0, 0].numpy(), r, atol=1e-12)
    # Collapsing the pyramid gives the image back.
    k1 = np.array([1, 4, 6, 4, 1]) / 16
    rec = ref[-1]
    for band in reversed(ref[:-1]):
        h, w = band.shape
        up = np.zeros((2 * rec.shape[0], 2 * rec.shape[1]))
        up[::2, ::2] = rec
        padded = np.pad(up[:h, :w], 2, mode="reflect")
        kernel = 4 * np.outer(k1, k1)
        rec = band + np.array([[(padded[i : i + 5, j : j + 5] * kernel).sum() for j in range(w)] for i in range(h)])
    np.testing.assert_allclose(rec, x[0, 0].numpy(), atol=1e-12)


def test_matting_loss_hand_computed():
    # T = 2 spatially constant frames: no Laplacian band-pass content at all.
    pred_pha, true_pha = _frames([0.2, 0.6]), _frames([0.0, 1.0])
    pred_fgr, true_fgr = _frames([0.5, 0.5], c=3), _frames([0.9, 0.25], c=3)
    terms = matting_loss(pred_fgr, pred_pha, true_fgr, true_pha)
    assert terms["pha_l1"].item() == pytest.approx(0.3)  # (0.2 + 0.4) / 2
    assert terms["pha_laplacian"].item() < 1e-12
    assert terms["pha_coherence"].item() == pytest.approx(5 * (0.4 - 1.0) ** 2)
    # Frame 0 has alpha 0: its foreground is ignored; frame 1 errs by 0.25.
    assert terms["fgr_l1"].item() == pytest.approx(0.25 / 2)
    assert terms["fgr_coherence"].item() == pytest.approx(5 * (0.5 - 0.25) ** 2)
    assert terms["total"].item() == pytest.approx(0.3 + 1.8 + 0.125 + 0.3125)


def test_matting_loss_masks_foreground_per_pixel_and_backpropagates():
    true_pha = torch.zeros(1, 1, 1, 4, 4, dtype=torch.float64)
    true_pha[..., :2] = 0.5  # left half known foreground
    pred_fgr = torch.full((1, 1, 3, 4, 4), 0.5, dtype=torch.float64, requires_grad=True)
    true_fgr = torch.zeros(1, 1, 3, 4, 4, dtype=torch.float64)
    pred_pha = true_pha.clone().requires_grad_(True)
    terms = matting_loss(pred_fgr, pred_pha, true_fgr, true_pha)
    assert terms["fgr_l1"].item() == pytest.approx(0.5 / 2)  # error 0.5 on half the pixels
    terms["total"].backward()
    # Pixels without foreground get no foreground gradient.
    assert pred_fgr.grad[..., 2:].abs().max().item() == 0.0
    assert pred_fgr.grad[..., :2].abs().min().item() > 0.0
    assert not terms["fgr_l1"].requires_grad  # logged terms are detached


def test_coarse_matting_loss_resizes_targets_and_weights():
    true_pha = torch.zeros(1, 1, 1, 8, 8, dtype=torch.float64)
    true_pha[..., :4] = 1.0
    true_fgr = torch.full((1, 1, 3, 8, 8), 0.5, dtype=torch.float64)
    pred_pha_s = torch.full((1, 1, 1, 2, 2), 0.5, dtype=torch.float64)
    pred_fgr_s = torch.full((1, 1, 3, 2, 2), 0.5, dtype=torch.float64)
    terms = coarse_matting_loss(pred_fgr_s, pred_pha_s, true_fgr, true_pha, weight=0.25)
    # Targets become [[1, 0], [1, 0]] (bilinear from 8 to 2 samples the middle of each half):
    # L1 0.5; a 2x2 image has no Laplacian band; T = 1:
    # no coherence; the foreground matches where alpha > 0.
    assert terms["coarse_pha_l1"].item() == pytest.approx(0.25 * 0.5)
    assert terms["coarse_pha_laplacian"].item() == 0.0
    assert terms["coarse_fgr_l1"].item() == 0.0
    assert terms["coarse_total"].item() == pytest.approx(0.25 * 0.5)


def test_segmentation_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0]).view(1, 1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 1, 2)
    expected = (math.log(2) + math.log(1 + math.exp(2))) / 2
    assert segmentation_loss(logits, target)["total"].item() == pytest.approx(expected, rel=1e-6)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="pha"):
        matting_loss(torch.zeros(1, 1, 3, 4, 4), torch.zeros(1, 1, 1, 4, 4), torch.zeros(1, 1, 3, 4, 4), torch.zeros(1, 1, 1, 4, 5))
    with pytest.raises(ValueError, match="seg"):
        segmentation_loss(torch.zeros(2, 1), torch.zeros(1, 2))


def test_coarse_matting_loss_follows_bimatting_one_level_laplacian_and_bilinear_targets():
    # BiMatting's train.py: true_*_s = F.interpolate(true_*, size=coarse, mode='bilinear',
    # align_corners=False) and matting_loss(pred_*_s, ..., lvl=1)['total'] * 0.25.
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    true_pha = torch.zeros(1, 2, 1, 64, 64, dtype=torch.float64)
    true_pha[..., 8:40, 12:50] = torch.rand(2, 1, 32, 38, generator=g, dtype=torch.float64)
    true_fgr = torch.rand(1, 2, 3, 64, 64, generator=g, dtype=torch.float64)
    pred_pha_s = torch.rand(1, 2, 1, 8, 8, generator=g, dtype=torch.float64)
    pred_fgr_s = torch.rand(1, 2, 3, 8, 8, generator=g, dtype=torch.float64)

    def small(x):
        return F.interpolate(x.flatten(0, 1), size=(8, 8), mode="bilinear", align_corners=False).unflatten(0, x.shape[:2])

    tp, tf = small(true_pha), small(true_fgr)
    band = lambda x: laplacian_pyramid(x.flatten(0, 1), levels=1)[0]  # noqa: E731
    m = (tp > 0).double()
    expected = (
        (pred_pha_s - tp).abs().mean()
        + (band(pred_pha_s) - band(tp)).abs().mean()  # one level: weight 2**0, divided by 1
        + 5 * temporal_coherence_loss(pred_pha_s, tp)
        + (pred_fgr_s * m - tf * m).abs().mean()
        + 5 * temporal_coherence_loss(pred_fgr_s * m, tf * m)
    ) * 0.25
    terms = coarse_matting_loss(pred_fgr_s, pred_pha_s, true_fgr, true_pha, weight=0.25)
    assert terms["coarse_total"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert terms["coarse_pha_laplacian"].item() == pytest.approx(0.25 * (band(pred_pha_s) - band(tp)).abs().mean().item())
