"""Packed binary convolution (1x1 / 3x3, stride 1 / 2, zero padding) with a fused epilogue.

Math: for a :class:`~bimatting_triton.kernels.pack.PackedActivation` ``a`` (values
``sign(x + bias)`` in {-1, 0, +1}) and a :class:`PackedWeight` (values ``sign(w_c)`` in
{-1, 0, +1}, ``w_c = w - mean(w)`` per output channel, ``alpha = mean|w_c|``), the
integer accumulator is ``acc[n, o, i, j] = sum_{c, kh, kw} a[n, c, i*s - p + kh,
j*s - p + kw] * sign(w_c)[o, c, kh, kw]``, with out-of-image taps contributing 0 (zero
padding). ``BiConv2d(x) == alpha[o] * acc`` up to float rounding. The sum is exact:
|acc| <= KH*KW*Cin < 2**31 (and converts exactly to float32 while KH*KW*Cin <= 2**24).

Bit layouts: activations in :mod:`~bimatting_triton.kernels.pack` (int32 (N, H, W, 2, CW),
plane 0 sign, plane 1 nonzero, channel ``c`` at bit ``c % 32`` of word ``c // 32``), weights in
:mod:`~bimatting_triton.kernels.packed_weight` (the same planes as (KH, KW, 2, CW, Cout), and
the int8 copy the ``'dot'`` loop reads).

Exactness of the two corrections (padding and sign(0)): every product is
``value_a * value_w`` with value ``nonzero - 2*sign``; padded channels, out-of-image
taps (loaded as all-zero words) and zero activations/weights have ``nonzero == 0`` and
contribute exactly 0, so no correction term is needed afterwards.

Two inner loops (``method``):
* ``'dot'`` (default, ``'auto'``): unpack the activation words of a (BM pixels x BK
  channels) tile to int8 {-1, 0, +1} in registers (:func:`unpack_words`: four values per
  shift-and-mask, in a channel order the weight rows follow) and ``tl.dot`` them with the
  int8 weight tile, int32 accumulation (tensor cores on GPU: Triton has no 1-bit MMA).
* ``'popcount'``: ``valid = nz_a & nz_w``, ``neg = (s_a ^ s_w) & valid``,
  ``acc += popc(valid) - 2*popc(neg)`` per 32-channel word (libdevice ``popc`` on CUDA,
  a SWAR count elsewhere). Kept for comparison; the benchmark picks.

The accumulator goes through the fused epilogue of :mod:`~bimatting_triton.kernels.epilogue`
(folded BatchNorm, residuals, LearnableBias, activation, mask, the next layer's sign + pack).
The kernel is built from ``@triton.jit`` helpers (:func:`conv_accumulate` here, the
epilogue's there) that :mod:`~bimatting_triton.kernels.sparse_unit` reuses for its
tile-sparse variant, so both compute every value with the same operations.

Batch and time are folded into N by the caller. Public: :func:`binary_conv2d` (Triton;
reference fallback where Triton cannot run) and :func:`binary_conv2d_reference` (plain
PyTorch); the weights' and the epilogue's names are re-exported here (:func:`pack_weight`,
:func:`pack_conv`, :class:`PackedWeight`, :func:`fold_scale_shift`, :class:`Epilogue`,
:class:`Residual`, ...).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    autotuning,
    cdiv,
    check_pixel_count,
    hardware_popcount,
    interpreting,
    note_compiled,
    popcount32,
    pow2,
    triton_can_run,
)
from .epilogue import (
    ACTIVATIONS,
    RESIDUAL_MODES,
    BoundEpilogue,
    ConvOutput,
    Epilogue,
    EpiloguePlan,
    Residual,
    _prepare,
    _residual_args,
    apply_mask,
    epilogue_flags,
    epilogue_reference,
    epilogue_values,
    epilogue_vectors,
    fold_scale_shift,
    mask_args,
    store_packed,
)
from .pack import WORD_BITS, PackedActivation, words_for
from .packed_weight import PackedWeight, dot_channel_order, dot_weights, pack_conv, pack_weight

__all__ = [
    "PackedWeight",
    "dot_channel_order",
    "dot_weights",
    "taps_per_step",
    "pack_weight",
    "pack_conv",
    "fold_scale_shift",
    "Residual",
    "Epilogue",
    "EpiloguePlan",
    "BoundEpilogue",
    "ConvOutput",
    "RESIDUAL_MODES",
    "ACTIVATIONS",
    "integer_conv_dtype",
    "binary_conv2d",
    "binary_conv2d_reference",
]

METHODS = ("auto", "dot", "popcount")


def _check_conv_args(x, weight) -> tuple[int, int, int, int, int, int]:
    if not isinstance(x, PackedActivation):
        raise TypeError(f"x must be a PackedActivation (see sign_pack), got {type(x).__name__}")
    if not isinstance(weight, PackedWeight):
        raise TypeError(f"weight must be a PackedWeight (see pack_weight), got {type(weight).__name__}")
    n, c, h, w = x.shape
    if c != weight.in_channels:
        raise ValueError(f"x has {c} channels but weight expects {weight.in_channels}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    ho, wo = weight.output_size(h, w)
    if ho < 1 or wo < 1:
        raise ValueError(f"x's spatial size {(h, w)} is too small for kernel {weight.kernel_size}")
    return n, c, h, w, ho, wo


# ----------------------------------------------------------------------------------------
# Reference (plain PyTorch)
# ----------------------------------------------------------------------------------------
def integer_conv_dtype(device: torch.device, terms: int) -> torch.dtype:
    """The float dtype in which ``F.conv2d`` of {-1, 0, +1} values is exact on ``device``, for
    dot products of ``terms`` products (input channels x taps).

    Every product is -1, 0 or +1 and every partial sum an integer of magnitude <= ``terms``:
    float32 represents all of them exactly while ``terms`` <= 2**24, in any order of summation,
    so an algorithm that only multiplies and adds returns the exact sum. On the CPU with oneDNN
    (PyTorch asks it for direct convolutions; im2col + GEMM where it is not used) that is
    float32, several times faster than float64 there. Elsewhere float64 (every integer below
    2**53): cuDNN may choose FFT or Winograd algorithms, and so may NNPACK on a CPU without
    oneDNN, whose transforms round even for integer inputs; float64 keeps their error far
    below the 0.5 that the final rounding absorbs.
    """
    if (torch.device(device).type == "cpu" and terms <= 2**24 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled):
        return torch.float32
    return torch.float64


def binary_conv2d_reference(
    x: PackedActivation, weight: PackedWeight, epilogue: Epilogue | BoundEpilogue | None = None
) -> Tensor | ConvOutput:
    """Plain-PyTorch :func:`binary_conv2d`: unpack to floats {-1, 0, +1} and ``F.conv2d``.

    The integer sums are exact in floating point (:func:`integer_conv_dtype`). Without an
    epilogue returns the int32 accumulator (N, Cout, Ho, Wo); with one, a
    :class:`ConvOutput` computed op by op in the order of
    :mod:`~bimatting_triton.kernels.epilogue`'s docstring (:func:`epilogue_reference`).
    """
    n, _, _, _, ho, wo = _check_conv_args(x, weight)
    prepared = _prepare(epilogue, n, weight.out_channels, ho, wo, x.device) if epilogue is not None else None
    kh, kw = weight.kernel_size
    dtype = integer_conv_dtype(x.device, x.words * WORD_BITS * kh * kw)
    acc = F.conv2d(x.unpack(dtype), weight.values(dtype), stride=weight.stride, padding=weight.padding)
    acc = acc.round().to(torch.int32)
    if prepared is None:
        return acc
    return epilogue_reference(acc, prepared)


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _quad(z, s, N: tl.constexpr):
    # Bits N, N+8, N+16, N+24 of each word as the four bytes of an int32 (byte j <- bit N + 8j),
    # value z - 2s: 0x00 (0), 0x01 (+1) or 0xFF (-1). A sign bit implies its nonzero bit, so
    # s * 0xFE (bits 1-7 of a byte) and z (bit 0) never overlap: the sum is their OR.
    zq = (z >> N) & 0x01010101
    sq = (s >> N) & 0x01010101
    return sq * 0xFE + zq


# unpack_words' form: tl.join in compiled kernels; under the interpreter, whose cost is per
# operation, one broadcast over the 32 bit positions (the same values in the same order, six
# operations instead of ~70; tests/kernels/test_binary_conv.py checks both forms).
_UNPACK_BY_JOIN = tl.constexpr(not interpreting())


@triton.jit
def _unpack_by_broadcast(z, s):
    k = tl.arange(0, 32)
    bit = (k % 4) * 8 + k // 4  # the bit at position k of a word (dot_channel_order)
    zb = (z[:, :, None] >> bit[None, None, :]) & 1
    sb = (s[:, :, None] >> bit[None, None, :]) & 1
    return (zb - 2 * sb).to(tl.int8)


@triton.jit
def unpack_words(z, s, BY_JOIN: tl.constexpr = _UNPACK_BY_JOIN):
    """(R, C) int32 words (nonzero plane ``z``, sign plane ``s`` with s & ~z == 0) ->
    (R, C, 2, 2, 2, 2, 2) int8 values ``z_bit - 2 s_bit`` in {-1, 0, +1}; reshaped to
    (R, 32 C), position ``32 w + 4 n + j`` holds bit ``n + 8 j`` of word ``w``
    (:func:`dot_channel_order`, the order of :class:`PackedWeight`'s ``int8`` rows).

    Two ALU operations per plane per four values (a shift and a mask put four bits into
    four bytes) instead of a shift and a mask per value, and ``tl.join`` keeps each word's
    32 values in the thread that loaded the word (vector stores to the dot operand), where a
    broadcast over a bit axis would spread one bit per lane (a load and a byte store each).
    Each join appends a dimension after the earlier ones, so joining quad ``n`` with
    ``n + 4``, then ``+ 2``, then ``+ 1`` (and the bytes likewise) gives the order above.
    ``BY_JOIN`` False: the same values as (R, C, 32), by a broadcast over the bit positions
    (the interpreter's default: fewer operations there)."""
    if not BY_JOIN:
        return _unpack_by_broadcast(z, s)
    q = tl.join(tl.join(tl.join(_quad(z, s, 0), _quad(z, s, 4)), tl.join(_quad(z, s, 2), _quad(z, s, 6))),
                tl.join(tl.join(_quad(z, s, 1), _quad(z, s, 5)), tl.join(_quad(z, s, 3), _quad(z, s, 7))))
    return tl.join(tl.join(q.to(tl.int8), (q >> 16).to(tl.int8)), tl.join((q >> 8).to(tl.int8), (q >> 24).to(tl.int8)))


@triton.jit
def conv_accumulate(
    x_ptr, w_ptr, n_img, oh, ow, m_ok, offs_n, n_ok, H, W, CW, COUT,
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    METHOD: tl.constexpr, HW_POPC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    TAPS: tl.constexpr = 1,
):
    """Exact int32 accumulator (BM, BN) of output pixels (n_img, oh, ow) (BM,) x channels offs_n (BN,).

    ``n_img`` may be a scalar (one image per tile). Rows with ``m_ok`` False and columns
    with ``n_ok`` False are 0. Weights as :func:`binary_conv2d` passes them (``METHOD``).
    ``TAPS`` > 1 ('dot' only, :func:`taps_per_step`): each step takes ``TAPS`` whole taps of
    a layer with few input channels (``CW * TAPS == BK // 32``) instead of one tap's channels.
    """
    cin_pad = CW * 32
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    # One flat runtime loop over (tap, channel block) rather than unrolled taps: only one
    # step's addresses and bit tensors are live at a time (unrolling the taps kept all nine
    # taps' row addresses in registers: 255 registers and spills, see bench/compile_report.py),
    # and Triton's software pipeliner sees a single loop. What does not change along the loop
    # is computed before it: each step adds offsets (the tap's, the channel block's) to
    # per-row / per-column bases, and (tap, step) are counted, not divided out.
    ih0 = oh * STRIDE - PAD  # input row and column of tap (0, 0)
    iw0 = ow * STRIDE - PAD
    pix0 = ((n_img * H + ih0) * W + iw0).to(tl.int64) * (2 * CW)  # word offset of its sign plane
    kw_ = tl.arange(0, BK // 32)
    if METHOD == 0:
        kk = tl.arange(0, BK)
        # int8 weights (dot_weights): per output channel, (tap, channel) rows contiguous
        w_rows = offs_n.to(tl.int64) * (KH * KW * cin_pad)
    if METHOD == 0 and TAPS > 1:
        # Step ``it`` covers taps it*TAPS .. it*TAPS + TAPS - 1, each whole (CW words): word
        # slot j of the step is word j % CW of tap it*TAPS + j // CW, and the weight rows of
        # those taps follow one another, so the step's rows are it*BK .. it*BK + BK - 1.
        CWC: tl.constexpr = BK // 32 // TAPS  # == CW (the launch guarantees it)
        slot_tap = kw_ // CWC
        slot_word = kw_ % CWC
        for it in range(0, tl.cdiv(KH * KW, TAPS)):
            tap = it * TAPS + slot_tap  # (BK/32,)
            kh = tap // KW
            kw = tap - kh * KW
            amask = (m_ok[:, None] & (tap < KH * KW)[None, :] & (ih0[:, None] >= -kh[None, :])
                     & (ih0[:, None] < H - kh[None, :]) & (iw0[:, None] >= -kw[None, :])
                     & (iw0[:, None] < W - kw[None, :]))
            a_ptr = x_ptr + pix0[:, None] + ((kh * W + kw) * (2 * CW) + slot_word)[None, :]
            z = tl.load(a_ptr + CW, mask=amask, other=0)
            s = tl.load(a_ptr, mask=amask, other=0) & z
            a = tl.reshape(unpack_words(z, s), (BM, BK))
            row = it * BK + kk
            b = tl.load(w_ptr + w_rows[None, :] + row[:, None], mask=(row < KH * KW * cin_pad)[:, None] & n_ok[None, :],
                        other=0)
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    else:
        if METHOD == 0:
            steps_per_tap = tl.cdiv(cin_pad, BK)
        else:
            steps_per_tap = tl.cdiv(CW, BK // 32)
        tap = 0
        step = 0
        for it in range(0, KH * KW * steps_per_tap):
            kh = tap // KW
            kw = tap - kh * KW
            # Out-of-image taps load all-zero words: nonzero bits 0 => they contribute 0.
            inside = m_ok & (ih0 >= -kh) & (ih0 < H - kh) & (iw0 >= -kw) & (iw0 < W - kw)
            pix = pix0 + (kh * W + kw) * (2 * CW)
            word = step * (BK // 32) + kw_
            w_ok = word < CW
            amask = inside[:, None] & w_ok[None, :]
            a_ptr = x_ptr + pix[:, None] + word[None, :]
            z = tl.load(a_ptr + CW, mask=amask, other=0)
            s = tl.load(a_ptr, mask=amask, other=0) & z
            if METHOD == 0:
                # Each word loaded once (BM, BK/32) and its 32 values made in the thread that
                # loaded it, in the order of the weight rows (unpack_words).
                a = tl.reshape(unpack_words(z, s), (BM, BK))
                # (BK, BN) read along the input channels, contiguous in memory: the int8 dot's
                # operand layout (K-major), so the tile goes to shared memory without a transpose
                ch = step * BK + kk
                b = tl.load(w_ptr + w_rows[None, :] + (tap * cin_pad + ch)[:, None],
                            mask=(ch < cin_pad)[:, None] & n_ok[None, :], other=0)
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            else:
                b_ptr = w_ptr + (tap * 2 * CW + word).to(tl.int64)[:, None] * COUT + offs_n[None, :]
                bmask = w_ok[:, None] & n_ok[None, :]
                wz = tl.load(b_ptr + CW * COUT, mask=bmask, other=0)
                ws = tl.load(b_ptr, mask=bmask, other=0) & wz
                valid = z[:, :, None] & wz[None, :, :]  # (BM, BK/32, BN): both nonzero
                neg = (s[:, :, None] ^ ws[None, :, :]) & valid  # product -1
                acc += tl.sum(popcount32(valid, HW_POPC) - 2 * popcount32(neg, HW_POPC), axis=1)
            step += 1
            wrapped = step == steps_per_tap
            tap = tl.where(wrapped, tap + 1, tap)
            step = tl.where(wrapped, 0, step)
    return acc


@triton.jit
def _binary_conv_kernel(
    x_ptr,  # int32 (N, H, W, 2, CW) packed activations
    w_ptr,  # METHOD 0: int8 (KH, KW, 32*CW, COUT) as dot_weights; METHOD 1: int32 (KH, KW, 2, CW, COUT)
    M, H, W, HO, WO, CW, COUT,
    scale_ptr, shift_ptr, ba_ptr, slope_ptr, bb_ptr, nb_ptr,  # (COUT,) epilogue vectors
    r1_ptr, r1_sn, r1_sc, r1_sh, r1_sw, R1H, R1W, R1C,  # residual
    r2_ptr, r2_sn, r2_sc, r2_sh, r2_sw, R2H, R2W, R2C,  # post residual
    m_ptr, m_sn, m_sh, m_sw,  # mask (N, 1, HO, WO)
    a_ptr, a_sn, a_sc, a_sh, a_sw,  # addend (N, COUT, HO, WO)
    y_ptr, y_sn, y_sc, y_sh, y_sw,  # output: int32 acc (EPILOGUE 0) or float y, logical NCHW
    p_ptr, PCW,  # packed output int32 (N, HO, WO, 2, PCW)
    KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    METHOD: tl.constexpr, HW_POPC: tl.constexpr,
    EPILOGUE: tl.constexpr, HAS_SHIFT: tl.constexpr, R1_MODE: tl.constexpr, HAS_BA: tl.constexpr,
    ACT: tl.constexpr, HAS_BB: tl.constexpr, R2_MODE: tl.constexpr, MASK_MODE: tl.constexpr,
    STORE_Y: tl.constexpr, STORE_P: tl.constexpr, HAS_NB: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,  # BK: input channels per step, a multiple of 32
    TAPS: tl.constexpr,  # whole taps per step (taps_per_step), or 1
):
    # Implicit GEMM: rows = output pixels m = (n*HO + oh)*WO + ow, columns = output
    # channels, reduction over (kh, kw, input channel).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < COUT
    n_img = offs_m // (HO * WO)
    oh = (offs_m % (HO * WO)) // WO
    ow = offs_m % WO

    acc = conv_accumulate(x_ptr, w_ptr, n_img, oh, ow, m_ok, offs_n, n_ok, H, W, CW, COUT,
                          KH, KW, STRIDE, PAD, METHOD, HW_POPC, BM, BN, BK, TAPS)

    # ---- epilogue ----
    mask = m_ok[:, None] & n_ok[None, :]
    n64 = n_img.to(tl.int64)
    oh64 = oh.to(tl.int64)
    ow64 = ow.to(tl.int64)
    y_off = (n64 * y_sn + oh64 * y_sh + ow64 * y_sw)[:, None] + (offs_n.to(tl.int64) * y_sc)[None, :]
    if EPILOGUE == 0:
        tl.store(y_ptr + y_off, acc, mask=mask)
    else:
        y = epilogue_values(
            acc, offs_n, n_ok, mask, n64, oh64, ow64, scale_ptr, shift_ptr, ba_ptr, slope_ptr, bb_ptr,
            r1_ptr, r1_sn, r1_sc, r1_sh, r1_sw, R1H, R1W, R1C,
            r2_ptr, r2_sn, r2_sc, r2_sh, r2_sw, R2H, R2W, R2C,
            HAS_SHIFT, R1_MODE, HAS_BA, ACT, HAS_BB, R2_MODE,
        )
        y_out = apply_mask(y.to(y_ptr.dtype.element_ty), m_ptr, m_sn, m_sh, m_sw, a_ptr, a_sn, a_sc, a_sh, a_sw,
                           n64, oh64, ow64, offs_n, mask, MASK_MODE)
        if STORE_Y:
            tl.store(y_ptr + y_off, y_out, mask=mask)
        if STORE_P:
            store_packed(y_out, p_ptr, PCW, offs_m, m_ok, pid_n, nb_ptr, offs_n, n_ok, mask, HAS_NB, BM, BN)


# Under the interpreter the cost is per op and per program, not per element: big tiles.
_INTERPRETER_CONFIG = dict(BM=128, BN=64, BK=128)


def _cuda_configs(method: int) -> list:
    if method == 0:
        # Tiles that compile without spills on sm_90, triton 3.6 and 3.9 (bench/compile_report.py).
        shapes = [(64, 32, 64, 4), (64, 32, 32, 4), (64, 64, 64, 4), (64, 64, 128, 4), (64, 128, 64, 4),
                  (64, 128, 128, 4), (128, 128, 128, 8)]
        return [triton.Config(dict(BM=m, BN=n, BK=k), num_warps=w, num_stages=3) for m, n, k, w in shapes]
    shapes = [(64, 32, 64, 4), (64, 32, 32, 4), (32, 32, 64, 4), (128, 32, 64, 8)]
    return [triton.Config(dict(BM=m, BN=n, BK=k), num_warps=w, num_stages=2) for m, n, k, w in shapes]


_KEY = ["M", "COUT", "CW", "KH", "KW", "STRIDE", "EPILOGUE", "STORE_P"]
_TUNED = {}
# The mask stage may read its addend from the output (read-modify-write): the
# autotuner's trial runs must then start from the same output each time.
_RESTORE = ["y_ptr"]


def dot_channel_step(cin_pad: int) -> int:
    """Input channels a step of the 'dot' loop takes by default (its BK): as many as the layer
    has (``cin_pad``, a multiple of 32), up to 128, a power of two. The dense and sparse
    heuristic tiles both use it."""
    return 128 if cin_pad >= 128 else 64 if cin_pad >= 64 else 32


@functools.lru_cache(maxsize=1024)
def _heuristic_config(method: int, cout: int, cin_pad: int, residual: bool = False, taps: int = 1) -> dict:
    """One tile per layer shape (CUDA, no autotuning). Cached: the same dict for the same
    arguments (callers read it, never change it).

    'dot': 64 pixels (one warpgroup's wgmma rows, 4 warps) x as many output channels as the
    layer has, up to 128 x as many input channels per step as it has, up to 128. The
    unpacking costs the same per (pixel, input channel) whatever BN is, and the loop's
    addressing the same per step whatever BK is, so the widest tile the layer fills does the
    most multiply-adds per instruction (``bench/compile_report.py``, sm_90, both on triton 3.6
    and 3.9: no spills, at most ~180 registers; issue-bound rate 0.4x Hopper's fp16 tensor-core
    peak at 64x32x64, 1.5x at 64x128x64, 1.9x at 64x128x128; 8 warps on BM = 64 or 4 warps on
    BM = 128 issue far more per MAC). With a ``residual`` (or post-residual) in the epilogue,
    BN is at most 64: its loads on top of a 64x128 accumulator in 128 threads spill
    (``bench/compile_model.py --check``; the 'avgpool' shortcut most). A layer of ``taps`` > 1
    taps (3x3) with at most 64 input channels takes two whole taps a step (BK = 2 * cin_pad,
    :func:`taps_per_step`) instead of one: 5 steps instead of 9, about 1.3-1.8x fewer
    instructions per frame for those layers (four taps of 32 channels a step waste a quarter
    of the last step and issue more).
    """
    bn = 128 if cout >= 128 and not residual else 64 if cout >= 64 else 32
    if method == 0:
        bk = 2 * cin_pad if taps > 1 and cin_pad <= 64 else dot_channel_step(cin_pad)
        return dict(BM=64, BN=bn, BK=bk, num_warps=4, num_stages=3)
    # popcount: the (BM, BK/32, BN) AND/XOR words stay small with BN = 32
    return dict(BM=64, BN=32, BK=min(64, max(32, pow2(cin_pad))), num_warps=4, num_stages=2)


def taps_per_step(method: int, taps: int, cw: int, bk: int) -> int:
    """Whole taps per step of the packed conv's loop (its ``TAPS``): ``BK / 32 / CW`` for a
    'dot' layer of several taps whose ``CW`` words divide a step's ``BK / 32``, else 1 (a step
    takes one tap's channels). E.g. a 3x3 layer of 32 channels at BK = 128: 3 steps of 4 taps
    instead of 9 steps that each fill a quarter of the tile."""
    words = bk // 32
    return words // cw if method == 0 and taps > 1 and cw < words and words % cw == 0 else 1


def _launcher(method: int, block: tuple[int, int, int] | None, cout: int = 1, cin_pad: int = 32,
              residual: bool = False, taps: int = 1):
    """The kernel to launch and its tile: ``block`` if given, one fixed tile under the
    interpreter, autotuned with ``BIMATTING_AUTOTUNE=1`` (an empty tile: the autotuner's), else
    a heuristic tile."""
    if block is not None:
        return _binary_conv_kernel, dict(BM=block[0], BN=block[1], BK=block[2])
    if interpreting():
        return _binary_conv_kernel, _INTERPRETER_CONFIG
    if not autotuning():
        return _binary_conv_kernel, _heuristic_config(method, cout, cin_pad, residual, taps)
    if method not in _TUNED:
        _TUNED[method] = triton.autotune(configs=_cuda_configs(method), key=_KEY, restore_value=_RESTORE)(
            _binary_conv_kernel
        )
    return _TUNED[method], {}


def binary_conv2d(
    x: PackedActivation,
    weight: PackedWeight,
    epilogue: Epilogue | BoundEpilogue | None = None,
    *,
    method: str = "auto",
    block: tuple[int, int, int] | None = None,
) -> Tensor | ConvOutput:
    """Packed binary convolution of ``x`` with ``weight`` (its stride and zero padding).

    ``x``: :class:`PackedActivation` (N, Cin, H, W), batch x time folded into N.
    ``weight``: :class:`PackedWeight` (Cout, Cin, KH, KW) on the same device.
    Without ``epilogue``: the exact int32 accumulator (N, Cout, Ho, Wo) (channels-last
    memory). With one: a :class:`ConvOutput` ``(y, packed)`` per :class:`Epilogue` (or
    per ``EpiloguePlan.bind(...)``, the same epilogue with its per-channel part checked
    once: less host work per launch for a layer run many times).
    ``method``: ``'dot'`` (int8 ``tl.dot``), ``'popcount'``, or ``'auto'`` (= ``'dot'``).
    ``block``: optional tile sizes (BM pixels, BN output channels, BK input channels),
    powers of two with BM, BN >= 16, BN and BK multiples of 32 (for tests and
    benchmarks); by default one fixed tile under the interpreter, autotuned on CUDA.
    Runs the Triton kernel on CUDA or under ``TRITON_INTERPRET=1``, else the reference.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if block is not None:
        ok = (
            isinstance(block, tuple) and len(block) == 3 and all(isinstance(b, int) and b > 0 for b in block)
            and all(b & (b - 1) == 0 for b in block) and block[0] >= 16 and block[1] >= 32 and block[2] >= 32
        )
        if not ok:
            raise ValueError(f"block must be (BM, BN, BK): powers of two, BM >= 16, BN >= 32, BK >= 32; got {block!r}")
    n, _, h, w, ho, wo = _check_conv_args(x, weight)
    cout = weight.out_channels
    dev = x.device
    p = _prepare(epilogue, n, cout, ho, wo, dev) if epilogue is not None else None
    if not triton_can_run(x.bits) or (interpreting() and p is not None and p.out_dtype == torch.bfloat16):
        # (Triton's interpreter has no bf16 arithmetic: it would compare raw bits.)
        return binary_conv2d_reference(x, weight, epilogue)
    check_pixel_count(n, max(h, ho), max(w, wo), "x")  # (the launch numbers x's and the output's pixels)

    code = 1 if method == "popcount" else 0
    m = n * ho * wo
    kh, kw = weight.kernel_size
    packed = None
    if p is None:
        y = torch.empty((n, cout, ho, wo), dtype=torch.int32, device=dev, memory_format=torch.channels_last)
        dummy = y
        vectors = (dummy,) * 6
        res1 = res2 = _residual_args(None, dummy)
        margs, aargs, _ = mask_args(None, None, dummy)
        flags = dict(EPILOGUE=0, HAS_SHIFT=False, R1_MODE=0, HAS_BA=False, ACT=0, HAS_BB=False, R2_MODE=0,
                     MASK_MODE=0, STORE_Y=True, STORE_P=False, HAS_NB=False)
        pbits, pcw = y, 1
    else:
        if p.out is not None:
            y = p.out
        elif p.store_float:
            y = torch.empty((n, cout, ho, wo), dtype=p.out_dtype, device=dev, memory_format=torch.channels_last)
        else:
            y = torch.empty((1, 1, 1, 1), dtype=p.out_dtype, device=dev)  # carries the dtype only
        dummy = p.scale
        vectors = (*epilogue_vectors(p), p.next_bias if p.next_bias is not None else dummy)
        res1 = _residual_args(p.residual, dummy)
        res2 = _residual_args(p.post_residual, dummy)
        margs, aargs, mode = mask_args(p.mask, p.addend, dummy)
        flags = dict(
            EPILOGUE=1,
            **epilogue_flags(p),
            MASK_MODE=mode,
            STORE_Y=p.store_float,
            STORE_P=p.pack,
            HAS_NB=p.next_bias is not None,
        )
        pcw = words_for(cout)
        if p.pack:
            pbits = torch.empty((n, ho, wo, 2, pcw), dtype=torch.int32, device=dev)
            packed = PackedActivation._allocated(pbits, cout)  # (N, Ho, Wo, 2, words) int32
        else:
            pbits = dummy
    if m > 0:
        residual = p is not None and (p.residual is not None or p.post_residual is not None)
        kernel, config = _launcher(code, block, cout, x.words * 32, residual, kh * kw)
        taps = taps_per_step(code, kh * kw, x.words, config["BK"]) if "BK" in config else 1
        w_arg = weight.int8 if code == 0 else weight.bits

        def grid(meta):
            return (cdiv(m, meta["BM"]), cdiv(cout, meta["BN"]))

        compiled = kernel[grid](
            x.bits, w_arg, m, h, w, ho, wo, x.words, cout,
            *vectors, *res1, *res2, *margs, *aargs, y, *y.stride(), pbits, pcw,
            KH=kh, KW=kw, STRIDE=weight.stride, PAD=weight.padding,
            METHOD=code, HW_POPC=hardware_popcount(x.bits), **flags, TAPS=taps, **config,
        )
        note_compiled(f"binary_conv{kh}x{kw}s{weight.stride}", config, compiled)
    if p is None:
        return y
    return ConvOutput(y if p.store_float else None, packed)
