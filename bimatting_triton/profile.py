"""Complexity report of a matting network: BOPs, FLOPs, OPs, parameters and storage.

``profile(model, size=(H, W), sparse=...)`` runs one forward pass of ``model`` on a
(1, 3, H, W) frame (on the ``meta`` device by default, so it costs no real compute)
and counts, per layer and per stage:

* **BOPs** — binary operations: the multiply-accumulates of every
  :class:`bimatting_triton.nn.BiConv2d` (±1 weights times ±1 activations, which an
  XNOR/AND-popcount kernel computes one bit per MAC).
* **FLOPs** — float operations of every other ``nn.Conv2d`` / ``nn.Linear``,
  **counted as multiply-accumulates (MACs)**, the convention of the binarization
  literature that the BiMatting paper follows (ReActNet, BiBERT, BiMatting: OPs =
  BOPs/64 + FLOPs with FLOPs = MACs). Conv biases are not counted.
* **OPs** = BOPs / 64 + FLOPs.
* Optionally (``elementwise=True``) the **elementwise** work that the convention above
  leaves out (BatchNorm, PReLU, sign, sigmoid/tanh, GRU gating, bilinear resizing,
  pooling, the guided-filter arithmetic): one op per output element of every aten op
  that is not a convolution/matmul or pure data movement (views, concatenation,
  copies), excluding the per-forward weight binarization inside ``BiConv2d``. It is an
  approximation, reported in its own column and never folded into OPs silently
  (``Profile.totals()['ops_with_elementwise']`` adds it).
* **Parameters**, binary (the weights of ``BiConv2d``) vs float (everything else), and
  **storage**: ``fp32`` = every state_dict entry at 32 bits (integer buffers at their
  own width), i.e. the ordinary float checkpoint; ``packed`` = binary weights at 1 bit
  plus one float scale ``alpha`` per output channel (``alpha_bits``, 32 by default),
  ``BiConv2d.channel_threshold`` dropped (the forward never reads it), every other
  float entry at ``float_bits`` (32 by default; integer buffers at their own width).
  BatchNorm is *not* assumed folded.

Sparse decoder units (BiMatting's decoder): the ``conv`` branch and the GRU's ``ih`` /
``hh`` convs of ``decoder.decode3``..``decode0`` are multiplied by the incoherence mask,
so they only need computing where the (resized) mask is non-zero. ``sparse`` scales
their BOPs — and the FLOPs of decode0's float 3x3 conv, which sits in the same masked
branch — by the mask density: a number (same density at every level), a dict
``{'decode3': d3, 'decode2': d2, 'decode1': d1, 'decode0': d0}``, or ``'measured'``
with ``src=`` a real clip: the densities are then measured by
:func:`mask_densities`. The dense numbers are always reported beside the sparse ones.

Counts are per frame (batch 1, one time step); ``project_seg`` (segmentation pass only)
is counted in parameters but not in operations.
"""
from __future__ import annotations

import copy
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from .nn import BiConv2d

__all__ = [
    "profile",
    "Profile",
    "LayerStats",
    "mask_densities",
    "densities_from_mask",
    "level_sizes",
    "SPARSE_BLOCKS",
    "BOPS_PER_OP",
]

BOPS_PER_OP = 64
"""Binary operations counted as one OP (64-bit XNOR-popcount), as in the paper's OPs."""

SPARSE_BLOCKS = ("decode3", "decode2", "decode1", "decode0")
"""Decoder blocks whose ``conv`` / ``gru.ih`` / ``gru.hh`` branches run only on the mask."""

# Module names of the masked units: decoder.decodeK.conv.*, decoder.decodeK.gru.ih.*,
# decoder.decodeK.gru.hh.* (not the always-on conv_1x1 / ih_1x1 / hh_1x1 twins).
_SPARSE_UNIT = re.compile(r"^decoder\.(decode[0-3])\.(?:conv|gru\.ih|gru\.hh)\.")
_SPARSE_MARKER = re.compile(r"^decoder\.decode[0-3]\.conv_1x1$")

_GIGA = 1e9
_MEGA = 1e6
_MIB_BITS = 8 * 2**20


@dataclass
class LayerStats:
    """Operation counts of one conv/linear module, summed over its calls in one frame.

    ``macs`` is the dense multiply-accumulate count (BOPs when ``binary``, FLOPs
    otherwise); ``density`` is the mask density applied when ``sparse`` (else 1.0).
    Shapes are those of the last call, (N, C, H, W) for convs.
    """

    name: str
    stage: str
    binary: bool
    kind: str
    in_shape: tuple
    out_shape: tuple
    calls: int = 0
    macs: int = 0
    sparse: bool = False
    density: float = 1.0

    @property
    def sparse_macs(self) -> float:
        return self.macs * self.density if self.sparse else float(self.macs)


@dataclass
class Profile:
    """The result of :func:`profile`: per-layer counts, per-stage sums, a table and a dict.

    Use ``print(p)`` (or ``p.table()``) for the readable per-stage table,
    ``p.layer_table()`` for every layer, ``p.totals()`` / ``p.stages()`` / ``p.to_dict()``
    for numbers in code. Operation counts are plain ints/floats (not giga).
    """

    model: str
    size: tuple[int, int]
    downsample_ratio: float
    model_size: tuple[int, int]
    layers: list[LayerStats]
    params: dict[str, dict[str, int]]
    storage_bits: dict[str, dict[str, int]]
    stage_order: list[str]
    densities: Optional[dict[str, float]] = None
    elementwise: Optional[dict[str, int]] = None
    alpha_bits: int = 32
    float_bits: int = 32
    notes: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ numbers
    def _sum(self, layers: list[LayerStats], stage: Optional[str]) -> dict[str, float]:
        bops = sum(ly.macs for ly in layers if ly.binary)
        flops = sum(ly.macs for ly in layers if not ly.binary)
        row: dict[str, float] = {"bops": bops, "flops": flops, "ops": bops / BOPS_PER_OP + flops}
        if self.densities is not None:
            sb = sum(ly.sparse_macs for ly in layers if ly.binary)
            sf = sum(ly.sparse_macs for ly in layers if not ly.binary)
            row.update(bops_sparse=sb, flops_sparse=sf, ops_sparse=sb / BOPS_PER_OP + sf)
        keys = [stage] if stage is not None else self.stage_order
        if self.elementwise is not None:
            ew = sum(self.elementwise.get(k, 0) for k in keys)
            row["elementwise"] = ew
            row["ops_with_elementwise"] = row["ops"] + ew
            if self.densities is not None:
                row["ops_sparse_with_elementwise"] = row["ops_sparse"] + ew
        pb = sum(self.params.get(k, {}).get("binary", 0) for k in keys)
        pf = sum(self.params.get(k, {}).get("float", 0) for k in keys)
        row.update(params_binary=pb, params_float=pf, params=pb + pf)
        row["storage_bits_fp32"] = sum(self.storage_bits.get(k, {}).get("fp32", 0) for k in keys)
        row["storage_bits_packed"] = sum(self.storage_bits.get(k, {}).get("packed", 0) for k in keys)
        return row

    def stages(self) -> dict[str, dict[str, float]]:
        """Per-stage sums, in forward order: ``{stage: {bops, flops, ops, [..._sparse], params, ...}}``."""
        return {s: self._sum([ly for ly in self.layers if ly.stage == s], s) for s in self.stage_order}

    def totals(self) -> dict[str, float]:
        """Whole-model sums (same keys as a stage row)."""
        return self._sum(self.layers, None)

    def to_dict(self) -> dict:
        """Everything as plain Python types (JSON-serialisable)."""
        return {
            "model": self.model,
            "size": list(self.size),
            "downsample_ratio": self.downsample_ratio,
            "model_input_size": list(self.model_size),
            "conventions": {
                "flops": "multiply-accumulates (MACs) of float conv/linear layers",
                "bops": "multiply-accumulates of BiConv2d layers",
                "ops": f"bops / {BOPS_PER_OP} + flops",
                "elementwise": "approx. one op per output element of non-conv, non-data-movement ops",
                "storage_fp32": "state_dict at 32 bits per float entry",
                "storage_packed": f"binary weights 1 bit + {self.alpha_bits}-bit alpha per output channel; "
                f"channel_threshold dropped; other float entries {self.float_bits} bits",
            },
            "densities": self.densities,
            "total": self.totals(),
            "stages": self.stages(),
            "layers": [asdict(ly) for ly in self.layers],
            "notes": list(self.notes),
        }

    # ------------------------------------------------------------------ tables
    def table(self) -> str:
        """Readable per-stage table (operations in G/M per frame, parameters in M, storage in MiB)."""
        sparse = self.densities is not None
        ew = self.elementwise is not None
        cols = ["stage", "BOPs(G)", "FLOPs(M)", "OPs(M)"]
        if sparse:
            cols += ["density", "BOPs_sp(G)", "OPs_sp(M)"]
        if ew:
            cols += ["elemw(M)"]
        cols += ["Pbin(M)", "Pfloat(M)", "fp32(MiB)", "packed(MiB)"]

        def fmt(stage: str, row: dict, density: str) -> list[str]:
            cells = [stage, f"{row['bops'] / _GIGA:.3f}", f"{row['flops'] / _MEGA:.1f}", f"{row['ops'] / _MEGA:.1f}"]
            if sparse:
                cells += [density, f"{row['bops_sparse'] / _GIGA:.3f}", f"{row['ops_sparse'] / _MEGA:.1f}"]
            if ew:
                cells += [f"{row['elementwise'] / _MEGA:.1f}"]
            cells += [
                f"{row['params_binary'] / _MEGA:.3f}",
                f"{row['params_float'] / _MEGA:.3f}",
                f"{row['storage_bits_fp32'] / _MIB_BITS:.3f}",
                f"{row['storage_bits_packed'] / _MIB_BITS:.3f}",
            ]
            return cells

        rows = []
        for s, row in self.stages().items():
            block = s.split(".")[-1]
            d = f"{self.densities[block]:.3f}" if sparse and block in self.densities else ""
            rows.append(fmt(s, row, d))
        total = fmt("total", self.totals(), "")
        h, w = self.size
        mh, mw = self.model_size
        head = (
            f"{self.model} at {w}x{h} (downsample_ratio {self.downsample_ratio:g}, "
            f"network input {mw}x{mh}), per frame\n"
            f"FLOPs = float MACs; BOPs = binary MACs; OPs = BOPs/{BOPS_PER_OP} + FLOPs"
            + ("; elemw = approx. elementwise ops, not in OPs" if ew else "")
            + f"\nPbin/Pfloat = binary/float parameters; storage fp32 = float checkpoint, "
            f"packed = 1-bit weights + fp{self.alpha_bits} alpha + fp{self.float_bits} rest"
        )
        return head + "\n" + _render(cols, rows, total) + "".join(f"\n{n}" for n in self.notes)

    def layer_table(self) -> str:
        """One row per conv/linear layer: kind, output shape, calls, MACs and density."""
        cols = ["layer", "type", "kind", "out shape", "calls", "MACs(M)", "density"]
        rows = [
            [
                ly.name,
                "binary" if ly.binary else "float",
                ly.kind,
                "x".join(str(d) for d in ly.out_shape),
                str(ly.calls),
                f"{ly.macs / _MEGA:.2f}",
                f"{ly.density:.3f}" if ly.sparse else "",
            ]
            for ly in self.layers
        ]
        calls = sum(ly.calls for ly in self.layers)
        macs = sum(ly.macs for ly in self.layers)
        total = ["total", "", "", "", str(calls), f"{macs / _MEGA:.2f}", ""]
        return _render(cols, rows, total)

    def __str__(self) -> str:
        return self.table()


def _render(cols: list[str], rows: list[list[str]], total: list[str]) -> str:
    """Fixed-width table: header, rule, rows, rule, total row (first column left-aligned)."""
    widths = [max(len(c), len(total[i]), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cols), sep, *(line(r) for r in rows), sep, line(total)])


def _stage_of(name: str) -> str:
    """Stage of a module/parameter name: its top-level child, decoder blocks kept apart."""
    if not name:
        return "model"
    parts = name.split(".")
    if parts[0] == "decoder" and len(parts) > 1 and parts[1].startswith("decode"):
        return f"decoder.{parts[1]}"
    return parts[0]


def _auto_downsample_ratio(h: int, w: int) -> float:
    """RVM's default: bring the longer side to at most 512 pixels."""
    return min(512 / max(h, w), 1.0)


# aten ops that only move or reshape data, or are counted by the conv/linear hooks.
_NOT_ELEMENTWISE = {
    "convolution", "_convolution", "conv2d", "mm", "addmm", "bmm", "matmul", "linear",
    "cat", "stack", "clone", "copy_", "_to_copy", "contiguous", "lift_fresh", "lift_fresh_copy",
    "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
    "new_zeros", "new_ones", "new_empty", "new_full", "fill_", "zero_", "detach", "alias",
    "split", "split_with_sizes", "unbind", "chunk", "slice", "select", "narrow", "index_select",
    "constant_pad_nd", "_unsafe_view", "view", "reshape", "expand", "permute", "transpose", "t",
    "unsqueeze", "squeeze", "flatten", "unflatten", "as_strided", "_reshape_alias",
}  # fmt: skip


class _ElementwiseCounter(TorchDispatchMode):
    """Adds the output size of every elementwise-like aten op to the current stage.

    Only an op's first output counts (batch norm's saved statistics are bookkeeping),
    and nothing inside a ``BiConv2d`` does: there the ops binarize the *weights*, a
    one-time cost of the float simulation that a packed model does not pay per frame.
    """

    def __init__(self, stack: list[str], skip: set[str], counts: dict[str, int]):
        super().__init__()
        self.stack, self.skip, self.counts = stack, skip, counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        where = self.stack[-1] if self.stack else ""
        if not func.is_view and func.overloadpacket.__name__ not in _NOT_ELEMENTWISE and where not in self.skip:
            first = out[0] if isinstance(out, (tuple, list)) and out else out
            if isinstance(first, Tensor):
                stage = _stage_of(where)
                self.counts[stage] = self.counts.get(stage, 0) + first.numel()
        return out


def _kind(mod: nn.Module) -> str:
    if isinstance(mod, nn.Linear):
        return "linear"
    kh, kw = mod.kernel_size
    s = f"conv{kh}x{kw}"
    if mod.stride != (1, 1):
        s += f"/s{mod.stride[0]}"
    if mod.dilation != (1, 1):
        s += f" d{mod.dilation[0]}"
    if mod.groups > 1:
        s += " dw" if mod.groups == mod.in_channels == mod.out_channels else f" g{mod.groups}"
    return s


def _count_forward(
    model: nn.Module, src: Tensor, downsample_ratio: float, elementwise: bool
) -> tuple[dict[str, LayerStats], Optional[dict[str, int]]]:
    """One forward of ``model`` on ``src`` with hooks; returns per-layer stats and elementwise counts."""
    layers: dict[str, LayerStats] = {}
    stack: list[str] = []
    handles = []

    def on_conv(name: str):
        def hook(mod, inputs, out):
            if isinstance(mod, nn.Linear):
                macs = out.numel() * mod.in_features
            else:
                kh, kw = mod.kernel_size
                macs = out.numel() * (mod.in_channels // mod.groups) * kh * kw
            st = layers.get(name)
            if st is None:
                binary = isinstance(mod, BiConv2d)
                sparse = bool(_SPARSE_UNIT.match(name))
                st = layers[name] = LayerStats(name, _stage_of(name), binary, _kind(mod), (), (), sparse=sparse)
            st.calls += 1
            st.macs += int(macs)
            st.in_shape, st.out_shape = tuple(inputs[0].shape), tuple(out.shape)

        return hook

    # Module stack for attributing elementwise ops (hooks must return None, or they
    # would replace the module's input/output).
    def push(name: str):
        def hook(mod, inputs) -> None:
            stack.append(name)

        return hook

    def pop(mod, inputs, out) -> None:
        stack.pop()

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            handles.append(mod.register_forward_hook(on_conv(name)))
        elif isinstance(mod, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d)):
            raise NotImplementedError(f"model: layer {name!r} ({type(mod).__name__}) is not supported by the counter")
        if elementwise:
            handles.append(mod.register_forward_pre_hook(push(name)))
            handles.append(mod.register_forward_hook(pop))
    counts: Optional[dict[str, int]] = {} if elementwise else None
    try:
        with torch.no_grad():
            if elementwise:
                binary = {n for n, m in model.named_modules() if isinstance(m, BiConv2d)}
                with _ElementwiseCounter(stack, binary, counts):
                    model(src, downsample_ratio=downsample_ratio)
            else:
                model(src, downsample_ratio=downsample_ratio)
    finally:
        for h in handles:
            h.remove()
    return layers, counts


def _params_and_storage(model: nn.Module, alpha_bits: int, float_bits: int) -> tuple[dict, dict]:
    """Per-stage parameter counts (binary / float) and storage bits (fp32 / packed)."""
    binary = {n for n, m in model.named_modules() if isinstance(m, BiConv2d)}
    params: dict[str, dict[str, int]] = {}
    bits: dict[str, dict[str, int]] = {}
    param_names = {n for n, _ in model.named_parameters()}
    for key, t in model.state_dict(keep_vars=True).items():
        stage = _stage_of(key)
        owner, _, leaf = key.rpartition(".")
        is_binary_weight = owner in binary and leaf == "weight"
        n = t.numel()
        width = 32 if t.is_floating_point() else t.element_size() * 8
        if key in param_names:
            p = params.setdefault(stage, {"binary": 0, "float": 0})
            p["binary" if is_binary_weight else "float"] += n
        b = bits.setdefault(stage, {"fp32": 0, "packed": 0})
        b["fp32"] += n * width
        if is_binary_weight:
            b["packed"] += n + t.shape[0] * alpha_bits  # 1 bit per weight + one alpha per output channel
        elif owner in binary and leaf == "channel_threshold":
            pass  # stored by the training checkpoints, never read by the forward
        else:
            b["packed"] += n * (float_bits if t.is_floating_point() else width)
    return params, bits


def _reject_converted(model: nn.Module) -> None:
    """The counter reads nn.Conv2d / BiConv2d layers; a converted model's packed units hold neither."""
    from .fuse import BinaryConvUnit
    from .fuse_generic import PackedBiConv2d

    packed = [n for n, m in model.named_modules() if isinstance(m, (BinaryConvUnit, PackedBiConv2d))]
    if packed:
        raise TypeError(
            f"model: holds {len(packed)} packed units made by convert() or load_packed() (e.g. {packed[0]!r}), "
            "which this counter cannot read; profile the model before convert() (the same network: the same "
            "BOPs and FLOPs; its 'packed' storage column estimates the packed checkpoint)"
        )


def _has_sparse_units(model: nn.Module) -> bool:
    return any(_SPARSE_MARKER.match(n) for n, _ in model.named_modules())


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def level_sizes(size: tuple[int, int], downsample_ratio: float = 1.0) -> dict[str, tuple[int, int]]:
    """Spatial size (h, w) at which each sparse decoder block runs, for frames of ``size`` (H, W).

    decode0 runs at the network input (the frame resized by ``downsample_ratio``, sizes
    floored as ``F.interpolate`` does); decode1/2/3 at the source pyramid levels, each a
    2x2 ceil-mode average pool of the previous (so sizes are ceil-halved).
    """
    h, w = size
    if downsample_ratio != 1:
        h, w = math.floor(h * downsample_ratio), math.floor(w * downsample_ratio)
    sizes = {"decode0": (h, w)}
    for block in ("decode1", "decode2", "decode3"):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        sizes[block] = (h, w)
    return sizes


def densities_from_mask(mask: Tensor, size: tuple[int, int], downsample_ratio: float = 1.0) -> dict[str, float]:
    """Fraction of pixels where the incoherence mask, resized to each decoder level, is non-zero.

    ``mask``: (N, 1, h, w) or (B, T, 1, h, w), values in {0, 1}, at 1/16 of the network
    input (as BiMatting's decoder builds it). ``size``: the full frame's (H, W). The
    masked 3x3 units of a level must be computed wherever the bilinearly resized mask
    (align_corners False, as the decoder resizes it) is non-zero; that fraction, averaged
    over all frames, is the level's density. Returns ``{'decode3': .., ..., 'decode0': ..}``.
    """
    if mask.ndim not in (4, 5) or mask.shape[-3] != 1:
        raise ValueError(f"mask: expected (N, 1, h, w) or (B, T, 1, h, w), got shape {tuple(mask.shape)}")
    m = mask.reshape(-1, 1, *mask.shape[-2:]).to(torch.float32)
    sizes = level_sizes(size, downsample_ratio)
    return {block: float((_resize(m, sizes[block]) > 0).to(torch.float32).mean()) for block in SPARSE_BLOCKS}


def tile_densities_from_mask(
    mask: Tensor, size: tuple[int, int], downsample_ratio: float = 1.0, tile: tuple[int, int] | None = None
) -> dict[str, float]:
    """Like :func:`densities_from_mask`, but the fraction of pixels the sparse kernels compute.

    The fused decoder (``bimatting_triton.fuse_decoder``) runs its masked 3x3 units on
    whole tiles (``kernels.tile_list.active_tiles``, default tile size) that hold any
    pixel with a non-zero mask, so the work done is the pixels of those tiles, which is
    at least the pixel density. decode0's binary unit also computes a 1-pixel halo for
    its float 3x3 conv; its density here is that of the float conv, which dominates it.
    """
    from .kernels.sparse_unit import active_tiles_reference

    if mask.ndim not in (4, 5) or mask.shape[-3] != 1:
        raise ValueError(f"mask: expected (N, 1, h, w) or (B, T, 1, h, w), got shape {tuple(mask.shape)}")
    m = mask.reshape(-1, 1, *mask.shape[-2:]).to(torch.float32)
    sizes = level_sizes(size, downsample_ratio)
    return {block: float(active_tiles_reference(_resize(m, sizes[block]), tile).density())
            for block in SPARSE_BLOCKS}


def mask_densities(model: nn.Module, src: Tensor, downsample_ratio: float = 1.0) -> dict[str, float]:
    """Measured density of BiMatting's incoherence mask at each sparse decoder level.

    Runs ``model(src, downsample_ratio=..., return_coarse=True)`` once (no grad; the
    caller chooses train/eval mode), rebuilds the mask from the coarse alpha ``pha_s``
    with the model's own ``incoherence_mask`` (``bimatting_triton.model.decoder``), and
    returns :func:`densities_from_mask` of it. ``src``: (B, T, 3, H, W) or (B, 3, H, W)
    float in [0, 1]. This is the hook point for measured densities: a model that
    exposes its masks directly can feed them to :func:`densities_from_mask` instead.
    """
    from .model.decoder import incoherence_mask

    if not isinstance(src, Tensor) or src.ndim not in (4, 5) or src.shape[-3] != 3:
        raise ValueError(f"src: expected (B, 3, H, W) or (B, T, 3, H, W), got {getattr(src, 'shape', src)}")
    first = next(model.parameters())
    with torch.no_grad():
        out = model(src.to(first.device, first.dtype), downsample_ratio=downsample_ratio, return_coarse=True)
    pha_s = out[-1]  # [..., fgr_s, pha_s]: the coarse alpha, already clamped to [0, 1]
    mask = incoherence_mask(pha_s.reshape(-1, 1, *pha_s.shape[-2:]))
    return densities_from_mask(mask, tuple(src.shape[-2:]), downsample_ratio)


DensitySpec = Union[None, float, Mapping[str, float], str]


def profile(
    model: nn.Module,
    size: Optional[tuple[int, int]] = None,
    sparse: DensitySpec = None,
    *,
    downsample_ratio: Optional[float] = None,
    src: Optional[Tensor] = None,
    elementwise: bool = False,
    alpha_bits: int = 32,
    float_bits: int = 32,
    on_meta: bool = True,
) -> Profile:
    """Count BOPs, FLOPs (as MACs), OPs = BOPs/64 + FLOPs, parameters and storage of ``model``.

    Args:
        model: a network with RVM's forward contract (``model(src, downsample_ratio=r)``),
            e.g. ``bimatting_triton.BiMatting`` or ``bimatting_triton.baselines.RVMMobileNetV3``.
            It is not modified.
        size: (H, W) of the full-resolution frame, e.g. (288, 512) or (1080, 1920);
            may be left out when ``src`` is given (it must match ``src`` otherwise).
        sparse: mask density of the decoder's sparse units: ``None`` (dense only), a
            number in [0, 1], a dict ``{'decode3': .., 'decode2': .., 'decode1': ..,
            'decode0': ..}``, or ``'measured'`` (needs ``src``; see :func:`mask_densities`).
        downsample_ratio: the network runs on the frame resized by this ratio (and the
            refiner upsamples back when it is not 1). ``None``: RVM's automatic choice,
            ``min(1, 512 / max(H, W))``.
        src: a real clip (B, T, 3, H, W) or (B, 3, H, W) for ``sparse='measured'``; its
            size is the profiled size.
        elementwise: also count elementwise ops (approximate; reported apart from OPs).
        alpha_bits: width of the stored per-channel binary scale in the packed estimate (32 or 16).
        float_bits: width of every other float entry in the packed estimate (32 or 16).
        on_meta: run the counting forward on a copy of the model on the ``meta`` device
            (shape-only tensors, no compute; the default). ``False``, or a failing meta
            run, counts with a real forward of the model on its own device on a zero frame.

    Returns:
        A :class:`Profile` (``print`` it for the per-stage table; ``to_dict()`` for code).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _reject_converted(model)
    if src is not None:
        if not isinstance(src, Tensor) or src.ndim not in (4, 5) or src.shape[-3] != 3:
            got = getattr(src, "shape", src)
            raise ValueError(f"src: expected a (B, 3, H, W) or (B, T, 3, H, W) tensor, got {got}")
        if size is not None and tuple(size) != tuple(src.shape[-2:]):
            raise ValueError(f"size: {tuple(size)} differs from src's frame size {tuple(src.shape[-2:])}")
        size = tuple(src.shape[-2:])
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"size: expected (H, W) with two positive ints, got {size!r}")
    h, w = int(size[0]), int(size[1])
    if downsample_ratio is None:
        downsample_ratio = _auto_downsample_ratio(h, w)
    if not 0 < downsample_ratio <= 1:
        raise ValueError(f"downsample_ratio: expected a value in (0, 1], got {downsample_ratio}")
    if alpha_bits not in (16, 32):
        raise ValueError(f"alpha_bits: expected 16 or 32, got {alpha_bits}")
    if float_bits not in (16, 32):
        raise ValueError(f"float_bits: expected 16 or 32, got {float_bits}")

    densities = _resolve_densities(model, sparse, src, downsample_ratio)

    layers, ew = _run_counter(model, h, w, downsample_ratio, elementwise, on_meta)
    # RVM's decoder uses the same module names but has no masked units: only models with
    # the always-on conv_1x1 twins get sparse rows.
    has_sparse = _has_sparse_units(model)
    for ly in layers.values():
        ly.sparse = ly.sparse and has_sparse
        if ly.sparse and densities is not None:
            ly.density = densities[ly.name.split(".")[1]]
    params, bits = _params_and_storage(model, alpha_bits, float_bits)

    # Stages in the model's module order; what runs at the model's or the decoder's own
    # level (only elementwise work: resizing, pooling, mask arithmetic) goes last.
    used = {ly.stage for ly in layers.values()} | set(params) | set(ew or ())
    order: list[str] = []
    for name, _ in model.named_modules():
        st = _stage_of(name)
        if st in used and st not in order and st not in ("model", "decoder"):
            order.append(st)
    order += [st for st in ("decoder", "model") if st in used]
    mh, mw = level_sizes((h, w), downsample_ratio)["decode0"]
    notes = []
    if "project_seg" in order:
        notes.append("project_seg runs in segmentation passes only: its parameters are counted, its ops are not.")
    if densities is not None:
        notes.append(
            "_sp columns: decoder conv/gru.ih/gru.hh units of decode3..0 scaled by the mask density "
            f"({'measured on the given clip' if sparse == 'measured' else 'given'})."
        )
    return Profile(
        model=type(model).__name__,
        size=(h, w),
        downsample_ratio=float(downsample_ratio),
        model_size=(mh, mw),
        layers=list(layers.values()),
        params=params,
        storage_bits=bits,
        stage_order=order,
        densities=densities,
        elementwise=ew,
        alpha_bits=alpha_bits,
        float_bits=float_bits,
        notes=notes,
    )


def _resolve_densities(
    model: nn.Module, sparse: DensitySpec, src: Optional[Tensor], downsample_ratio: float
) -> Optional[dict[str, float]]:
    if sparse is None or sparse is False:
        return None
    if not _has_sparse_units(model):
        raise ValueError(
            f"sparse: {type(model).__name__} has no sparse decoder units (no decoder.decodeK.conv_1x1); "
            "pass sparse=None"
        )
    if isinstance(sparse, str):
        if sparse != "measured":
            raise ValueError(f"sparse: expected None, a density, a dict or 'measured', got {sparse!r}")
        if src is None:
            raise ValueError("src: sparse='measured' needs a real clip, pass src=(B, T, 3, H, W) tensor")
        densities = mask_densities(model, src, downsample_ratio)
    elif isinstance(sparse, Mapping):
        missing = [b for b in SPARSE_BLOCKS if b not in sparse]
        extra = [k for k in sparse if k not in SPARSE_BLOCKS]
        if missing or extra:
            raise ValueError(f"sparse: dict needs exactly the keys {SPARSE_BLOCKS}, missing {missing}, unknown {extra}")
        densities = {b: float(sparse[b]) for b in SPARSE_BLOCKS}
    elif isinstance(sparse, (int, float)) and not isinstance(sparse, bool):
        densities = {b: float(sparse) for b in SPARSE_BLOCKS}
    else:
        raise ValueError(f"sparse: expected None, a density, a dict or 'measured', got {sparse!r}")
    for b, d in densities.items():
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise ValueError(f"sparse: density of {b} must be in [0, 1], got {d}")
    return densities


def _run_counter(model, h, w, downsample_ratio, elementwise, on_meta):
    if on_meta:
        try:
            shadow = copy.deepcopy(model).to("meta").eval()
            src = torch.zeros(1, 3, h, w, device="meta")
            return _count_forward(shadow, src, downsample_ratio, elementwise)
        except (NotImplementedError, RuntimeError) as e:
            warnings.warn(f"profile: the meta-device run failed ({e}); counting with a real forward instead")
    first = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        src = torch.zeros(1, 3, h, w, device=first.device, dtype=first.dtype)
        return _count_forward(model, src, downsample_ratio, elementwise)
    finally:
        model.train(was_training)
