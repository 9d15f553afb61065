"""The procedural dataset: shapes, exact composites, soft/thin edges, motion, determinism."""
import math

import pytest
import torch

from bimatting_triton.train.synthetic import SyntheticMatteDataset, _strand_coverage, procedural_texture


def test_strand_coverage_hand_computed():
    # One horizontal strand y = 5 from x = 2 to x = 10, width 1, opaque, on a 12x12 grid.
    line = torch.tensor([[[2.0, 5.0], [6.0, 5.0], [10.0, 5.0]]])
    a = _strand_coverage(line, torch.tensor([1.0]), torch.tensor([1.0]), 12).view(12, 12)
    # Pixel centres of rows 4 and 5 are 0.5 px away: coverage 0.5 + 0.5 - 0.5 = 0.5.
    assert torch.allclose(a[4, 2:10], torch.full((8,), 0.5)) and torch.allclose(a[5, 2:10], torch.full((8,), 0.5))
    assert a[3].abs().max() == 0 and a[6].abs().max() == 0  # 1.5 px away
    # Column 1 (centre x = 1.5) sees the end point at distance sqrt(0.5).
    assert a[4, 1].item() == pytest.approx(1 - math.sqrt(0.5), abs=1e-6)
    # A sub-pixel strand (width 0.4) peaks at 0.4 * (0.2 + 0.5 - 0.5) = 0.08 there; two
    # strands combine as layers: 1 - (1 - a)(1 - b).
    two = torch.cat([line, line + torch.tensor([0.0, 0.0])])
    b = _strand_coverage(two, torch.tensor([1.0, 0.4]), torch.tensor([1.0, 0.5]), 12).view(12, 12)
    assert b[4, 5].item() == pytest.approx(1 - (1 - 0.5) * (1 - 0.4 * 0.2 * 0.5), abs=1e-6)


def test_items_shapes_ranges_and_exact_composite():
    ds = SyntheticMatteDataset(length=4, size=40, seq_length=3, seed=7)
    for i in range(len(ds)):
        fgr, pha, bgr = ds[i]
        assert fgr.shape == (3, 3, 40, 40) and pha.shape == (3, 1, 40, 40) and bgr.shape == (3, 3, 40, 40)
        for x in (fgr, pha, bgr):
            assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
        # The object is there, and so is background.
        assert 0.05 < pha.mean() < 0.8
    with pytest.raises(IndexError):
        ds[4]


def test_alpha_has_soft_and_thin_structures_and_moves():
    ds = SyntheticMatteDataset(length=8, size=64, seq_length=4, seed=0)
    partial = torch.stack([((p > 0.02) & (p < 0.98)).float().mean() for _, p, _ in (ds[i] for i in range(8))])
    assert (partial > 0.01).all()  # every clip has a real transition region
    # Thin strands: isolated partial-alpha pixels whose 3x3 neighbourhood has no opaque pixel.
    _, pha, _ = ds[0]
    p = pha[0, 0]
    opaque_near = torch.nn.functional.max_pool2d((p > 0.98).float()[None, None], 3, 1, 1)[0, 0]
    assert ((p > 0.05) & (opaque_near == 0)).sum() > 5
    # Motion: consecutive frames differ in alpha and background.
    fgr, pha, bgr = ds[1]
    assert (pha[1:] - pha[:-1]).abs().mean() > 1e-3 and (bgr[1:] - bgr[:-1]).abs().mean() > 1e-3


def test_deterministic_per_seed_epoch_index():
    a, b = SyntheticMatteDataset(3, 32, 2, seed=1), SyntheticMatteDataset(3, 32, 2, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2]))
    assert not torch.equal(a[0][1], a[1][1])
    other = SyntheticMatteDataset(3, 32, 2, seed=2)
    assert not torch.equal(a[2][1], other[2][1])
    b.set_epoch(1)
    assert not torch.equal(a[2][1], b[2][1])


def test_augmented_variant_and_texture():
    ds = SyntheticMatteDataset(2, 32, 3, seed=0, augment=True)
    fgr, pha, bgr = ds[0]
    assert fgr.shape == (3, 3, 32, 32) and 0 <= pha.min() and pha.max() <= 1
    tex = procedural_texture(torch.Generator().manual_seed(0), 20, 30)
    assert tex.shape == (3, 20, 30) and tex.min() >= 0 and tex.max() <= 1 and tex.std() > 0.01
    with pytest.raises(ValueError, match="size"):
        SyntheticMatteDataset(2, 4, 3)
