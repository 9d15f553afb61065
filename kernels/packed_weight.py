"""Packed binary weights: a BiConv2d's ``sign(w - mean(w))`` as bit planes, and the int8 copy
the ``'dot'`` loop reads.

Layouts
-------
* :class:`PackedWeight` ``bits``: int32 (KH, KW, 2, CW, Cout) with ``CW = ceil(Cin / 32)``, the
  two planes of :mod:`~bimatting_triton.kernels.pack` (plane 0 sign, plane 1 nonzero; channel
  ``c`` at bit ``c % 32`` of word ``c // 32``), output channels contiguous (coalesced loads of a
  tile of Cout). A degenerate output channel (all ``w_c == 0``) has nonzero bits 0, so it reads
  as 0.
* ``int8``: the same values unpacked, int8 (KH, KW, 32*CW, Cout), padding rows 0, the rows of
  each word in :func:`dot_channel_order` (row ``4n + j`` of a word is channel ``n + 8j``), stored
  as (Cout, KH, KW, 32*CW) (see :func:`dot_weights`).

``alpha = mean|w_c|`` per output channel scales the convolution's integer sum
(:func:`~bimatting_triton.kernels.epilogue.fold_scale_shift` folds it into the epilogue).
Public: :class:`PackedWeight`, :func:`pack_weight`, :func:`pack_conv`, :func:`dot_weights`,
:func:`dot_channel_order`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._common import version_counter
from .pack import WORD_BITS, pack_values, unpack_values, words_for

__all__ = ["PackedWeight", "dot_channel_order", "dot_weights", "pack_weight", "pack_conv"]


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
        version = version_counter(self.bits)
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
    order in which :func:`~bimatting_triton.kernels.binary_conv.unpack_words` makes a word's
    values (cheapest to unpack)."""
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
