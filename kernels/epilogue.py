"""The packed convolutions' fused epilogue: what :func:`~bimatting_triton.kernels.binary_conv.binary_conv2d`
and the tile-sparse units of :mod:`~bimatting_triton.kernels.sparse_unit` do with an integer
accumulator, described (:class:`Epilogue`, checked once per layer by :class:`EpiloguePlan`),
computed by ``@triton.jit`` helpers (:func:`epilogue_values`, :func:`apply_activation`,
:func:`apply_mask`, :func:`store_packed`) that both kernels call, so that they compute every value
with the same operations, and by its plain-PyTorch reference (:func:`epilogue_reference`).

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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor, nn

from ._common import interpreting
from .pack import PackedActivation, sign_pack_reference

__all__ = [
    "fold_scale_shift",
    "Residual",
    "Epilogue",
    "EpiloguePlan",
    "BoundEpilogue",
    "ConvOutput",
    "epilogue_reference",
]

RESIDUAL_MODES = ("add", "half_sum", "avgpool")
ACTIVATIONS = (None, "prelu", "relu", "sigmoid", "tanh")


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
# Description and checks
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
    """What :func:`~bimatting_triton.kernels.binary_conv.binary_conv2d` does with the integer accumulator
    (order in the module docstring).

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
    """Result of :func:`~bimatting_triton.kernels.binary_conv.binary_conv2d` with an epilogue: float
    output (or None) and packed (or None)."""

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
        # (a non-tensor next_bias reaches _vector's TypeError, which names it)
        nb_dtype = epi.next_bias.dtype if isinstance(epi.next_bias, Tensor) else out_dtype
        nb = _vector(epi.next_bias, cout, "next_bias", torch.promote_types(out_dtype, nb_dtype), device)
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
    means the current CUDA device) and builds the kernel's per-channel arguments. Each launch
    then passes ``plan.bind(residual=..., ...)`` as the epilogue of
    :func:`~bimatting_triton.kernels.binary_conv.binary_conv2d` (or ``binary_conv2d_reference``):
    only the tensors given to ``bind`` and the input are checked. The result is the same as with the equivalent
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


def epilogue_reference(acc: Tensor, p: _Prepared) -> ConvOutput:
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


# ----------------------------------------------------------------------------------------
# Triton helpers (called by the dense and the tile-sparse kernels)
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
def apply_activation(y, slope_ptr, offs_n, n_ok, ACT: tl.constexpr):
    """ACT 0 none, 1 PReLU (per-channel slope), 2 ReLU, 3 sigmoid, 4 tanh (module docstring)."""
    if ACT == 1:
        slope = tl.load(slope_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        y = tl.where(y > 0, y, slope * y)
    elif ACT == 2:
        y = tl.where(y < 0, 0.0, y)  # NaN stays NaN, as torch.relu
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
        nonzero = neg | ((y_out > t) & mask)  # NaN gives 0, as torch.sign (kernels/pack.py)
    else:
        neg = (y_out < 0) & mask
        nonzero = neg | ((y_out > 0) & mask)
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


# ----------------------------------------------------------------------------------------
# Kernel arguments and constexpr flags
# ----------------------------------------------------------------------------------------
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
