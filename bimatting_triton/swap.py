"""Bring existing RVM / BiMatting code onto bimatting_triton's modules without rewriting it.

* :func:`swap_modules` replaces the binary layers of a model written with the published
  BiMatting code (or any code shaped like it) by this package's ``BiConv2d``,
  ``BinaryActivation`` and ``LearnableBias``, carrying the same parameters, so the
  ``state_dict`` is unchanged and training continues with the same numbers; after it,
  ``bimatting_triton.convert`` gives the fused inference model.
* :func:`binarize_` turns the float ``nn.Conv2d`` layers of an RVM-style network into
  BiMatting-style binary layers (sign of the input, then a ``BiConv2d`` whose latent
  weights are the original float weights), for binarization experiments.

Layers are recognised by structure and behaviour, never by importing the other code:

* binary conv: an ``nn.Conv2d`` subclass (not ours) that has a ``channel_threshold``
  parameter of shape (1, Cin, 1, 1) and zero padding;
* sign activation: a module without parameters or children whose class name mentions
  "binary"/"sign" and whose output on a probe tensor is exactly ``torch.sign``;
* learnable bias: a module whose only state is a ``bias`` parameter of shape
  (1, C, 1, 1), without children, whose output on a probe is exactly ``x + bias``.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from .nn import BiConv2d, BinaryActivation, LearnableBias

FilterFn = Callable[[nn.Module, str], bool]

_SIGN_NAME = re.compile(r"binar|sign", re.IGNORECASE)
_PROBE = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0]).view(1, 7, 1, 1)


@dataclass
class SwapReport:
    """What a swap changed: ``swapped`` lists ``(qualified name, old class, new class)``."""

    model: nn.Module
    swapped: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.swapped)

    def counts(self) -> dict[str, int]:
        """Number of swapped modules per new class name."""
        out: dict[str, int] = {}
        for _, _, new in self.swapped:
            out[new] = out.get(new, 0) + 1
        return out

    def __str__(self) -> str:
        if not self.swapped:
            return "no module swapped"
        summary = ", ".join(f"{n} x {cls}" for cls, n in sorted(self.counts().items()))
        lines = [f"swapped {len(self.swapped)} modules ({summary}):"]
        lines += [f"  {name}: {old} -> {new}" for name, old, new in self.swapped]
        return "\n".join(lines)


def _is_foreign_binary_conv(module: nn.Module) -> bool:
    if isinstance(module, BiConv2d) or not isinstance(module, nn.Conv2d):
        return False
    threshold = getattr(module, "channel_threshold", None)
    return (
        isinstance(threshold, nn.Parameter)
        and tuple(threshold.shape) == (1, module.in_channels, 1, 1)
        and module.padding_mode == "zeros"
    )


def _probe_output(module: nn.Module, x: Tensor) -> Tensor | None:
    try:
        with torch.no_grad():
            out = module(x)
    except Exception:  # not an elementwise module: not ours to swap
        return None
    return out if isinstance(out, Tensor) and out.shape == x.shape else None


def _is_foreign_sign(module: nn.Module) -> bool:
    if isinstance(module, BinaryActivation) or not _SIGN_NAME.search(type(module).__name__):
        return False
    if any(True for _ in module.parameters()) or any(True for _ in module.children()):
        return False
    out = _probe_output(module, _PROBE)
    return out is not None and torch.equal(out, torch.sign(_PROBE))


def _is_foreign_learnable_bias(module: nn.Module) -> bool:
    if isinstance(module, LearnableBias) or any(True for _ in module.children()):
        return False
    params = dict(module.named_parameters())
    if list(params) != ["bias"] or list(module.state_dict()) != ["bias"]:
        return False
    bias = params["bias"]
    if bias.ndim != 4 or bias.shape[0] != 1 or bias.shape[2:] != (1, 1):
        return False
    x = torch.linspace(-1, 1, bias.shape[1], dtype=bias.dtype, device=bias.device).view(1, -1, 1, 1)
    out = _probe_output(module, x)
    return out is not None and torch.equal(out, x + bias.detach())


def _our_biconv_like(conv: nn.Conv2d) -> BiConv2d:
    new = BiConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size[0] if conv.kernel_size[0] == conv.kernel_size[1] else conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    return new


def _replacement(module: nn.Module) -> nn.Module | None:
    """Our module carrying ``module``'s very parameters (same objects), or None."""
    if _is_foreign_binary_conv(module):
        new = _our_biconv_like(module)
        new.weight, new.channel_threshold = module.weight, module.channel_threshold
        new.bias = module.bias
        return new
    if _is_foreign_sign(module):
        return BinaryActivation()
    if _is_foreign_learnable_bias(module):
        new = LearnableBias(module.bias.shape[1])
        new.bias = module.bias
        return new
    return None


def swap_modules(model: nn.Module, *, inplace: bool = True, filter_fn: FilterFn | None = None) -> SwapReport:
    """Replace BiMatting-style binary layers of ``model`` by bimatting_triton's modules.

    ``filter_fn(module, qualified_name) -> bool`` may veto single modules (True = swap).
    The swapped modules hold the very same ``nn.Parameter`` objects, so optimizers
    built before the swap keep working and ``state_dict()`` is unchanged (keys, values
    and order). With ``inplace=False`` a deep copy is swapped and the input untouched.
    Returns a :class:`SwapReport` (``report.model`` is the swapped model; ``print(report)``
    lists the changes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = SwapReport(model)
    for name, module in list(model.named_modules()):
        if not name or (filter_fn is not None and not filter_fn(module, name)):
            continue
        new = _replacement(module)
        if new is None:
            continue
        new.train(module.training)
        model.set_submodule(name, new)
        report.swapped.append((name, type(module).__name__, type(new).__name__))
    return report


class SignInputBiConv2d(BiConv2d):
    """``BiConv2d(sign(x))``: a float conv turned into a BiMatting-style binary layer.

    Keeps the original conv's parameter names (``weight``, ``bias``) and adds
    ``channel_threshold``, so checkpoints of the float network load with
    ``strict=False`` (or after adding that one key).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sign = BinaryActivation()

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.sign(x))


def default_binarize_filter(first_conv_name: str | None) -> FilterFn:
    """Skip the first conv (it sees the image), the heads and fixed filters.

    Heads are convs named ``project*`` or with at most 4 output channels (alpha, fgr
    residual, guided-filter coefficients); ``box_filter`` is a fixed smoothing filter.
    """

    def keep(module: nn.Module, name: str) -> bool:
        leaf = name.rpartition(".")[2]
        if name == first_conv_name or "project" in name or leaf == "box_filter":
            return False
        return module.out_channels > 4

    return keep


def binarize_(model: nn.Module, filter_fn: FilterFn | None = None) -> SwapReport:
    """Turn the float ``nn.Conv2d`` layers of ``model`` into binary ones, in place.

    Each selected conv becomes a :class:`SignInputBiConv2d` with the same configuration,
    whose latent weights are the original float weights (``alpha * sign(w - mean(w))`` in
    the forward) and whose input is binarized by ``sign``. ``filter_fn(module, name)``
    selects the convs (True = binarize); the default skips the first conv, the
    projection heads, convs with <= 4 output channels and ``box_filter``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    convs = [(n, m) for n, m in model.named_modules() if type(m) is nn.Conv2d]
    if filter_fn is None:
        filter_fn = default_binarize_filter(convs[0][0] if convs else None)
    report = SwapReport(model)
    for name, conv in convs:
        if conv.padding_mode != "zeros" or not filter_fn(conv, name):
            continue
        new = SignInputBiConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        model.set_submodule(name, new)
        report.swapped.append((name, "Conv2d", "SignInputBiConv2d"))
    return report
