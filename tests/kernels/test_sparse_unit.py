"""Tile-sparse decoder units (kernels/sparse_unit.py) against the dense computation.

* Tile lists: the Triton builder equals the plain-PyTorch one and a brute-force scan of
  the mask (integers: exact), with and without a halo, for B x T > 1.
* The masked unit ``unit3x3 * m + unit1x1``: bitwise equal to the dense fused kernels
  combined the same way (under the interpreter both round like PyTorch; on CUDA an FMA
  may differ by one rounding, bounded), exactly the 1x1 branch wherever ``m == 0``, and
  within a derived rounding bound of the plain-PyTorch reference (which uses
  ``torch.sigmoid`` / ``torch.tanh``). Masks: empty, full, one pixel at each corner,
  edge and tile border, random at several densities, different per item and frame.
* The sparse kernels write the active tiles only (sentinel values elsewhere survive).

Shapes are small (11 x 19 frames, 4 x 8 tiles: partial tiles on two sides) so that a
launch is a few tens of programs under the interpreter.
"""
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from bimatting_triton.kernels import _common
from bimatting_triton.kernels.binary_conv import Epilogue, Residual, binary_conv2d, binary_conv2d_reference, pack_weight
from bimatting_triton.kernels.pack import sign_pack
from bimatting_triton.kernels.sparse_unit import (
    TileList,
    active_tiles,
    active_tiles_reference,
    gru_update,
    skipped_bops,
    sparse_binary_conv2d,
    sparse_binary_conv2d_reference,
    sparse_float_conv2d,
    sparse_float_conv2d_reference,
    sparse_unit,
    sparse_unit_reference,
)

DEVICE = torch.device("cuda" if os.environ.get("BIMATTING_TEST_CUDA") and torch.cuda.is_available() else "cpu")
B, T, H, W = 2, 2, 11, 19
TILE = (4, 8)  # 3 x 3 tiles per frame, the last row and column partial
CIN, COUT = 40, 24


# ----------------------------------------------------------------------------------------
# masks
# ----------------------------------------------------------------------------------------
def _soft_mask(b, t, h, w, density, seed=0):
    """A decoder-like mask: a random coarse {0, 1} grid bilinearly resized (soft, in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(b * t, 1, max(h // 4, 1), max(w // 4, 1), generator=g) < density).float()
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False).reshape(b, t, 1, h, w)


# One pixel set per frame: image corners, image edges, and tile borders inside the image
# (its 3x3 neighbourhood then lies in the inactive neighbouring tiles).
SINGLE_PIXELS = {
    "corners": [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1)],
    "edges": [(0, 9), (H - 1, 4), (5, 0), (6, W - 1)],
    "tile-borders": [(3, 7), (4, 8), (3, 8), (8, 15)],
}


def _single_pixel_mask(pixels, value=0.7):
    m = torch.zeros(B * T, 1, H, W)
    for n, (i, j) in enumerate(pixels):
        m[n, 0, i, j] = value
    return m.reshape(B, T, 1, H, W)


def _mask(kind):
    if kind == "empty":
        return torch.zeros(B, T, 1, H, W)
    if kind == "full":
        return torch.rand(B, T, 1, H, W) * 0.9 + 0.1
    if kind in SINGLE_PIXELS:
        return _single_pixel_mask(SINGLE_PIXELS[kind])
    density = float(kind.split("-")[1])  # "random-0.05": different per item and frame
    return _soft_mask(B, T, H, W, density, seed=int(density * 100))


def _brute_force_flags(mask, tile, halo):
    """flags (T, B * th * tw) by scanning every tile's grown window in Python."""
    b, t, _, h, w = mask.shape
    th, tw = tile
    nth, ntw = -(-h // th), -(-w // tw)
    flags = torch.zeros(t, b * nth * ntw, dtype=torch.int32)
    for g in range(t):
        for i in range(b):
            for ty in range(nth):
                for tx in range(ntw):
                    win = mask[i, g, 0, max(ty * th - halo, 0) : ty * th + th + halo,
                               max(tx * tw - halo, 0) : tx * tw + tw + halo]
                    flags[g, (i * nth + ty) * ntw + tx] = int(bool((win != 0).any()))
    return flags


# ----------------------------------------------------------------------------------------
# tile lists
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("halo", [0, 1])
@pytest.mark.parametrize("tile", [TILE, (8, 2)])
def test_active_tiles_match_brute_force(tile, halo):
    mask = _soft_mask(3, 2, 13, 21, 0.1)
    mask[0, 1] = 0  # an empty frame of one item
    mask[2, 0, 0, 12, 20] = -0.5  # negative counts as set (m != 0), at the last pixel
    mask[1, 1, 0, 0, 0] = float("nan")  # so does NaN (the dense product is NaN there)
    want = _brute_force_flags(mask, tile, halo)
    assert 0 < want.sum() < want.numel()
    for build in (active_tiles, active_tiles_reference):
        tiles = build(mask.to(DEVICE), tile, halo)
        assert (tiles.groups, tiles.items, tiles.size, tiles.tile, tiles.halo) == (2, 3, (13, 21), tile, halo)
        assert torch.equal(tiles.flags.cpu(), want)
        assert torch.equal(tiles.count.cpu(), want.sum(1, dtype=torch.int32))
        for g in range(2):
            # the active entries, in increasing order
            assert torch.equal(tiles.index[g, : tiles.count[g]].cpu(), want[g].nonzero().flatten().to(torch.int32))


def test_tile_list_empty_full_and_strided_mask():
    full = torch.ones(B, T, 1, H, W, device=DEVICE)
    tiles = active_tiles(full, TILE)
    assert tiles.count.tolist() == [B * 9] * T and int(tiles.computed_pixels()) == B * T * H * W
    empty = active_tiles(torch.zeros(B, T, 1, H, W, device=DEVICE), TILE, halo=1)
    assert empty.count.tolist() == [0] * T and float(empty.density()) == 0.0
    # A 4-D (N, 1, H, W) mask reads as T = 1; a strided view is read in place.
    big = torch.zeros(3, 2, H, 2 * W, device=DEVICE)
    big[1, 0, 5, 10] = 1.0
    view = big[:, :1, :, ::2]  # (3, 1, H, W), non-contiguous
    tiles = active_tiles(view, TILE)
    assert (tiles.groups, tiles.items) == (1, 3)
    assert torch.equal(tiles.flags.cpu(), _brute_force_flags(view.cpu().unsqueeze(1), TILE, 0))


def test_select_coverage_and_counts():
    mask = _mask("random-0.1")
    tiles = active_tiles(mask.to(DEVICE), TILE)
    cover = tiles.coverage().cpu()  # folded order n = b*T + t
    assert cover.shape == (B * T, 1, H, W)
    nz = (mask != 0).flatten(0, 1)
    assert (cover | ~nz).all()  # every masked pixel is covered
    # covered pixels are exactly those of tiles holding a masked pixel
    th, tw = TILE
    for n in range(B * T):
        for ty in range(3):
            for tx in range(3):
                block = (slice(ty * th, ty * th + th), slice(tx * tw, tx * tw + tw))
                assert bool(cover[n, 0][block].all()) == bool(nz[n, 0][block].any())
    assert int(tiles.computed_pixels()) == int(cover.sum())
    assert int(skipped_bops(tiles, CIN, COUT, 3)) == (cover.numel() - int(cover.sum())) * CIN * 9 * COUT
    for t in range(T):
        one = tiles.select(t)
        assert one.groups == 1 and torch.equal(one.coverage().cpu(), cover.reshape(B, T, 1, H, W)[:, t])
    with pytest.raises(IndexError, match="frame 2 out of range"):
        tiles.select(2)


# ----------------------------------------------------------------------------------------
# the masked unit
# ----------------------------------------------------------------------------------------
def _epilogue(act, dtype=torch.float32):
    kw = dict(dtype=dtype, device=DEVICE)
    return Epilogue(
        scale=torch.rand(COUT, **kw) * 0.1 + 0.02,
        shift=torch.randn(COUT, **kw),
        bias_a=torch.randn(COUT, **kw),
        act=act,
        prelu_weight=torch.rand(COUT, **kw) * 2 - 1 if act == "prelu" else None,
        bias_b=torch.randn(COUT, **kw) if act == "prelu" else None,
    )


def _unit_inputs(n, h, w):
    x = torch.randn(n, CIN, h, w, device=DEVICE)
    x[x.abs() < 0.3] = 0  # sign 0 inputs
    b3, b1 = torch.randn(CIN, device=DEVICE) * 0.3, torch.randn(CIN, device=DEVICE) * 0.3
    w3 = pack_weight(torch.randn(COUT, CIN, 3, 3, device=DEVICE))
    w1 = pack_weight(torch.randn(COUT, CIN, 1, 1, device=DEVICE))
    return sign_pack(x, b3), w3, sign_pack(x, b1), w1


def _branch_bound(x, w, epi):
    """Bound on |kernel - reference| of one branch's output (see test_binary_conv's bound).

    Up to 16 roundings of intermediates bounded by ``mag`` (the sum of the absolute terms)
    before the activation: ``16 eps mag``; the activation is 1-Lipschitz (PReLU with
    |slope| <= 1, tanh; sigmoid 1/4) and sigmoid/tanh as evaluated by the kernel and by
    PyTorch are each within 2 ulps of the exact value (outputs <= 1): + 4 eps.
    """
    acc = binary_conv2d_reference(x, w).double()
    col = lambda v: v.double().abs().reshape(1, -1, 1, 1)  # noqa: E731
    mag = acc.abs() * col(epi.scale) + col(epi.shift) + col(epi.bias_a)
    eps = torch.finfo(epi.scale.dtype).eps
    bound = 16 * eps * mag
    if epi.act in ("sigmoid", "tanh"):
        bound = bound + 4 * eps
    elif epi.bias_b is not None:
        bound = bound + 16 * eps * col(epi.bias_b)
    return bound


def _assert_combined_equal(got, y3, mask, y1):
    """``got == y3 * mask + y1`` as PyTorch computes it: bitwise on the CPU (the interpreter
    rounds each op like PyTorch); on CUDA the kernel may fuse the multiply-add (one rounding
    fewer): within 2 eps of the terms' magnitude."""
    dense = y3 * mask + y1
    if DEVICE.type == "cpu":
        assert torch.equal(got, dense)
    else:
        tol = 2 * torch.finfo(got.dtype).eps * ((y3 * mask).abs() + y1.abs())
        assert ((got - dense).abs() <= tol).all()


UNIT_CASES = {
    # name: (mask kind, act, method)
    "empty-prelu": ("empty", "prelu", "dot"),
    "full-sigmoid": ("full", "sigmoid", "dot"),
    "corners-prelu": ("corners", "prelu", "dot"),
    "edges-tanh": ("edges", "tanh", "popcount"),
    "tile-borders-prelu": ("tile-borders", "prelu", "dot"),
    "random-0.05-tanh": ("random-0.05", "tanh", "dot"),
    "random-0.25-sigmoid": ("random-0.25", "sigmoid", "popcount"),
    "random-0.5-prelu": ("random-0.5", "prelu", "dot"),
}


@pytest.mark.parametrize("name", list(UNIT_CASES))
def test_sparse_unit_equals_dense(name):
    kind, act, method = UNIT_CASES[name]
    mask5 = _mask(kind).to(DEVICE)
    mask = mask5.flatten(0, 1)  # (B*T, 1, H, W), n = b*T + t
    x3, w3, x1, w1 = _unit_inputs(B * T, H, W)
    e3, e1 = _epilogue(act), _epilogue(act)
    tiles = active_tiles(mask5, TILE)
    got = sparse_unit(x3, w3, e3, x1, w1, e1, mask, tiles, method=method)
    assert got.shape == (B * T, COUT, H, W) and got.dtype == torch.float32

    # Wherever m == 0 the result is exactly the 1x1 branch of the dense kernel.
    y1 = binary_conv2d(x1, w1, e1, method=method).y
    zero = (mask == 0).expand_as(got)
    assert torch.equal(got[zero], y1[zero])
    # Everywhere: the dense fused kernels combined as the network does.
    y3 = binary_conv2d(x3, w3, e3, method=method).y
    _assert_combined_equal(got, y3, mask, y1)
    # And the plain-PyTorch reference, within the rounding bound.
    ref = sparse_unit_reference(x3, w3, e3, x1, w1, e1, mask)
    y3r, y1r = binary_conv2d_reference(x3, w3, e3).y, binary_conv2d_reference(x1, w1, e1).y
    eps = torch.finfo(torch.float32).eps
    m = mask.double()
    # each branch's error, scaled by |m|, plus the two roundings of the product and sum
    bound = _branch_bound(x3, w3, e3) * m + _branch_bound(x1, w1, e1) + 4 * eps * (y3r.double().abs() * m
                                                                                   + y1r.double().abs())
    diff = (got.double() - ref.double()).abs()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item()}"
    if kind == "empty":
        assert int(tiles.count.sum()) == 0 and torch.equal(got, y1)


def test_frame_lists_for_recurrent_steps():
    # A GRU step sees frame t of every item: (B, C, H, W) tensors with tiles.select(t).
    mask5 = _mask("random-0.1").to(DEVICE)
    tiles = active_tiles(mask5, TILE)
    x3, w3, x1, w1 = _unit_inputs(B, H, W)
    e3, e1 = _epilogue("sigmoid"), _epilogue("sigmoid")
    for t in range(T):
        m = mask5[:, t]  # (B, 1, H, W), a strided view
        got = sparse_unit(x3, w3, e3, x1, w1, e1, m, tiles.select(t))
        _assert_combined_equal(got, binary_conv2d(x3, w3, e3).y, m, binary_conv2d(x1, w1, e1).y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_unit_gru_update(dtype):
    # gru=(h, z, out): the unit's launch also applies the GRU update h + z (unit - h), i.e.
    # torch.lerp(h, unit, z) up to rounding, into a strided out (a frame of a clip tensor).
    mask5 = _mask("random-0.25").to(DEVICE)
    tiles = active_tiles(mask5, TILE)
    x3, w3, x1, w1 = _unit_inputs(B, H, W)
    kw = dict(dtype=dtype, device=DEVICE)
    e3 = Epilogue(scale=torch.rand(COUT, **kw), shift=torch.randn(COUT, **kw), act="tanh")
    e1 = Epilogue(scale=torch.rand(COUT, **kw), shift=torch.randn(COUT, **kw), act="tanh")
    clip = torch.randn(B, T, COUT, H, W + 2, **kw)[..., 1:-1]  # outputs (B, T, C, H, W), strided
    state = torch.randn(B, COUT, H, W, **kw)
    gate = torch.rand(B, 2 * COUT, H, W, **kw)[:, COUT:]  # the update half of the gates
    for t in range(T):
        m = mask5[:, t]
        unit = sparse_unit(x3, w3, e3, x1, w1, e1, m, tiles.select(t))
        got = sparse_unit(x3, w3, e3, x1, w1, e1, m, tiles.select(t), gru=(state, gate, clip[:, t]))
        assert got.data_ptr() == clip[:, t].data_ptr()
        want = torch.lerp(state, unit, gate)
        tol = 4 * torch.finfo(dtype).eps * (state.abs() + unit.abs())
        assert bool(((got - want).abs() <= tol).all())
        assert torch.equal(gru_update(unit, (state, gate, None)), want)
        fresh = sparse_unit(x3, w3, e3, x1, w1, e1, m, tiles.select(t), gru=(state, gate, None))
        assert torch.equal(fresh, got)
        state = got
    with pytest.raises(ValueError, match=r"gru z must be a float tensor of shape \(2, 24, 11, 19\)"):
        sparse_unit(x3, w3, e3, x1, w1, e1, mask5[:, 0], tiles.select(0), gru=(state, gate[:, :3], None))
    with pytest.raises(ValueError, match="gru out must have the unit's output dtype"):
        sparse_unit(x3, w3, e3, x1, w1, e1, mask5[:, 0], tiles.select(0), gru=(state, gate, state.half()))


@pytest.mark.parametrize("method", ["dot", "popcount"])
def test_sparse_conv_writes_active_tiles_only(method):
    # No mask stage, residuals in the epilogue, float64: the tiles get the dense epilogue's
    # values (same code as the dense kernel), every other pixel keeps its sentinel.
    mask5 = _mask("tile-borders").to(DEVICE)
    tiles = active_tiles(mask5, TILE, halo=1)
    x3, w3, _, _ = _unit_inputs(B * T, H, W)
    kw = dict(dtype=torch.float64, device=DEVICE)
    out = torch.full((B * T, COUT, H, W), float("nan"), **kw)
    epi = Epilogue(scale=torch.rand(COUT, **kw), shift=torch.randn(COUT, **kw), act="relu",
                   residual=Residual(torch.randn(B * T, COUT // 2, H, W, **kw)),
                   post_residual=torch.randn(B * T, COUT, H, W, **kw), out=out)
    sparse_binary_conv2d(x3, w3, epi, tiles, method=method)
    cover = tiles.coverage().expand_as(out)
    assert out[~cover].isnan().all() and not out[cover].isnan().any()
    dense = binary_conv2d(x3, w3, replace(epi, out=None), method=method).y
    assert torch.equal(out[cover], dense[cover])
    ref = torch.full_like(out, float("nan"))
    sparse_binary_conv2d_reference(x3, w3, replace(epi, out=ref), tiles)
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13, equal_nan=True)


@pytest.mark.parametrize("cout", [24, 70], ids=["BN32-BK64", "BN64-BK32"])
def test_sparse_conv_cuda_heuristic_tiles(cout):
    # The tiles the sparse conv launches with on CUDA (sparse_heuristic_config), run here:
    # the active tiles get exactly the dense kernel's values.
    from bimatting_triton.kernels.pack import words_for
    from bimatting_triton.kernels.sparse_unit import sparse_heuristic_config

    mask5 = _mask("tile-borders").to(DEVICE)
    tiles = active_tiles(mask5, TILE, halo=1)
    x = torch.randn(B * T, CIN, H, W, device=DEVICE)
    xp = sign_pack(x)
    wp = pack_weight(torch.randn(cout, CIN, 3, 3, device=DEVICE))
    cfg = sparse_heuristic_config(0, cout, words_for(CIN) * 32)
    out = torch.full((B * T, cout, H, W), float("nan"), device=DEVICE)
    epi = Epilogue(scale=torch.rand(cout, device=DEVICE), shift=torch.randn(cout, device=DEVICE), act="relu", out=out)
    sparse_binary_conv2d(xp, wp, epi, tiles, block=(cfg["BN"], cfg["BK"]))
    cover = tiles.coverage().expand_as(out)
    assert out[~cover].isnan().all() and not out[cover].isnan().any()
    dense = binary_conv2d(xp, wp, replace(epi, out=None)).y
    assert torch.equal(out[cover], dense[cover])


def test_dense_kernel_mask_stage_and_gate_activations():
    # The dense kernel's own mask stage (y * m [+ addend]) and sigmoid / tanh against the reference.
    x3, w3, _, _ = _unit_inputs(2, 5, 7)
    mask = torch.rand(2, 1, 5, 7, device=DEVICE)
    mask[:, :, 2] = 0
    addend = torch.randn(2, COUT, 5, 7, device=DEVICE)
    for act, with_addend in (("sigmoid", True), ("tanh", False)):
        epi = _epilogue(act)
        epi.mask, epi.addend = mask, addend if with_addend else None
        got = binary_conv2d(x3, w3, epi).y
        ref = binary_conv2d_reference(x3, w3, epi).y
        bound = _branch_bound(x3, w3, epi) + 4 * torch.finfo(torch.float32).eps * ref.abs().double()
        assert ((got.double() - ref.double()).abs() <= bound).all()
        if with_addend:
            assert torch.equal(got[:, :, 2], addend[:, :, 2])


# ----------------------------------------------------------------------------------------
# sparse float conv (decode0)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_float_conv(dtype):
    c = 16
    mask5 = _mask("edges").to(DEVICE, dtype)
    mask = mask5.flatten(0, 1)
    tiles = active_tiles(mask5, TILE)
    kw = dict(dtype=dtype, device=DEVICE)
    x = torch.randn(B * T, c, H, W, **kw).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last
    weight = torch.randn(c, c, 3, 3, **kw)
    scale, shift = torch.rand(c, **kw) + 0.5, torch.randn(c, **kw)
    addend = torch.randn(B * T, c, H, W, **kw)
    out = addend.clone()
    sparse_float_conv2d(x, weight, scale, shift, "relu", out, tiles, mask=mask, addend=out)
    # The dense computation, in float64.
    want = torch.relu(F.conv2d(x.double(), weight.double(), padding=1) * scale.double().reshape(1, c, 1, 1)
                      + shift.double().reshape(1, c, 1, 1)) * mask.double() + addend.double()
    zero = (mask == 0).expand_as(out)
    assert torch.equal(out[zero], addend[zero])
    # 144-term dot products: |error| <= 144 eps sum|x w| in any summation order; then the
    # scale, shift, product with m and sum with the addend: a few roundings more.
    eps = torch.finfo(dtype).eps
    m = mask.double()
    mag = F.conv2d(x.double().abs(), weight.double().abs(), padding=1) * scale.double().reshape(1, c, 1, 1)
    mag = mag + shift.double().abs().reshape(1, c, 1, 1)
    bound = 150 * eps * mag * m + 4 * eps * ((want - addend.double()).abs() + addend.double().abs())
    assert ((out.double() - want).abs() <= bound).all()
    ref = addend.clone()
    sparse_float_conv2d_reference(x, weight, scale, shift, "relu", ref, tiles, mask=mask, addend=ref)
    assert ((out.double() - ref.double()).abs() <= 2 * bound).all()


# ----------------------------------------------------------------------------------------
# errors and fallback
# ----------------------------------------------------------------------------------------
def test_bad_arguments():
    mask5 = _mask("corners")
    tiles = active_tiles(mask5, TILE)
    x3, w3, x1, w1 = _unit_inputs(B * T, H, W)
    epi = _epilogue("prelu")
    with pytest.raises(ValueError, match="epilogue.out is required"):
        sparse_binary_conv2d(x3, w3, epi, tiles)
    out = torch.zeros(B * T, COUT, H, W)
    with pytest.raises(ValueError, match="floats only"):
        sparse_binary_conv2d(x3, w3, replace(epi, out=out, pack=True), tiles)
    with pytest.raises(ValueError, match="tiles cover 2 items x 1 frames"):
        sparse_binary_conv2d(x3, w3, replace(epi, out=out), tiles.select(0))
    with pytest.raises(TypeError, match="tiles must be a TileList"):
        sparse_binary_conv2d(x3, w3, replace(epi, out=out), mask5)
    with pytest.raises(ValueError, match="block must be"):
        sparse_binary_conv2d(x3, w3, replace(epi, out=out), tiles, block=(24, 64))
    with pytest.raises(ValueError, match="tile must be"):
        active_tiles(mask5, (3, 8))
    with pytest.raises(ValueError, match="mask must be a float"):
        active_tiles(torch.zeros(B, T, 2, H, W))
    with pytest.raises(ValueError, match="epi3: out, mask, addend and pack are set by the unit"):
        sparse_unit(x3, w3, replace(epi, out=out), x1, w1, epi, mask5.flatten(0, 1), tiles)
    with pytest.raises(ValueError, match="w3 must be a 3x3 conv with padding 1 and w1 a 1x1"):
        sparse_unit(x1, w1, epi, x3, w3, epi, mask5.flatten(0, 1), tiles)  # branches swapped
    with pytest.raises(ValueError, match="mask must be a float tensor of shape"):
        sparse_unit(x3, w3, epi, x1, w1, epi, mask5.flatten(0, 1)[:, :, 1:], tiles)
    with pytest.raises(ValueError, match="tiles cover 2 items x 1 frames"):
        sparse_unit(x3, w3, epi, x1, w1, epi, mask5.flatten(0, 1), tiles.select(0))
    with pytest.raises(ValueError, match="epilogue.mask must be a float tensor of shape"):
        binary_conv2d(x3, w3, replace(epi, mask=torch.zeros(B * T, 2, H, W)))
    with pytest.raises(ValueError, match="addend is only used with a mask"):
        binary_conv2d(x3, w3, replace(epi, addend=out))
    with pytest.raises(ValueError, match="TileList: index and flags"):
        TileList(tiles.index, tiles.count, tiles.flags[:, :-1], B, (H, W), TILE)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the fallback is for devices where Triton cannot run")
def test_fallback_without_triton(monkeypatch):
    mask5 = _mask("random-0.1")
    x3, w3, x1, w1 = _unit_inputs(B * T, H, W)
    e3, e1 = _epilogue("tanh"), _epilogue("tanh")
    tiles = active_tiles(mask5, TILE)
    want = sparse_unit(x3, w3, e3, x1, w1, e1, mask5.flatten(0, 1), tiles)
    monkeypatch.setattr(_common, "interpreting", lambda: False)  # as without TRITON_INTERPRET
    fallback_tiles = active_tiles(mask5, TILE)
    assert torch.equal(fallback_tiles.index, active_tiles_reference(mask5, TILE).index)
    got = sparse_unit(x3, w3, e3, x1, w1, e1, mask5.flatten(0, 1), fallback_tiles)
    ref = sparse_unit_reference(x3, w3, e3, x1, w1, e1, mask5.flatten(0, 1))
    assert torch.equal(got, ref)  # the reference path, tile by tile, is the dense reference
    torch.testing.assert_close(got, want, rtol=0, atol=8 * torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------------------
# bench/sparse.py (counts on any machine; the kernels' checks under the interpreter)
# ----------------------------------------------------------------------------------------
def _sparse_bench(monkeypatch):
    import importlib.util
    import sys

    bench_dir = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
    monkeypatch.syspath_prepend(bench_dir)  # for bench/cli_args.py
    spec = importlib.util.spec_from_file_location("sparse_bench", os.path.join(bench_dir, "sparse.py"))
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the CUDA session runs the bench itself")
def test_bench_checks_every_unit_against_dense(monkeypatch, capsys):
    # --check-only: each sparse kernel and the one-launch masked unit checked against the
    # dense kernels (bitwise where m == 0) at every level's real shapes, small frame.
    bench = _sparse_bench(monkeypatch)
    rows = bench.main(["--size", "64x36@1", "--densities", "30", "--dtype", "float32", "--check-only"])
    out = capsys.readouterr()
    assert "unit ms" in out.out
    assert len([line for line in out.err.splitlines() if line.startswith("  30% ")]) == 11  # a line per row, as run
    assert len(rows) == 11 and all(0 < r.tiles <= 1 for r in rows)


def test_bench_counts_skipped_bops(monkeypatch, capsys):
    bench = _sparse_bench(monkeypatch)
    rows = bench.main(["--size", "256x144@0.5", "--densities", "0,10,100", "--counts-only"])
    assert "skipped GBOPs" in capsys.readouterr().out
    # At 0 % every masked multiply-accumulate is skipped: Cin * 9 * Cout per pixel of each
    # level (levels: the 128x72 network input, then ceil-halved), from the model's shapes.
    sizes = {"decode0": (72, 128), "decode1": (36, 64), "decode2": (18, 32), "decode3": (9, 16)}
    shapes = {"decode3": [(195, 80), (80, 80), (80, 40)], "decode2": [(115, 40), (40, 40), (40, 20)],
              "decode1": [(59, 32), (32, 32), (32, 16)], "decode0": [(35, 16)]}
    total = sum(ci * 9 * co * sizes[b][0] * sizes[b][1] for b, units in shapes.items() for ci, co in units)
    zero = [r for r in rows if r.target == 0]
    assert sum(r.skipped_g for r in zero if r.unit != "conv.float") == pytest.approx(total / 1e9, rel=1e-12)
    assert all(r.skipped_g == 0 and r.tiles == 1 for r in rows if r.target == 1)
    ten = [r for r in rows if r.target == 0.1]
    assert all(abs(r.pixels - 0.1) < 0.05 and r.pixels <= r.tiles < 1 for r in ten)
