"""LearnableBias + sign + bit-pack: float activations -> two bit planes, 32 channels a word.

Bit layout (shared with :mod:`bimatting_triton.kernels.binary_conv`)
--------------------------------------------------------------------
A :class:`PackedActivation` of logical shape (N, C, H, W) holds ``bits``, an int32
tensor of shape (N, H, W, 2, CW) with ``CW = ceil(C / 32)``, contiguous (NHWC: the
words of one pixel are adjacent):

* plane 0 (``SIGN``): bit ``c % 32`` of word ``c // 32`` is 1 where ``x + bias < 0``;
* plane 1 (``NONZERO``): the same bit is 1 where ``x + bias`` is < 0 or > 0.

Bit 0 is the least significant bit; a word with bit 31 set is a negative int32.
The value of channel ``c`` is ``nonzero - 2 * sign`` in {-1, 0, +1}, which is exactly
``torch.sign(x + bias)``, including ``sign(0) == 0`` (SPEC §1). Invariant: the sign
plane is a subset of the nonzero plane (the kernels also AND them, so a violating
tensor still reads as 0 where ``nonzero`` is 0). Channels ``C <= c < 32 * CW`` have
both bits 0 and so contribute 0 to any dot product; so do out-of-image taps, which
the convolution loads as all-zero words. NaN packs as 0, as ``torch.sign(NaN) == 0``
(it is neither < 0 nor > 0; so does ``inf + -inf``, which is NaN).

Exactness of the fused bias: the kernel tests ``x < -bias`` and ``x > -bias``
instead of rounding ``x + bias``. IEEE addition with gradual underflow never changes
the sign of an exact sum and rounds to 0 only when the exact sum is 0, so
``sign(fl(x + bias)) == sign(x + bias)`` and the comparison (done in the wider of the
two dtypes, where negation and widening are exact) gives the same bits as the
reference ``torch.sign(x + bias)`` for every float dtype, with no FTZ concern.

Several sources: ``sign_pack([a, b, c], bias)`` packs ``torch.cat([a, b, c], dim=1)``
without building it (up to 3 tensors with the same N, H, W, each with its own strides), and
the last source may be a :class:`Product` ``(g, h)``, read as ``g * h``: the product is
taken in the sources' dtype, a single correctly rounded multiplication as torch's, so the
bits equal packing the materialised product (the bf16 interpreter path, which widens to
float32, materialises it first).

Public functions: :func:`sign_pack` (Triton; falls back to the reference where Triton
cannot run), :func:`sign_pack_pair` (two biases, one read) and :func:`sign_pack_reference`
(plain PyTorch), plus the torch helpers
:func:`pack_values` / :func:`unpack_values` used by the references and weight packing.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import cdiv, check_pixel_count, interpreting, triton_can_run, version_counter

__all__ = [
    "WORD_BITS",
    "SIGN",
    "NONZERO",
    "words_for",
    "PackedActivation",
    "Product",
    "pack_values",
    "unpack_values",
    "sign_pack",
    "sign_pack_pair",
    "sign_pack_reference",
]

WORD_BITS = 32
SIGN = 0  # plane index of the sign bits (x + bias < 0)
NONZERO = 1  # plane index of the nonzero bits (x + bias != 0)


def words_for(channels: int) -> int:
    """Number of 32-bit words holding ``channels`` channels: ``ceil(channels / 32)``."""
    return (channels + WORD_BITS - 1) // WORD_BITS


@dataclass(frozen=True)
class PackedActivation:
    """Sign-packed activations of logical shape (N, C, H, W); layout in the module docstring.

    ``bits``: int32 (N, H, W, 2, ceil(C / 32)), contiguous. ``channels``: C.
    """

    bits: Tensor
    channels: int

    def __post_init__(self):
        b = self.bits
        if not isinstance(b, Tensor) or b.dtype != torch.int32 or b.dim() != 5 or b.shape[3] != 2:
            raise ValueError(
                "PackedActivation.bits must be an int32 tensor of shape (N, H, W, 2, CW), got "
                f"{getattr(b, 'dtype', type(b))} {tuple(getattr(b, 'shape', ()))}"
            )
        if not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"PackedActivation.channels must be a positive int, got {self.channels!r}")
        if b.shape[4] != words_for(self.channels):
            raise ValueError(
                f"PackedActivation.bits has {b.shape[4]} words per plane, expected "
                f"ceil({self.channels} / 32) = {words_for(self.channels)}"
            )
        if not b.is_contiguous():
            object.__setattr__(self, "bits", b.contiguous())

    @classmethod
    def _allocated(cls, bits: Tensor, channels: int) -> "PackedActivation":
        """For the kernels' own outputs, allocated with the right dtype, shape and layout:
        the same object without the checks (host time at every launch)."""
        obj = object.__new__(cls)
        object.__setattr__(obj, "bits", bits)
        object.__setattr__(obj, "channels", channels)
        return obj

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Logical (N, C, H, W)."""
        n, h, w = self.bits.shape[:3]
        return (n, self.channels, h, w)

    @property
    def words(self) -> int:
        """Words per plane and pixel, ``ceil(C / 32)``."""
        return self.bits.shape[4]

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def to(self, device) -> "PackedActivation":
        return PackedActivation(self.bits.to(device), self.channels)

    def unpack(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The values {-1, 0, +1} as a (N, C, H, W) tensor of ``dtype`` (contiguous NCHW).

        Made from ``bits``, or, for the output of :func:`sign_pack_reference`, from the int8
        values it packed (the same values: the plain-PyTorch path then unpacks nothing; a
        write into ``bits`` afterwards is seen through its version counter, except on an
        inference-mode tensor, which has none: treat ``bits`` as read-only)."""
        remembered = self.__dict__.get("_values")
        if remembered is not None and remembered[1] == version_counter(self.bits):
            values = remembered[0]
        else:
            # (transposed to NCHW while widened: one pass over the int8 values, 3x faster on a
            # CPU than transposing the wide values)
            values = unpack_values(self.bits, self.channels, torch.int8).permute(0, 3, 1, 2)
        return values.to(dtype, memory_format=torch.contiguous_format)

    def _remember_values(self, values: Tensor) -> "PackedActivation":
        """Keep ``values`` (N, C, H, W) int8, the values ``bits`` was packed from, for :meth:`unpack`."""
        object.__setattr__(self, "_values", (values, version_counter(self.bits)))
        return self


# ----------------------------------------------------------------------------------------
# Plain-PyTorch packing helpers (the specification of the layout)
# ----------------------------------------------------------------------------------------
def _as_words(word_bytes: Tensor) -> Tensor:
    """(..., 4 * K) uint8, each group of 4 the bytes of a word from least to most significant
    -> (..., K) int32 words, contiguous."""
    if sys.byteorder != "little":
        word_bytes = word_bytes.unflatten(-1, (-1, 4)).flip(-1).flatten(-2)
    # Copied into a fresh tensor and viewed as int32 (.contiguous() may keep odd strides on
    # size-1 dimensions, which the view rejects).
    fresh = torch.empty(word_bytes.shape, dtype=torch.uint8, device=word_bytes.device)
    return fresh.copy_(word_bytes).view(torch.int32)


def _word_bytes(words: Tensor) -> Tensor:
    """Inverse of :func:`_as_words`: (..., K) int32 -> (..., 4 * K) uint8, least significant first."""
    if words.stride(-1) != 1:
        words = words.contiguous()
    word_bytes = words.view(torch.uint8)
    if sys.byteorder != "little":
        word_bytes = word_bytes.unflatten(-1, (-1, 4)).flip(-1).flatten(-2)
    return word_bytes


_BIT_VALUES: dict = {}  # device -> uint8 (8,) [1, 2, 4, ..., 128]
_BYTE_PAIR_VALUES: dict = {}  # device -> int8 (65536, 8), see unpack_values


def pack_values(values: Tensor, dim: int = -1) -> Tensor:
    """Pack the signs of ``values`` along ``dim`` (C channels, default the last) into bit planes
    (..., 2, ceil(C / 32)) int32: ``values``' other dimensions in order, then plane and word.

    Plane 0 marks ``values < 0``, plane 1 ``values`` < 0 or > 0 (not NaN); padding channels are 0.
    Any real dtype; only the sign of each value matters (NaN counts as 0, as in ``torch.sign``).
    """
    if values.dim() < 1:
        raise ValueError("pack_values: values must have at least one dimension (the channels)")
    dim = dim % values.dim()
    return _pack_planes(_sign_planes(values, dim), dim)


def _sign_planes(values: Tensor, dim: int) -> Tensor:
    """uint8 (..., 2, 32 * ceil(C / 32), ...): ``values < 0`` and ``values`` < 0 or > 0 along ``dim``
    (plane SIGN, plane NONZERO at ``dim``, the channels after it, zero padded)."""
    c = values.shape[dim]
    before, after = values.shape[:dim], values.shape[dim + 1:]
    planes = torch.zeros(*before, 2, words_for(c) * WORD_BITS, *after, dtype=torch.uint8, device=values.device)
    index = (slice(None),) * dim
    planes[index + (SIGN, slice(0, c))] = values < 0
    # (values < 0) | (values > 0), not values != 0: NaN is 0 as in torch.sign.
    planes[index + (NONZERO, slice(0, c))] = (values < 0).logical_or_(values > 0)
    return planes


def _pack_planes(planes: Tensor, dim: int) -> Tensor:
    """:func:`_sign_planes`' planes (plane axis at ``dim``) -> (..., 2, CW) int32 words."""
    cw = planes.shape[dim + 1] // WORD_BITS
    after = planes.shape[dim + 2:]
    # Bytes first, along the channels where they lie (bit j of byte b is channel 8b + j:
    # distinct powers of two, so the uint8 sum is their OR), then the bytes moved last (an
    # eighth of the elements) and read four at a time as words, least significant first.
    # (A product with 2**j: torch's uint8 multiply is vectorised, its uint8 shift is not.)
    powers = _BIT_VALUES.get(planes.device)
    if powers is None:
        powers = _BIT_VALUES[planes.device] = (1 << torch.arange(8, device=planes.device)).to(torch.uint8)
    powers = powers.reshape(8, *(1,) * len(after))
    word_bytes = (planes.unflatten(dim + 1, (cw * 4, 8)) * powers).sum(dim=dim + 2, dtype=torch.uint8)
    return _as_words(word_bytes.movedim((dim, dim + 1), (-2, -1)))


def unpack_values(bits: Tensor, channels: int, dtype: torch.dtype = torch.int8) -> Tensor:
    """Inverse of :func:`pack_values`: (..., 2, CW) int32 -> (..., channels) in {-1, 0, +1}.

    A sign bit counts only where its nonzero bit is set (the kernels' reading).
    """
    if bits.dtype != torch.int32 or bits.dim() < 2 or bits.shape[-2] != 2:
        raise ValueError(f"unpack_values: bits must be int32 (..., 2, CW), got {bits.dtype} {tuple(bits.shape)}")
    if bits.shape[-1] != words_for(channels):
        raise ValueError(f"unpack_values: {bits.shape[-1]} words cannot hold exactly {channels} channels")
    # A byte of each plane holds 8 channels: one lookup in a table of the 8 values of every
    # (nonzero byte, sign byte) pair, indexed by nonzero * 256 + sign, unpacks them.
    table = _BYTE_PAIR_VALUES.get(bits.device)
    if table is None:
        pair = torch.arange(65536, device=bits.device)
        bit = torch.arange(8, device=bits.device)
        nonzero, sign = ((pair >> 8)[:, None] >> bit) & 1, ((pair & 255)[:, None] >> bit) & 1
        table = _BYTE_PAIR_VALUES[bits.device] = (nonzero - 2 * (sign & nonzero)).to(torch.int8)
    word_bytes = _word_bytes(bits)  # (..., 2, 4 * CW)
    index = word_bytes[..., NONZERO, :].to(torch.int32) * 256 + word_bytes[..., SIGN, :]
    values = table[index].flatten(-2)[..., :channels]  # (..., 32 * CW) -> (..., channels)
    return values.to(dtype)


def _check_activation(x, name: str, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D ({layout}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _as_nchw(x: Tensor, layout: str) -> Tensor:
    if layout == "NCHW":
        return x
    if layout == "NHWC":
        return x.permute(0, 3, 1, 2)
    raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")


MAX_SOURCES = 3  # tensors one pack reads as their channel concatenation (the decoder's [x, skip, src])


class Product(NamedTuple):
    """A pack source whose values are ``a * b`` (same shape, dtype and device), multiplied as
    the kernel reads them, never stored: the GRU's ``[x, reset * h]``. Only as the last
    source of a list."""

    a: Tensor
    b: Tensor


def _sources(x, layout: str) -> tuple[list[Tensor], Tensor | None]:
    """``x`` (one tensor, or a list/tuple of up to 3 read as ``torch.cat(x, dim=channels)``,
    the last of which may be a :class:`Product`) checked and seen as NCHW views (no copy).
    Returns (sources, gate): for a product last source, ``a`` is its source and ``b`` the gate."""
    views, gate = _source_views(x, layout)
    if sum(v.shape[1] for v in views) == 0:
        raise ValueError("x must have at least one channel")
    return views, gate


def _source_views(x, layout: str) -> tuple[list[Tensor], Tensor | None]:
    """:func:`_sources` before the check of the channel count they add up to."""
    if isinstance(x, Tensor):
        _check_activation(x, "x", layout)
        return [_as_nchw(x, layout)], None
    if isinstance(x, Product):
        x = [x]
    if not isinstance(x, (list, tuple)) or not 1 <= len(x) <= MAX_SOURCES:
        raise TypeError(f"x must be a tensor or a list/tuple of 1 to {MAX_SOURCES} tensors, got "
                        f"{type(x).__name__}{f' of {len(x)}' if isinstance(x, (list, tuple)) else ''}")
    gate = None
    views = []
    for i, t in enumerate(x):
        if isinstance(t, Product):
            if i != len(x) - 1:
                raise ValueError(f"x[{i}]: a Product may only be the last source")
            _check_activation(t.b, f"x[{i}].b", layout)
            _check_activation(t.a, f"x[{i}].a", layout)
            gate, v = _as_nchw(t.b, layout), _as_nchw(t.a, layout)
            if gate.shape != v.shape or (gate.dtype, gate.device) != (v.dtype, v.device):
                raise ValueError(f"x[{i}]: Product factors must have the same shape, dtype and device, got "
                                 f"{tuple(t.a.shape)} {v.dtype} {v.device} and {tuple(t.b.shape)} {gate.dtype} "
                                 f"{gate.device}")
        else:
            _check_activation(t, f"x[{i}]", layout)
            v = _as_nchw(t, layout)
        if views and (v.dtype, v.device) != (views[0].dtype, views[0].device):
            raise ValueError(f"x[{i}] is {v.dtype} on {v.device}, expected {views[0].dtype} on {views[0].device} "
                             "like x[0]")
        if views and (v.shape[0], *v.shape[2:]) != (views[0].shape[0], *views[0].shape[2:]):
            raise ValueError(f"x[{i}] has (N, H, W) = {(v.shape[0], *v.shape[2:])}, expected "
                             f"{(views[0].shape[0], *views[0].shape[2:])} like x[0] (channels may differ)")
        views.append(v)
    return views, gate


def _materialised(sources: list[Tensor], gate: Tensor | None) -> Tensor:
    """The concatenation the sources stand for, as a tensor (the references build it)."""
    if gate is not None:
        sources = [*sources[:-1], sources[-1] * gate]
    return sources[0] if len(sources) == 1 else torch.cat(sources, dim=1)


def _channel_vector(v, channels: int, name: str, device: torch.device) -> Tensor:
    """``v`` (any shape with ``channels`` elements, e.g. LearnableBias's (1, C, 1, 1)) -> (C,)."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}")
    if v.numel() != channels:
        raise ValueError(f"{name} must have {channels} elements (one per channel), got shape {tuple(v.shape)}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the activations are on {device}")
    return v.reshape(channels)


def sign_pack_reference(x, bias: Tensor | None = None, layout: str = "NCHW") -> PackedActivation:
    """Plain-PyTorch ``pack(torch.sign(x + bias))``: the model's LearnableBias + BinaryActivation.

    ``x``: float (N, C, H, W) (``layout='NCHW'``) or (N, H, W, C) (``'NHWC'``), any strides;
    or a list/tuple of up to 3 such tensors (same N, H, W, dtype, device), packed as their
    concatenation along the channels. ``bias``: ``C`` elements (e.g. ``LearnableBias.bias``
    of shape (1, C, 1, 1); C in all) or None.
    """
    x = _materialised(*_sources(x, layout))
    c = x.shape[1]
    if bias is not None:
        x = x + _channel_vector(bias, c, "bias", x.device).reshape(1, c, 1, 1)
    # Only the signs are read (torch.sign(x) would pack the same bits). The int8 values
    # nonzero - 2 * negative come with the result, so that the plain-PyTorch convolutions that
    # read it need not unpack the bits again (PackedActivation.unpack).
    planes = _sign_planes(x, 1)  # (N, 2, 32 * CW, H, W) uint8
    values = (planes[:, NONZERO, :c] - 2 * planes[:, SIGN, :c]).view(torch.int8)  # uint8 wraps: 255 is -1
    return PackedActivation(_pack_planes(planes, 1), c)._remember_values(values)


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _sign_words(x, bias_ptr, c, c_ok, mask, shift, HAS_BIAS: tl.constexpr):
    """Sign and nonzero words (BP, BW) of ``sign(x + bias)`` for a (BP, BW, 32) block of ``x``."""
    if HAS_BIAS:
        # sign(x + b) from exact comparisons with -b (see the module docstring); negating
        # on load (exact) saves a launch per call.
        t = -tl.load(bias_ptr + c, mask=c_ok, other=0.0)[None, :, :]
        neg = (x < t) & mask
        nonzero = neg | ((x > t) & mask)  # not x != t: NaN (and inf + -inf) give 0, as torch.sign
    else:
        neg = (x < 0) & mask
        nonzero = neg | ((x > 0) & mask)
    # The shifted bits are distinct powers of two, so their int32 sum is their OR
    # (1 << 31 is -2**31 and no partial sum overflows); tl.sum is vectorised by the
    # interpreter, where a custom tl.reduce combine runs element by element.
    return tl.sum(neg.to(tl.int32) << shift, axis=2), tl.sum(nonzero.to(tl.int32) << shift, axis=2)


@triton.jit
def _source_offsets(p, sn, sh, sw, H, W):
    """(BP,) int64 offsets of pixels ``p = n*H*W + h*W + w`` in a source with strides (sn, sh, sw)."""
    hw = H * W
    n = p // hw
    h = (p % hw) // W
    w = p % W
    return n.to(tl.int64) * sn + h.to(tl.int64) * sh + w.to(tl.int64) * sw


@triton.jit
def _sign_pack_kernel(
    x_ptr,  # float, source 0: logical (N, C0, H, W) with strides (sn, sc, sh, sw)
    x1_ptr,  # SOURCES >= 2: source 1, (N, C1, H, W), strides s1*; its channels follow source 0's
    x2_ptr,  # SOURCES == 3: source 2, (N, C2, H, W), strides s2*
    g_ptr,  # GATED: the last source's factor, its shape, strides g*: that source reads x * g
    bias_ptr,  # (C,) the bias (only read when HAS_BIAS)
    out_ptr,  # int32 (N, H, W, 2, CW)
    bias2_ptr,  # PAIR: the second bias (only read when HAS_BIAS2)
    out2_ptr,  # PAIR: the second packed output, int32 (N, H, W, 2, CW)
    sn, sc, sh, sw,
    s1n, s1c, s1h, s1w,
    s2n, s2c, s2h, s2w,
    gn, gc, gh, gw,
    P, C, C0, C01, H, W, CW,  # C = C0 + C1 + C2 channels in all; C01 = C0 + C1
    C_LAST,  # first channel of the last source (0, C0 or C01)
    SOURCES: tl.constexpr,  # 1, 2 or 3 tensors read as their channel concatenation
    GATED: tl.constexpr,  # the last source is a product x * g (the GRU's reset * h)
    HAS_BIAS: tl.constexpr,
    PAIR: tl.constexpr,  # also pack sign(x + bias2) into out2 (x read once for both)
    HAS_BIAS2: tl.constexpr,
    BP: tl.constexpr,  # pixels per program
    BW: tl.constexpr,  # words per program
):
    pid_p = tl.program_id(0)
    pid_w = tl.program_id(1)
    p = pid_p * BP + tl.arange(0, BP)  # (BP,) pixel index n*H*W + h*W + w
    p_ok = p < P

    word = pid_w * BW + tl.arange(0, BW)  # (BW,)
    bit = tl.arange(0, 32)  # (32,)
    c = word[:, None] * 32 + bit[None, :]  # (BW, 32) channel index of the concatenation
    c_ok = c < C
    mask = p_ok[:, None, None] & c_ok[None, :, :]  # (BP, BW, 32)
    # Channel c comes from source 0 below C0, source 1 in [C0, C01), source 2 from C01 on
    # (one source: C0 == C01 == C). Each load is masked to its own channel range, so an
    # address computed with a negative channel offset is never read.
    base = _source_offsets(p, sn, sh, sw, H, W)
    x = tl.load(x_ptr + base[:, None, None] + c[None, :, :].to(tl.int64) * sc,
                mask=mask & (c < C0)[None, :, :], other=0.0)
    if SOURCES >= 2:
        base1 = _source_offsets(p, s1n, s1h, s1w, H, W)
        in1 = (c >= C0) & (c < C01)
        x1 = tl.load(x1_ptr + base1[:, None, None] + (c - C0)[None, :, :].to(tl.int64) * s1c,
                     mask=mask & in1[None, :, :], other=0.0)
        x = tl.where(in1[None, :, :], x1, x)
    if SOURCES >= 3:
        base2 = _source_offsets(p, s2n, s2h, s2w, H, W)
        in2 = c >= C01
        x2 = tl.load(x2_ptr + base2[:, None, None] + (c - C01)[None, :, :].to(tl.int64) * s2c,
                     mask=mask & in2[None, :, :], other=0.0)
        x = tl.where(in2[None, :, :], x2, x)
    if GATED:
        # The product in the sources' dtype, rounded once as torch rounds ``x * g``; the
        # other sources' channels are multiplied by 1.0 (exact, keeps -0.0 and NaN).
        gbase = _source_offsets(p, gn, gh, gw, H, W)
        in_last = c >= C_LAST
        g = tl.load(g_ptr + gbase[:, None, None] + (c - C_LAST)[None, :, :].to(tl.int64) * gc,
                    mask=mask & in_last[None, :, :], other=1.0)
        x = x * g
    shift = bit[None, None, :]
    out_off = p.to(tl.int64)[:, None] * (2 * CW) + word[None, :]
    smask = p_ok[:, None] & (word < CW)[None, :]
    sign_word, nz_word = _sign_words(x, bias_ptr, c, c_ok, mask, shift, HAS_BIAS)
    tl.store(out_ptr + out_off, sign_word, mask=smask)
    tl.store(out_ptr + out_off + CW, nz_word, mask=smask)
    if PAIR:
        sign_word2, nz_word2 = _sign_words(x, bias2_ptr, c, c_ok, mask, shift, HAS_BIAS2)
        tl.store(out2_ptr + out_off, sign_word2, mask=smask)
        tl.store(out2_ptr + out_off + CW, nz_word2, mask=smask)


def sign_pack(x, bias: Tensor | None = None, layout: str = "NCHW") -> PackedActivation:
    """Fused LearnableBias + sign + bit-pack: ``pack(torch.sign(x + bias))``, exactly.

    ``x``: float (N, C, H, W) for ``layout='NCHW'`` or (N, H, W, C) for ``'NHWC'``; any
    float dtype and any strides (no copy is made). Or a list/tuple of up to 3 such tensors
    with the same N, H, W, dtype and device: packed as ``torch.cat(x, dim=channels)``
    without building the concatenation (the decoder's ``[upsampled, skip, source]``).
    ``bias``: ``C`` elements (C: all channels) or None.
    Returns a :class:`PackedActivation` (bits (N, H, W, 2, ceil(C/32)) int32). Runs the
    Triton kernel on CUDA or under ``TRITON_INTERPRET=1``, else :func:`sign_pack_reference`.
    """
    sources, gate = _sources(x, layout)
    if not triton_can_run(sources[0]):
        return sign_pack_reference(x, bias, layout)
    return _launch_sign_pack(sources, gate, [bias])[0]


def sign_pack_pair(
    x, bias: Tensor | None, bias2: Tensor | None, layout: str = "NCHW"
) -> tuple[PackedActivation, PackedActivation]:
    """``(sign_pack(x, bias), sign_pack(x, bias2))`` in one pass over ``x`` (one launch):
    the two binary units of a decoder pair read the same input with their own LearnableBias.
    Arguments as :func:`sign_pack` (``x`` may be a list of tensors); falls back to
    :func:`sign_pack_reference` likewise."""
    sources, gate = _sources(x, layout)
    if not triton_can_run(sources[0]):
        whole = _materialised(sources, gate)  # (NCHW; the concatenation built once for both)
        return sign_pack_reference(whole, bias), sign_pack_reference(whole, bias2)
    first, second = _launch_sign_pack(sources, gate, [bias, bias2])
    return first, second


def _bias_arg(bias: Tensor | None, x: Tensor, channels: int, name: str) -> Tensor | None:
    """``bias`` as a contiguous (C,) vector in the comparison dtype, or None."""
    if bias is None:
        return None
    if (isinstance(bias, Tensor) and bias.dtype == x.dtype and bias.dim() == 1 and bias.shape[0] == channels
            and bias.stride(0) == 1 and bias.device == x.device):
        return bias  # the common case (a converted model's buffers): nothing to check or copy
    bias = _channel_vector(bias, channels, name, x.device)
    dtype = x.dtype if bias.dtype == x.dtype else torch.promote_types(x.dtype, bias.dtype)
    if interpreting() and dtype == torch.bfloat16:
        dtype = torch.float32
    return bias.to(dtype).contiguous()


def _launch_sign_pack(sources: list[Tensor], gate: Tensor | None, biases: list) -> list[PackedActivation]:
    """One kernel launch packing ``sign(cat(sources) + b)`` for each of the one or two
    ``biases``; ``sources``: 1 to 3 NCHW tensors checked by :func:`_sources`, the last one
    multiplied by ``gate`` if given."""
    check_pixel_count(sources[0].shape[0], sources[0].shape[2], sources[0].shape[3], "x")  # (numbered in int32)
    if interpreting() and sources[0].dtype == torch.bfloat16:
        # The interpreter compares bf16 as raw integers; widening is exact, but a product
        # must first be rounded to bf16 as torch rounds it.
        if gate is not None:
            sources, gate = [*sources[:-1], sources[-1] * gate], None
        sources = [s.float() for s in sources]
    x = sources[0]
    n, _, h, w = x.shape
    widths = [s.shape[1] for s in sources]
    c = sum(widths)
    vectors = [_bias_arg(b, x, c, name) for b, name in zip(biases, ("bias", "bias2"))]
    cw = words_for(c)
    outs = [torch.empty((n, h, w, 2, cw), dtype=torch.int32, device=x.device) for _ in biases]
    p = n * h * w
    if p > 0:
        bp, bw = (64, 2) if interpreting() else (64, 1)
        pair = len(biases) == 2
        # Unused source slots repeat source 0 (never read: their channel ranges are empty).
        padded = sources + [x] * (MAX_SOURCES - len(sources))
        g = gate if gate is not None else x
        grid = (cdiv(p, bp), cdiv(cw, bw))
        _sign_pack_kernel[grid](
            *padded, g, vectors[0] if vectors[0] is not None else x, outs[0],
            (vectors[1] if vectors[1] is not None else x) if pair else x, outs[1] if pair else outs[0],
            *(stride for s in padded for stride in s.stride()), *g.stride(),
            p, c, widths[0], sum(widths[:2]), h, w, cw, c - widths[-1],
            SOURCES=len(sources), GATED=gate is not None, HAS_BIAS=vectors[0] is not None, PAIR=pair,
            HAS_BIAS2=pair and vectors[1] is not None, BP=bp, BW=bw,
        )
    return [PackedActivation._allocated(out, c) for out in outs]  # (N, H, W, 2, CW) int32, as built above
