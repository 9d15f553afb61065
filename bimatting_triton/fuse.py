"""``convert(model)``: a copy of a BiMatting model whose binary layers run the packed kernels.

The converted model has the same forward arguments and outputs as the original one
and computes the same function up to float rounding (inference only: its forward runs
under ``torch.no_grad()``, and BatchNorm is folded with its running statistics, i.e.
eval-mode semantics). What is replaced:

* ``BinaryBackbone`` -> :class:`FusedBackbone`: the 17 BasicBlocks as a chain of packed
  convolutions. Each block is two kernel launches: the 3x3 conv with ``bn1``, the
  shortcut (``'add'``, or ``'avgpool'`` for stride 2), ``move12``/``prelu1``/``move13``
  fused, which also packs ``sign(move21(out1))``; then the 1x1 stage as *one* conv
  (the 2 or 4 branches of a dense block stacked along Cout, their residual read at
  channel ``o % C``; the shrinking block's residual fused as ``'half_sum'``) with
  ``bn2*``, ``move22``/``prelu2``/``move23``, the dense shortcut of blocks 3/6/12
  (``'avgpool'`` post-residual) and the *next* block's ``move11`` + sign + pack fused.
  The float activations are still written once per stage (they are the next
  shortcut), but no float tensor is re-read to binarize it.
* Any ``nn.Sequential`` (not a subclass: its forward could differ) with binary units
  ``LearnableBias -> BinaryActivation -> BiConv2d [-> BatchNorm2d] [-> LearnableBias]
  [-> PReLU | ReLU] [-> LearnableBias]`` among other modules (ASPP, GRU gates, decoder
  blocks, refiner) -> :class:`FusedSequential`; the modules must be these classes
  themselves or subclasses that keep their forward (:func:`runs_as`), a BatchNorm must
  track running statistics to be folded;
  two units in a row (the refiner's) pass packed bits only: the first one's epilogue
  applies the second one's LearnableBias + sign + pack and stores no float.
* A ``BasicBlock`` outside a ``BinaryBackbone`` -> :class:`FusedBasicBlock`.
* The decoder's ``UpsamplingBlock`` / ``OutputBlock`` -> the blocks of
  :mod:`bimatting_triton.fuse_decoder`: their masked 3x3 branches run only on the
  active tiles of the incoherence mask.

A ``BiConv2d`` outside these structures (e.g. in a model brought in with
``swap_modules``) becomes a ``PackedBiConv2d`` (:mod:`bimatting_triton.fuse_generic`).
``backend='auto'`` runs the Triton
kernels where they can run (CUDA, or the CPU under ``TRITON_INTERPRET=1``) and their
plain-PyTorch references elsewhere; ``backend='reference'`` always runs the references
(same packed weights and folded epilogues, exact integer convolutions of the unpacked bits,
float32 on the CPU: about as fast there as the plain model).
Convert after moving the model to its device and dtype; ``.to()``/``.double()``/``.half()``
on the converted model also work (packed bits are integer buffers, the epilogue vectors
follow the float dtype). The epilogues compute in float64 for a float64 model and in
float32 otherwise: a float16/bfloat16 model keeps its activations (and the kernels'
outputs) in half precision, its epilogue arithmetic in float32 (:func:`compute_dtype`;
float32 copies of half-precision vectors are made once and reused).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from .kernels.binary_conv import (
    ConvOutput,
    Epilogue,
    EpiloguePlan,
    PackedWeight,
    Residual,
    binary_conv2d,
    binary_conv2d_reference,
    dot_weights,
    fold_scale_shift,
    pack_weight,
)
from .kernels._common import version_counter
from .kernels.pack import PackedActivation, sign_pack, sign_pack_reference
from .model.backbone import DENSE_SHORTCUTS, FEATURE_BLOCKS, BasicBlock, BinaryBackbone
from .nn import BiConv2d, BinaryActivation, LearnableBias
from .swap import SignInputBiConv2d

__all__ = ["convert", "BinaryConvUnit", "FusedSequential", "FusedBasicBlock", "FusedBackbone", "compute_dtype"]

BACKENDS = ("auto", "reference")


def _vec(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().reshape(-1).clone()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The epilogues' arithmetic dtype for a model in ``dtype``: float64 for float64, else
    float32 (a half-precision model computes its epilogues in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_compute_dtype(module: nn.Module, *names: str) -> list[Tensor | None]:
    """``module``'s float buffers ``names`` in their :func:`compute_dtype`: the buffers
    themselves when they are float32/float64, else float32 copies, made once and reused
    while the buffers are the same tensors, unchanged (``.half()``/``.to()`` replace them;
    ``load_state_dict`` and other in-place writes bump their version counter)."""
    cache = module.__dict__.setdefault("_compute_copies", {})
    out = []
    for name in names:
        t = getattr(module, name)
        if t is None or t.dtype in (torch.float32, torch.float64):
            out.append(t)
            continue
        version = version_counter(t)
        hit = cache.get(name)
        if hit is None or hit[0] is not t or version is None or hit[1] != version:
            hit = cache[name] = (t, version, t.to(compute_dtype(t.dtype)))
        out.append(hit[2])
    return out


def runs_as(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls``'s: what ``convert`` may replace by fused
    code. A subclass with a forward of its own (a gain, a residual, ...) computes something else."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def fusable_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` itself (no subclass: its forward and attributes are known) with a
    ``LB -> sign -> BiConv2d`` unit in it: what :class:`FusedSequential` replaces. (One without
    keeps its modules and their names; its binary convs take the generic packed path.)"""
    if type(module) is not nn.Sequential:
        return False
    mods = list(module)
    return any(_is_unit_start(mods, i) for i in range(len(mods)))


def _foldable_batchnorm(module: nn.Module) -> bool:
    # With track_running_stats=False a BatchNorm normalises with the batch's statistics even in
    # eval mode: nothing to fold, so it stays a module of its own.
    return runs_as(module, nn.BatchNorm2d) and module.track_running_stats and module.running_mean is not None


def packable(conv: BiConv2d) -> bool:
    """Whether the packed kernel computes this conv: no groups or dilation, square stride/padding."""
    return (conv.groups == 1 and conv.dilation == (1, 1) and conv.stride[0] == conv.stride[1]
            and conv.padding[0] == conv.padding[1])


class BinaryConvUnit(nn.Module):
    """``LB -> sign -> BiConv2d(s) -> [BN] -> [LB] -> [PReLU | ReLU] -> [LB]`` with packed weights.

    ``convs``: one BiConv2d, or several with the same input, kernel, stride and padding
    whose outputs are concatenated (the stacked branches of a dense block); ``bns``: a
    BatchNorm2d (or None) per conv. ``in_bias``: the LearnableBias before the sign (None:
    the input arrives packed). ``bias_a`` / ``act`` / ``bias_b``: the modules after the BN.
    Buffers: ``bits`` (int32), ``int8``, ``alpha``, and the folded epilogue vectors.
    """

    def __init__(
        self,
        convs: Sequence[BiConv2d],
        bns: Sequence[nn.BatchNorm2d | None] | None = None,
        in_bias: LearnableBias | None = None,
        bias_a: LearnableBias | None = None,
        act: nn.Module | None = None,
        bias_b: LearnableBias | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        convs = list(convs)
        bns = list(bns) if bns is not None else [None] * len(convs)
        first = convs[0]
        for c in convs:
            if not isinstance(c, BiConv2d):
                raise TypeError(f"convs must be BiConv2d modules, got {type(c).__name__}")
            if not packable(c):
                raise ValueError(
                    f"convs: {c} is grouped, dilated or has a non-square stride/padding, which the packed "
                    "kernel does not compute"
                )
            if (c.in_channels, c.kernel_size, c.stride, c.padding) != (
                first.in_channels, first.kernel_size, first.stride, first.padding
            ):
                raise ValueError("stacked convs must share in_channels, kernel_size, stride and padding")
        if len(bns) != len(convs):
            raise ValueError(f"bns must have one entry per conv ({len(convs)}), got {len(bns)}")
        with torch.no_grad():
            weight = torch.cat([c.weight for c in convs], dim=0)
            pw = pack_weight(weight, first.stride[0], first.padding[0])
            dtype = weight.dtype  # the buffers follow the model's dtype (folded in float64)
            scales, shifts, start = [], [], 0
            for c, bn in zip(convs, bns):
                cout = c.out_channels
                sc, sh = fold_scale_shift(pw.alpha[start : start + cout], bn, c.bias, dtype=dtype)
                scales.append(sc)
                shifts.append(sh)
                start += cout
        self.in_channels = first.in_channels
        self.out_channels = weight.shape[0]
        self.stride, self.padding = first.stride[0], first.padding[0]
        self.register_buffer("bits", pw.bits)
        self.register_buffer("int8", pw.int8)
        self.register_buffer("alpha", pw.alpha)
        self.register_buffer("scale", torch.cat(scales))
        self.register_buffer("shift", torch.cat(shifts))
        self.register_buffer("in_bias", _vec(in_bias.bias) if in_bias is not None else None)
        self.register_buffer("bias_a", _vec(bias_a.bias) if bias_a is not None else None)
        self.register_buffer("bias_b", _vec(bias_b.bias) if bias_b is not None else None)
        if act is None:
            self.act, slope = None, None
        elif isinstance(act, nn.PReLU):
            self.act, slope = "prelu", _vec(act.weight)
        elif isinstance(act, nn.ReLU):
            self.act, slope = "relu", None
        else:
            raise TypeError(f"act must be nn.PReLU, nn.ReLU or None, got {type(act).__name__}")
        self.register_buffer("slope", slope)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def extra_repr(self) -> str:
        kh, kw = self.bits.shape[:2]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"act={self.act}, backend={self.backend!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # ``int8`` is derived data (the kernels' operand layout, which a newer release may
        # change): whatever the loaded dict held, it is made again from the loaded bits.
        with torch.no_grad():
            self.int8.copy_(dot_weights(self.bits))

    def packed_weight(self) -> PackedWeight:
        """The buffers as a :class:`PackedWeight`, built (and checked) once and reused while
        they are the same tensors (``.to()``/``.cuda()`` replace them, and so the cache)."""
        cached = self.__dict__.get("_packed_weight")
        if cached is None or cached.bits is not self.bits or cached.alpha is not self.alpha \
                or cached.int8 is not self.int8:
            cached = PackedWeight(self.bits, self.alpha, self.in_channels, self.stride, self.padding, self.int8)
            self.__dict__["_packed_weight"] = cached
        return cached

    def pack(self, x: Tensor | Sequence[Tensor]) -> PackedActivation:
        """``sign(in_bias(x))`` packed; x (N, Cin, H, W) float, or up to 3 tensors (N, Ci, H, W)
        read as their concatenation along the channels (see ``sign_pack``)."""
        fn = sign_pack_reference if self.backend == "reference" else sign_pack
        return fn(x, self.in_bias)

    def run(
        self,
        x: PackedActivation,
        residual: Residual | None = None,
        post_residual: Residual | None = None,
        next_bias: Tensor | None = None,
        pack_next: bool = False,
        store_float: bool = True,
    ) -> ConvOutput:
        """The convolution and its epilogue on packed input; optionally packs ``sign(y + next_bias)``."""
        plan = self.epilogue_plan(store_float=store_float, pack_next=pack_next,
                                  next_bias=next_bias if pack_next else None)
        fn = binary_conv2d_reference if self.backend == "reference" else binary_conv2d
        return fn(x, self.packed_weight(), plan.bind(residual=residual, post_residual=post_residual))

    def epilogue_plan(self, store_float: bool = True, pack_next: bool = False,
                      next_bias: Tensor | None = None) -> EpiloguePlan:
        """:meth:`epilogue` with these options as an :class:`EpiloguePlan` (its per-channel
        part checked once): built on first use and reused while the buffers and
        ``next_bias`` are the same tensors; where the plan holds copies of them (float32
        copies of a half model's, an expanded single PReLU slope), also while they are
        unchanged (version counters), so ``load_state_dict`` after a forward is seen."""
        buffers = self._buffers
        sources = (buffers["scale"], buffers["shift"], buffers["bias_a"], buffers["slope"], buffers["bias_b"],
                   next_bias)
        plans = self.__dict__.setdefault("_epilogue_plans", {})
        key = (store_float, pack_next)
        hit = plans.get(key)
        same = hit is not None and all(a is b for a, b in zip(hit[0], sources))
        if same and hit[2]:
            return hit[3]  # the plan reads the buffers themselves: in-place writes are seen
        versions = tuple(None if t is None else version_counter(t) for t in sources)
        if same and hit[1] == versions:
            return hit[3]
        plan = EpiloguePlan(self.epilogue(store_float=store_float, pack=pack_next, next_bias=next_bias),
                            self.out_channels, self.bits.device)
        c = plan.checked
        direct = all(a is b for a, b in zip((c.scale, c.shift, c.bias_a, c.slope, c.bias_b, c.next_bias), sources))
        if direct or None not in [v for t, v in zip(sources, versions) if t is not None]:
            plans[key] = (sources, versions, direct, plan)
        return plan

    def epilogue(self, **options) -> Epilogue:
        """This unit's :class:`Epilogue` (folded BN, LearnableBias, activation) with ``options``
        (residuals, packing, ...): vectors in the compute dtype, outputs in the buffers' dtype."""
        scale, shift, bias_a, slope, bias_b = in_compute_dtype(self, "scale", "shift", "bias_a", "slope", "bias_b")
        out_dtype = None if scale is self.scale else self.scale.dtype  # half-precision outputs
        return Epilogue(scale=scale, shift=shift, bias_a=bias_a, act=self.act, prelu_weight=slope, bias_b=bias_b,
                        out_dtype=out_dtype, **options)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """x (N, Cin, H, W) float -> (N, Cout, H', W') in the dtype of the buffers (the model's)."""
        return self.run(self.pack(x)).y


def _is_unit_start(mods: list[nn.Module], i: int) -> bool:
    return (
        i + 2 < len(mods)
        and runs_as(mods[i], LearnableBias)
        and runs_as(mods[i + 1], BinaryActivation)
        and runs_as(mods[i + 2], BiConv2d)
        and packable(mods[i + 2])  # others stay plain modules (convert() warns about them)
    )


class FusedSequential(nn.Module):
    """An ``nn.Sequential`` with its binary units replaced by :class:`BinaryConvUnit` s.

    Other modules run unchanged; a unit directly followed by another unit hands it
    packed bits (its epilogue applies the next unit's LearnableBias + sign + pack).
    """

    def __init__(self, seq: nn.Sequential, backend: str = "auto"):
        super().__init__()
        mods = list(seq)
        ops: list[nn.Module] = []
        i = 0
        while i < len(mods):
            if not _is_unit_start(mods, i):
                # A BiConv2d that does not start a unit stays here; convert() then gives it
                # the generic packed path (fuse_generic.PackedBiConv2d).
                ops.append(mods[i])
                i += 1
                continue
            in_bias, conv = mods[i], mods[i + 2]
            i += 3
            bn = bias_a = act = bias_b = None
            if i < len(mods) and _foldable_batchnorm(mods[i]):
                bn, i = mods[i], i + 1
            if i < len(mods) and runs_as(mods[i], LearnableBias) and not _is_unit_start(mods, i):
                bias_a, i = mods[i], i + 1
            if i < len(mods) and (runs_as(mods[i], nn.PReLU) or runs_as(mods[i], nn.ReLU)):
                act, i = mods[i], i + 1
                if i < len(mods) and runs_as(mods[i], LearnableBias) and not _is_unit_start(mods, i):
                    bias_b, i = mods[i], i + 1
            ops.append(BinaryConvUnit([conv], [bn], in_bias, bias_a, act, bias_b, backend))
        self.ops = nn.ModuleList(ops)

    @torch.no_grad()
    def forward(self, x: Tensor | None, packed: PackedActivation | None = None) -> Tensor:
        """x (N, C, H, W) float; ``packed``: if the sequence starts with a binary unit, its
        input already packed with its LearnableBias (then ``x`` is not read and may be None)."""
        for i, op in enumerate(self.ops):
            if not isinstance(op, BinaryConvUnit):
                x = op(x)
                continue
            if packed is None:
                packed = op.pack(x)
            nxt = self.ops[i + 1] if i + 1 < len(self.ops) else None
            if isinstance(nxt, BinaryConvUnit):
                out = op.run(packed, next_bias=nxt.in_bias, pack_next=True, store_float=False)
            else:
                out = op.run(packed)
            x, packed = out.y, out.packed
        return x


class FusedBasicBlock(nn.Module):
    """A backbone ``BasicBlock`` as two packed convolutions (see the module docstring)."""

    def __init__(self, block: BasicBlock, backend: str = "auto"):
        super().__init__()
        self.mode, self.stride = block.mode, block.stride
        self.conv3x3 = BinaryConvUnit(
            [block.binary_3x3], [block.bn1], block.move11, block.move12, block.prelu1, block.move13, backend
        )
        convs, bns = zip(*block.pointwise_branches())
        self.pointwise = BinaryConvUnit(convs, bns, block.move21, block.move22, block.prelu2, block.move23, backend)

    @property
    def in_bias(self) -> Tensor | None:
        """``move11``'s bias: what a previous stage applies when it packs this block's input."""
        return self.conv3x3.in_bias

    def run(
        self,
        x: Tensor,
        packed: PackedActivation | None = None,
        dense_source: Tensor | None = None,
        next_bias: Tensor | None = None,
        pack_next: bool = False,
    ) -> ConvOutput:
        """x (N, Cin, H, W) float (the shortcut); ``packed``: ``sign(move11(x))`` if already packed;
        ``dense_source``: a tensor whose 2x2 average pool is added to the output (dense shortcut)."""
        if packed is None:
            packed = self.conv3x3.pack(x)
        shortcut = Residual(x, "avgpool" if self.stride == 2 else "add")
        out1 = self.conv3x3.run(packed, residual=shortcut, next_bias=self.pointwise.in_bias, pack_next=True)
        residual = Residual(out1.y, "half_sum" if self.mode == "shrink" else "add")
        post = Residual(dense_source, "avgpool") if dense_source is not None else None
        return self.pointwise.run(out1.packed, residual=residual, post_residual=post,
                                  next_bias=next_bias, pack_next=pack_next)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.run(x).y


class FusedBackbone(nn.Module):
    """``BinaryBackbone`` with the blocks chained on packed activations; same forward."""

    def __init__(self, backbone: BinaryBackbone, backend: str = "auto"):
        super().__init__()
        self.stem = backbone.feature[0]
        self.blocks = nn.ModuleList(FusedBasicBlock(b, backend) for b in list(backbone.feature)[1:])
        self.register_buffer("mean", backbone.mean.clone(), persistent=False)
        self.register_buffer("std", backbone.std.clone(), persistent=False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = self.stem(x)
        outputs = [x]
        packed = None
        for i, block in enumerate(self.blocks, start=1):
            nxt = self.blocks[i] if i < len(self.blocks) else None
            source = outputs[DENSE_SHORTCUTS[i]] if i in DENSE_SHORTCUTS else None
            out = block.run(x, packed, source, nxt.in_bias if nxt is not None else None, pack_next=nxt is not None)
            x, packed = out.y, out.packed
            outputs.append(x)
        f1, f2, f3, f4 = (outputs[i] for i in FEATURE_BLOCKS)
        return f1, f2, f3, f4


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """A fused copy of ``model`` (or ``model`` itself with ``inplace=True``), in eval mode.

    ``model``: a :class:`~bimatting_triton.BiMatting` (or any module built from
    ``BinaryBackbone``, ``BasicBlock`` and ``nn.Sequential`` binary units). Its forward
    arguments and outputs are unchanged; see the module docstring for what is fused.
    ``backend``: ``'auto'`` (Triton kernels where they can run, else the references)
    or ``'reference'`` (always the plain-PyTorch references).
    Raises ``ValueError`` naming a binary unit that looks fusable but is malformed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    fused = model if inplace else copy.deepcopy(model)
    fused.eval()
    if runs_as(fused, BinaryBackbone):
        return FusedBackbone(fused, backend).eval()
    if runs_as(fused, BasicBlock):
        return FusedBasicBlock(fused, backend).eval()
    if fusable_sequential(fused):  # (its nested Sequentials and other convs follow below)
        fused = FusedSequential(fused, backend).eval()
    from .fuse_decoder import fuse_decoder_block  # imports this module

    # Outermost first; a replaced subtree is not visited again. A module used under several
    # names gets one replacement, set under each name.
    done: list[str] = []
    replaced: dict[int, nn.Module] = {}
    for name, module in list(fused.named_modules(remove_duplicate=False)):
        if any(name == d or name.startswith(d + ".") for d in done) or not name:
            continue
        new = replaced.get(id(module))
        if new is not None:
            pass
        elif runs_as(module, BinaryBackbone):
            new = FusedBackbone(module, backend)
        elif runs_as(module, BasicBlock):
            new = FusedBasicBlock(module, backend)
        elif (decoder_block := fuse_decoder_block(module, backend)) is not None:
            new = decoder_block  # sparse masked units (fuse_decoder)
        elif fusable_sequential(module):
            try:
                new = FusedSequential(module, backend)
            except ValueError as err:
                raise ValueError(f"convert: {name}: {err}") from None
        if new is not None:
            fused.set_submodule(name, new.eval())
            replaced[id(module)] = new
            done.append(name)
    from .fuse_generic import PackedBiConv2d, replace_remaining_binary_convs  # imports this module

    if (runs_as(fused, BiConv2d) or runs_as(fused, SignInputBiConv2d)) and packable(fused):
        return PackedBiConv2d(fused, backend).eval()
    replace_remaining_binary_convs(fused, backend)  # convs outside known units (swapped models)
    return fused
