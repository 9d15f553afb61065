"""Packed-kernel replacements for binary convs that ``convert`` finds outside known units.

``convert`` fuses the structures it knows (BiMatting's backbone blocks and the
``LearnableBias -> sign -> BiConv2d -> ...`` units of ``nn.Sequential`` s). Models brought
in with :func:`~bimatting_triton.swap_modules` or :func:`~bimatting_triton.binarize_`
may call their ``BiConv2d`` from code of their own, where the sign of the input happens
in another module. Such a conv becomes a :class:`PackedBiConv2d`: packed weights, the
packed-bit kernel, ``alpha`` and the conv bias in the epilogue.

Its input must be ternary (values in {-1, 0, +1}, as after ``BinaryActivation``) for
the packed arithmetic to be the conv's; ``sign(x) == x`` then, so packing is exact.
The module checks this on every call (one pass over the input) and computes an input
that is not ternary with the float convolution of the binarized weight instead, so
the result is always the original layer's. ``SignInputBiConv2d`` (from ``binarize_``)
binarizes its own input, so it needs no check. The check's answer is read on the host (a
device synchronisation per such conv and call), so a model holding unchecked
``PackedBiConv2d`` s cannot be captured by :class:`~bimatting_triton.CudaGraphStep` (it says
so); BiMatting's own units, and ``binarize_``'d convs, have no such check.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fuse import BinaryConvUnit, packable, runs_as
from .nn import BiConv2d
from .swap import SignInputBiConv2d


class PackedBiConv2d(nn.Module):
    """A ``BiConv2d`` (or ``SignInputBiConv2d``) on packed weights and the packed-bit kernel.

    forward(x: (N, Cin, H, W) float) -> (N, Cout, H', W') in the dtype of the conv's weight.
    """

    def __init__(self, conv: BiConv2d, backend: str = "auto"):
        super().__init__()
        if not packable(conv):
            raise ValueError(
                "PackedBiConv2d: the packed kernel computes groups=1, dilation=1 and equal strides and "
                f"paddings along H and W only; got {conv}"
            )
        self.unit = BinaryConvUnit([conv], [None], backend=backend)
        self.signs_input = isinstance(conv, SignInputBiConv2d)
        with torch.no_grad():
            self.register_buffer("binary_weight", conv.binary_weight().detach().clone())
            self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.stride, self.padding = conv.stride, conv.padding

    def extra_repr(self) -> str:
        return f"signs_input={self.signs_input}"

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.signs_input or bool(((x == 0) | (x.abs() == 1)).all()):
            return self.unit(x)
        return F.conv2d(x, self.binary_weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype),
                        self.stride, self.padding)


def replace_remaining_binary_convs(model: nn.Module, backend: str = "auto") -> list[str]:
    """Swap every packable ``BiConv2d`` still in ``model`` for a :class:`PackedBiConv2d`.

    Convs the kernel cannot compute (grouped, dilated, ...) and subclasses with a forward of
    their own stay as they are (plain PyTorch, same results) and a warning names them. A
    conv used under several names gets one replacement. Returns the names of those left.
    """
    left, own_forward = [], []
    replaced: dict[int, PackedBiConv2d] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if id(module) in replaced:
            model.set_submodule(name, replaced[id(module)])
            continue
        if not isinstance(module, BiConv2d):
            continue
        if not (runs_as(module, BiConv2d) or runs_as(module, SignInputBiConv2d)):
            own_forward.append(name)
        elif not packable(module):
            left.append(name)
        else:
            replaced[id(module)] = PackedBiConv2d(module, backend).eval()
            model.set_submodule(name, replaced[id(module)])
    if left:
        warnings.warn(
            f"convert: binary convs {left} are grouped, dilated or have a non-square stride/padding, which "
            "the packed kernel does not compute; they keep running in plain PyTorch",
            stacklevel=3,
        )
    if own_forward:
        warnings.warn(
            f"convert: binary convs {own_forward} are subclasses of BiConv2d with a forward of their own, which "
            "the packed kernel does not know; they keep running in plain PyTorch",
            stacklevel=3,
        )
    return left + own_forward
