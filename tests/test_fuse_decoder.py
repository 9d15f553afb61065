"""Fused decoder blocks (bimatting_triton/fuse_decoder.py) against the plain blocks.

The blocks carry the golden weights (every parameter and BN statistic perturbed) in
float64, so the fused blocks differ from the plain ones only by rounding (folded
BatchNorm, the kernels' sigmoid/tanh): ~1e-15; the tolerance 1e-10 leaves room and
still catches any wrong pixel. Masks are soft (a sparse {0, 1} mask bilinearly
resized, as the decoder resizes its mask), different per item and frame, plus the
empty and the full mask. The whole converted model is checked against the
golden data in tests/test_fuse.py.
"""
import copy
import os

import pytest
import torch

from bimatting_triton.fuse import convert
from bimatting_triton.fuse_decoder import (
    FusedConvGRU,
    FusedMaskedConvGRU,
    FusedOutputBlock,
    FusedUpsamplingBlock,
    fuse_decoder_block,
    sparsity_report,
    tile_densities,
)
from bimatting_triton.model.common import resize

DEVICE = torch.device("cuda" if os.environ.get("BIMATTING_TEST_CUDA") and torch.cuda.is_available() else "cpu")
TOL = 1e-10
B, T, H, W = 2, 2, 14, 22
TILE = (8, 8)  # 2 x 3 tiles per frame, partial on both sides


@pytest.fixture(scope="module")
def model(golden_model):
    """The shared golden model (not modified: fusing copies what it needs)."""
    return golden_model if DEVICE.type == "cpu" else copy.deepcopy(golden_model).to(DEVICE)


@pytest.fixture(scope="module")
def decoder(model):
    return model.decoder


def level_mask(kind: str, seed: int = 0) -> torch.Tensor:
    """(B, T, 1, H, W) float64 mask of a decoder level: soft, different per item and frame."""
    if kind == "empty":
        return torch.zeros(B, T, 1, H, W, dtype=torch.float64, device=DEVICE)
    if kind == "full":
        return torch.ones(B, T, 1, H, W, dtype=torch.float64, device=DEVICE)
    if kind == "tile-border":
        # One pixel per item and frame on a tile border: its 3x3 ring lies in inactive tiles.
        m = torch.zeros(B * T, 1, H, W, dtype=torch.float64)
        for n, (i, j) in enumerate([(7, 7), (8, 15), (7, 16), (13, 8)]):
            m[n, 0, i, j] = 0.6
        return m.reshape(B, T, 1, H, W).to(DEVICE)
    # A few set pixels per item and frame at half the level's size (the decoder's mask is
    # coarser still, but then a frame this small would be all edge), resized bilinearly:
    # soft values, non-zero one pixel beyond the set ones.
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(B * T, 1, H // 2, W // 2, generator=g) < 0.03).float()
    for n in range(B * T):
        coarse[n, 0, n % (H // 2), (3 * n) % (W // 2)] = 1.0
    m = resize(coarse, (H, W))
    return m.reshape(B, T, 1, H, W).double().to(DEVICE)


def _rand(*shape):
    return torch.randn(*shape, dtype=torch.float64, device=DEVICE)


def assert_close(got, want, name):
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs().max().item()
    assert err <= TOL, f"{name}: max abs error {err:.3g}"


@pytest.mark.parametrize("kind", ["random", "empty", "full"])
def test_upsampling_block_matches_plain(decoder, kind):
    plain = decoder.decode1  # UpsamplingBlock(40, 16, 3, 32) with ConvGRU_Up(16)
    fused = FusedUpsamplingBlock(plain, tile=TILE)
    mask = level_mask(kind)
    x, f, s = _rand(B, T, 40, H // 2, W // 2), _rand(B, T, 16, H, W), torch.rand(B, T, 3, H, W).double().to(DEVICE)
    r = _rand(B, 16, H, W) if kind == "random" else None  # a carried state, or zeros
    with torch.no_grad():
        want, want_r = plain(x, f, s, r, mask)
    got, got_r = fused(x, f, s, r, mask)
    assert_close(got, want, "out")
    assert_close(got_r, want_r, "r")
    tiles = fused.last_tiles["binary"]
    active = int(tiles.count.sum())
    assert active == {"empty": 0, "full": B * T * 6}.get(kind, active)
    if kind == "random":
        assert 0 < active < B * T * 6  # really sparse, and not trivially so
        assert fused.gru.last_tiles["binary"] is tiles  # the GRU reuses the level's list


@pytest.mark.parametrize("kind", ["random", "tile-border", "empty"])
def test_output_block_matches_plain(decoder, kind):
    plain = decoder.decode0  # OutputBlock(32, 3, 16): binary 3x3 -> BN -> ReLU -> float 3x3 -> BN -> ReLU
    fused = FusedOutputBlock(plain, tile=TILE)
    mask = level_mask(kind, seed=3)
    x, s = _rand(B, T, 32, H // 2, W // 2), torch.rand(B, T, 3, H, W).double().to(DEVICE)
    with torch.no_grad():
        want = plain(x, s, mask)
    got = fused(x, s, mask)
    assert_close(got, want, "hid")
    grown, own = fused.last_tiles["binary"], fused.last_tiles["float"]
    assert (grown.halo, own.halo) == (1, 0)
    assert bool((grown.flags >= own.flags).all())  # the binary unit covers the float conv's ring
    if kind != "empty":
        assert 0 < int(own.count.sum()) <= int(grown.count.sum()) < own.groups * own.capacity
    if kind == "tile-border":
        assert int(own.count.sum()) == B * T and int(grown.count.sum()) > B * T  # the ring reaches other tiles


def test_gru_alone_and_reference_backend(decoder):
    plain_gru = decoder.decode2.gru  # ConvGRU_Up(20)
    mask = level_mask("random", seed=5)
    x, h = _rand(B, T, 20, H, W), _rand(B, 20, H, W)
    with torch.no_grad():
        want, want_h = plain_gru(x, h, mask)
    fused = fuse_decoder_block(plain_gru)
    assert isinstance(fused, FusedMaskedConvGRU)
    got, got_h = fused(x, h, mask)
    assert_close(got, want, "gru out")
    assert_close(got_h, want_h, "gru h")
    # backend='reference': the dense plain-PyTorch computation, same results.
    ref_gru, ref_h = FusedMaskedConvGRU(plain_gru, backend="reference")(x, h, mask)
    assert_close(ref_gru, want, "reference gru out")
    assert fuse_decoder_block(torch.nn.ReLU()) is None


@pytest.mark.parametrize("with_state", [True, False])
def test_bottleneck_gru_matches_plain(decoder, with_state):
    plain_gru = decoder.decode4.gru  # ConvGRU(64): dense 3x3 units, sigmoid / tanh gates
    x = _rand(B, 3, 64, 3, 5)[:, :, :, :, 1:]  # T = 3 frames, a non-contiguous input
    h = _rand(B, 64, 3, 4) if with_state else None
    with torch.no_grad():
        want, want_h = plain_gru(x, h)
    fused = fuse_decoder_block(plain_gru)
    assert isinstance(fused, FusedConvGRU)
    got, got_h = fused(x, h)
    assert_close(got, want, "gru out")
    assert_close(got_h, want_h, "gru h")
    assert torch.equal(got[:, -1], got_h)
    ref, ref_h = FusedConvGRU(plain_gru, backend="reference")(x, h)
    assert_close(ref, want, "reference gru out")
    assert_close(ref_h, want_h, "reference gru h")
    # a state_dict of the earlier layout (units as FusedSequential: ih.ops.0.*) still loads
    old = {k.replace("ih.", "ih.ops.0.").replace("hh.", "hh.ops.0."): v for k, v in fused.state_dict().items()}
    other = FusedConvGRU(plain_gru)
    for b_ in other.buffers():
        b_.zero_()
    other.load_state_dict(old)
    assert all(torch.equal(a, b_) for a, b_ in zip(other.state_dict().values(), fused.state_dict().values()))


def test_convert_wires_the_sparse_blocks_and_reports_sparsity(model):
    # (Golden weights: with an untrained model, values within rounding of 0 reach a sign()
    # and any two correct implementations can differ by O(1) there.)
    fused = convert(model, backend="reference")  # the dense references: quick on the CPU
    dec = fused.decoder
    assert all(isinstance(getattr(dec, f"decode{i}"), FusedUpsamplingBlock) for i in (1, 2, 3))
    assert isinstance(dec.decode0, FusedOutputBlock)
    assert isinstance(dec.decode4.gru, FusedConvGRU)
    assert sparsity_report(fused) == {}  # nothing ran yet
    src = torch.rand(1, 2, 3, 48, 80, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        want = model(src)
    got = fused(src)
    for name, a, b in zip(["fgr", "pha", "r1", "r2", "r3", "r4"], got, want):
        assert (a - b).abs().max().item() <= 1e-6, name  # the golden tolerance (a whole network)
    report = sparsity_report(fused)
    assert list(report) == ["decode3", "decode2", "decode1", "decode0"]
    for name, stats in report.items():
        block = getattr(dec, name)
        tiles = block.last_tiles["binary"]
        per_pixel = sum(u.in_channels * 9 * u.out_channels for u in block.masked_units())
        assert stats.skipped_bops == (tiles.total_pixels() - int(tiles.computed_pixels())) * per_pixel
        assert 0.0 <= stats.density <= 1.0
    assert report["decode0"].skipped_flops == round((1 - report["decode0"].float_density) * 2 * 48 * 80) * 16 * 9 * 16
    densities = tile_densities(fused)
    assert densities["decode0"] == report["decode0"].float_density
    assert densities["decode3"] == report["decode3"].density
