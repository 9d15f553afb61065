"""Binary building blocks of BiMatting: ``LearnableBias``, ``BinaryActivation``, ``BiConv2d``.

The forward math is the published BiMatting code's, exactly (see SPEC §1); the
backward passes are straight-through estimators written as ``torch.autograd.Function``s
so that they are explicit and testable:

* :class:`SignSTE` — forward ``torch.sign(x)`` (note ``sign(0) == 0``), backward the
  hardtanh estimator ``grad * 1{|x| <= 1}``.
* :class:`BinaryWeightSTE` — forward ``alpha * sign(w_c)`` with ``alpha`` the per-output-
  channel mean of ``|w_c|`` (treated as a constant), backward ``grad * 1{|w_c| <= 1}``,
  i.e. the gradient of ``clamp(w_c, -1, 1)``.

These modules run in plain PyTorch on any device and any float dtype; the fused
inference path (``bimatting_triton.convert``) replaces them by packed-bit kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SignSTE",
    "BinaryWeightSTE",
    "LearnableBias",
    "BinaryActivation",
    "BiConv2d",
    "binarize_weight",
]


class SignSTE(torch.autograd.Function):
    """``sign(x)`` forward; hardtanh straight-through gradient backward.

    ``x``: any shape, float dtype. Returns a tensor of the same shape and dtype with
    values in {-1, 0, +1} (0 exactly where ``x == 0``).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # d hardtanh(x)/dx = 1 on [-1, 1] (both ends included, as torch.clamp's backward).
        return grad_out * (x.abs() <= 1).to(grad_out.dtype)


class BinaryWeightSTE(torch.autograd.Function):
    """Scaled sign of centred weights, with the clamp straight-through gradient.

    ``w_c``: (Cout, Cin, kh, kw) weights already centred per output channel.
    Forward: ``alpha * sign(w_c)``, ``alpha = mean(|w_c|)`` over dims (1, 2, 3), shape
    (Cout, 1, 1, 1). Backward: ``grad * 1{|w_c| <= 1}`` (alpha gets no gradient, it
    is detached in the published code).
    """

    @staticmethod
    def forward(ctx, w_c: Tensor) -> Tensor:
        ctx.save_for_backward(w_c)
        alpha = w_c.abs().mean(dim=(1, 2, 3), keepdim=True)
        return alpha * torch.sign(w_c)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (w_c,) = ctx.saved_tensors
        return grad_out * (w_c.abs() <= 1).to(grad_out.dtype)


def binarize_weight(weight: Tensor) -> Tensor:
    """The effective weight of a :class:`BiConv2d`: ``alpha * sign(w - mean(w))``.

    ``weight``: (Cout, Cin, kh, kw). The mean is per output channel over (Cin, kh, kw).
    Differentiable through :class:`BinaryWeightSTE` (and the mean subtraction).
    """
    w_c = weight - weight.mean(dim=(1, 2, 3), keepdim=True)
    return BinaryWeightSTE.apply(w_c)


class LearnableBias(nn.Module):
    """``x + bias`` with a learnable per-channel ``bias`` of shape (1, C, 1, 1), init 0.

    ``x``: (N, C, H, W) (or any tensor that broadcasts with (1, C, 1, 1)).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.bias

    def extra_repr(self) -> str:
        return f"{self.bias.shape[1]}"


class BinaryActivation(nn.Module):
    """``sign(x)`` with ``sign(0) = 0``, hardtanh straight-through gradient."""

    def forward(self, x: Tensor) -> Tensor:
        return SignSTE.apply(x)


class BiConv2d(nn.Conv2d):
    """Binary-weight 2-D convolution of BiMatting (weights ``alpha * sign(w_c)``).

    A drop-in ``nn.Conv2d`` (same constructor, ``weight`` and optional ``bias``) with
    one more parameter, ``channel_threshold`` of shape (1, Cin, 1, 1), which the
    official checkpoints carry but the forward never uses: it is kept so that they
    load unchanged. Padding defaults to ``kernel_size // 2`` (the network's only
    use), zero padding only. Input (N, Cin, H, W) -> output (N, Cout, H', W').
    The activations are binarized by a separate :class:`BinaryActivation`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        bias: bool = False,
        **kwargs,
    ):
        if padding is None:
            padding = kernel_size // 2 if isinstance(kernel_size, int) else tuple(k // 2 for k in kernel_size)
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias, **kwargs
        )
        if self.padding_mode != "zeros":
            raise ValueError(f"BiConv2d supports padding_mode='zeros' only, got {self.padding_mode!r}")
        self.channel_threshold = nn.Parameter(torch.zeros(1, in_channels, 1, 1))

    def binary_weight(self) -> Tensor:
        """``alpha * sign(w_c)``, (Cout, Cin/groups, kh, kw), same dtype as ``weight``."""
        return binarize_weight(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.binary_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
