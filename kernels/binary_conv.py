"""Packed binary convolution (1x1 / 3x3, stride 1 / 2, zero padding) with a fused epilogue.

Math: for a :class:`~bimatting_triton.kernels.pack.PackedActivation` ``a`` (values
``sign(x + bias)`` in {-1, 0, +1}) and a :class:`PackedWeight` (values ``sign(w_c)`` in
{-1, 0, +1}, ``w_c = w - mean(w)`` per output channel, ``alpha = mean|w_c|``), the
integer accumulator is ``acc[n, o, i, j] = sum_{c, kh, kw} a[n, c, i*s - p + kh,
j*s - p + kw] * sign(w_c)[o, c, kh, kw]``, with out-of-image taps contributing 0 (zero
padding). ``BiConv2d(x) == alpha[o] * acc`` up to float rounding. The sum is exact:
|acc| <= KH*KW*Cin < 2**31 (and converts exactly to float32 while KH*KW*Cin <= 2**24).

Bit layouts
-----------
* Activations: see :mod:`bimatting_triton.kernels.pack` (int32 (N, H, W, 2, CW), plane 0
  sign, plane 1 nonzero, channel ``c`` at bit ``c % 32`` of word ``c // 32``).
* :class:`PackedWeight` ``bits``: int32 (KH, KW, 2, CW, Cout), same two planes and
  channel order, output channels contiguous (coalesced loads of a tile of Cout);
  a degenerate output channel (all ``w_c == 0``) has nonzero bits 0, so it reads as 0.
  ``int8``: the same values unpacked, int8 (KH, KW, 32*CW, Cout), padding rows 0, the rows
  of each word in :func:`dot_channel_order` (row ``4n + j`` of a word is channel ``n + 8j``),
  stored as (Cout, KH, KW, 32*CW) (see :func:`dot_weights`).

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

Fused epilogue (:class:`Epilogue`), all per output channel ``o``, in the dtype of
``scale`` (the compute dtype, float32 or float64), in this order::

    y = acc * scale[o] (+ shift[o])          # alpha, conv bias and eval BatchNorm folded
    y = y + residual                         # Residual: 'add' | 'half_sum' | 'avgpool'
    y = y + bias_a[o]                        # LearnableBias
    y = act(y)                               # prelu(y, slope[o]) | relu | sigmoid | tanh
    y = y + bias_b[o]                        # LearnableBias
    y = y + post_residual                    # e.g. the dense shortcut across blocks
    y_out = y cast to out_dtype
    y_out = y_out * mask + addend            # if mask: the decoder's `branch3x3 * m + branch1x1`,
                                             # in out_dtype (mask (N, 1, Ho, Wo), addend optional)
    stored if store_float
    packed = pack(sign(y_out + next_bias))   # if pack: the next binary layer's input

``sigmoid`` is ``1 / (1 + e)`` (y >= 0) or ``e / (1 + e)`` with ``e = exp(-|y|)``, and
``tanh`` is ``sign(y) (1 - e) / (1 + e)`` with ``e = exp(-2|y|)`` (no overflow; no
libdevice, which the interpreter lacks): within a few ulps (absolute) of
``torch.sigmoid`` / ``torch.tanh``, which the reference uses. The mask stage may read
``addend`` from ``out`` itself (read-modify-write: every element is read and written by
the same program; the autotuner restores ``out`` between its trial runs).

Residual modes (all fused, nothing to precompute): ``'add'`` reads a (N, Cr, Ho, Wo)
tensor at channel ``o % Cr`` (Cr == Cout, or Cr dividing Cout for the stacked branches
of a dense block); ``'half_sum'`` reads (N, 2*Cout, Ho, Wo) and adds
``(r[o] + r[o + Cout]) / 2`` (the shrinking block); ``'avgpool'`` reads (N, Cout, Hr,
Wr) and adds ``AvgPool2d(2, 2, ceil_mode=True)(r)`` (divisor = the in-image count,
as PyTorch's with zero padding), for the stride-2 shortcut. Float tensors are logical
NCHW with any strides; outputs are allocated channels-last (NHWC in memory) unless an
``out`` tensor (any strides, e.g. a channel slice of a concat buffer) is given. ``out``
must not overlap any input other than ``addend`` (which may be ``out`` itself).

The kernel is built from ``@triton.jit`` helpers (:func:`conv_accumulate`,
:func:`epilogue_values`, :func:`apply_activation`, :func:`apply_mask`,
:func:`store_packed`) that :mod:`~bimatting_triton.kernels.sparse_unit` reuses for
its tile-sparse variant, so both compute every value with the same operations.

Batch and time are folded into N by the caller. Public: :func:`pack_weight`,
:func:`pack_conv`, :func:`fold_scale_shift`, :class:`Epilogue`, :class:`Residual`,
:func:`binary_conv2d` (Triton; reference fallback where Triton cannot run) and
:func:`binary_conv2d_reference` (plain PyTorch).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from ._common import (
    autotuning,
    cdiv,
    hardware_popcount,
    interpreting,
    note_compiled,
    popcount32,
    pow2,
    triton_can_run,
)
from .pack import WORD_BITS, PackedActivation, pack_values, sign_pack_reference, unpack_values, words_for

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
    "binary_conv2d",
    "binary_conv2d_reference",
]

METHODS = ("auto", "dot", "popcount")
RESIDUAL_MODES = ("add", "half_sum", "avgpool")
ACTIVATIONS = (None, "prelu", "relu", "sigmoid", "tanh")


# ----------------------------------------------------------------------------------------
# Packed weights
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedWeight:
    """Binary weights of one BiConv2d, packed (layouts in the module docstring).

    ``bits``: int32 (KH, KW, 2, ceil(Cin/32), Cout). ``alpha``: (Cout,) float, ``mean|w_c|``.
    ``in_channels``: Cin. ``stride``, ``padding``: the convolution's (zero padding).
    ``int8``: int8 (KH, KW, 32*ceil(Cin/32), Cout) values for the ``'dot'`` path, laid out by
    :func:`dot_weights`; derived from ``bits`` when not given (pass a stored copy to skip the
    unpacking).
    """

    bits: Tensor
    alpha: Tensor
    in_channels: int
    stride: int = 1
    padding: int = 0
    int8: Tensor | None = field(default=None, repr=False, compare=False)
    # values() per dtype, with the version of ``bits`` it was made from (the references'
    # weights, unpacked once instead of at every call)
    _values: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        b = self.bits
        if not isinstance(b, Tensor) or b.dtype != torch.int32 or b.dim() != 5 or b.shape[2] != 2:
            raise ValueError(
                "PackedWeight.bits must be an int32 tensor of shape (KH, KW, 2, CW, Cout), got "
                f"{getattr(b, 'dtype', type(b))} {tuple(getattr(b, 'shape', ()))}"
            )
        if b.shape[3] != words_for(self.in_channels):
            raise ValueError(
                f"PackedWeight.bits has {b.shape[3]} words, expected ceil({self.in_channels} / 32)"
            )
        a = self.alpha
        if not isinstance(a, Tensor) or a.shape != (b.shape[4],) or not a.is_floating_point():
            raise ValueError(f"PackedWeight.alpha must be a float tensor of shape ({b.shape[4]},)")
        if self.alpha.device != b.device:
            raise ValueError("PackedWeight.alpha and bits must be on the same device")
        if not (isinstance(self.stride, int) and self.stride >= 1):
            raise ValueError(f"PackedWeight.stride must be a positive int, got {self.stride!r}")
        if not (isinstance(self.padding, int) and self.padding >= 0):
            raise ValueError(f"PackedWeight.padding must be a non-negative int, got {self.padding!r}")
        object.__setattr__(self, "bits", b.contiguous())
        kh, kw, _, cw, cout = b.shape
        if self.int8 is None:
            object.__setattr__(self, "int8", dot_weights(b))
        elif (
            not isinstance(self.int8, Tensor) or self.int8.dtype != torch.int8
            or self.int8.shape != (kh, kw, cw * WORD_BITS, cout) or self.int8.device != b.device
        ):
            raise ValueError(
                f"PackedWeight.int8 must be an int8 tensor of shape {(kh, kw, cw * WORD_BITS, cout)} on {b.device}"
            )
        elif not self.int8.permute(3, 0, 1, 2).is_contiguous():  # (laid out as dot_weights does)
            object.__setattr__(self, "int8", self.int8.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0))

    @property
    def out_channels(self) -> int:
        return self.bits.shape[4]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return (self.bits.shape[0], self.bits.shape[1])

    @property
    def words(self) -> int:
        return self.bits.shape[3]

    @property
    def device(self) -> torch.device:
        return self.bits.device

    def to(self, device) -> "PackedWeight":
        return PackedWeight(
            self.bits.to(device), self.alpha.to(device), self.in_channels, self.stride, self.padding,
            self.int8.to(device),
        )

    def values(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``sign(w_c)`` as (Cout, Cin, KH, KW) of ``dtype`` (made once per dtype and reused
        while ``bits`` is unchanged; do not write to it)."""
        version = None if self.bits.is_inference() else self.bits._version  # (inference tensors have none)
        hit = self._values.get(dtype)
        if hit is not None and version is not None and hit[0] == version:
            return hit[1]
        v = unpack_values(self.bits.permute(0, 1, 4, 2, 3), self.in_channels, dtype)  # (KH, KW, Cout, Cin)
        v = v.permute(2, 3, 0, 1).contiguous()
        self._values[dtype] = (version, v)
        return v

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Output (Ho, Wo) for an (h, w) input."""
        kh, kw = self.kernel_size
        return ((h + 2 * self.padding - kh) // self.stride + 1, (w + 2 * self.padding - kw) // self.stride + 1)


def dot_channel_order(cin_pad: int, device=None) -> Tensor:
    """int64 (cin_pad,): the input channel of each row of the ``'dot'`` path's int8 weights.

    Within each 32-channel word, row ``4 n + j`` holds channel ``n + 8 j`` (n < 8, j < 4): the
    order in which :func:`unpack_words` makes a word's values (cheapest to unpack)."""
    k = torch.arange(cin_pad, device=device)
    return k - k % WORD_BITS + (k % 4) * 8 + (k % WORD_BITS) // 4


def dot_weights(bits: Tensor) -> Tensor:
    """int8 (KH, KW, 32*CW, Cout) weight values {-1, 0, +1} from packed ``bits`` (KH, KW, 2, CW,
    Cout), the rows of each word in :func:`dot_channel_order`, stored as a contiguous
    (Cout, KH, KW, 32*CW) tensor: each output channel's (tap, channel) rows follow one another
    in memory (the int8 dot's operand is read along them, whole taps at a time for layers
    with few channels)."""
    cin_pad = bits.shape[3] * WORD_BITS
    vals = unpack_values(bits.permute(0, 1, 4, 2, 3), cin_pad, torch.int8)  # (KH, KW, Cout, 32*CW)
    ordered = vals[..., dot_channel_order(cin_pad, bits.device)]
    return ordered.permute(2, 0, 1, 3).contiguous().permute(1, 2, 3, 0)


def pack_weight(weight: Tensor, stride: int = 1, padding: int | None = None) -> PackedWeight:
    """Pack a BiConv2d weight (Cout, Cin, KH, KW) exactly as ``bimatting_triton.nn`` binarizes it.

    ``w_c = weight - mean(weight over (Cin, KH, KW))``, ``alpha = mean(|w_c|)`` per output
    channel (same ops as ``binarize_weight``, so ``alpha * values == binarize_weight``
    bitwise), sign bits of ``w_c`` (``w_c == 0`` packs as 0). ``padding`` defaults to
    ``KH // 2`` (BiConv2d's default).
    """
    if not isinstance(weight, Tensor) or weight.dim() != 4 or not weight.is_floating_point():
        raise ValueError(
            "weight must be a float tensor of shape (Cout, Cin, KH, KW), got "
            f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}"
        )
    if padding is None:
        padding = weight.shape[2] // 2
    with torch.no_grad():
        w_c = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
        alpha = w_c.abs().mean(dim=(1, 2, 3))
        bits = pack_values(torch.sign(w_c).permute(2, 3, 0, 1))  # (KH, KW, Cout, 2, CW)
    bits = bits.permute(0, 1, 3, 4, 2).contiguous()  # (KH, KW, 2, CW, Cout)
    return PackedWeight(bits, alpha.detach().clone(), weight.shape[1], stride, padding)


def pack_conv(conv: nn.Conv2d) -> PackedWeight:
    """Pack a ``BiConv2d`` (or any zero-padded, ungrouped Conv2d with square stride/padding)."""
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"conv must be an nn.Conv2d (BiConv2d), got {type(conv).__name__}")
    if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        raise ValueError("conv must have groups=1, dilation=1 and zero padding")
    if conv.stride[0] != conv.stride[1] or not isinstance(conv.padding, tuple) or conv.padding[0] != conv.padding[1]:
        raise ValueError(f"conv must have a square stride and padding, got {conv.stride}, {conv.padding}")
    return pack_weight(conv.weight, conv.stride[0], conv.padding[0])


def fold_scale_shift(
    alpha: Tensor,
    batchnorm: nn.BatchNorm2d | None = None,
    conv_bias: Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Fold ``BN(alpha * acc + conv_bias)`` (BN in eval mode) into ``acc * scale + shift``.

    ``k = gamma / sqrt(running_var + eps)``, ``scale = alpha * k``,
    ``shift = (conv_bias - running_mean) * k + beta``; computed in float64, returned as
    two (Cout,) tensors of ``dtype`` (default ``alpha.dtype``), which becomes the
    epilogue's compute dtype. Equal to the unfolded math up to float rounding.
    """
    dtype = dtype or alpha.dtype
    a = alpha.detach().to(torch.float64)
    scale, shift = a, torch.zeros_like(a)
    if conv_bias is not None:
        shift = conv_bias.detach().to(torch.float64).reshape(-1)
    if batchnorm is not None:
        if batchnorm.running_mean is None or batchnorm.running_var is None:
            raise ValueError("batchnorm must track running statistics to be folded")
        k = 1.0 / torch.sqrt(batchnorm.running_var.detach().to(torch.float64) + batchnorm.eps)
        if batchnorm.weight is not None:
            k = k * batchnorm.weight.detach().to(torch.float64)
        scale = scale * k
        shift = (shift - batchnorm.running_mean.detach().to(torch.float64)) * k
        if batchnorm.bias is not None:
            shift = shift + batchnorm.bias.detach().to(torch.float64)
    return scale.to(dtype), shift.to(dtype)


# ----------------------------------------------------------------------------------------
# Epilogue description
# ----------------------------------------------------------------------------------------
@dataclass
class Residual:
    """A float tensor (logical NCHW, any strides) added in the epilogue; ``mode`` in
    ``'add'`` (N, Cr, Ho, Wo) with Cr | Cout, ``'half_sum'`` (N, 2*Cout, Ho, Wo),
    ``'avgpool'`` (N, Cout, Hr, Wr) with ceil(Hr/2) == Ho and ceil(Wr/2) == Wo."""

    tensor: Tensor
    mode: str = "add"


@dataclass
class Epilogue:
    """What :func:`binary_conv2d` does with the integer accumulator (order in the module docstring).

    Per-channel vectors may have any shape with Cout elements (e.g. LearnableBias's
    (1, C, 1, 1)); they are cast to ``scale.dtype``, the compute dtype. ``prelu_weight``
    may also have 1 element (``nn.PReLU()``). ``residual`` / ``post_residual``: a
    :class:`Residual` or a plain tensor (mode ``'add'``). ``out``: optional float output
    (N, Cout, Ho, Wo), any strides; else one is allocated (channels-last) of
    ``out_dtype`` (default the compute dtype). ``pack``: also return
    ``pack(sign(y_out + next_bias))``. ``mask``: (N, 1, Ho, Wo) float, any strides: the
    output becomes ``y_out * mask + addend`` (``addend``: (N, Cout, Ho, Wo) float, any
    strides, may be ``out`` itself; None adds nothing), computed in ``out_dtype``.
    """

    scale: Tensor
    shift: Tensor | None = None
    residual: Residual | Tensor | None = None
    bias_a: Tensor | None = None
    act: str | None = None
    prelu_weight: Tensor | None = None
    bias_b: Tensor | None = None
    post_residual: Residual | Tensor | None = None
    store_float: bool = True
    out: Tensor | None = None
    out_dtype: torch.dtype | None = None
    pack: bool = False
    next_bias: Tensor | None = None
    mask: Tensor | None = None
    addend: Tensor | None = None


class ConvOutput(NamedTuple):
    """Result of :func:`binary_conv2d` with an epilogue: float output (or None) and packed (or None)."""

    y: Tensor | None
    packed: PackedActivation | None


@dataclass
class _Prepared:
    """An :class:`Epilogue` checked against the output shape, vectors as (Cout,) compute dtype.

    ``static_flags`` / ``vector_args``: :func:`channel_flags` / :func:`epilogue_vectors`
    when they were built once (an :class:`EpiloguePlan`'s), else None (built at launch)."""

    scale: Tensor
    shift: Tensor | None
    residual: Residual | None
    bias_a: Tensor | None
    act: str | None
    slope: Tensor | None
    bias_b: Tensor | None
    post_residual: Residual | None
    store_float: bool
    out: Tensor | None
    out_dtype: torch.dtype
    pack: bool
    next_bias: Tensor | None
    mask: Tensor | None = None
    addend: Tensor | None = None
    static_flags: dict | None = None
    vector_args: tuple | None = None


def _vector(v, cout: int, name: str, dtype: torch.dtype, device, allow_scalar: bool = False) -> Tensor | None:
    if v is None:
        return None
    if (isinstance(v, Tensor) and v.dtype == dtype and v.device == device and v.dim() == 1 and v.numel() == cout
            and v.stride(0) == 1):
        return v  # the common case (a converted module's buffers): no checks or copies left to do
    if not isinstance(v, Tensor) or not v.is_floating_point():
        raise TypeError(f"epilogue.{name} must be a float tensor, got {getattr(v, 'dtype', type(v).__name__)}")
    if v.device != device:
        raise ValueError(f"epilogue.{name} is on {v.device}, expected {device}")
    if v.numel() == 1 and allow_scalar:
        return v.reshape(1).expand(cout).to(dtype).contiguous()
    if v.numel() != cout:
        raise ValueError(
            f"epilogue.{name} must have {cout} elements (one per output channel), got shape {tuple(v.shape)}"
        )
    return v.reshape(cout).to(dtype).contiguous()


def _residual(r, name: str, n: int, cout: int, ho: int, wo: int, device) -> Residual | None:
    if r is None:
        return None
    if isinstance(r, Tensor):
        r = Residual(r)
    if not isinstance(r, Residual):
        raise TypeError(f"epilogue.{name} must be a Residual or a tensor, got {type(r).__name__}")
    t = r.tensor
    if r.mode not in RESIDUAL_MODES:
        raise ValueError(f"epilogue.{name}.mode must be one of {RESIDUAL_MODES}, got {r.mode!r}")
    if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
        raise ValueError(f"epilogue.{name} must be a 4-D float tensor (N, C, H, W)")
    if t.device != device:
        raise ValueError(f"epilogue.{name} is on {t.device}, expected {device}")
    tn, tc, th, tw = t.shape
    if r.mode == "add":
        ok = tc >= 1 and cout % tc == 0 and (th, tw) == (ho, wo)
        want = f"(N={n}, C dividing {cout}, {ho}, {wo})"
    elif r.mode == "half_sum":
        ok = tc == 2 * cout and (th, tw) == (ho, wo)
        want = f"({n}, {2 * cout}, {ho}, {wo})"
    else:
        ok = tc == cout and (th + 1) // 2 == ho and (tw + 1) // 2 == wo
        want = f"({n}, {cout}, H, W) with ceil(H/2) = {ho}, ceil(W/2) = {wo}"
    if not ok or tn != n:
        raise ValueError(f"epilogue.{name} ({r.mode}) must have shape {want}, got {tuple(t.shape)}")
    return r


def _check_per_channel(epi: Epilogue, cout: int, device) -> _Prepared:
    """The per-channel part of ``epi`` (vectors, activation, what is stored) checked; its
    per-pixel fields (residuals, out, mask, addend) left None in the result."""
    if not isinstance(epi, Epilogue):
        raise TypeError(f"epilogue must be an Epilogue or None, got {type(epi).__name__}")
    if not isinstance(epi.scale, Tensor) or not epi.scale.is_floating_point():
        raise TypeError("epilogue.scale must be a float tensor (its dtype is the compute dtype)")
    cd = epi.scale.dtype
    if cd not in (torch.float32, torch.float64):
        raise TypeError(f"epilogue.scale must be float32 or float64 (the compute dtype), got {cd}")
    if epi.act not in ACTIVATIONS:
        raise ValueError(f"epilogue.act must be one of {ACTIVATIONS}, got {epi.act!r}")
    if (epi.act == "prelu") != (epi.prelu_weight is not None):
        raise ValueError("epilogue.prelu_weight must be given exactly when act == 'prelu'")
    if not (epi.store_float or epi.pack):
        raise ValueError("epilogue must store the float output, pack it, or both")
    if epi.next_bias is not None and not epi.pack:
        raise ValueError("epilogue.next_bias is only used with pack=True")
    out_dtype = epi.out_dtype or (epi.out.dtype if isinstance(epi.out, Tensor) else cd)
    if not (isinstance(out_dtype, torch.dtype) and out_dtype.is_floating_point):
        raise TypeError(f"epilogue.out_dtype must be a float dtype, got {out_dtype}")
    nb = None
    if epi.next_bias is not None:
        nb = _vector(epi.next_bias, cout, "next_bias", torch.promote_types(out_dtype, epi.next_bias.dtype), device)
    return _Prepared(
        scale=_vector(epi.scale, cout, "scale", cd, device),
        shift=_vector(epi.shift, cout, "shift", cd, device),
        residual=None,
        bias_a=_vector(epi.bias_a, cout, "bias_a", cd, device),
        act=epi.act,
        slope=_vector(epi.prelu_weight, cout, "prelu_weight", cd, device, allow_scalar=True),
        bias_b=_vector(epi.bias_b, cout, "bias_b", cd, device),
        post_residual=None,
        store_float=epi.store_float,
        out=None,
        out_dtype=out_dtype,
        pack=epi.pack,
        next_bias=nb,
    )


def _with_per_pixel(c: _Prepared, n: int, cout: int, ho: int, wo: int, device,
                    residual, post_residual, out, mask, addend) -> _Prepared:
    """``c`` (a checked per-channel part) completed with its per-pixel tensors, checked
    against the output (n, cout, ho, wo)."""
    if out is not None:
        if not c.store_float:
            raise ValueError("epilogue.out is given but store_float is False")
        if not isinstance(out, Tensor) or tuple(out.shape) != (n, cout, ho, wo) or not out.is_floating_point():
            raise ValueError(f"epilogue.out must be a float tensor of shape {(n, cout, ho, wo)}, got "
                             f"{getattr(out, 'dtype', type(out))} {tuple(getattr(out, 'shape', ()))}")
        if out.device != device:
            raise ValueError(f"epilogue.out is on {out.device}, expected {device}")
        if out.dtype != c.out_dtype:
            raise ValueError(f"epilogue.out has dtype {out.dtype} but out_dtype is {c.out_dtype}")
    if mask is not None:
        mask = float_map(mask, "epilogue.mask", (n, 1, ho, wo), device)
        if addend is not None:
            addend = float_map(addend, "epilogue.addend", (n, cout, ho, wo), device)
    elif addend is not None:
        raise ValueError("epilogue.addend is only used with a mask (y * mask + addend)")
    return _Prepared(
        c.scale, c.shift, _residual(residual, "residual", n, cout, ho, wo, device), c.bias_a, c.act, c.slope,
        c.bias_b, _residual(post_residual, "post_residual", n, cout, ho, wo, device), c.store_float, out,
        c.out_dtype, c.pack, c.next_bias, mask, addend, c.static_flags, c.vector_args,
    )


class EpiloguePlan:
    """An :class:`Epilogue`'s per-channel part checked once, for a layer launched many times.

    ``EpiloguePlan(epilogue, cout, device)`` checks ``epilogue`` (which must leave its
    per-pixel fields ``residual``, ``post_residual``, ``out``, ``mask``, ``addend`` unset)
    for ``cout`` output channels on ``device`` (default: ``epilogue.scale``'s; ``'cuda'``
    means the current CUDA device) and builds the kernel's per-channel arguments. Each launch then passes ``plan.bind(residual=..., ...)`` as the epilogue of
    :func:`binary_conv2d` (or :func:`binary_conv2d_reference`): only the tensors given to
    ``bind`` and the input are checked. The result is the same as with the equivalent
    :class:`Epilogue`. The plan keeps the vectors it was built with (or the copies it made
    in the compute dtype): build a new one when they are replaced or written in place
    (a converted model's units do, see ``BinaryConvUnit``).
    """

    __slots__ = ("epilogue", "cout", "device", "checked")

    def __init__(self, epilogue: Epilogue, cout: int, device=None):
        if not isinstance(epilogue, Epilogue):
            raise TypeError(f"epilogue must be an Epilogue, got {type(epilogue).__name__}")
        per_pixel = [f for f in ("residual", "post_residual", "out", "mask", "addend")
                     if getattr(epilogue, f) is not None]
        if per_pixel:
            raise ValueError(f"EpiloguePlan: leave {', '.join(per_pixel)} unset (given per launch by bind())")
        self.epilogue = epilogue
        device = torch.device(device if device is not None else getattr(epilogue.scale, "device", "cpu"))
        if device.type == "cuda" and device.index is None:  # tensors' devices always carry the index
            device = torch.device("cuda", torch.cuda.current_device())
        self.cout, self.device = int(cout), device
        c = _check_per_channel(epilogue, self.cout, self.device)
        c.static_flags, c.vector_args = channel_flags(c), epilogue_vectors(c)
        self.checked = c

    def bind(self, residual: Residual | Tensor | None = None, post_residual: Residual | Tensor | None = None,
             out: Tensor | None = None, mask: Tensor | None = None, addend: Tensor | None = None) -> "BoundEpilogue":
        """The epilogue of one launch: this plan with its per-pixel tensors (as in :class:`Epilogue`)."""
        return BoundEpilogue(self, residual, post_residual, out, mask, addend)


class BoundEpilogue(NamedTuple):
    """An :class:`EpiloguePlan` with the per-pixel tensors of one launch (``plan.bind(...)``)."""

    plan: EpiloguePlan
    residual: Residual | Tensor | None
    post_residual: Residual | Tensor | None
    out: Tensor | None
    mask: Tensor | None
    addend: Tensor | None

    @property
    def pack(self) -> bool:
        """Whether the launch packs its output (read like :attr:`Epilogue.pack`)."""
        return self.plan.checked.pack

    def as_epilogue(self) -> Epilogue:
        """The equivalent :class:`Epilogue` (for code that takes only those)."""
        return dataclasses.replace(self.plan.epilogue, residual=self.residual, post_residual=self.post_residual,
                                   out=self.out, mask=self.mask, addend=self.addend)


def _prepare(epi: Epilogue | BoundEpilogue, n: int, cout: int, ho: int, wo: int, device) -> _Prepared:
    if isinstance(epi, BoundEpilogue):
        plan = epi.plan
        if plan.cout != cout or plan.device != device:
            raise ValueError(f"epilogue: its plan was built for {plan.cout} output channels on {plan.device}, "
                             f"this launch has {cout} on {device}")
        c = plan.checked
    else:
        c = _check_per_channel(epi, cout, device)
    return _with_per_pixel(c, n, cout, ho, wo, device, epi.residual, epi.post_residual, epi.out, epi.mask, epi.addend)


def float_map(t, name: str, shape: tuple[int, int, int, int], device) -> Tensor:
    """Check a float (N, C, Ho, Wo) tensor argument ``name`` (any strides); returns it."""
    if not isinstance(t, Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
        raise ValueError(
            f"{name} must be a float tensor of shape {shape}, got "
            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t


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
def _residual_reference(r: Residual, cout: int, dtype: torch.dtype) -> Tensor:
    t = r.tensor.to(dtype)
    if r.mode == "add":
        return t.repeat(1, cout // t.shape[1], 1, 1)
    if r.mode == "half_sum":
        return (t[:, :cout] + t[:, cout:]) / 2
    return F.avg_pool2d(t, 2, 2, ceil_mode=True)


def _epilogue_reference(acc: Tensor, p: _Prepared) -> ConvOutput:
    cout = acc.shape[1]

    def col(v: Tensor) -> Tensor:
        return v.reshape(1, cout, 1, 1)

    y = acc.to(p.scale.dtype) * col(p.scale)
    if p.shift is not None:
        y = y + col(p.shift)
    if p.residual is not None:
        y = y + _residual_reference(p.residual, cout, y.dtype)
    if p.bias_a is not None:
        y = y + col(p.bias_a)
    if p.act == "prelu":
        y = F.prelu(y, p.slope)
    elif p.act == "relu":
        y = torch.relu(y)
    elif p.act == "sigmoid":
        y = torch.sigmoid(y)
    elif p.act == "tanh":
        y = torch.tanh(y)
    if p.bias_b is not None:
        y = y + col(p.bias_b)
    if p.post_residual is not None:
        y = y + _residual_reference(p.post_residual, cout, y.dtype)
    y = y.to(p.out_dtype)
    if p.mask is not None:
        y = y * p.mask.to(p.out_dtype)
        if p.addend is not None:
            y = y + p.addend.to(p.out_dtype)
    packed = sign_pack_reference(y, p.next_bias) if p.pack else None
    if p.out is not None:
        p.out.copy_(y)
        y = p.out
    return ConvOutput(y if p.store_float else None, packed)


def integer_conv_dtype(device: torch.device, terms: int) -> torch.dtype:
    """The float dtype in which ``F.conv2d`` of {-1, 0, +1} values is exact on ``device``, for
    dot products of ``terms`` products (input channels x taps).

    Every product is -1, 0 or +1 and every partial sum an integer of magnitude <= ``terms``:
    float32 represents all of them exactly while ``terms`` <= 2**24, in any order of summation,
    so an algorithm that only multiplies and adds (direct or im2col + GEMM, what PyTorch's CPU
    convolutions run) returns the exact sum. On the CPU that is float32 (several times faster
    than float64 there). Elsewhere float64 (every integer below 2**53): cuDNN may choose
    FFT or Winograd algorithms, whose transforms round even for integer inputs, and float64
    keeps their error far below the 0.5 that the final rounding absorbs.
    """
    if torch.device(device).type == "cpu" and terms <= 2**24:
        return torch.float32
    return torch.float64


def binary_conv2d_reference(
    x: PackedActivation, weight: PackedWeight, epilogue: Epilogue | BoundEpilogue | None = None
) -> Tensor | ConvOutput:
    """Plain-PyTorch :func:`binary_conv2d`: unpack to floats {-1, 0, +1} and ``F.conv2d``.

    The integer sums are exact in floating point (:func:`integer_conv_dtype`). Without an
    epilogue returns the int32 accumulator (N, Cout, Ho, Wo); with one, a
    :class:`ConvOutput` computed op by op in the order of the module docstring.
    """
    n, _, _, _, ho, wo = _check_conv_args(x, weight)
    prepared = _prepare(epilogue, n, weight.out_channels, ho, wo, x.device) if epilogue is not None else None
    kh, kw = weight.kernel_size
    dtype = integer_conv_dtype(x.device, x.words * WORD_BITS * kh * kw)
    acc = F.conv2d(x.unpack(dtype), weight.values(dtype), stride=weight.stride, padding=weight.padding)
    acc = acc.round().to(torch.int32)
    if prepared is None:
        return acc
    return _epilogue_reference(acc, prepared)


# ----------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _add_residual(y, r_ptr, sn, sc, sh, sw, RH, RW, RC, n_img, oh, ow, offs_n, mask, MODE: tl.constexpr):
    """y (BM, BN) + the residual of the tile; n_img/oh/ow (BM,) int64, offs_n (BN,) int32."""
    if MODE == 1:  # 'add': channel o reads o % RC
        c = (offs_n % RC).to(tl.int64)
        ptr = r_ptr + (n_img * sn + oh * sh + ow * sw)[:, None] + (c * sc)[None, :]
        y = y + tl.load(ptr, mask=mask, other=0.0).to(y.dtype)
    elif MODE == 2:  # 'half_sum': RC == 2 * Cout, (r[o] + r[o + Cout]) / 2
        c = offs_n.to(tl.int64)
        ptr = r_ptr + (n_img * sn + oh * sh + ow * sw)[:, None] + (c * sc)[None, :]
        r0 = tl.load(ptr, mask=mask, other=0.0).to(y.dtype)
        r1 = tl.load(ptr + (RC // 2) * sc, mask=mask, other=0.0).to(y.dtype)
        y = y + (r0 + r1) / 2
    elif MODE == 3:  # 'avgpool': AvgPool2d(2, 2, ceil_mode=True), divisor = in-image count
        c = offs_n.to(tl.int64)
        total = tl.zeros_like(y)
        count = tl.zeros_like(oh).to(y.dtype)
        for dy in tl.static_range(2):
            for dx in tl.static_range(2):
                ih = 2 * oh + dy
                iw = 2 * ow + dx
                inside = (ih < RH) & (iw < RW)
                ptr = r_ptr + (n_img * sn + ih * sh + iw * sw)[:, None] + (c * sc)[None, :]
                total = total + tl.load(ptr, mask=mask & inside[:, None], other=0.0).to(y.dtype)
                count = count + inside.to(y.dtype)
        y = y + total / tl.maximum(count, 1.0)[:, None]
    return y


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
def apply_activation(y, slope_ptr, offs_n, n_ok, ACT: tl.constexpr):
    """ACT 0 none, 1 PReLU (per-channel slope), 2 ReLU, 3 sigmoid, 4 tanh (module docstring)."""
    if ACT == 1:
        slope = tl.load(slope_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        y = tl.where(y > 0, y, slope * y)
    elif ACT == 2:
        y = tl.where(y > 0, y, 0.0)
    elif ACT == 3:
        # e = exp(-|y|) in (0, 1]: no overflow; sigmoid(-|y|) = e / (1 + e).
        e = tl.exp(-tl.abs(y))
        y = tl.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif ACT == 4:
        # tanh(|y|) = (1 - e) / (1 + e), e = exp(-2|y|) in (0, 1]: no overflow; odd symmetry.
        e = tl.exp(-2.0 * tl.abs(y))
        t = (1.0 - e) / (1.0 + e)
        y = tl.where(y < 0, -t, t)
    return y


@triton.jit
def epilogue_values(
    acc, offs_n, n_ok, mask, n64, oh64, ow64,
    scale_ptr, shift_ptr, ba_ptr, slope_ptr, bb_ptr,
    r1_ptr, r1_sn, r1_sc, r1_sh, r1_sw, R1H, R1W, R1C,
    r2_ptr, r2_sn, r2_sc, r2_sh, r2_sw, R2H, R2W, R2C,
    HAS_SHIFT: tl.constexpr, R1_MODE: tl.constexpr, HAS_BA: tl.constexpr, ACT: tl.constexpr,
    HAS_BB: tl.constexpr, R2_MODE: tl.constexpr,
):
    """The float epilogue of the module docstring up to the cast: int32 tile -> y (BM, BN).

    ``y`` is in the compute dtype (``scale``'s). ``n64``/``oh64``/``ow64``: int64 pixel
    coordinates (``n64`` may be a scalar); ``mask``: the (BM, BN) validity of the tile.
    """
    scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0)
    y = acc.to(scale.dtype) * scale[None, :]
    if HAS_SHIFT:
        y = y + tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    y = _add_residual(y, r1_ptr, r1_sn, r1_sc, r1_sh, r1_sw, R1H, R1W, R1C, n64, oh64, ow64, offs_n, mask, R1_MODE)
    if HAS_BA:
        y = y + tl.load(ba_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    y = apply_activation(y, slope_ptr, offs_n, n_ok, ACT)
    if HAS_BB:
        y = y + tl.load(bb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
    y = _add_residual(y, r2_ptr, r2_sn, r2_sc, r2_sh, r2_sw, R2H, R2W, R2C, n64, oh64, ow64, offs_n, mask, R2_MODE)
    return y


@triton.jit
def apply_mask(y, m_ptr, m_sn, m_sh, m_sw, a_ptr, a_sn, a_sc, a_sh, a_sw, n64, oh64, ow64, offs_n, mask,
               MASK_MODE: tl.constexpr):
    """``y * m[pixel] (+ addend[pixel, channel])`` in y's dtype (MASK_MODE 1 / 2); 0: y unchanged."""
    if MASK_MODE != 0:
        m_off = n64 * m_sn + oh64 * m_sh + ow64 * m_sw
        m = tl.load(m_ptr + m_off[:, None], mask=mask, other=0.0).to(y.dtype)
        y = y * m
        if MASK_MODE == 2:
            a_off = (n64 * a_sn + oh64 * a_sh + ow64 * a_sw)[:, None] + (offs_n.to(tl.int64) * a_sc)[None, :]
            y = y + tl.load(a_ptr + a_off, mask=mask, other=0.0).to(y.dtype)
    return y


@triton.jit
def store_packed(y_out, p_ptr, PCW, offs_m, m_ok, pid_n, nb_ptr, offs_n, n_ok, mask,
                 HAS_NB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """Next layer's LearnableBias + sign + pack of the value as stored (y_out), by exact
    comparison with -next_bias (see kernels/pack.py); pixel rows ``offs_m`` of (N*Ho*Wo)."""
    if HAS_NB:
        t = -tl.load(nb_ptr + offs_n, mask=n_ok, other=0.0)[None, :]  # -next_bias (negation is exact)
        neg = (y_out < t) & mask
        nonzero = (y_out != t) & mask
    else:
        neg = (y_out < 0) & mask
        nonzero = (y_out != 0) & mask
    # BN is a multiple of 32 and the tile starts on a word: word j of the tile
    # holds columns 32j..32j+31; distinct powers of two sum to their OR.
    shift = (offs_n % 32)[None, :]
    sign_w = tl.sum(tl.reshape(neg.to(tl.int32) << shift, (BM, BN // 32, 32)), axis=2)
    nz_w = tl.sum(tl.reshape(nonzero.to(tl.int32) << shift, (BM, BN // 32, 32)), axis=2)
    word = pid_n * (BN // 32) + tl.arange(0, BN // 32)
    p_off = offs_m.to(tl.int64)[:, None] * (2 * PCW) + word[None, :]
    pmask = m_ok[:, None] & (word < PCW)[None, :]
    tl.store(p_ptr + p_off, sign_w, mask=pmask)
    tl.store(p_ptr + p_off + PCW, nz_w, mask=pmask)


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


_RES_CODE = {None: 0, "add": 1, "half_sum": 2, "avgpool": 3}
_ACT_CODE = {None: 0, "prelu": 1, "relu": 2, "sigmoid": 3, "tanh": 4}


def _interpretable(t: Tensor) -> Tensor:
    """bf16 -> float32 under the interpreter (exact; it has no bf16 arithmetic)."""
    return t.float() if interpreting() and t.dtype == torch.bfloat16 else t


def _residual_args(r: Residual | None, dummy: Tensor) -> tuple:
    if r is None:
        return (dummy, 0, 0, 0, 0, 1, 1, 1)
    t = _interpretable(r.tensor)
    return (t, *t.stride(), t.shape[2], t.shape[3], t.shape[1])


def mask_args(mask: Tensor | None, addend: Tensor | None, dummy: Tensor) -> tuple[tuple, tuple, int]:
    """Kernel arguments of the mask stage: (mask ptr + 3 strides), (addend ptr + 4 strides), MASK_MODE."""
    if mask is None:
        return (dummy, 0, 0, 0), (dummy, 0, 0, 0, 0), 0
    m = _interpretable(mask)
    margs = (m, m.stride(0), m.stride(2), m.stride(3))
    if addend is None:
        return margs, (dummy, 0, 0, 0, 0), 1
    a = _interpretable(addend)
    return margs, (a, *a.stride()), 2


def epilogue_vectors(p: "_Prepared") -> tuple:
    """The kernel arguments scale, shift, bias_a, slope, bias_b of the float epilogue (absent
    ones as ``scale``, never read; shared with the sparse kernels); a plan's, built once."""
    if p.vector_args is not None:
        return p.vector_args
    return tuple(v if v is not None else p.scale for v in (p.scale, p.shift, p.bias_a, p.slope, p.bias_b))


def channel_flags(p: "_Prepared") -> dict:
    """The per-channel constexpr flags of the float epilogue (HAS_SHIFT, HAS_BA, ACT, HAS_BB;
    shared with the sparse kernels); a plan's, built once."""
    if p.static_flags is not None:
        return p.static_flags
    return dict(HAS_SHIFT=p.shift is not None, HAS_BA=p.bias_a is not None, ACT=_ACT_CODE[p.act],
                HAS_BB=p.bias_b is not None)


def epilogue_flags(p: "_Prepared") -> dict:
    """The constexpr flags of the float epilogue, residual modes included (shared with the sparse kernel)."""
    return dict(channel_flags(p), R1_MODE=_RES_CODE[p.residual.mode if p.residual else None],
                R2_MODE=_RES_CODE[p.post_residual.mode if p.post_residual else None])


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
