"""Datasets (public layouts on a tiny fake tree), temporal sampling and augmentations."""
import os

import numpy as np
import pytest
import torch

from matting_data import make_imagematte, make_matting_tree

from bimatting_triton.train.data import (
    Backgrounds,
    ImageMatteDataset,
    MattingAugmentation,
    SegmentationDataset,
    VideoMatteDataset,
    apply_motion,
    color_jitter,
    composite,
    item_generator,
    motion_matrices,
    random_batch_crop,
    read_image,
    sample_frame_indices,
    write_image,
)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_png_roundtrip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    write_image(str(tmp_path / "a.png"), rgb)
    write_image(str(tmp_path / "b.png"), gray)
    np.testing.assert_array_equal(read_image(str(tmp_path / "a.png")), rgb)
    np.testing.assert_array_equal(read_image(str(tmp_path / "b.png"), gray=True), gray)
    # An alpha saved as RGB (R = G = B) reads back as its grey level.
    write_image(str(tmp_path / "c.png"), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(read_image(str(tmp_path / "c.png"), gray=True), gray)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_read_image_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        read_image(str(bad))


def test_sample_frame_indices_plain_run_bounces_at_the_ends():
    idx = sample_frame_indices(5, 8, _gen(), start=2, speed=(1.0, 1.0), p_reverse=0.0, p_pause=0.0)
    assert idx == [2, 3, 4, 3, 2, 1, 0, 1]
    rev = sample_frame_indices(5, 8, _gen(), start=2, speed=(1.0, 1.0), p_reverse=1.0, p_pause=0.0)
    assert rev == idx[::-1]
    assert sample_frame_indices(1, 4, _gen(), speed=(1.0, 1.0)) == [0, 0, 0, 0]


def test_sample_frame_indices_random_runs_stay_in_range_and_are_reproducible():
    for seed in range(30):
        idx = sample_frame_indices(7, 12, _gen(seed), p_pause=0.5)
        assert len(idx) == 12 and all(0 <= i < 7 for i in idx)
        assert idx == sample_frame_indices(7, 12, _gen(seed), p_pause=0.5)
        # Neighbouring frames never jump by more than the top speed (3) plus rounding.
        assert max(abs(a - b) for a, b in zip(idx, idx[1:])) <= 4
    # Slow speeds repeat frames, fast ones skip.
    slow = sample_frame_indices(100, 10, _gen(), start=0, speed=(0.5, 0.5), p_reverse=0, p_pause=0)
    fast = sample_frame_indices(100, 10, _gen(), start=0, speed=(3.0, 3.0), p_reverse=0, p_pause=0)
    assert slow == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and fast == list(range(0, 30, 3))


def test_apply_motion_integer_shift_is_exact():
    x = torch.arange(2 * 1 * 6 * 8, dtype=torch.float32).view(2, 1, 6, 8)
    # Output pixel x samples input x + 2: a shift of 2 px is 2 * 2 / W in normalised units.
    theta = torch.tensor([[1.0, 0.0, 4.0 / 8], [0.0, 1.0, 0.0]]).expand(2, 2, 3)
    out = apply_motion(x, theta)
    torch.testing.assert_close(out[..., :6], x[..., 2:], atol=1e-4, rtol=0)
    assert out[..., 6:].abs().max() == 0  # sampled outside: zero padding


def test_motion_matrices_rotation_only_are_rotations_and_identity_when_still():
    g = _gen(3)
    theta = motion_matrices(6, g, degrees=30, translate=0.0, scale=(1.0, 1.0), shear=0.0)
    a = theta[:, :, :2].double()
    torch.testing.assert_close(a @ a.transpose(1, 2), torch.eye(2, dtype=torch.float64).expand(6, 2, 2), atol=1e-6, rtol=0)
    assert theta[:, :, 2].abs().max() == 0
    angles = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    steps = angles.diff()
    assert (steps >= -1e-7).all() or (steps <= 1e-7).all()  # monotone: smooth motion, no jitter
    still = motion_matrices(3, g, degrees=0, translate=0, scale=(1.0, 1.0), shear=0)
    torch.testing.assert_close(still, torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(3, 2, 3))


def test_color_jitter_identity_and_luma_preserving_hue():
    x = torch.rand(3, 3, 5, 5, generator=_gen(1))
    same = color_jitter(x, _gen(2), brightness=0, contrast=0, saturation=0, hue=0)
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
    y = x * 0.2 + 0.4  # keep away from the clamp (gamut edges)
    hued = color_jitter(y, _gen(2), brightness=0, contrast=0, saturation=0, hue=0.1)
    luma = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]  # noqa: E731
    assert (hued - y).abs().max() > 0.01
    torch.testing.assert_close(luma(hued), luma(y), atol=1e-5, rtol=0)


def test_augmentation_moves_fgr_and_pha_together():
    t, h, w = 4, 40, 50
    pha = torch.rand(t, 1, h, w, generator=_gen(5))
    fgr = pha.expand(t, 3, h, w).clone()  # colour encodes alpha
    aug = MattingAugmentation(24, p_motion=1.0, p_flip=0.5, p_jitter=0.0, p_gray=0.0, p_noise=0.0)
    for seed in range(4):
        f, p = aug.foreground(fgr, pha, _gen(seed))
        assert f.shape == (t, 3, 24, 24) and p.shape == (t, 1, 24, 24)
        torch.testing.assert_close(f[:, :1], p, atol=1e-6, rtol=0)
        b = aug.background(torch.rand(t, 3, h, w, generator=_gen(seed)), _gen(seed))
        assert b.shape == (t, 3, 24, 24) and 0 <= b.min() and b.max() <= 1


def test_videomatte_dataset_layout_items_and_determinism(tmp_path):
    root = make_matting_tree(tmp_path)
    bg = Backgrounds(str(root / "bgimg"), str(root / "bgvid"))
    ds = VideoMatteDataset(str(root / "vm"), bg, size=16, seq_length=3, seed=1)
    assert len(ds) == 2 * 2  # two windows of 3 in each 5-frame clip
    fgr, pha, bgr = ds[1]
    assert fgr.shape == (3, 3, 16, 16) and pha.shape == (3, 1, 16, 16) and bgr.shape == (3, 3, 16, 16)
    assert fgr.dtype == torch.float32 and 0 <= composite(fgr, pha, bgr).min() and composite(fgr, pha, bgr).max() <= 1
    again = ds[1]
    assert all(torch.equal(a, b) for a, b in zip((fgr, pha, bgr), again))
    ds.set_epoch(1)
    assert not torch.equal(ds[1][2], bgr)


def test_videomatte_dataset_without_augmentation_keeps_the_frames(tmp_path):
    root = make_matting_tree(tmp_path)
    ds = VideoMatteDataset(str(root / "vm"), Backgrounds(str(root / "bgimg")), size=24, seq_length=4, augment=False)
    for i in range(len(ds)):
        _, pha, _ = ds[i]
        clip = ds.index[i][0]
        # Each frame is one of its clip's alpha frames, unchanged (constant 40 f + clip) / 255.
        levels = (pha[:, 0, 0, 0] * 255).round().long().tolist()
        assert all((v - clip) % 40 == 0 and 0 <= (v - clip) // 40 < 5 for v in levels)
        assert torch.equal(pha, pha[:, :, :1, :1].expand_as(pha))


def test_dataset_layout_errors(tmp_path):
    root = make_matting_tree(tmp_path, clips=1)
    os.remove(root / "vm" / "pha" / "clip0" / "0003.png")
    with pytest.raises(FileNotFoundError, match="0003.png"):
        VideoMatteDataset(str(root / "vm"), Backgrounds(str(root / "bgimg")), 16, 2)
    with pytest.raises(ValueError, match="image_dir"):
        Backgrounds(None, None)


def test_imagematte_and_segmentation_datasets(tmp_path):
    root = make_matting_tree(tmp_path, clips=1)
    im = make_imagematte(tmp_path)
    ds = ImageMatteDataset(str(im), Backgrounds(str(root / "bgimg")), size=16, seq_length=3)
    fgr, pha, bgr = ds[0]
    assert fgr.shape == (3, 3, 16, 16) and pha.shape == (3, 1, 16, 16)
    assert not torch.equal(pha[0], pha[-1])  # the still image moves (motion always on)

    seg = SegmentationDataset(str(im / "fgr"), str(im / "pha"), size=16)
    img, mask = seg[0]
    assert img.shape == (1, 3, 16, 16) and mask.shape == (1, 1, 16, 16)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_item_generator_depends_on_seed_epoch_index():
    draws = {torch.rand(1, generator=item_generator(s, e, i)).item() for s in (0, 1) for e in (0, 1) for i in (0, 1)}
    assert len(draws) == 8
    assert torch.rand(1, generator=item_generator(3, 4, 5)).item() == torch.rand(1, generator=item_generator(3, 4, 5)).item()


def test_imagematte_epoch_covers_the_backgrounds_as_in_rvm(tmp_path):
    # RVM's ImageMatteDataset: len = max(#images, #background images + #background clips),
    # image idx % #images; with few mattes an epoch is as long as the background set.
    root = make_matting_tree(tmp_path, clips=1)
    im = make_imagematte(tmp_path)
    backgrounds = Backgrounds(str(root / "bgimg"), str(root / "bgvid"))
    n_bg = len(backgrounds.images) + len(backgrounds.videos)
    assert n_bg > 1
    ds = ImageMatteDataset(str(im), backgrounds, size=16, seq_length=2)
    assert len(ds) == n_bg
    fgr, pha, bgr = ds[n_bg - 1]  # wraps around to the only image
    assert fgr.shape == (2, 3, 16, 16) and pha.shape == (2, 1, 16, 16)


def test_random_batch_crop_is_rvms_multiscale_crop():
    # RVM / BiMatting train.py random_crop: h, w drawn in [S/2, S) and rounded down to 16, the
    # frames resized to the square of the larger and centre-cropped; one crop for the batch.
    g = torch.Generator().manual_seed(0)
    fgr, pha = torch.rand(2, 3, 3, 96, 96), torch.rand(2, 3, 1, 96, 96)
    sizes = set()
    for _ in range(40):
        a, b = random_batch_crop([fgr, pha], g)
        h, w = a.shape[-2:]
        sizes.add((h, w))
        assert a.shape[:3] == (2, 3, 3) and b.shape == (2, 3, 1, h, w)
        assert h % 16 == 0 and w % 16 == 0 and 48 <= h < 96 and 48 <= w < 96
        side = max(h, w)
        square = torch.nn.functional.interpolate(pha.flatten(0, 1), size=(side, side), mode="bilinear",
                                                 align_corners=False)
        top, left = round((side - h) / 2), round((side - w) / 2)
        assert torch.equal(b, square[..., top:top + h, left:left + w].unflatten(0, (2, 3)))
    assert sizes == {(h, w) for h in (48, 64, 80) for w in (48, 64, 80)}  # every size is drawn
    # the same generator state gives the same crop; sides below 2 * 16 keep at least 16
    assert torch.equal(random_batch_crop([pha], torch.Generator().manual_seed(5))[0],
                       random_batch_crop([pha], torch.Generator().manual_seed(5))[0])
    assert random_batch_crop([torch.rand(1, 1, 1, 20, 8)], g)[0].shape[-2:] == (16, 8)
