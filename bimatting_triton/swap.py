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
  parameter of shape (1, Cin, 1, 1), zero padding and no state besides ``weight``,
  ``channel_threshold`` and ``bias``, *and* whose forward and gradients (input, weight,
  bias) on a random probe equal ``BiConv2d``'s (``alpha * sign(w - mean(w))``, clamp STE);
* sign activation: a module without parameters or children whose class name mentions
  "binary"/"sign", whose output on a probe tensor is exactly ``torch.sign`` *and* whose
  gradient is the hardtanh STE ``grad * 1{|x| <= 1}``;
* learnable bias: a module whose only state is a ``bias`` parameter of shape
  (1, C, 1, 1), without children, whose output on a probe is exactly ``x + bias``.

A candidate (a conv with ``channel_threshold``; a sign-named module whose forward is
``sign``) that fails the behaviour probe is left as it is, listed with the reason in
``SwapReport.skipped`` and reported by a ``UserWarning``: swapping it would silently
change the outputs or the training gradients. Probes use random tensors of their own
(substituted for the parameters, as ``torch.func.functional_call`` does), on the module's
device (the CPU for a module on the meta device), calling ``forward`` itself (the module's
hooks do not see the probe), outside any ``inference_mode``, without gradients reaching any
parameter's ``.grad`` and restoring the modules' train/eval mode.
"""
from __future__ import annotations

import copy
import re
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.stateless import _reparametrize_module

from .nn import BiConv2d, BinaryActivation, LearnableBias, binarize_weight

FilterFn = Callable[[nn.Module, str], bool]

_SIGN_NAME = re.compile(r"binar|sign", re.IGNORECASE)
_PROBE = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 2.0]).view(1, 7, 1, 1)
# Gradient probe of sign modules: both sides of the STE window and 0, avoiding exactly
# +-1 (clamp passes the gradient there, nn.Hardtanh does not: both are the same STE).
_GRAD_PROBE = torch.tensor([-3.0, -1.5, -0.7, -0.2, 0.0, 0.3, 0.9, 1.2, 2.5]).view(1, 9, 1, 1)
# Relative tolerance (to the largest reference value) of the conv probe. Rounding, incl.
# the published ``a.detach() - b.detach() + b`` trick, is ~1e-6; a real difference (a
# float forward, an input shift, a missing clamp) is > 1e-2.
_CONV_RTOL = 1e-4


@dataclass
class SwapReport:
    """What a swap changed.

    ``swapped`` lists ``(qualified name, old class, new class)``; ``skipped`` lists
    ``(qualified name, class, reason)`` for look-alike candidates left unswapped
    because their behaviour differs from ours.
    """

    model: nn.Module
    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

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
            lines = ["no module swapped"]
        else:
            summary = ", ".join(f"{n} x {cls}" for cls, n in sorted(self.counts().items()))
            lines = [f"swapped {len(self.swapped)} modules ({summary}):"]
            lines += [f"  {name}: {old} -> {new}" for name, old, new in self.swapped]
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} look-alike modules:")
            lines += [f"  {name}: {cls} ({reason})" for name, cls, reason in self.skipped]
        return "\n".join(lines)


@contextmanager
def _mode(module: nn.Module, training: bool):
    """Put ``module`` (and its submodules) in train/eval mode, restore each one's after."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, was in saved:
            m.training = was


def _no_autocast(device: torch.device):
    """The probe compares float32 results, not an enclosing autocast's half ones.

    (TF32 convs need no care: both sides round the same inputs, and the binary weights
    differ by at most one float32 ulp, far below ``_CONV_RTOL``.)
    """
    return torch.autocast(device.type, enabled=False) if device.type in ("cuda", "cpu") else nullcontext()


def _conv_structure_problem(module: nn.Module) -> str | None:
    """None if ``module`` is shaped like a published binary conv, else why not.

    Raises ``LookupError`` when it is not a candidate at all (no ``channel_threshold``).
    """
    if isinstance(module, BiConv2d) or not isinstance(module, nn.Conv2d):
        raise LookupError
    threshold = getattr(module, "channel_threshold", None)
    if not isinstance(threshold, nn.Parameter) or tuple(threshold.shape) != (1, module.in_channels, 1, 1):
        raise LookupError
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    extra = sorted(set(module.state_dict()) - {"weight", "bias", "channel_threshold"})
    if extra:
        return f"state besides weight/bias/channel_threshold: {extra}"
    return None


def _mismatch(name: str, got: Tensor | None, ref: Tensor | None) -> str | None:
    if got is None and ref is None:
        return None
    if got is None or ref is None:  # no gradient is a zero gradient
        got, ref = (torch.zeros_like(ref), ref) if got is None else (got, torch.zeros_like(got))
    if got.shape != ref.shape:
        return f"{name} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    err = (got.to(ref.dtype) - ref).abs().max().item()
    scale = ref.abs().max().item()
    if not err <= _CONV_RTOL * scale + 1e-12:  # also catches NaN
        return f"{name} differs from BiConv2d's by {err:.3g} (max |value| {scale:.3g})"
    return None


def _conv_behaviour_problem(module: nn.Conv2d, check_gradients: bool) -> str | None:
    """None if ``module``'s forward (and gradients) equal BiConv2d's on a random probe.

    The probe substitutes random parameters of its own (weights up to ~+-3, so that the
    clamp window matters; a nonzero ``channel_threshold``, so that a forward using it is
    seen) via :func:`_forward_with`: the module's parameters and their ``.grad`` stay
    untouched. float32 (float64 for float64 modules), on the module's device.
    """
    device = _probe_device(module.weight)
    dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).to(device)

    params = {n: rand(*p.shape, scale=1.0 if n == "weight" else 0.3) for n, p in module.named_parameters()}
    size = [d * (k - 1) + s + 1 for d, k, s in zip(module.dilation, module.kernel_size, module.stride)]
    x = rand(1, module.in_channels, *size)

    def reference(x: Tensor, p: dict[str, Tensor]) -> Tensor:
        return F.conv2d(x, binarize_weight(p["weight"]), p.get("bias"), module.stride, module.padding,
                        module.dilation, module.groups)

    try:
        with _no_autocast(device):
            for training in (False, True):
                with _mode(module, training), torch.no_grad():
                    got = _forward_with(module, params, x)
                if not isinstance(got, Tensor):
                    return f"forward returns {type(got).__name__}, not a tensor"
                problem = _mismatch(f"forward ({'train' if training else 'eval'})", got, reference(x, params))
                if problem:
                    return problem
            if not check_gradients:
                return None
            leaves = {n: t.detach().requires_grad_() for n, t in params.items()}
            xg = x.detach().requires_grad_()
            inputs = [xg, *leaves.values()]
            with _mode(module, True), torch.enable_grad():
                out = _forward_with(module, leaves, xg)
                upstream = torch.randn(out.shape, generator=gen, dtype=dtype).to(device)
                got = (torch.autograd.grad(out, inputs, upstream, allow_unused=True)
                       if out.requires_grad else [None] * len(inputs))
                ref = torch.autograd.grad(reference(xg, leaves), inputs, upstream, allow_unused=True)
    except Exception as exc:  # a forward that cannot run on a plain conv input is not ours
        return f"probe failed: {type(exc).__name__}: {exc}"
    for name, g, r in zip(["input", *leaves], got, ref):
        problem = _mismatch(f"gradient of {name}", g, r)
        if problem:
            return problem + " (check_gradients=False swaps it anyway)"
    return None


def _probe_device(param: Tensor) -> torch.device:
    """Where to probe a module holding ``param``: its device, or the CPU for one built on the
    meta device (to be loaded later), whose code is probed with tensors of our own."""
    return torch.device("cpu") if param.is_meta else param.device


def _forward_with(module: nn.Module, params: dict[str, Tensor], x: Tensor):
    """``module.forward(x)`` with ``params`` in place of its parameters (restored after).
    ``forward``, not ``__call__``: the module's hooks (profilers, collectors) do not see the probe."""
    with _reparametrize_module(module, params):
        return module.forward(x)


def _probe_output(module: nn.Module, x: Tensor) -> Tensor | None:
    try:
        with torch.no_grad():
            out = module.forward(x)
    except Exception:  # not an elementwise module: not ours to swap
        return None
    return out if isinstance(out, Tensor) and out.shape == x.shape else None


def _sign_problem(module: nn.Module, check_gradients: bool) -> str | None:
    """None if ``module`` behaves as ``BinaryActivation`` (sign, hardtanh STE), else why not.

    Raises ``LookupError`` when it is not a candidate at all: no sign-like name; parameters,
    buffers (a threshold, say: ``BinaryActivation`` has none to take it) or children; or a
    forward that is not exactly ``torch.sign`` in eval and in train mode.
    """
    if isinstance(module, BinaryActivation) or not _SIGN_NAME.search(type(module).__name__):
        raise LookupError
    if any(True for _ in module.parameters()) or any(True for _ in module.buffers()) or any(True for _ in module.children()):
        raise LookupError
    for training in (False, True):
        with _mode(module, training):
            out = _probe_output(module, _PROBE)
        if out is None or not torch.equal(out, torch.sign(_PROBE)):
            raise LookupError
    if not check_gradients:
        return None
    x = _GRAD_PROBE.clone().requires_grad_()
    upstream = torch.linspace(0.5, 1.5, x.numel()).view_as(x)  # distinct: a mixed-up gradient shows
    expected = upstream * (x.detach().abs() <= 1)
    try:
        with torch.enable_grad(), _mode(module, True):  # (gradients are a training matter)
            out = module.forward(x)
            grad = torch.autograd.grad(out, x, upstream, allow_unused=True)[0] if out.requires_grad else None
    except Exception as exc:
        return f"gradient probe failed: {type(exc).__name__}: {exc}"
    if grad is None:
        grad = torch.zeros_like(x)
    if not torch.allclose(grad, expected, rtol=1e-5, atol=1e-6):
        probe = ", ".join(f"{v:g}" for v in _GRAD_PROBE.flatten().tolist())
        got = ", ".join(f"{v:.3g}" for v in (grad / upstream).flatten().tolist())
        return (f"gradient is not the hardtanh STE: d out/d x at [{probe}] is [{got}]"
                " (check_gradients=False swaps it anyway)")
    return None


def _is_foreign_learnable_bias(module: nn.Module) -> bool:
    if isinstance(module, LearnableBias) or any(True for _ in module.children()):
        return False
    params = dict(module.named_parameters())
    if list(params) != ["bias"] or list(module.state_dict()) != ["bias"]:
        return False
    bias = params["bias"]
    if bias.ndim != 4 or bias.shape[0] != 1 or bias.shape[2:] != (1, 1):
        return False
    # A random stand-in bias (a fresh model's is all zeros: an identity would pass).
    device = _probe_device(bias)
    gen = torch.Generator().manual_seed(0)
    probe_bias = torch.randn(bias.shape, generator=gen).to(device=device, dtype=bias.dtype)
    x = torch.linspace(-1, 1, bias.shape[1], dtype=bias.dtype, device=device).view(1, -1, 1, 1)
    try:
        with torch.no_grad():
            out = _forward_with(module, {"bias": probe_bias}, x)
    except Exception:  # not an elementwise module: not ours to swap
        return False
    return isinstance(out, Tensor) and out.shape == x.shape and torch.equal(out, x + probe_bias)


def _our_biconv_like(conv: nn.Conv2d) -> BiConv2d:
    """An empty BiConv2d configured like ``conv`` (built on the meta device: its
    parameters are replaced by ``conv``'s, so no initialisation, no global RNG use)."""
    new = BiConv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size[0] if conv.kernel_size[0] == conv.kernel_size[1] else conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        device="meta",
        dtype=conv.weight.dtype,
    )
    return new


def _replacement(module: nn.Module, check_gradients: bool) -> nn.Module | str | None:
    """Our module carrying ``module``'s very parameters (same objects); a str saying why
    a look-alike candidate is not swapped; or None (not a candidate)."""
    try:
        problem = _conv_structure_problem(module) or _conv_behaviour_problem(module, check_gradients)
    except LookupError:
        pass
    else:
        if problem:
            return problem
        new = _our_biconv_like(module)
        new.weight, new.channel_threshold = module.weight, module.channel_threshold
        new.bias = module.bias
        return new
    try:
        problem = _sign_problem(module, check_gradients)
    except LookupError:
        pass
    else:
        return problem or BinaryActivation()
    if _is_foreign_learnable_bias(module):
        new = LearnableBias(module.bias.shape[1])
        new.bias = module.bias
        return new
    return None


def swap_modules(
    model: nn.Module, *, inplace: bool = True, filter_fn: FilterFn | None = None, check_gradients: bool = True
) -> SwapReport:
    """Replace BiMatting-style binary layers of ``model`` by bimatting_triton's modules.

    ``filter_fn(module, qualified_name) -> bool`` may veto single modules (True = swap).
    The swapped modules hold the very same ``nn.Parameter`` objects, so optimizers
    built before the swap keep working and ``state_dict()`` is unchanged (keys, values
    and order). With ``inplace=False`` a deep copy is swapped and the input untouched.

    Each candidate is probed (see the module docstring) and swapped only if it computes
    what ours does, forward and backward, so training continues with the same numbers.
    Look-alikes that differ (e.g. a float conv carrying ``channel_threshold``, or a sign
    with a ReActNet-style polynomial STE) are left in place, listed with the reason in
    ``report.skipped`` and reported by one ``UserWarning``. ``check_gradients=False``
    compares forwards only (for inference-only use before ``convert``: a sign or conv
    with another STE is then swapped, and training after the swap uses our STE).

    Returns a :class:`SwapReport` (``report.model`` is the swapped model; ``print(report)``
    lists the changes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = SwapReport(model)
    # A module used under several names is decided once, at its first name (filter and probe).
    decided: dict[int, nn.Module | str | None] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name:
            continue
        if id(module) not in decided:
            if filter_fn is not None and not filter_fn(module, name):
                decided[id(module)] = None
            else:
                with torch.inference_mode(False):  # the probes need autograd (enable_grad alone cannot lift it)
                    decided[id(module)] = _replacement(module, check_gradients)
        new = decided[id(module)]
        if new is None:
            continue
        if isinstance(new, str):
            report.skipped.append((name, type(module).__name__, new))
            continue
        new.train(module.training)
        model.set_submodule(name, new)
        report.swapped.append((name, type(module).__name__, type(new).__name__))
    if report.skipped:
        listed = "; ".join(f"{name} ({cls}): {reason}" for name, cls, reason in report.skipped)
        warnings.warn(f"swap_modules left {len(report.skipped)} look-alike module(s) unswapped, "
                      f"their behaviour differs from bimatting_triton's: {listed}", UserWarning, stacklevel=2)
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
    # (A conv used under several names becomes one binary conv, set under each name.)
    convs = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Conv2d]
    if filter_fn is None:
        filter_fn = default_binarize_filter(convs[0][0] if convs else None)
    report = SwapReport(model)
    made: dict[int, SignInputBiConv2d | None] = {}  # decided at a conv's first name
    for name, conv in convs:
        if id(conv) not in made:
            made[id(conv)] = _sign_input_like(conv) if conv.padding_mode == "zeros" and filter_fn(conv, name) else None
        if made[id(conv)] is None:
            continue
        model.set_submodule(name, made[id(conv)])
        report.swapped.append((name, "Conv2d", "SignInputBiConv2d"))
    return report


def _sign_input_like(conv: nn.Conv2d) -> SignInputBiConv2d:
    """A SignInputBiConv2d configured like ``conv``, holding its very weight and bias."""
    new = SignInputBiConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    new.weight, new.bias = conv.weight, conv.bias
    new.train(conv.training)
    return new
