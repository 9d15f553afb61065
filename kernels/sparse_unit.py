"""Tile-sparse decoder units: the 3x3 branches computed only where the incoherence mask is set.

BiMatting's decoder computes, at every level, ``branch3x3(x) * m + branch1x1(x)`` with
``m`` the incoherence mask resized to the level (soft, in [0, 1]; SPEC §2). Wherever
``m == 0`` the 3x3 branch contributes nothing, so it is computed here only on the
*active tiles*: the output tiles of ``TH x TW`` pixels that hold a pixel with
``m != 0``. One launch computes the unit, a program per tile (active or not)::

    y1 = unit1x1(x)[tile]                         # every tile
    out[tile] = unit3x3(x)[tile] * m[tile] + y1   # active tiles
    out[tile] = y1                                # the others

Inactive tiles get ``unit1x1(x)``, which is exactly ``unit3x3 * 0 + unit1x1`` (for a
finite 3x3 result); inside an active tile the kernel computes the same
``y3 * m + y1`` in the same order as the dense path, so the result equals the dense
computation everywhere (bitwise under the interpreter, where both round like PyTorch;
on GPU the multiply-add may be contracted into an FMA: within one rounding).

The active tiles come as a :class:`~bimatting_triton.kernels.tile_list.TileList`
(:mod:`~bimatting_triton.kernels.tile_list`: built on the device without a host sync, one
row per frame; the sparse kernels are launched with a grid of the list's capacity and each
program beyond the row's count returns at once).

Kernels (each beside its plain-PyTorch reference)
-------------------------------------------------
* :func:`sparse_binary_conv2d` — the packed binary convolution of
  :mod:`~bimatting_triton.kernels.binary_conv` (same accumulator and fused epilogue code,
  shared ``@triton.jit`` helpers) over the active tiles only, writing into
  ``epilogue.out`` there and nowhere else; the halo of a 3x3 is read from the dense
  packed input. With ``epilogue.mask`` / ``addend = out`` it is the masked unit.
* :func:`sparse_float_conv2d` — a float KxK convolution (``tl.dot``, IEEE fp32 or fp64)
  with per-channel scale/shift (folded BatchNorm), activation and the mask stage over
  the active tiles: decode0's float 3x3 conv inside its masked branch.
* :func:`sparse_unit` — the whole masked unit ``unit3x3 * m + unit1x1`` in one launch
  (``_masked_pair_kernel``: the 1x1 on every tile, the 3x3 where the tile's flag is
  set); :func:`sparse_unit_reference` is the dense computation. (Epilogues with
  residuals, which the decoder's units do not have, take two launches: the dense 1x1,
  then :func:`sparse_binary_conv2d` rewriting the active tiles.)

Counting: :meth:`TileList.computed_pixels` / :meth:`TileList.density` and
:func:`skipped_bops` give the work actually skipped (device tensors; reading them syncs).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import autotuning, cdiv, hardware_popcount, interpreting, note_compiled, triton_can_run
from ._common import pow2 as _pow2
from .tile_list import TileList, _check_tiles, _tile_coords, active_tiles, active_tiles_reference, default_tile
from .binary_conv import (
    METHODS,
    _check_conv_args,
    binary_conv2d,
    binary_conv2d_reference,
    conv_accumulate,
    dot_channel_step,
)
from .epilogue import (
    BoundEpilogue,
    Epilogue,
    _prepare,
    _residual_args,
    apply_activation,
    apply_mask,
    channel_flags,
    epilogue_flags,
    epilogue_values,
    epilogue_vectors,
    float_map,
    mask_args,
)
from .pack import PackedActivation
from .packed_weight import PackedWeight

__all__ = [
    "TileList",
    "default_tile",
    "active_tiles",
    "active_tiles_reference",
    "sparse_binary_conv2d",
    "sparse_binary_conv2d_reference",
    "sparse_float_conv2d",
    "sparse_float_conv2d_reference",
    "sparse_unit",
    "sparse_unit_reference",
    "gru_update",
    "skipped_bops",
]

# ----------------------------------------------------------------------------------------
# Sparse packed binary convolution
# ----------------------------------------------------------------------------------------
@triton.jit
def _sparse_conv_kernel(
    tiles_ptr, count_ptr, L, TPI, TILES_W, G,  # tile list row g: index (G, L), count (G,)
    x_ptr, w_ptr, H, W, HO, WO, CW, COUT,
    scale_ptr, shift_ptr, ba_ptr, slope_ptr, bb_ptr,
    r1_ptr, r1_sn, r1_sc, r1_sh, r1_sw, R1H, R1W, R1C,
    r2_ptr, r2_sn, r2_sc, r2_sh, r2_sw, R2H, R2W, R2C,
    m_ptr, m_sn, m_sh, m_sw,
    a_ptr, a_sn, a_sc, a_sh, a_sw,
    y_ptr, y_sn, y_sc, y_sh, y_sw,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    METHOD: tl.constexpr, HW_POPC: tl.constexpr,
    HAS_SHIFT: tl.constexpr, R1_MODE: tl.constexpr, HAS_BA: tl.constexpr, ACT: tl.constexpr,
    HAS_BB: tl.constexpr, R2_MODE: tl.constexpr, MASK_MODE: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # The dense kernel's implicit GEMM with its BM pixel rows replaced by one TH x TW tile
    # of the list; programs past the frame's count return at once (no host sync).
    active, n_img, oh, ow, m_ok = _tile_coords(tiles_ptr, count_ptr, L, TPI, TILES_W, G, HO, WO, TH, TW)
    if active:
        pid_n = tl.program_id(2)
        offs_n = pid_n * BN + tl.arange(0, BN)
        n_ok = offs_n < COUT
        acc = conv_accumulate(x_ptr, w_ptr, n_img, oh, ow, m_ok, offs_n, n_ok, H, W, CW, COUT,
                              KH, KW, STRIDE, PAD, METHOD, HW_POPC, TH * TW, BN, BK)
        mask = m_ok[:, None] & n_ok[None, :]
        n64 = n_img.to(tl.int64)
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        y = epilogue_values(
            acc, offs_n, n_ok, mask, n64, oh64, ow64, scale_ptr, shift_ptr, ba_ptr, slope_ptr, bb_ptr,
            r1_ptr, r1_sn, r1_sc, r1_sh, r1_sw, R1H, R1W, R1C,
            r2_ptr, r2_sn, r2_sc, r2_sh, r2_sw, R2H, R2W, R2C,
            HAS_SHIFT, R1_MODE, HAS_BA, ACT, HAS_BB, R2_MODE,
        )
        y_out = apply_mask(y.to(y_ptr.dtype.element_ty), m_ptr, m_sn, m_sh, m_sw, a_ptr, a_sn, a_sc, a_sh, a_sw,
                           n64, oh64, ow64, offs_n, mask, MASK_MODE)
        y_off = (n64 * y_sn + oh64 * y_sh + ow64 * y_sw)[:, None] + (offs_n.to(tl.int64) * y_sc)[None, :]
        tl.store(y_ptr + y_off, y_out, mask=mask)


def _sparse_configs(method: int) -> list:
    if method == 0:
        # Tiles that compile without spills on sm_90, triton 3.6 and 3.9 (compile_report.py --kernel sparse).
        shapes = [(16, 64, 4), (32, 64, 4), (64, 64, 4), (32, 128, 4), (64, 128, 4)]
        return [triton.Config(dict(BN=n, BK=k), num_warps=w, num_stages=3) for n, k, w in shapes]
    shapes = [(32, 32, 4), (64, 32, 4), (32, 64, 4), (64, 64, 8)]
    return [triton.Config(dict(BN=n, BK=k), num_warps=w, num_stages=2) for n, k, w in shapes]


_SPARSE_KEY = ["COUT", "CW", "KH", "KW", "STRIDE", "TH", "TW", "ACT", "MASK_MODE"]
_SPARSE_TUNED = {}


@functools.lru_cache(maxsize=1024)
def sparse_heuristic_config(method: int, cout: int, cin_pad: int) -> dict:
    """One tile per layer shape (CUDA, no autotuning): the tile's 64 pixels x BN channels.

    As the dense conv's rule (``binary_conv._heuristic_config``: the widest tile the layer
    fills, 4 warps) with BN at most 64: chosen with bench/compile_report.py --kernel sparse
    for sm_90 on triton 3.6 and 3.9, no spills and at most ~170 registers per thread (BN = 128
    tiles need 244-255 and spill at BK = 64; 8 warps issue twice the instructions per MAC).
    Cached: the same dict for the same arguments (callers read it, never change it).
    """
    if method == 0:
        return dict(BN=min(64, max(16, _pow2(cout))), BK=dot_channel_step(cin_pad), num_warps=4, num_stages=3)
    return dict(BN=min(64, max(16, _pow2(cout))), BK=min(64, max(32, _pow2(cin_pad))), num_warps=4, num_stages=2)


def _sparse_launcher(method: int, block, cout: int, cin_pad: int):
    if block is not None:
        return _sparse_conv_kernel, dict(BN=block[0], BK=block[1])
    if interpreting():
        return _sparse_conv_kernel, _interpreter_tile(cout, cin_pad)
    if not autotuning():  # one heuristic tile per layer shape (see kernels/_common.autotuning)
        return _sparse_conv_kernel, sparse_heuristic_config(method, cout, cin_pad)
    if method not in _SPARSE_TUNED:
        # restore_value: the output is read-modify-written (addend = out): every trial
        # run of the autotuner must start from the same output.
        _SPARSE_TUNED[method] = triton.autotune(
            configs=_sparse_configs(method), key=_SPARSE_KEY, restore_value=["y_ptr"]
        )(_sparse_conv_kernel)
    return _SPARSE_TUNED[method], {}


def _check_sparse_epilogue(epilogue) -> None:
    if not isinstance(epilogue, Epilogue):
        raise TypeError(f"epilogue must be an Epilogue, got {type(epilogue).__name__}")
    if epilogue.out is None:
        raise ValueError("epilogue.out is required: the sparse conv writes the active tiles of an existing output")
    if epilogue.pack or not epilogue.store_float:
        raise ValueError("the sparse conv stores floats only (epilogue.pack=False, store_float=True)")


def sparse_binary_conv2d_reference(
    x: PackedActivation, weight: PackedWeight, epilogue: Epilogue, tiles: TileList
) -> Tensor:
    """Plain PyTorch: the dense :func:`binary_conv2d_reference` with the epilogue (mask stage
    included), copied into ``epilogue.out`` on the active tiles only. Returns ``epilogue.out``."""
    n, _, _, _, ho, wo = _check_conv_args(x, weight)
    _check_sparse_epilogue(epilogue)
    _check_tiles(tiles, n, ho, wo, x.device)
    out = epilogue.out
    dense = binary_conv2d_reference(
        x, weight, dataclasses.replace(epilogue, out=None, out_dtype=epilogue.out_dtype or out.dtype)
    ).y  # reads the addend (possibly ``out``) before anything is written
    out.copy_(torch.where(tiles.coverage(), dense, out))
    return out


def sparse_binary_conv2d(
    x: PackedActivation,
    weight: PackedWeight,
    epilogue: Epilogue,
    tiles: TileList,
    *,
    method: str = "auto",
    block: tuple[int, int] | None = None,
) -> Tensor:
    """Packed binary conv + fused epilogue computed only on the active tiles of ``tiles``.

    ``x``: :class:`PackedActivation` (N, Cin, H, W), dense (the halo of a tile is read
    from it). ``weight``: :class:`PackedWeight`. ``epilogue``: an :class:`Epilogue` with
    ``out`` (N, Cout, Ho, Wo) given (any strides): on the active tiles it receives the
    epilogue's result, elsewhere it is left untouched; ``pack`` is not supported. For the
    decoder's masked unit pass ``mask`` (N, 1, Ho, Wo) and ``addend=out`` holding the 1x1
    branch: ``out = y3 * mask + out`` on the tiles (see :func:`sparse_unit`).
    ``tiles``: a :class:`TileList` of size (Ho, Wo) whose items x frames is N (folded
    ``n = b*G + g``). ``method``: as :func:`binary_conv2d`. ``block``: optional (BN, BK)
    (powers of two, BN >= 16, BK >= 32); the pixel tile is the list's. Returns ``out``.
    Triton on CUDA or under ``TRITON_INTERPRET=1``; elsewhere the reference.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if block is not None:
        ok = (isinstance(block, tuple) and len(block) == 2 and all(isinstance(v, int) and v > 0 for v in block)
              and all(v & (v - 1) == 0 for v in block) and block[0] >= 16 and block[1] >= 32)
        if not ok:
            raise ValueError(f"block must be (BN, BK): powers of two, BN >= 16, BK >= 32; got {block!r}")
    n, _, h, w, ho, wo = _check_conv_args(x, weight)
    _check_sparse_epilogue(epilogue)
    _check_tiles(tiles, n, ho, wo, x.device)
    cout = weight.out_channels
    p = _prepare(epilogue, n, cout, ho, wo, x.device)
    if not triton_can_run(x.bits) or (interpreting() and p.out_dtype == torch.bfloat16):
        return sparse_binary_conv2d_reference(x, weight, epilogue, tiles)
    y = p.out
    if tiles.capacity == 0 or tiles.groups == 0:
        return y
    code = 1 if method == "popcount" else 0
    dummy = p.scale
    vectors = epilogue_vectors(p)
    margs, aargs, mode = mask_args(p.mask, p.addend, dummy)
    kernel, config = _sparse_launcher(code, block, cout, x.words * 32)
    kh, kw = weight.kernel_size
    th, tw = tiles.tile

    def grid(meta):
        return (tiles.capacity, tiles.groups, cdiv(cout, meta["BN"]))

    compiled = kernel[grid](
        tiles.index, tiles.count, tiles.capacity, tiles.tiles_per_item, tiles.tiles_w, tiles.groups,
        x.bits, weight.int8 if code == 0 else weight.bits, h, w, ho, wo, x.words, cout,
        *vectors, *_residual_args(p.residual, dummy), *_residual_args(p.post_residual, dummy),
        *margs, *aargs, y, *y.stride(),
        KH=kh, KW=kw, STRIDE=weight.stride, PAD=weight.padding, METHOD=code, HW_POPC=hardware_popcount(x.bits),
        **epilogue_flags(p), MASK_MODE=mode, TH=th, TW=tw, **config,
    )
    note_compiled(f"sparse_conv{kh}x{kw}", config, compiled)
    return y


# ----------------------------------------------------------------------------------------
# The masked unit: dense 1x1 branch + sparse 3x3 branch
# ----------------------------------------------------------------------------------------
def _check_unit_epilogue(epi, name: str) -> None:
    if not isinstance(epi, (Epilogue, BoundEpilogue)):
        raise TypeError(f"{name} must be an Epilogue (or EpiloguePlan.bind()), got {type(epi).__name__}")
    if epi.out is not None or epi.mask is not None or epi.addend is not None or epi.pack:
        raise ValueError(f"{name}: out, mask, addend and pack are set by the unit; leave them unset")


@triton.jit
def _masked_pair_kernel(
    flags_ptr, flags_sg, TPI, TILES_W,  # flags (G, L) of the mask's tiles (halo 0), row stride flags_sg
    G, x3_ptr, w3_ptr, x1_ptr, w1_ptr, H, W, CW, COUT,
    s3_ptr, sh3_ptr, ba3_ptr, sl3_ptr, bb3_ptr,  # the 3x3 branch's epilogue vectors
    s1_ptr, sh1_ptr, ba1_ptr, sl1_ptr, bb1_ptr,  # the 1x1 branch's
    m_ptr, m_sn, m_sh, m_sw,
    y_ptr, y_sn, y_sc, y_sh, y_sw,
    h_ptr, h_sn, h_sc, h_sh, h_sw,  # GRU: the state h (N, COUT, H, W)
    z_ptr, z_sn, z_sc, z_sh, z_sw,  # GRU: the update gate z (N, COUT, H, W)
    METHOD: tl.constexpr, HW_POPC: tl.constexpr,
    HAS_SHIFT3: tl.constexpr, HAS_BA3: tl.constexpr, ACT3: tl.constexpr, HAS_BB3: tl.constexpr,
    HAS_SHIFT1: tl.constexpr, HAS_BA1: tl.constexpr, ACT1: tl.constexpr, HAS_BB1: tl.constexpr,
    GRU: tl.constexpr,  # store the GRU's new state h + z * (unit - h) instead of the unit
    TH: tl.constexpr, TW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    # One program per tile of the frame (active or not) and BN output channels: the 1x1
    # branch everywhere, the 3x3 branch and ``y3 * m + y1`` only where the tile is active.
    e = tl.program_id(0)
    g = tl.program_id(1)
    pid_n = tl.program_id(2)
    item = e // TPI
    r = e % TPI
    n_img = item * G + g  # folded (B*G) order, as the tile lists
    p = tl.arange(0, TH * TW)
    oh = (r // TILES_W) * TH + p // TW
    ow = (r % TILES_W) * TW + p % TW
    m_ok = (oh < H) & (ow < W)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_ok = offs_n < COUT
    mask = m_ok[:, None] & n_ok[None, :]
    n64 = n_img.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    acc1 = conv_accumulate(x1_ptr, w1_ptr, n_img, oh, ow, m_ok, offs_n, n_ok, H, W, CW, COUT,
                           1, 1, 1, 0, METHOD, HW_POPC, TH * TW, BN, BK)
    # (no residuals in the decoder's units: the residual slots get a dummy pointer, mode 0)
    y = epilogue_values(acc1, offs_n, n_ok, mask, n64, oh64, ow64, s1_ptr, sh1_ptr, ba1_ptr, sl1_ptr, bb1_ptr,
                        s1_ptr, 0, 0, 0, 0, 1, 1, 1, s1_ptr, 0, 0, 0, 0, 1, 1, 1,
                        HAS_SHIFT1, 0, HAS_BA1, ACT1, HAS_BB1, 0).to(y_ptr.dtype.element_ty)
    if tl.load(flags_ptr + g.to(tl.int64) * flags_sg + e) != 0:
        acc3 = conv_accumulate(x3_ptr, w3_ptr, n_img, oh, ow, m_ok, offs_n, n_ok, H, W, CW, COUT,
                               3, 3, 1, 1, METHOD, HW_POPC, TH * TW, BN, BK)
        y3 = epilogue_values(acc3, offs_n, n_ok, mask, n64, oh64, ow64, s3_ptr, sh3_ptr, ba3_ptr, sl3_ptr, bb3_ptr,
                             s3_ptr, 0, 0, 0, 0, 1, 1, 1, s3_ptr, 0, 0, 0, 0, 1, 1, 1,
                             HAS_SHIFT3, 0, HAS_BA3, ACT3, HAS_BB3, 0)
        # y3 * m + y1 in the output dtype, as the network and the two-kernel form round it
        m = tl.load(m_ptr + (n64 * m_sn + oh64 * m_sh + ow64 * m_sw)[:, None], mask=mask, other=0.0)
        y = y3.to(y_ptr.dtype.element_ty) * m.to(y_ptr.dtype.element_ty) + y
    if GRU:
        # torch.lerp(h, y, z) up to rounding, in the epilogue's compute dtype
        cd = s1_ptr.dtype.element_ty
        h_off = (n64 * h_sn + oh64 * h_sh + ow64 * h_sw)[:, None] + (offs_n.to(tl.int64) * h_sc)[None, :]
        z_off = (n64 * z_sn + oh64 * z_sh + ow64 * z_sw)[:, None] + (offs_n.to(tl.int64) * z_sc)[None, :]
        h = tl.load(h_ptr + h_off, mask=mask, other=0.0).to(cd)
        z = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(cd)
        y = (h + z * (y.to(cd) - h)).to(y_ptr.dtype.element_ty)
    y_off = (n64 * y_sn + oh64 * y_sh + ow64 * y_sw)[:, None] + (offs_n.to(tl.int64) * y_sc)[None, :]
    tl.store(y_ptr + y_off, y, mask=mask)


def sparse_unit(
    x3: PackedActivation,
    w3: PackedWeight,
    epi3: Epilogue | BoundEpilogue,
    x1: PackedActivation,
    w1: PackedWeight,
    epi1: Epilogue | BoundEpilogue,
    mask: Tensor,
    tiles: TileList,
    *,
    method: str = "auto",
    gru: tuple[Tensor, Tensor, Tensor | None] | None = None,
) -> Tensor:
    """The decoder's masked unit ``unit3x3(x) * mask + unit1x1(x)``, the 3x3 only on active tiles.

    ``x3`` / ``x1``: the unit input packed with each branch's own LearnableBias (N, Cin,
    H, W); ``w3`` / ``w1``: 3x3 (padding 1) and 1x1 :class:`PackedWeight` (same Cout, stride 1);
    ``epi3`` / ``epi1``: their epilogues (BN/bias/LB/activation, e.g. the GRU gates'
    ``act='sigmoid'``), without ``out``/``mask``/``addend``/``pack`` (and, with the
    kernel, without residuals); :class:`Epilogue` s or ``EpiloguePlan.bind()`` s.
    ``mask``: float (N, 1, H, W), the level's mask; ``tiles``: its :class:`TileList`
    (``halo=0`` suffices). Returns (N, Cout, H, W) (channels-last)
    of ``epi1``'s output dtype: the 1x1 branch everywhere, ``y3 * mask + y1`` on the
    active tiles. One launch (``_masked_pair_kernel``: a program per tile, the 3x3 only
    where the tile's flag is set). Equal to :func:`sparse_unit_reference` wherever
    ``mask == 0`` exactly, elsewhere up to rounding.

    ``gru = (h, z, out)``: the unit is a GRU's candidate; return the new state
    ``torch.lerp(h, unit, z)`` = ``h + z * (unit - h)`` instead (computed in the epilogue's
    dtype, stored in ``out``, a (N, Cout, H, W) tensor of the output dtype, any strides, or
    a new one if ``out`` is None; ``h``, ``z``: (N, Cout, H, W), any strides).
    """
    _check_unit_epilogue(epi3, "epi3")
    _check_unit_epilogue(epi1, "epi1")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, _, h, w, ho, wo = _check_conv_args(x1, w1)
    n3, _, h3, w3_, _, _ = _check_conv_args(x3, w3)
    if w1.kernel_size != (1, 1) or w1.stride != 1 or w3.kernel_size != (3, 3) or w3.stride != 1 or w3.padding != 1:
        raise ValueError(f"sparse_unit: w3 must be a 3x3 conv with padding 1 and w1 a 1x1, both stride 1; got "
                         f"{w3.kernel_size} pad {w3.padding} stride {w3.stride} and {w1.kernel_size} stride {w1.stride}")
    if (n3, h3, w3_) != (n, h, w) or w3.out_channels != w1.out_channels or x3.words != x1.words:
        raise ValueError(f"sparse_unit: x3/w3 {(n3, x3.channels, h3, w3_)} -> {w3.out_channels} and x1/w1 "
                         f"{(n, x1.channels, h, w)} -> {w1.out_channels} must match")
    cout = w1.out_channels
    if not triton_can_run(x1.bits) or epi3.residual is not None or epi1.residual is not None \
            or epi3.post_residual is not None or epi1.post_residual is not None:
        return _sparse_unit_two_launches(x3, w3, epi3, x1, w1, epi1, mask, tiles, method, gru)
    p1 = _prepare(epi1, n, cout, ho, wo, x1.device)
    p3 = _prepare(epi3, n, cout, ho, wo, x1.device)  # (its out_dtype is not used: the unit stores epi1's)
    if interpreting() and p1.out_dtype == torch.bfloat16:
        return _sparse_unit_two_launches(x3, w3, epi3, x1, w1, epi1, mask, tiles, method, gru)
    mask = float_map(mask, "mask", (n, 1, ho, wo), x1.device)
    _check_tiles(tiles, n, ho, wo, x1.device)
    h_state, z_gate, y = _check_gru(gru, n, cout, ho, wo, p1.out_dtype, x1.device)
    if y is None:
        y = torch.empty((n, cout, ho, wo), dtype=p1.out_dtype, device=x1.device, memory_format=torch.channels_last)
    if n == 0 or tiles.capacity == 0 or tiles.groups == 0:
        return y
    if interpreting() and mask.dtype == torch.bfloat16:
        mask = mask.float()
    code = 1 if method == "popcount" else 0

    def flags(pp, suffix):  # (no residuals in the pair: only the per-channel flags)
        return {f"{name}{suffix}": value for name, value in channel_flags(pp).items()}

    config = _pair_config(code, cout, x1.words * 32)
    th, tw = tiles.tile
    grid = (tiles.capacity, tiles.groups, cdiv(cout, config["BN"]))
    compiled = _masked_pair_kernel[grid](
        tiles.flags, tiles.flags.stride(0), tiles.tiles_per_item, tiles.tiles_w, tiles.groups,
        x3.bits, w3.int8 if code == 0 else w3.bits, x1.bits, w1.int8 if code == 0 else w1.bits,
        h, w, x1.words, cout, *epilogue_vectors(p3), *epilogue_vectors(p1),
        mask, mask.stride(0), mask.stride(2), mask.stride(3), y, *y.stride(),
        *((h_state, *h_state.stride()) if gru else (y, 0, 0, 0, 0)),
        *((z_gate, *z_gate.stride()) if gru else (y, 0, 0, 0, 0)),
        METHOD=code, HW_POPC=hardware_popcount(x1.bits), **flags(p3, "3"), **flags(p1, "1"), GRU=gru is not None,
        TH=th, TW=tw, **config,
    )
    note_compiled("masked_pair", config, compiled)
    return y


def _pair_config(method: int, cout: int, cin_pad: int) -> dict:
    """The masked pair kernel's tile: one of the sparse conv's (a tile's 64 pixels x BN
    channels), fixed under the interpreter."""
    if interpreting():
        return _interpreter_tile(cout, cin_pad)
    return sparse_heuristic_config(method, cout, cin_pad)


def _interpreter_tile(cout: int, cin_pad: int) -> dict:
    """BN, BK of the sparse kernels under the interpreter: big (its cost is per op and program)."""
    return dict(BN=min(128, max(16, _pow2(cout))), BK=min(256, max(32, _pow2(cin_pad))))


def _check_gru(gru, n: int, cout: int, h: int, w: int, dtype: torch.dtype, device):
    """(h, z, out) of :func:`sparse_unit`'s ``gru`` checked, or (None, None, None)."""
    if gru is None:
        return None, None, None
    if not isinstance(gru, tuple) or len(gru) != 3:
        raise TypeError("gru must be a tuple (h, z, out) with out a tensor or None")
    state, gate, out = gru
    for name, t in (("gru h", state), ("gru z", gate), ("gru out", out)):
        if t is None and name == "gru out":
            continue
        if not isinstance(t, Tensor) or tuple(t.shape) != (n, cout, h, w) or not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor of shape {(n, cout, h, w)}, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
    if out is not None and out.dtype != dtype:
        raise ValueError(f"gru out must have the unit's output dtype {dtype}, got {out.dtype}")
    return state, gate, out


def _sparse_unit_two_launches(x3, w3, epi3, x1, w1, epi1, mask, tiles, method, gru=None) -> Tensor:
    """The dense 1x1 launch then the sparse 3x3 rewriting the active tiles (residuals allowed),
    then the GRU update if asked (``torch.lerp``)."""
    if isinstance(epi3, BoundEpilogue):
        epi3 = epi3.as_epilogue()
    y1 = binary_conv2d(x1, w1, epi1, method=method).y
    epi = dataclasses.replace(epi3, out=y1, out_dtype=y1.dtype, mask=mask, addend=y1)
    unit = sparse_binary_conv2d(x3, w3, epi, tiles, method=method)
    return unit if gru is None else gru_update(unit, gru)


def gru_update(unit: Tensor, gru: tuple[Tensor, Tensor, Tensor | None]) -> Tensor:
    """``torch.lerp(h, unit, z)`` for ``gru = (h, z, out)``, into ``out`` if given (the
    plain-PyTorch form of :func:`sparse_unit`'s ``gru`` option)."""
    state, gate, out = gru
    n, c, h, w = unit.shape
    _check_gru(gru, n, c, h, w, unit.dtype, unit.device)
    if out is None:
        return torch.lerp(state, unit, gate)
    return torch.lerp(state, unit, gate, out=out)


def sparse_unit_reference(
    x3: PackedActivation, w3: PackedWeight, epi3: Epilogue, x1: PackedActivation, w1: PackedWeight,
    epi1: Epilogue, mask: Tensor,
) -> Tensor:
    """Plain PyTorch, dense: ``binary_conv2d_reference(x3, w3, epi3) * mask + binary_conv2d_reference(x1, w1, epi1)``
    (the product and sum in ``epi1``'s output dtype, as the network does)."""
    _check_unit_epilogue(epi3, "epi3")
    _check_unit_epilogue(epi1, "epi1")
    y1 = binary_conv2d_reference(x1, w1, epi1).y
    y3 = binary_conv2d_reference(x3, w3, epi3).y
    return y3.to(y1.dtype) * mask.to(y1.dtype) + y1


# ----------------------------------------------------------------------------------------
# Sparse float convolution (decode0's 16 -> 16 3x3 inside the masked branch)
# ----------------------------------------------------------------------------------------
@triton.jit
def _sparse_float_conv_kernel(
    tiles_ptr, count_ptr, L, TPI, TILES_W, G,
    x_ptr, x_sn, x_sc, x_sh, x_sw,  # float (N, CIN, H, W), any strides
    w_ptr,  # (KH, KW, CIN, COUT) contiguous, x's dtype
    H, W, CIN, COUT,
    scale_ptr, shift_ptr, slope_ptr,  # (COUT,) compute dtype
    m_ptr, m_sn, m_sh, m_sw,
    a_ptr, a_sn, a_sc, a_sh, a_sw,
    y_ptr, y_sn, y_sc, y_sh, y_sw,
    KH: tl.constexpr, KW: tl.constexpr, PAD: tl.constexpr, IS_F64: tl.constexpr,
    HAS_SHIFT: tl.constexpr, ACT: tl.constexpr, MASK_MODE: tl.constexpr,
    TH: tl.constexpr, TW: tl.constexpr, BC: tl.constexpr,
):
    # Stride-1 "same" float conv of one tile: one (TH*TW, BC) x (BC, BC) IEEE dot per tap.
    active, n_img, oh, ow, m_ok = _tile_coords(tiles_ptr, count_ptr, L, TPI, TILES_W, G, H, W, TH, TW)
    if active:
        offs_c = tl.arange(0, BC)
        ci_ok = offs_c < CIN
        co_ok = offs_c < COUT
        n64 = n_img.to(tl.int64)
        if IS_F64:
            acc = tl.zeros((TH * TW, BC), dtype=tl.float64)
        else:
            acc = tl.zeros((TH * TW, BC), dtype=tl.float32)
        for kh in tl.static_range(KH):
            for kw in tl.static_range(KW):
                ih = oh - PAD + kh
                iw = ow - PAD + kw
                inside = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)  # zero padding
                x_off = (n64 * x_sn + ih.to(tl.int64) * x_sh + iw.to(tl.int64) * x_sw)[:, None]
                xv = tl.load(x_ptr + x_off + (offs_c.to(tl.int64) * x_sc)[None, :],
                             mask=inside[:, None] & ci_ok[None, :], other=0.0)
                w_off = ((kh * KW + kw) * CIN + offs_c)[:, None] * COUT + offs_c[None, :]
                wv = tl.load(w_ptr + w_off, mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
                if IS_F64:  # out_dtype spelled out: triton 3.6 defaults it to float32
                    acc = tl.dot(xv, wv, acc, input_precision="ieee", out_dtype=tl.float64)
                else:
                    acc = tl.dot(xv, wv, acc, input_precision="ieee", out_dtype=tl.float32)
        mask = m_ok[:, None] & co_ok[None, :]
        scale = tl.load(scale_ptr + offs_c, mask=co_ok, other=0.0)
        y = acc.to(scale.dtype) * scale[None, :]
        if HAS_SHIFT:
            y = y + tl.load(shift_ptr + offs_c, mask=co_ok, other=0.0)[None, :]
        y = apply_activation(y, slope_ptr, offs_c, co_ok, ACT)
        oh64 = oh.to(tl.int64)
        ow64 = ow.to(tl.int64)
        y_out = apply_mask(y.to(y_ptr.dtype.element_ty), m_ptr, m_sn, m_sh, m_sw, a_ptr, a_sn, a_sc, a_sh, a_sw,
                           n64, oh64, ow64, offs_c, mask, MASK_MODE)
        y_off = (n64 * y_sn + oh64 * y_sh + ow64 * y_sw)[:, None] + (offs_c.to(tl.int64) * y_sc)[None, :]
        tl.store(y_ptr + y_off, y_out, mask=mask)


_FLOAT_ACTS = (None, "relu", "sigmoid", "tanh")
_FLOAT_ACT_CODE = {None: 0, "relu": 2, "sigmoid": 3, "tanh": 4}


def _check_float_conv_args(x, weight, scale, shift, act, out, mask, addend, tiles):
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a float (N, Cin, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    n, cin, h, w = x.shape
    if not isinstance(weight, Tensor) or weight.dim() != 4 or weight.shape[1] != cin \
            or weight.shape[2] != weight.shape[3] or weight.shape[2] % 2 == 0:
        raise ValueError(f"weight must be a (Cout, {cin}, K, K) tensor with K odd, got "
                         f"{tuple(getattr(weight, 'shape', ()))}")
    cout = weight.shape[0]
    if max(cin, cout) > 128:
        raise ValueError(f"sparse_float_conv2d supports up to 128 channels, got {cin} -> {cout}")
    if not isinstance(scale, Tensor) or scale.numel() != cout or scale.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"scale must be a float32/float64 tensor of {cout} elements (the compute dtype)")
    if shift is not None and (not isinstance(shift, Tensor) or shift.numel() != cout):
        raise ValueError(f"shift must have {cout} elements")
    if act not in _FLOAT_ACTS:
        raise ValueError(f"act must be one of {_FLOAT_ACTS}, got {act!r}")
    if not isinstance(out, Tensor) or tuple(out.shape) != (n, cout, h, w) or not out.is_floating_point():
        raise ValueError(f"out must be a float tensor of shape {(n, cout, h, w)}, got "
                         f"{tuple(getattr(out, 'shape', ()))}")
    if mask is None and addend is not None:
        raise ValueError("addend is only used with a mask (y * mask + addend)")
    if mask is not None and (not isinstance(mask, Tensor) or tuple(mask.shape) != (n, 1, h, w)):
        raise ValueError(f"mask must be a float tensor of shape {(n, 1, h, w)}")
    if addend is not None and (not isinstance(addend, Tensor) or tuple(addend.shape) != (n, cout, h, w)):
        raise ValueError(f"addend must be a float tensor of shape {(n, cout, h, w)}")
    for name, t in (("weight", weight), ("scale", scale), ("out", out), ("mask", mask), ("addend", addend)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")
    _check_tiles(tiles, n, h, w, x.device)


def sparse_float_conv2d_reference(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor | None, act: str | None, out: Tensor,
    tiles: TileList, mask: Tensor | None = None, addend: Tensor | None = None,
) -> Tensor:
    """Plain PyTorch: ``F.conv2d`` (zero padding K//2) in the compute dtype, then ``* scale + shift``,
    ``act``, the cast to ``out.dtype`` and ``* mask + addend``, copied into ``out`` on the tiles."""
    _check_float_conv_args(x, weight, scale, shift, act, out, mask, addend, tiles)
    cd = scale.dtype
    cout = weight.shape[0]
    # the weight rounded to the dtype the kernel reads it in
    wd = torch.float32 if x.dtype == torch.bfloat16 else x.dtype  # (the kernel widens bf16 x to float32 first)
    y = F.conv2d(x.to(cd), weight.to(wd).to(cd), padding=weight.shape[2] // 2) * scale.reshape(1, cout, 1, 1).to(cd)
    if shift is not None:
        y = y + shift.reshape(1, cout, 1, 1).to(cd)
    y = {None: lambda v: v, "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[act](y)
    y = y.to(out.dtype)
    if mask is not None:
        y = y * mask.to(out.dtype)
        if addend is not None:
            y = y + addend.to(out.dtype)
    out.copy_(torch.where(tiles.coverage(), y, out))
    return out


def sparse_float_conv2d(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor | None, act: str | None, out: Tensor,
    tiles: TileList, mask: Tensor | None = None, addend: Tensor | None = None,
) -> Tensor:
    """Float KxK conv (stride 1, zero padding K//2, no bias) + ``* scale + shift`` + ``act``
    (+ ``* mask + addend``), computed only on the active tiles and written into ``out`` there.

    ``x``: float (N, Cin, H, W), any strides; read densely around each tile, so the
    pixels within K//2 of an active tile must hold the conv's real input (build the
    producer's list with ``halo = K//2``); elsewhere any finite values. ``weight``:
    (Cout, Cin, K, K), Cin, Cout <= 128 (read in place if its memory is (K, K, Cin, Cout)
    contiguous and its dtype x's, else copied so for the launch). ``scale``/``shift``:
    (Cout,) (folded BatchNorm), float32 or float64: the compute dtype. ``act``: None, 'relu', 'sigmoid', 'tanh'.
    ``out``: (N, Cout, H, W), any strides; ``mask`` (N, 1, H, W) and ``addend`` (N, Cout,
    H, W) (may be ``out``) as in :class:`Epilogue`. The dot runs in IEEE float32 (x
    float32/float16) or float64 (x float64). Returns ``out``.
    """
    _check_float_conv_args(x, weight, scale, shift, act, out, mask, addend, tiles)
    if not triton_can_run(x) or (interpreting() and torch.bfloat16 in (x.dtype, out.dtype)):
        return sparse_float_conv2d_reference(x, weight, scale, shift, act, out, tiles, mask, addend)
    n, cin, h, w = x.shape
    cout, k = weight.shape[0], weight.shape[2]
    if tiles.capacity == 0 or tiles.groups == 0:
        return out
    if x.dtype == torch.bfloat16:
        x = x.float()
    # (K, K, Cin, Cout) contiguous: no copy when the weight is stored so in memory, in x's dtype
    wk = weight.detach().permute(2, 3, 1, 0).to(x.dtype).contiguous()
    dummy = scale
    shift_arg = shift.reshape(cout).to(scale.dtype).contiguous() if shift is not None else dummy
    margs, aargs, mode = mask_args(mask, addend, dummy)
    th, tw = tiles.tile
    _sparse_float_conv_kernel[(tiles.capacity, tiles.groups)](
        tiles.index, tiles.count, tiles.capacity, tiles.tiles_per_item, tiles.tiles_w, tiles.groups,
        x, *x.stride(), wk, h, w, cin, cout, scale.reshape(cout).contiguous(), shift_arg, dummy,
        *margs, *aargs, out, *out.stride(),
        KH=k, KW=k, PAD=k // 2, IS_F64=x.dtype == torch.float64, HAS_SHIFT=shift is not None,
        ACT=_FLOAT_ACT_CODE[act], MASK_MODE=mode, TH=th, TW=tw, BC=max(16, _pow2(max(cin, cout))),
        num_warps=4,
    )
    return out


# ----------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------
def skipped_bops(tiles: TileList, in_channels: int, out_channels: int, kernel_size: int = 3) -> Tensor:
    """Binary operations skipped by running a KxK ``in -> out`` binary conv on ``tiles`` only.

    BOPs are counted as the profiler does (one per binary multiply-accumulate of the
    BiConv2d, logical channels, no padding to 32): ``(all output pixels - computed
    pixels) * in * K * K * out``, over every item and frame of the list. Returns an
    int64 scalar tensor on the list's device (``int()`` of it syncs).
    """
    per_pixel = int(in_channels) * int(kernel_size) ** 2 * int(out_channels)
    return (tiles.total_pixels() - tiles.computed_pixels()) * per_pixel
