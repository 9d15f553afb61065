"""Fused decoder blocks whose masked 3x3 branches run only on the incoherence mask's tiles.

``convert`` replaces BiMatting's ``decode3``/``decode2``/``decode1`` (``UpsamplingBlock``,
with its ``MaskedConvGRU``) and ``decode0`` (``OutputBlock``) by the modules here. Same
forward arguments and results as the plain blocks (up to float rounding; exactly where
the mask is 0); what changes is that every ``branch3x3(x) * m + branch1x1(x)`` of SPEC §2
is computed by :func:`~bimatting_triton.kernels.sparse_unit.sparse_unit`: the 1x1 branch
densely, the 3x3 branch only on the tiles of the level's mask that hold a pixel with
``m != 0`` (one :class:`~bimatting_triton.kernels.tile_list.TileList` per level and
forward, built on the device, shared by the block's conv and, frame by frame, its GRU).

* :class:`FusedUpsamplingBlock`: ``y = conv(y) * m + conv_1x1(y)`` (LB -> sign -> BiConv
  -> BN -> LB -> PReLU, both fused in the kernels' epilogue), then the GRU.
* :class:`FusedMaskedConvGRU`: per frame, ``(r, z) = ih(g) * m + ih_1x1(g)`` and
  ``cand = hh(g') * m + hh_1x1(g')``, with the gate's bias, LearnableBias and sigmoid /
  tanh in the epilogue; the gating ``h = (1 - z) h + z cand`` (as ``h + z (cand - h)``)
  in the candidate's own kernel launch, written straight into the block's output.
* :class:`FusedConvGRU`: the bottleneck's dense ``ConvGRU`` (decode4.gru) the same way
  (its update one ``torch.lerp``).
* :class:`FusedOutputBlock` (decode0): the masked branch is a binary 3x3 unit (BN, ReLU)
  followed by a float 3x3 conv (16 -> 16, BN, ReLU). The float conv needs its input on a
  one-pixel ring around every masked pixel, so the binary unit runs on the tiles of the
  mask grown by one pixel (``halo=1``) into a zeroed buffer, and the float conv (folded
  BN, ReLU, ``* m + conv_1x1``) runs on the tiles of the mask itself
  (:func:`~bimatting_triton.kernels.sparse_unit.sparse_float_conv2d`). Pixels of those
  tiles whose 3x3 ring reaches an uncomputed (zero) pixel have ``m == 0``: their
  finite value is multiplied by 0. The 1x1 branch (binary 1x1, float 1x1) is dense.

No concatenation is built: a unit's input ``cat([x, skip, source])`` (or the GRU's
``[x, h]`` and ``[x, reset * h]``, the product taken as it is read) is packed straight from
its parts (``sign_pack_pair`` on a list of tensors),
and the upsampling block's GRU overwrites the half of the block's output it reads, so
the block's ``cat([a, gru(b)])`` is that output itself.

``backend='reference'`` computes the same blocks densely with the plain-PyTorch
references (``branch3x3 * m + branch1x1`` over every pixel); the tile lists are still
built (by the reference) so that :func:`sparsity_report` works with either backend.

Measured sparsity: after a forward, :func:`sparsity_report` gives per block the
fraction of the masked units' pixels actually computed and the binary operations
(and decode0's float MACs) skipped; :func:`tile_densities` the densities alone, in the
form ``bimatting_triton.profile.profile(model, sparse=...)`` takes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .fuse import BinaryConvUnit, FusedSequential, in_compute_dtype, runs_as
from .kernels.binary_conv import binary_conv2d_reference, fold_scale_shift
from .kernels.pack import Product, sign_pack_pair
from .kernels.sparse_unit import (
    TileList,
    active_tiles,
    active_tiles_reference,
    default_tile,
    gru_update,
    skipped_bops,
    sparse_binary_conv2d,
    sparse_float_conv2d,
    sparse_unit,
    sparse_unit_reference,
)
from .model.common import per_frame, upsample2x
from .model.decoder import ConvGRU, MaskedConvGRU, OutputBlock, UpsamplingBlock

__all__ = [
    "FusedConvGRU",
    "FusedMaskedConvGRU",
    "FusedUpsamplingBlock",
    "FusedOutputBlock",
    "fuse_decoder_block",
    "BlockSparsity",
    "sparsity_report",
    "tile_densities",
]


def _single_unit(seq: nn.Sequential, backend: str, name: str) -> tuple[BinaryConvUnit, list[nn.Module]]:
    """The binary unit that starts ``seq`` (parsed as :class:`FusedSequential` does) and the modules after it."""
    ops = list(FusedSequential(seq, backend).ops)
    if not ops or not isinstance(ops[0], BinaryConvUnit) or any(isinstance(m, BinaryConvUnit) for m in ops[1:]):
        raise ValueError(f"{name}: expected one binary unit (LB -> sign -> BiConv2d ...) at the start, got {seq}")
    return ops[0], ops[1:]


def _gated_unit(seq: nn.Sequential, backend: str, name: str) -> BinaryConvUnit:
    """``LB -> sign -> BiConv(bias) -> [LB] -> Sigmoid | Tanh`` as one unit with the activation fused."""
    unit, rest = _single_unit(seq, backend, name)
    acts = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
    if len(rest) != 1 or type(rest[0]) not in acts or unit.act is not None or unit.bias_b is not None:
        raise ValueError(f"{name}: expected LB -> sign -> BiConv2d -> [LB] -> Sigmoid/Tanh, got {seq}")
    unit.act = acts[type(rest[0])]  # applied in the kernel epilogue after bias_a (the LB)
    return unit


def _pack_pair(unit_a: BinaryConvUnit, unit_b: BinaryConvUnit, sources: list[Tensor]):
    """The input of two units that read the same tensor, packed with each one's LearnableBias.

    ``sources``: 1 to 3 float (N, Ci, H, W) tensors read as their channel concatenation
    (``torch.cat(sources, 1)`` is never built), the last one possibly a ``Product`` (the
    GRU's ``reset * h``, multiplied as it is read). One pass and one launch with the kernels."""
    if unit_a.backend == "reference":
        return unit_a.pack(sources), unit_b.pack(sources)
    return sign_pack_pair(sources, unit_a.in_bias, unit_b.in_bias)


def _masked_pair(unit3: BinaryConvUnit, unit1: BinaryConvUnit, sources: list[Tensor], mask: Tensor,
                 tiles: TileList, gru: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
    """``unit3(y) * mask + unit1(y)`` with ``y = cat(sources, 1)`` (N, Cin, H, W) float,
    mask (N, 1, H, W) -> (N, Cout, H, W). ``gru = (h, z, out)``: the GRU's new state
    ``lerp(h, unit, z)`` instead, written into ``out`` (in the unit's kernel launch)."""
    x3, x1 = _pack_pair(unit3, unit1, sources)
    if unit3.backend == "reference":
        unit = sparse_unit_reference(x3, unit3.packed_weight(), unit3.epilogue(), x1, unit1.packed_weight(),
                                     unit1.epilogue(), mask)
        return unit if gru is None else gru_update(unit, gru)
    return sparse_unit(x3, unit3.packed_weight(), unit3.epilogue_plan().bind(), x1, unit1.packed_weight(),
                       unit1.epilogue_plan().bind(), mask, tiles, gru=gru)


def _crop_upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """x2 bilinear upsampling of (B, T, C, h, w), cropped to ``size`` (as the plain blocks do)."""
    h, w = size
    return per_frame(lambda v: upsample2x(v)[..., :h, :w], x)


class _SparseBlock(nn.Module):
    """Common parts: backend, tile size, and the tile lists of the last forward."""

    def __init__(self, backend: str, tile: tuple[int, int] | None):
        super().__init__()
        self.backend = backend
        self.tile = tile
        self.last_tiles: dict[str, TileList] = {}

    def tiles_for(self, mask: Tensor, halo: int = 0) -> TileList:
        """The active tiles of a (B, T, 1, H, W) mask (the reference builder with backend='reference')."""
        build = active_tiles_reference if self.backend == "reference" else active_tiles
        return build(mask, self.tile or default_tile(), halo)


class FusedMaskedConvGRU(_SparseBlock):
    """``MaskedConvGRU`` with the sparse units; forward(x, h, mask, tiles=None) as the plain one.

    x (B, T, c, H, W), h (B, c, H, W) or None (zeros), mask (B, T, 1, H, W) in x's dtype;
    ``tiles``: the mask's :class:`TileList` if already built (the upsampling block's).
    Returns (outputs (B, T, c, H, W), last h).
    """

    def __init__(self, gru: MaskedConvGRU, backend: str = "auto", tile: tuple[int, int] | None = None):
        super().__init__(backend, tile)
        self.channels = gru.channels
        self.ih = _gated_unit(gru.ih, backend, "gru.ih")
        self.ih_1x1 = _gated_unit(gru.ih_1x1, backend, "gru.ih_1x1")
        self.hh = _gated_unit(gru.hh, backend, "gru.hh")
        self.hh_1x1 = _gated_unit(gru.hh_1x1, backend, "gru.hh_1x1")

    def masked_units(self) -> list[BinaryConvUnit]:
        return [self.ih, self.hh]

    @torch.no_grad()
    def forward(self, x: Tensor, h: Tensor | None, mask: Tensor, tiles: TileList | None = None,
                out: Tensor | None = None):
        """``out``: where to write the outputs (B, T, c, H, W), e.g. ``x`` itself (frame t of x
        is read before frame t of the output is written); a new tensor if None."""
        if tiles is None:
            tiles = self.tiles_for(mask)
        self.last_tiles = {"binary": tiles}
        if h is None:
            h = x.new_zeros(x.shape[0], *x.shape[2:])
        outputs = torch.empty_like(x) if out is None else out
        for t in range(x.shape[1]):
            xt, m, tt = x[:, t], mask[:, t], tiles.select(t)
            gates = _masked_pair(self.ih, self.ih_1x1, [xt, h], m, tt)
            reset, update = gates.split(self.channels, dim=1)
            # the candidate and the update h + z (cand - h) in one launch, into the outputs
            h = _masked_pair(self.hh, self.hh_1x1, [xt, Product(reset, h)], m, tt, gru=(h, update, outputs[:, t]))
        return outputs, h


def current_conv_gru_key(key: str, prefix: str) -> str:
    """``key`` of a converted model's state, renamed if it is one of the :class:`FusedConvGRU`
    at ``prefix`` in the layout written before that class existed (its units then sat in
    ``FusedSequential(unit, activation)``: ``ih.ops.0.*`` / ``hh.ops.0.*``); else unchanged."""
    for unit in ("ih", "hh"):
        old = f"{prefix}{unit}.ops.0."
        if key.startswith(old):
            return f"{prefix}{unit}.{key[len(old):]}"
    return key


class FusedConvGRU(nn.Module):
    """The bottleneck's ``ConvGRU`` (decode4.gru, dense): each unit's input ``[x, h]`` /
    ``[x, reset * h]`` packed without a concatenation, gate activations in the kernels'
    epilogue, the update as one ``lerp``. Same forward(x, h) as the plain one."""

    def __init__(self, gru: ConvGRU, backend: str = "auto"):
        super().__init__()
        self.channels = gru.channels
        self.ih = _gated_unit(gru.ih, backend, "gru.ih")
        self.hh = _gated_unit(gru.hh, backend, "gru.hh")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = current_conv_gru_key(key, prefix)
            if new != key:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def forward(self, x: Tensor, h: Tensor | None) -> tuple[Tensor, Tensor]:
        """x (B, T, c, H, W), h (B, c, H, W) or None (zeros) -> (outputs (B, T, c, H, W), last h)."""
        if h is None:
            h = x.new_zeros(x.shape[0], *x.shape[2:])
        outputs = torch.empty_like(x)
        for t in range(x.shape[1]):
            xt = x[:, t]
            reset, update = self.ih.run(self.ih.pack([xt, h])).y.split(self.channels, dim=1)
            cand = self.hh.run(self.hh.pack([xt, Product(reset, h)])).y
            h = gru_update(cand, (h, update, outputs[:, t]))  # (1 - z) h + z cand as one lerp
        return outputs, h


class FusedUpsamplingBlock(_SparseBlock):
    """``UpsamplingBlock`` (decode3/2/1) with sparse masked units; same forward(x, f, s, r, mask)."""

    def __init__(self, block: UpsamplingBlock, backend: str = "auto", tile: tuple[int, int] | None = None):
        super().__init__(backend, tile)
        self.out_channels = block.out_channels
        self.conv, rest = _single_unit(block.conv, backend, "conv")
        self.conv_1x1, rest1 = _single_unit(block.conv_1x1, backend, "conv_1x1")
        if rest or rest1:
            raise ValueError("UpsamplingBlock: conv and conv_1x1 must be single binary units (LB ... PReLU)")
        self.gru = FusedMaskedConvGRU(block.gru, backend, tile)

    def masked_units(self) -> list[BinaryConvUnit]:
        return [self.conv, *self.gru.masked_units()]

    @torch.no_grad()
    def forward(self, x: Tensor, f: Tensor, s: Tensor, r: Tensor | None, mask: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,T,Cin,h,w), f (B,T,Cskip,H,W), s (B,T,3,H,W), mask (B,T,1,H,W) -> (B,T,Cout,H,W), r."""
        b, t = s.shape[:2]
        x = _crop_upsample(x, s.shape[-2:])
        tiles = self.tiles_for(mask)
        self.last_tiles = {"binary": tiles}
        sources = [x.flatten(0, 1), f.flatten(0, 1), s.flatten(0, 1)]  # packed as their concatenation
        y = _masked_pair(self.conv, self.conv_1x1, sources, mask.flatten(0, 1), tiles).unflatten(0, (b, t))
        # The GRU runs on the second half and overwrites it with its outputs: y is then
        # cat([first half, GRU outputs]) with no concatenation.
        _, bb = y.split(self.out_channels // 2, dim=2)
        _, r = self.gru(bb, r, mask, tiles, out=bb)
        return y, r


class FusedOutputBlock(_SparseBlock):
    """``OutputBlock`` (decode0) with the masked branch on tiles (see the module docstring)."""

    def __init__(self, block: OutputBlock, backend: str = "auto", tile: tuple[int, int] | None = None):
        super().__init__(backend, tile)
        self.binary, rest = _single_unit(block.conv, backend, "conv")
        ok = (
            self.binary.act == "relu" and self.binary.bias_b is None and len(rest) == 3
            and isinstance(rest[0], nn.Conv2d) and isinstance(rest[1], nn.BatchNorm2d) and isinstance(rest[2], nn.ReLU)
        )
        conv = rest[0] if ok else None
        if not ok or conv.groups != 1 or conv.stride != (1, 1) or conv.dilation != (1, 1) \
                or conv.kernel_size[0] != conv.kernel_size[1] or conv.padding != (conv.kernel_size[0] // 2,) * 2:
            raise ValueError(f"OutputBlock.conv: expected LB -> sign -> BiConv -> BN -> ReLU -> Conv(same) -> BN -> "
                             f"ReLU, got {block.conv}")
        with torch.no_grad():
            # (Cout, Cin, K, K) stored as (K, K, Cin, Cout) in memory, the sparse float conv's
            # layout: its kernel then reads the buffer as is (no re-layout copy at each call).
            weight = conv.weight.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
            ones = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
            scale, shift = fold_scale_shift(ones, rest[1], conv.bias, dtype=weight.dtype)
        self.register_buffer("float_weight", weight)
        self.register_buffer("float_scale", scale)
        self.register_buffer("float_shift", shift)
        self.conv_1x1 = FusedSequential(block.conv_1x1, backend)
        if not isinstance(self.conv_1x1.ops[0], BinaryConvUnit):
            raise ValueError(f"OutputBlock.conv_1x1: expected a binary unit first, got {block.conv_1x1}")

    def masked_units(self) -> list[BinaryConvUnit]:
        return [self.binary]

    @torch.no_grad()
    def forward(self, x: Tensor, s: Tensor, mask: Tensor) -> Tensor:
        """x (B,T,Cin,h,w), s (B,T,3,H,W), mask (B,T,1,H,W) -> (B,T,Cout,H,W)."""
        b, t = s.shape[:2]
        x = _crop_upsample(x, s.shape[-2:])
        sources = [x.flatten(0, 1), s.flatten(0, 1)]  # packed as their concatenation y
        m = mask.flatten(0, 1)
        grown, tiles = self.tiles_for(mask, halo=1), self.tiles_for(mask)
        self.last_tiles = {"binary": grown, "float": tiles}
        unit = self.binary
        packed, packed_1x1 = _pack_pair(unit, self.conv_1x1.ops[0], sources)
        out = self.conv_1x1(None, packed=packed_1x1)  # the dense 1x1 branch: a fresh tensor, updated in place below
        scale, shift = in_compute_dtype(self, "float_scale", "float_shift")  # the float conv's folded BN
        if self.backend == "reference":
            z = binary_conv2d_reference(packed, unit.packed_weight(), unit.epilogue()).y
            cout = z.shape[1]
            z = F.conv2d(z.to(scale.dtype), self.float_weight.to(scale.dtype), padding=self.float_weight.shape[2] // 2)
            z = torch.relu(z * scale.reshape(1, cout, 1, 1) + shift.reshape(1, cout, 1, 1))
            return (z.to(out.dtype) * m.to(out.dtype) + out).unflatten(0, (b, t))
        # Binary 3x3 unit on the grown tiles into a zeroed buffer (finite everywhere) ...
        n, _, h, w = out.shape
        z = torch.zeros((n, h, w, unit.out_channels), dtype=out.dtype, device=out.device).permute(0, 3, 1, 2)
        epi = unit.epilogue()
        epi.out = z
        sparse_binary_conv2d(packed, unit.packed_weight(), epi, grown)
        # ... then the float 3x3 + BN + ReLU, `* m + conv_1x1(y)`, on the mask's own tiles.
        sparse_float_conv2d(z, self.float_weight, scale, shift, "relu", out, tiles,
                            mask=m, addend=out)
        return out.unflatten(0, (b, t))


def fuse_decoder_block(module: nn.Module, backend: str = "auto") -> nn.Module | None:
    """The fused replacement of a decoder block (``UpsamplingBlock``, ``MaskedConvGRU``,
    ``OutputBlock``, the bottleneck's ``ConvGRU``), or None for any other module (``convert``'s hook)."""
    if runs_as(module, UpsamplingBlock):
        return FusedUpsamplingBlock(module, backend)
    if runs_as(module, MaskedConvGRU):
        return FusedMaskedConvGRU(module, backend)
    if runs_as(module, ConvGRU):
        return FusedConvGRU(module, backend)
    if runs_as(module, OutputBlock):
        return FusedOutputBlock(module, backend)
    return None


# ----------------------------------------------------------------------------------------
# Measured sparsity
# ----------------------------------------------------------------------------------------
@dataclass
class BlockSparsity:
    """What a sparse decoder block computed in its last forward (all frames and items).

    ``density``: fraction of the output pixels on which its masked binary units ran
    (active tiles; for decode0 the tiles grown by one pixel). ``float_density``: decode0's
    float 3x3 conv (its own tiles), else None. ``skipped_bops``: binary MACs not computed
    (profiler convention: Cin * K * K * Cout per output pixel, logical channels);
    ``skipped_flops``: float MACs not computed (decode0's float conv), else 0.
    """

    density: float
    float_density: float | None
    skipped_bops: int
    skipped_flops: int


def _block_name(name: str) -> str:
    return name.rpartition(".")[2] or name


def sparsity_report(model: nn.Module) -> dict[str, BlockSparsity]:
    """Per sparse block of ``model`` (a converted model, after a forward): a :class:`BlockSparsity`.

    Keys are the blocks' last name component (``'decode3'`` .. ``'decode0'``). Blocks that
    have not run yet are left out. Reads device tensors (one sync per block).
    """
    report: dict[str, BlockSparsity] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (FusedUpsamplingBlock, FusedOutputBlock)) or not module.last_tiles:
            continue
        binary = module.last_tiles["binary"]
        bops = sum(skipped_bops(binary, u.in_channels, u.out_channels, u.bits.shape[0]) for u in module.masked_units())
        float_density, flops = None, 0
        if isinstance(module, FusedOutputBlock):
            ft = module.last_tiles["float"]
            cout, cin, k, _ = module.float_weight.shape
            float_density = float(ft.density())
            flops = int(skipped_bops(ft, cin, cout, k))
        report[_block_name(name)] = BlockSparsity(float(binary.density()), float_density, int(bops), flops)
    return report


def tile_densities(model: nn.Module) -> dict[str, float]:
    """``{'decode3': d, ..., 'decode0': d}``: the fraction of each level's masked work done in
    the last forward (decode0: its float conv's, which dominates that block's OPs), the form
    ``profile(model, sparse=...)`` takes."""
    return {k: (v.float_density if v.float_density is not None else v.density)
            for k, v in sparsity_report(model).items()}
