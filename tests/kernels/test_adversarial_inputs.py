"""Adversarial cases the other kernel tests leave out, for every public Triton op of kernels/.

Filled from a coverage matrix of tests/kernels and tests/test_fuse*.py (see each section):
channel counts 1, 31, 33, 64, 65; spatial sizes 1x1, 1xW, Hx1 and smaller than a tile;
stride 2 on those; all-zero inputs and weights and ``x == -bias`` everywhere; extreme
values (inf, -inf, NaN, huge biases, -0.0, subnormals) in activations, epilogue vectors,
residuals, next_bias and masks; expanded (stride-0), transposed and channels-last views;
float16 / bfloat16 where accepted; empty batches; tile lists of masks smaller than a tile
and halos larger than it; the sparse units on tiny frames, stride 2 and float16 outputs.

Integer results (packed bits, accumulators, tile lists) are compared with ``torch.equal``.
Float epilogue outputs are compared as tests/kernels/test_binary_conv.py does (a derived
rounding bound, 0 in practice under the interpreter), with NaN and +-inf required at exactly
the reference's positions; a kernel launch on a non-contiguous view must give bitwise the
launch on the contiguous copy (same arithmetic, other addresses).

Shapes are tiny: each launch is one to a few programs under the interpreter.
"""
import math
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from bimatting_triton.kernels._common import MAX_PIXELS, check_pixel_count
from bimatting_triton.kernels.binary_conv import (
    Epilogue,
    Residual,
    binary_conv2d,
    binary_conv2d_reference,
    dot_channel_order,
    pack_weight,
)
from bimatting_triton.kernels.epilogue import _prepare, epilogue_reference
from bimatting_triton.kernels.pack import (
    PackedActivation,
    Product,
    sign_pack,
    sign_pack_pair,
    sign_pack_reference,
    words_for,
)
from bimatting_triton.kernels.sparse_unit import (
    sparse_binary_conv2d,
    sparse_binary_conv2d_reference,
    sparse_float_conv2d,
    sparse_float_conv2d_reference,
    sparse_unit,
    sparse_unit_reference,
)
from bimatting_triton.kernels.tile_list import active_tiles, active_tiles_reference

from bimatting_triton.nn import binarize_weight

from .test_sparse_unit import _brute_force_flags

DEVICE = torch.device("cuda" if os.environ.get("BIMATTING_TEST_CUDA") and torch.cuda.is_available() else "cpu")
INF, NAN = math.inf, math.nan


def _tiny(dtype):
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal


def _extreme_activations(n, c, h, w, bias, dtype, seed=0):
    """Random values with exact zeros of x and of x + bias, -0.0, subnormals, +-inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    r = torch.rand(n, c, h, w, generator=g)
    x[r < 0.1] = 0
    x[(r >= 0.1) & (r < 0.15)] = -0.0
    b = bias.reshape(1, c, 1, 1).to(dtype).expand(n, c, h, w)
    pick = (r >= 0.15) & (r < 0.45)
    x[pick] = -b[pick]  # x + bias == 0 exactly (NaN where the bias is NaN)
    x[(r >= 0.45) & (r < 0.5)] = _tiny(dtype)
    x[(r >= 0.5) & (r < 0.55)] = -_tiny(dtype)
    x[(r >= 0.55) & (r < 0.58)] = INF
    x[(r >= 0.58) & (r < 0.61)] = -INF
    x[(r >= 0.61) & (r < 0.63)] = NAN
    return x.to(DEVICE)


def _extreme_bias(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    special = [0.0, -0.0, 1e30, -1e30, INF, -INF, NAN, _tiny(torch.float32)]
    for i in range(0, c, 3):
        b[i] = special[(i // 3) % len(special)]
    return b.to(dtype).to(DEVICE)


# ========================================================================================
# sign + pack (kernels/pack.py)
# Covered before: C in {5, 14, 32, 33, 45, 70} (and 1 inside a 3-source list), 5x7 / 3x4 /
# 3x2, N 1-3, f16/bf16/f64, x == -bias and its neighbours, -0.0, subnormals, inf/NaN in x
# and bias (one test), strided / channels_last / NHWC. Missing: C = 1, 31, 64, 65 alone;
# 1x1, 1xW, Hx1; extremes with every dtype; all-zero input; expanded (stride-0) x, bias and
# Product gate; transposed views; an empty batch.
# ========================================================================================
PACK_SHAPES = [(1, (2, 1, 1)), (31, (2, 1, 7)), (32, (1, 7, 1)), (33, (3, 3, 5)), (64, (2, 1, 1)), (65, (2, 5, 3))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("c, nhw", PACK_SHAPES, ids=[f"c{c}-{'x'.join(map(str, s))}" for c, s in PACK_SHAPES])
def test_sign_pack_channels_sizes_and_extremes(c, nhw, dtype):
    n, h, w = nhw
    bias = _extreme_bias(c, dtype)
    x = _extreme_activations(n, c, h, w, bias, dtype)
    ref = sign_pack_reference(x, bias)
    assert torch.equal(ref.unpack(), torch.sign(x + bias.reshape(1, c, 1, 1)).float())
    got = sign_pack(x, bias.reshape(1, c, 1, 1))
    assert got.shape == (n, c, h, w) and torch.equal(got.bits, ref.bits)
    assert torch.equal(sign_pack(x).bits, sign_pack_reference(x).bits)
    first, second = sign_pack_pair(x, bias, -bias)
    assert torch.equal(first.bits, ref.bits) and torch.equal(second.bits, sign_pack_reference(x, -bias).bits)


@pytest.mark.parametrize("c", [33, 65])
def test_sign_pack_all_zero_and_all_cancelled(c):
    # Every value is 0 (x == 0, x == -0.0, x == -bias exactly): both planes all zero, padding included.
    bias = torch.randn(c, device=DEVICE)
    bias[::4] = -0.0
    zeros = torch.zeros(2, c, 3, 5, device=DEVICE)
    zeros[:, ::2] = -0.0
    cancelled = (-bias).reshape(1, c, 1, 1).expand(2, c, 3, 5)  # an expanded view, stride 0 but in C
    for x, b in ((zeros, None), (zeros, torch.zeros(c, device=DEVICE)), (zeros, -torch.zeros(c, device=DEVICE)),
                 (cancelled, bias)):
        got = sign_pack(x, b)
        assert got.bits.shape == (2, 3, 5, 2, words_for(c))
        assert not got.bits.any() and torch.equal(got.bits, sign_pack_reference(x, b).bits)


def test_sign_pack_broadcast_and_transposed_views():
    c = 65
    bias_full = torch.randn(2 * c, device=DEVICE)
    bias_full[::3] = 0
    bias = bias_full[::2]  # a non-contiguous vector
    base = _extreme_activations(1, c, 5, 3, bias, torch.float32)
    views = {
        "expanded N and W": base[:, :, :, :1].expand(3, c, 5, 4),
        "transposed H/W": base.transpose(2, 3),
        "channels_last 1x1": base[:, :, :1, :1].contiguous(memory_format=torch.channels_last),
        "permuted NHWC->NCHW": base.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2),
    }
    for name, x in views.items():
        want = sign_pack_reference(x.contiguous(), bias.contiguous()).bits
        assert torch.equal(sign_pack(x, bias).bits, want), name
        assert torch.equal(sign_pack(x, bias.reshape(1, c, 1, 1)).bits, want), name
    # a scalar bias expanded to C (stride 0)
    scalar = torch.tensor(0.25, device=DEVICE).expand(c)
    x = base.clone()
    x[:, :, 0] = -0.25
    assert torch.equal(sign_pack(x, scalar).bits, sign_pack_reference(x, scalar.contiguous()).bits)
    # sources with an expanded one and a Product whose gate is broadcast along C and W
    a = base[:, :20]
    hid = base[:, 20:].clone()
    small = torch.rand(1, 1, 5, 1, device=DEVICE)
    small[:, :, 0], hid[:, :, 0] = 0.5, 2.0  # products 1.0 exactly
    gate = small.expand(1, c - 20, 5, 3)
    whole = torch.cat([a, gate.contiguous() * hid], dim=1)
    assert torch.equal(sign_pack([a, Product(gate, hid)], bias).bits, sign_pack_reference(whole, bias).bits)
    src = [base[:, :1].expand(1, 7, 5, 3), base[:, 7:]]  # 7 channels that are one channel repeated
    assert torch.equal(sign_pack(src, bias).bits, sign_pack_reference(torch.cat([s.contiguous() for s in src], 1),
                                                                      bias).bits)


@pytest.mark.parametrize("shape", [(0, 33, 3, 5), (2, 33, 0, 5), (2, 33, 3, 0)])
def test_sign_pack_empty(shape):
    x = torch.randn(shape, device=DEVICE)
    got = sign_pack(x, torch.zeros(33, device=DEVICE))
    ref = sign_pack_reference(x, torch.zeros(33, device=DEVICE))
    assert got.bits.shape == ref.bits.shape == (shape[0], shape[2], shape[3], 2, 2)


# ========================================================================================
# packed weights (kernels/packed_weight.py)
# Covered before: Cin 70 (k 1, 3), Cin 20/21/40; a degenerate channel; float32. Missing:
# Cin 1, 31, 33, 65; float16 / float64 / non-contiguous weights; an all-zero weight.
# ========================================================================================
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("cin", [1, 31, 33, 65])
def test_pack_weight_channels_dtypes_and_views(cin, dtype):
    for k in (1, 3):
        w = torch.randn(5, cin, k, k, dtype=torch.float64).to(dtype)
        w[1] = 0  # all-zero channel: sign 0, alpha 0
        w[2, :, 0, 0] = w[2].mean()  # (some exactly-mean taps where the rounding allows)
        views = (w, w.contiguous(memory_format=torch.channels_last), w.transpose(2, 3).contiguous().transpose(2, 3))
        for view in views:
            pw = pack_weight(view)
            vals = pw.values(view.dtype)
            assert torch.equal(pw.alpha.reshape(-1, 1, 1, 1) * vals, binarize_weight(view))
            assert (vals[1] == 0).all() and pw.alpha[1] == 0
            cin_pad = words_for(cin) * 32
            natural = torch.empty_like(pw.int8)
            natural[:, :, dot_channel_order(cin_pad)] = pw.int8
            assert torch.equal(natural[:, :, :cin].permute(3, 2, 0, 1).to(vals.dtype), vals)
            assert not natural[:, :, cin:].any()
    zero = pack_weight(torch.zeros(3, cin, 3, 3, dtype=dtype))
    assert not zero.bits.any() and not zero.int8.any() and not zero.alpha.any()


# ========================================================================================
# packed binary convolution, accumulators (kernels/binary_conv.py)
# Covered before: (k, s, H, W) = 3/1 5x7, 3/2 7x9, 3/1 3x2, 1/1 4x5, 1/2 5x3 (+ 7x5, 6x5);
# Cin 5, 10, 20, 32, 33, 48, 50, 70, 130; Cout 16, 24, 40, 64, 70, 130; N 1-3. Missing:
# 1x1, 1xW, Hx1, 2x2 outputs of a 3x3 (every tap but the centre padded) and stride 2 on
# them; Cin 1, 31, 64, 65; Cout 1, 33, 65; all-zero inputs / weights.
# ========================================================================================
CONV_CASES = [
    # (k, stride, N, Cin, Cout, H, W, block)
    (3, 1, 2, 65, 33, 1, 1, None),  # every tap but the centre out of the image
    (3, 2, 2, 1, 1, 1, 1, None),
    (3, 1, 2, 31, 1, 1, 7, (16, 32, 32)),  # 1xW: the row above and below padded
    (3, 2, 3, 33, 65, 7, 1, (16, 64, 64)),  # Hx1, stride 2 on odd H, Cout not a multiple of BN
    (3, 2, 2, 64, 33, 2, 2, None),  # exactly two words, stride 2 on an even size smaller than a tile
    (3, 2, 1, 65, 64, 3, 5, (16, 64, 64)),  # 3 words in 2-word steps, the last half empty
    (1, 2, 2, 65, 1, 1, 1, None),
    (1, 2, 2, 31, 33, 5, 1, (16, 32, 32)),
    (1, 1, 3, 1, 65, 1, 7, (16, 32, 32)),
]


@pytest.mark.parametrize("method", ["dot", "popcount"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"k{c[0]}s{c[1]}n{c[2]}c{c[3]}o{c[4]}-{c[5]}x{c[6]}"
                                                  for c in CONV_CASES])
def test_accumulator_tiny_sizes_and_channel_counts(case, method):
    k, s, n, cin, cout, h, w, block = case
    bias = _extreme_bias(cin, torch.float32)
    x = _extreme_activations(n, cin, h, w, bias, torch.float32)
    weight = torch.randn(cout, cin, k, k, device=DEVICE)
    if cout > 1:
        weight[0] = 0.5  # degenerate channel: all w_c == 0
    pa, pw = sign_pack(x, bias), pack_weight(weight, stride=s)
    got = binary_conv2d(pa, pw, method=method, block=block)
    ref = binary_conv2d_reference(pa, pw)
    assert got.shape == (n, cout, (h - 1) // s + 1, (w - 1) // s + 1)
    assert torch.equal(got, ref)
    a = torch.sign(x + bias.reshape(1, -1, 1, 1)).double()
    want = F.conv2d(a, pw.values(torch.float64), stride=s, padding=k // 2).round().to(torch.int32)
    assert torch.equal(ref, want)


@pytest.mark.parametrize("method", ["dot", "popcount"])
def test_all_zero_inputs_and_weights(method):
    # Sums of all-zero activations (x == 0, or x == -bias everywhere) or of all-zero weights are 0,
    # and the epilogue then gives exactly its constant part (no rounding left: compared bitwise).
    n, cin, cout, h, w = 2, 33, 33, 5, 7
    bias = torch.randn(cin, device=DEVICE)
    xs = [torch.zeros(n, cin, h, w, device=DEVICE), (-bias).reshape(1, cin, 1, 1).expand(n, cin, h, w)]
    weights = [torch.randn(cout, cin, 3, 3, device=DEVICE), torch.zeros(cout, cin, 3, 3, device=DEVICE)]
    kw = dict(device=DEVICE)
    shift, bias_a = torch.randn(cout, **kw), torch.randn(cout, **kw)
    r_c = torch.randint(-3, 4, (cout,), **kw).float()  # integers: their 2x2 means are exact
    residual = r_c.reshape(1, cout, 1, 1).expand(n, cout, h, w)  # (an expanded residual)
    next_bias = -torch.relu((shift + r_c) + bias_a)  # the output, per channel: everything packs as 0
    for i, (x, weight) in enumerate([(xs[0], weights[0]), (xs[1], weights[0]), (torch.randn(n, cin, h, w, **kw),
                                                                                 weights[1])]):
        pa = sign_pack(x, bias if i == 1 else None)
        pw = pack_weight(weight if i == 0 else weight[:, :, 1:2, 1:2], stride=2)  # (1x1 after the first: cheaper)
        acc = binary_conv2d(pa, pw, method=method)
        assert not acc.any() and torch.equal(acc, binary_conv2d_reference(pa, pw))
        epi = Epilogue(torch.rand(cout, **kw), shift, Residual(residual, "avgpool"), bias_a, act="relu", pack=True,
                       next_bias=next_bias)
        got = binary_conv2d(pa, pw, epi, method=method)
        ref = binary_conv2d_reference(pa, pw, epi)
        assert torch.equal(got.y, ref.y) and torch.equal(got.y, (-next_bias).reshape(1, cout, 1, 1).expand_as(got.y))
        assert not got.packed.bits.any() and torch.equal(got.packed.bits, ref.packed.bits)


def test_empty_batch():
    pw = pack_weight(torch.randn(4, 33, 3, 3, device=DEVICE), stride=2)
    pa = sign_pack(torch.randn(0, 33, 5, 3, device=DEVICE))
    assert binary_conv2d(pa, pw).shape == binary_conv2d_reference(pa, pw).shape == (0, 4, 3, 2)
    got = binary_conv2d(pa, pw, Epilogue(torch.ones(4, device=DEVICE), pack=True))
    assert got.y.shape == (0, 4, 3, 2) and got.packed.bits.shape == (0, 3, 2, 2, 1)


@pytest.mark.parametrize("method", ["dot", "popcount"])
@pytest.mark.parametrize("shape, stride, padding", [((8, 33, 3, 3), 2, 0), ((8, 33, 1, 3), 1, None),
                                                     ((8, 33, 5, 5), 2, 2)], ids=["3x3s2p0", "1x3", "5x5s2"])
def test_accumulator_other_geometries(shape, stride, padding, method):
    # Geometries the model does not use but pack_weight accepts: no padding, non-square kernels, 5x5.
    pa = sign_pack(_extreme_activations(2, 33, 5, 7, torch.zeros(33), torch.float32))
    pw = pack_weight(torch.randn(*shape, device=DEVICE), stride=stride, padding=padding)
    assert torch.equal(binary_conv2d(pa, pw, method=method), binary_conv2d_reference(pa, pw))


# ========================================================================================
# fused epilogue (kernels/epilogue.py, through binary_conv2d)
# Covered before (test_binary_conv, test_sparse_unit): residual add (Cr = Cout and Cout/2),
# half_sum, avgpool on 5x7 -> 3x4, post_residual add, PReLU (per channel, scalar), ReLU,
# sigmoid/tanh with a mask (bound only), f32/f64 compute, f16 out, pack + next_bias,
# y_out == -next_bias, a NaN/inf scale with ReLU, out as a channel slice, mask + addend
# (read-modify-write) without pack. Missing: avgpool of a 1x1 or 2x1 residual; avgpool /
# half_sum as post_residual; add with Cr = 1; Cout 1/33/65; act None/sigmoid/tanh with pack;
# mask + pack; float16 residual / mask / addend with float32 compute; out as a transposed
# view; expanded and strided epilogue vectors and residuals; NaN/inf/huge/-0.0 in shift,
# biases, residuals, mask and next_bias, for every activation.
# ========================================================================================
def _expect_close(got, ref, bound, what=""):
    """NaN and +-inf exactly where the reference has them; finite values within ``bound``."""
    got, ref = got.double(), ref.double()
    assert torch.equal(got.isnan(), ref.isnan()), f"{what}: NaN positions differ"
    inf = ref.isinf()
    assert torch.equal(got.isinf(), inf) and torch.equal(got[inf], ref[inf]), f"{what}: inf positions differ"
    fin = ref.isfinite()
    diff = (got[fin] - ref[fin]).abs()
    b = bound.expand_as(ref)[fin]
    assert (diff <= b).all(), f"{what}: max excess {(diff - b).max().item()}"


def _abs_residual(r, cout):
    t = (r.tensor if isinstance(r, Residual) else r).double().abs().nan_to_num(0, 0, 0)
    mode = r.mode if isinstance(r, Residual) else "add"
    if mode == "add":
        return t.repeat(1, cout // t.shape[1], 1, 1)
    if mode == "half_sum":
        return (t[:, :cout] + t[:, cout:]) / 2
    return F.avg_pool2d(t, 2, 2, ceil_mode=True)


def _epilogue_bound(acc, epi, ref_pre):
    """test_binary_conv's rounding bound (16 roundings of intermediates <= mag in the compute
    dtype, one of the cast), + 4 eps for sigmoid / tanh (test_sparse_unit's), then the mask
    stage's two roundings in the output dtype. Non-finite terms count 0 (their outputs are
    compared by position)."""
    cout = acc.shape[1]
    col = lambda v: v.double().abs().nan_to_num(0, 0, 0).reshape(1, cout, 1, 1)
    mag = acc.double().abs() * col(epi.scale.reshape(-1).expand(cout))
    for v in (epi.shift, epi.bias_a, epi.bias_b):
        if v is not None:
            mag = mag + col(v.reshape(-1).expand(cout))
    for r in (epi.residual, epi.post_residual):
        if r is not None:
            mag = mag + _abs_residual(r, cout)
    cd = epi.scale.dtype
    out_dtype = epi.out_dtype or (epi.out.dtype if epi.out is not None else cd)
    eps_c, eps_o = torch.finfo(cd).eps, torch.finfo(out_dtype).eps
    bound = 16 * eps_c * mag + (4 * eps_c if epi.act in ("sigmoid", "tanh") else 0)
    pre = ref_pre.double().abs().nan_to_num(0, 0, 0)
    bound = bound + eps_o * pre
    if epi.mask is not None:
        m = epi.mask.double().abs().nan_to_num(0, 0, 0)
        a = epi.addend.double().abs().nan_to_num(0, 0, 0) if epi.addend is not None else 0
        bound = bound * m + 4 * eps_o * (pre * m + a)
    return bound


def _check_epilogue(pa, pw, epi, method, block=None):
    got = binary_conv2d(pa, pw, epi, method=method, block=block)
    ref = binary_conv2d_reference(pa, pw, epi)
    acc = binary_conv2d_reference(pa, pw)
    n, cout, ho, wo = acc.shape
    pre = epilogue_reference(acc, replace(_prepare(replace(epi, mask=None, addend=None, out=None), n, cout, ho, wo,
                                                   acc.device), pack=False)).y
    if epi.store_float:
        assert got.y.dtype == ref.y.dtype and got.y.shape == (n, cout, ho, wo)
        _expect_close(got.y, ref.y, _epilogue_bound(acc, epi, pre))
    if epi.pack:
        if epi.store_float:
            assert torch.equal(got.packed.bits, sign_pack_reference(got.y, epi.next_bias).bits)
        else:
            assert got.y is None
    return got, ref


EPI_EDGE_CASES = {
    # name: (k, stride, N, Cin, Cout, H, W, residual, post residual, act, compute, out dtype, mask, method)
    "avgpool-of-1x1-tanh-mask-pack": (3, 2, 2, 33, 33, 1, 1, ("avgpool", 1, 1), ("avgpool", 2, 1), "tanh",
                                      torch.float32, None, True, "dot"),
    "halfsum-1xW-sigmoid-f16-pack": (1, 1, 2, 31, 33, 1, 7, ("half_sum", 1, 7), ("half_sum", 1, 7), "sigmoid",
                                     torch.float32, torch.float16, False, "popcount"),
    "add-cr1-Hx1-prelu-mask-f16": (3, 1, 2, 65, 65, 7, 1, ("add1", 7, 1), ("add", 7, 1), "prelu",
                                   torch.float32, torch.float16, True, "dot"),
    "none-s2-odd-f64-cout1-mask-pack": (1, 2, 3, 1, 1, 5, 3, ("add", 3, 2), None, None, torch.float64, None, True,
                                        "popcount"),
    "relu-2x2-cout65-pack": (3, 2, 2, 64, 65, 3, 3, ("avgpool", 3, 3), ("add", 2, 2), "relu", torch.float32,
                             None, False, "dot"),
}


@pytest.mark.parametrize("name", list(EPI_EDGE_CASES))
def test_epilogue_options_on_edge_shapes(name):
    k, s, n, cin, cout, h, w, res, post, act, cd, out_dtype, with_mask, method = EPI_EDGE_CASES[name]
    pa = sign_pack(_extreme_activations(n, cin, h, w, torch.zeros(cin), torch.float32))
    weight = torch.randn(cout, cin, k, k, device=DEVICE)
    pw = pack_weight(weight, stride=s)
    ho, wo = pw.output_size(h, w)
    kw = dict(dtype=cd, device=DEVICE)
    half = torch.float16

    def residual(spec):
        if spec is None:
            return None
        mode, rh, rw = spec
        rc = {"add": cout, "add1": 1, "half_sum": 2 * cout, "avgpool": cout}[mode]
        t = torch.randn(n, rc, rh, rw, **kw)
        if mode == "half_sum":  # a channels_last float16 residual, summed in the compute dtype
            t = t.to(half).contiguous(memory_format=torch.channels_last)
        return Residual(t, "add" if mode == "add1" else mode)

    mask = addend = None
    if with_mask:
        mask = torch.rand(n, 1, ho, wo, device=DEVICE).to(half)  # a float16 mask for any output dtype
        mask.view(-1)[::3] = 0
        addend = torch.randn(n, cout, ho, wo, device=DEVICE).to(half)
    epi = Epilogue(
        scale=torch.rand(2 * cout, **kw)[::2] + 0.1,  # strided
        shift=torch.tensor(0.3, **kw).expand(cout),  # stride 0
        residual=residual(res),
        bias_a=torch.randn(1, cout, 1, 1, **kw),
        act=act,
        prelu_weight=torch.tensor([-0.25], **kw) if act == "prelu" else None,
        bias_b=torch.randn(cout, **kw),
        post_residual=residual(post),
        out_dtype=out_dtype,
        pack=True,
        next_bias=torch.randn(cout, **kw) if cout > 1 else None,
        mask=mask,
        addend=addend,
    )
    got, _ = _check_epilogue(pa, pw, epi, method)
    only = binary_conv2d(pa, pw, replace(epi, store_float=False), method=method)
    assert only.y is None and torch.equal(only.packed.bits, got.packed.bits)


@pytest.mark.parametrize("act", [None, "relu", "prelu", "sigmoid", "tanh"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_epilogue_extreme_values(act):
    # inf / NaN / huge / -0.0 in scale, shift, biases, the slope, both residuals, the mask and
    # next_bias: NaN and +-inf where torch gets them, the packed bits torch.sign's (NaN -> 0).
    method = "popcount" if act in ("relu", "tanh") else "dot"
    n, cin, cout, h, w = 2, 33, 40, 3, 5
    pa = sign_pack(_extreme_activations(n, cin, h, w, torch.zeros(cin), torch.float32))
    pw = pack_weight(torch.randn(cout, cin, 1, 1, device=DEVICE), stride=2)  # 1x1 stride 2: 2x3 out
    ho, wo = pw.output_size(h, w)
    special = torch.tensor([INF, -INF, NAN, 0.0, -0.0, 1e30, -1e30, 3e38], device=DEVICE)

    def vec(seed, specials=True):
        v = torch.randn(cout, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(seed))
        if specials:
            v[seed % 5 :: 5][: len(special)] = special[: len(v[seed % 5 :: 5])]
        return v

    scale = vec(1).abs()
    scale[:4] = torch.tensor([INF, 0.0, 3e38, -0.0])
    res = torch.randn(n, cout, h, w, device=DEVICE)  # avgpool windows holding inf, -inf, NaN
    res[0, :, 0, 0], res[0, :, 0, 1], res[1, :, 2, 4], res[1, :3, 1, 2] = INF, -INF, NAN, -1e38
    post = torch.randn(n, cout, ho, wo, device=DEVICE)
    post[1, ::7] = -INF
    mask = torch.rand(n, 1, ho, wo, device=DEVICE)
    mask[0, 0, 0] = torch.tensor([0.0, -0.0, INF])
    mask[1, 0, 1, 0] = NAN
    next_bias = vec(4)
    next_bias[5] = -3e38
    epi = Epilogue(scale, vec(2), Residual(res, "avgpool"), vec(3, specials=act != "prelu"), act,
                   vec(5).clamp(-1, 1) if act == "prelu" else None, vec(6), post, pack=True, next_bias=next_bias,
                   mask=mask, addend=torch.randn(n, cout, ho, wo, device=DEVICE))
    got, ref = _check_epilogue(pa, pw, epi, method)
    assert got.y.isnan().any() and got.y.isinf().any()
    # the packed values are torch.sign of the reference's own output wherever it agrees bitwise
    same = (got.y == ref.y) | (got.y.isnan() & ref.y.isnan())
    want = torch.sign(ref.y + next_bias.reshape(1, -1, 1, 1))
    assert torch.equal(got.packed.unpack()[same], want[same])


@pytest.mark.parametrize("method", ["dot", "popcount"])
def test_epilogue_views_equal_contiguous_launch(method):
    # The same epilogue given through expanded / transposed / channels_last views launches the
    # same arithmetic: bitwise the contiguous launch. Also an out buffer given as a transposed view.
    n, cin, cout, h, w = 2, 31, 33, 4, 5
    pa = sign_pack(torch.randn(n, cin, h, w, device=DEVICE))
    pw = pack_weight(torch.randn(cout, cin, 1, 1, device=DEVICE))
    kw = dict(device=DEVICE)
    res = torch.randn(1, cout, w, h, **kw).transpose(2, 3).expand(n, cout, h, w)  # transposed, stride-0 batch
    post = torch.randn(n, 2 * cout, h, w, **kw).contiguous(memory_format=torch.channels_last)
    mask = torch.rand(n, 1, 1, w, **kw).expand(n, 1, h, w)  # stride 0 along H
    addend = torch.randn(n, cout, w, h, **kw).transpose(2, 3)
    nb = torch.randn(3 * cout, **kw)[1::3]
    views = Epilogue(torch.rand(cout, **kw).expand(2, cout)[1], torch.randn(cout, 1, **kw)[:, 0],
                     Residual(res), torch.randn(2 * cout, **kw)[::2], "prelu", torch.rand(2 * cout, **kw)[1::2],
                     None, Residual(post, "half_sum"), pack=True, next_bias=nb, mask=mask, addend=addend)
    dense = Epilogue(views.scale.contiguous(), views.shift.contiguous(), Residual(res.contiguous()),
                     views.bias_a.contiguous(), "prelu", views.prelu_weight.contiguous(), None,
                     Residual(post.contiguous(), "half_sum"), pack=True, next_bias=nb.contiguous(),
                     mask=mask.contiguous(), addend=addend.contiguous())
    got, _ = _check_epilogue(pa, pw, views, method)
    want = binary_conv2d(pa, pw, dense, method=method)
    assert torch.equal(got.y, want.y) and torch.equal(got.packed.bits, want.packed.bits)
    out = torch.full((n, cout, w, h), NAN, **kw).transpose(2, 3)
    into = binary_conv2d(pa, pw, replace(views, out=out), method=method)
    assert into.y is out and torch.equal(out, want.y)


# ========================================================================================
# tile lists (kernels/tile_list.py)
# Covered before: 13x21 / 11x19 masks, tiles (4, 8) / (8, 2), halo 0/1, B 2-3, T 2, NaN and
# negative values, an empty frame, empty / full masks, a strided 4-D mask, float32 only.
# Missing: 1x1, 1xW, Hx1 and smaller-than-a-tile masks; halo 2 and halo > tile; -0.0 (not
# active), subnormal and inf values; float16 / bfloat16 / float64 masks; transposed views.
# ========================================================================================
TILE_CASES = [
    # (B, T, H, W, tile, halo)
    (1, 1, 1, 1, (4, 4), 0),
    (2, 3, 1, 9, (4, 8), 1),
    (2, 1, 9, 1, (16, 16), 2),
    (1, 2, 3, 5, (16, 16), 1),  # a whole frame smaller than one tile
    (3, 1, 5, 11, (2, 8), 3),  # halo larger than the tile's height
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", TILE_CASES, ids=[f"b{c[0]}t{c[1]}-{c[2]}x{c[3]}-tile{c[4][0]}x{c[4][1]}-halo{c[5]}"
                                                  for c in TILE_CASES])
def test_active_tiles_edge_masks(case, dtype):
    b, t, h, w, tile, halo = case
    g = torch.Generator().manual_seed(h * 31 + w)
    mask = torch.zeros(b, t, 1, h, w, dtype=dtype)
    pick = torch.rand(b, t, 1, h, w, generator=g)
    values = [-0.0, _tiny(dtype), -_tiny(dtype), INF, -INF, NAN, 0.5]
    # -0.0 everywhere a value is not set (never active); a few pixels of each special value
    mask[pick < 0.5] = -0.0
    for i, v in enumerate(values):
        mask[(pick >= 0.5 + 0.03 * i) & (pick < 0.515 + 0.03 * i)] = v
    if b * t > 1:
        mask[0, 0] = -0.0  # one frame of one item all -0.0: no active tile
    want = _brute_force_flags(mask.double(), tile, halo)
    for m in (mask.to(DEVICE), mask.to(DEVICE).transpose(3, 4).contiguous().transpose(3, 4)):
        for build in (active_tiles, active_tiles_reference):
            tiles = build(m, tile, halo)
            assert torch.equal(tiles.flags.cpu(), want)
            assert torch.equal(tiles.count.cpu(), want.sum(1, dtype=torch.int32))
            for f in range(t):
                assert torch.equal(tiles.index[f, : tiles.count[f]].cpu(), want[f].nonzero().flatten().to(torch.int32))
    # a 4-D (N, 1, H, W) mask is T = 1
    flat = active_tiles(mask.flatten(0, 1).to(DEVICE), tile, halo)
    assert torch.equal(flat.flags.cpu(), _brute_force_flags(mask.flatten(0, 1).unsqueeze(1).double(), tile, halo))


# ========================================================================================
# sparse units (kernels/sparse_unit.py)
# Covered before: 11x19 frames, tile (4, 8), CIN 40, COUT 24/70, B 2 x T 2, masks empty /
# full / single pixels / random, float32 (+ float64 GRU), 3x3 stride 1 only, the float conv
# at 16 -> 16, K 3, ReLU, mask + addend, float32/64. Missing: frames smaller than a tile,
# 1x1 / 1xW / Hx1 frames, CIN 1/33/64/65, COUT 1/33, float16 outputs and masks, masks
# holding -0.0 / inf / NaN, a single active tile, the sparse conv with stride 2 and 1x1
# weights, the float conv with K 1, Cin != Cout, act None/sigmoid/tanh, no mask, float16.
# ========================================================================================
UNIT_CASES = [
    # (B, T, H, W, CIN, COUT, tile, mask kind, act, out dtype, method)
    (1, 2, 3, 5, 33, 33, None, "full", "sigmoid", torch.float32, "dot"),  # a frame smaller than the tile
    (2, 1, 1, 1, 1, 1, (4, 4), "single", "prelu", torch.float32, "popcount"),
    (2, 1, 1, 9, 65, 17, (4, 8), "single-tile", "tanh", torch.float16, "dot"),
    (1, 2, 9, 1, 64, 32, (8, 2), "specials", "tanh", torch.float16, "dot"),
    (2, 2, 5, 6, 31, 33, (4, 4), "empty", "prelu", torch.float32, "dot"),
]


def _unit_mask(kind, n, h, w):
    m = torch.zeros(n, 1, h, w)
    if kind == "full":
        m = torch.rand(n, 1, h, w) * 0.9 + 0.1
    elif kind == "single":
        m[0, 0, 0, 0] = 0.7
    elif kind == "single-tile":  # only tile 1 (columns 8..) of the first item, in every frame
        m[0, 0, 0, 8] = 0.4
    elif kind == "specials":  # -0.0 does not activate a tile; inf and NaN do (and give inf / NaN)
        m[:] = -0.0  # two tiles a frame (rows 0-7 and 8): one active in each frame
        m[0, 0, 1, 0], m[0, 0, 3, 0], m[1, 0, 8, 0] = INF, 0.5, NAN
    return m.to(DEVICE)


@pytest.mark.parametrize("case", UNIT_CASES, ids=[f"b{c[0]}t{c[1]}-{c[2]}x{c[3]}-c{c[4]}o{c[5]}-{c[7]}-{c[9]}"
                                                  .replace("torch.", "") for c in UNIT_CASES])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_sparse_unit_edge_cases(case):
    b, t, h, w, cin, cout, tile, kind, act, out_dtype, method = case
    n = b * t
    mask = _unit_mask(kind, n, h, w)
    if out_dtype == torch.float16:
        mask = mask.half()
    tiles = active_tiles(mask.reshape(b, t, 1, h, w), tile)
    if kind == "single-tile":
        assert tiles.count.tolist() == [1] * t
    x = torch.randn(n, cin, h, w, device=DEVICE)
    x[x.abs() < 0.3] = 0
    b3, b1 = torch.randn(cin, device=DEVICE), torch.randn(cin, device=DEVICE)
    x[:, :, 0] = -b3.reshape(1, cin, 1)  # sign 0 through the 3x3 branch's bias
    x3, x1 = sign_pack(x, b3), sign_pack(x, b1)
    w3 = pack_weight(torch.randn(cout, cin, 3, 3, device=DEVICE))
    w1 = pack_weight(torch.randn(cout, cin, 1, 1, device=DEVICE))

    def epi():
        kw = dict(device=DEVICE)
        return Epilogue(torch.rand(cout, **kw) * 0.1 + 0.02, torch.randn(cout, **kw), bias_a=torch.randn(cout, **kw),
                        act=act, prelu_weight=torch.rand(cout, **kw) * 2 - 1 if act == "prelu" else None,
                        out_dtype=out_dtype)

    e3, e1 = epi(), epi()
    got = sparse_unit(x3, w3, e3, x1, w1, e1, mask, tiles, method=method)
    assert got.shape == (n, cout, h, w) and got.dtype == out_dtype
    y1 = binary_conv2d(x1, w1, e1, method=method).y
    y3 = binary_conv2d(x3, w3, e3, method=method).y
    zero = (mask == 0).expand_as(got)
    assert torch.equal(got[zero], y1[zero])
    dense = y3 * mask.to(out_dtype) + y1
    if DEVICE.type == "cpu":  # (as test_sparse_unit: bitwise where both round like PyTorch)
        assert torch.equal(got.isnan(), dense.isnan())
        keep = ~dense.isnan()
        assert torch.equal(got[keep], dense[keep])
    ref = sparse_unit_reference(x3, w3, e3, x1, w1, e1, mask)
    assert torch.equal(ref.isnan(), got.isnan()) and torch.equal(ref.isinf(), got.isinf())


SPARSE_CONV_CASES = [
    # (k, stride, CIN, COUT, H, W, block, method)
    (3, 2, 33, 40, 11, 19, (16, 32), "dot"),  # stride 2 on odd sizes: 6x10 output tiles
    (3, 2, 65, 33, 1, 7, None, "popcount"),
    (1, 1, 1, 65, 5, 9, (32, 32), "dot"),
]


@pytest.mark.parametrize("case", SPARSE_CONV_CASES, ids=[f"k{c[0]}s{c[1]}-c{c[2]}o{c[3]}-{c[4]}x{c[5]}"
                                                         for c in SPARSE_CONV_CASES])
def test_sparse_conv_stride2_and_1x1(case):
    k, s, cin, cout, h, w, block, method = case
    b, t = 1, 2
    pa = sign_pack(torch.randn(b * t, cin, h, w, device=DEVICE))
    pw = pack_weight(torch.randn(cout, cin, k, k, device=DEVICE), stride=s)
    ho, wo = pw.output_size(h, w)
    mask = torch.zeros(b, t, 1, ho, wo, device=DEVICE)
    mask[0, 0, 0, ho - 1, wo - 1] = 1.0  # the last pixel of frame 0; frame 1 empty
    mask[0, 1, 0, 0, 0] = -0.0
    tiles = active_tiles(mask, (4, 4), halo=1)
    kw = dict(device=DEVICE)
    epi = Epilogue(torch.rand(cout, **kw), torch.randn(cout, **kw), act="relu",
                   residual=Residual(torch.randn(b * t, 1, ho, wo, **kw)),
                   out=torch.full((b * t, cout, ho, wo), NAN, **kw))
    out = sparse_binary_conv2d(pa, pw, epi, tiles, method=method, block=block)
    cover = tiles.coverage().expand_as(out)
    assert cover.any() and not cover.all()
    assert out[~cover].isnan().all() and not out[cover].isnan().any()
    dense = binary_conv2d(pa, pw, replace(epi, out=None), method=method).y  # (the default tile)
    assert torch.equal(out[cover], dense[cover])
    ref = sparse_binary_conv2d_reference(pa, pw, replace(epi, out=torch.full_like(out, NAN)), tiles)
    bound = _epilogue_bound(binary_conv2d_reference(pa, pw), replace(epi, out=None), ref)
    _expect_close(out[cover], ref[cover], bound.expand_as(ref)[cover])
    assert ref[~cover].isnan().all()


FLOAT_CONV_CASES = [
    # (K, CIN, COUT, act, dtype, mask stage, H, W)
    (1, 3, 5, None, torch.float32, "mask", 5, 6),  # y * m alone (no addend)
    (3, 5, 3, "sigmoid", torch.float16, "mask+addend", 1, 7),
    (3, 16, 1, "tanh", torch.float64, None, 7, 1),
    (3, 1, 16, None, torch.float32, None, 3, 3),
]


@pytest.mark.parametrize("case", FLOAT_CONV_CASES, ids=[f"k{c[0]}-c{c[1]}o{c[2]}-{c[3]}-{c[4]}".replace("torch.", "")
                                                        for c in FLOAT_CONV_CASES])
def test_sparse_float_conv_variants(case):
    k, cin, cout, act, dtype, stage, h, w = case
    with_mask, with_addend = stage is not None, stage == "mask+addend"
    b, t = 2, 1
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(b * t, cin, h, w, dtype=dtype, device=DEVICE).contiguous(memory_format=torch.channels_last)
    x[0] = 0  # an all-zero item
    # float32 weights for float16 x: both the kernel and the reference round them to x's dtype first
    weight = torch.randn(cout, cin, k, k, dtype=cd, device=DEVICE)
    scale, shift = torch.rand(cout, dtype=cd, device=DEVICE) + 0.5, torch.randn(cout, dtype=cd, device=DEVICE)
    mask5 = torch.zeros(b, t, 1, h, w, dtype=dtype, device=DEVICE)
    mask5[:, 0, 0, h // 2, w // 2] = 0.5
    mask5[1, 0, 0, 0, 0] = 1.0
    tiles = active_tiles(mask5, (4, 4))
    mask = mask5.flatten(0, 1) if with_mask else None
    addend = torch.randn(b * t, cout, h, w, dtype=dtype, device=DEVICE)
    out = addend.clone() if with_addend else torch.full_like(addend, NAN)
    sparse_float_conv2d(x, weight, scale, shift, act, out, tiles, mask=mask, addend=out if with_addend else None)
    ref = addend.clone() if with_addend else torch.full_like(addend, NAN)
    sparse_float_conv2d_reference(x, weight, scale, shift, act, ref, tiles, mask=mask,
                                  addend=ref if with_addend else None)
    cover = tiles.coverage().expand_as(out)
    assert torch.equal(out[~cover].isnan(), ref[~cover].isnan())
    assert torch.equal(out[~cover].nan_to_num(), ref[~cover].nan_to_num())  # untouched outside the tiles
    # the bound of test_sparse_float_conv: K*K*Cin-term dot products, then a few roundings
    eps_c, eps_o = torch.finfo(cd).eps, torch.finfo(dtype).eps
    mag = F.conv2d(x.double().abs(), weight.double().abs(), padding=k // 2) * scale.double().reshape(1, -1, 1, 1)
    mag = mag + shift.double().abs().reshape(1, -1, 1, 1)
    m = mask.double() if with_mask else 1.0
    a = addend.double().abs() if with_addend else 0.0
    bound = (2 * k * k * cin + 8) * eps_c * mag * m + 4 * eps_o * (ref.double().abs() + a)
    if act in ("sigmoid", "tanh"):
        bound = bound + 4 * eps_c
    diff = (out.double() - ref.double()).abs()
    assert (diff[cover] <= bound[cover]).all(), f"max excess {(diff - bound)[cover].max().item()}"


# ========================================================================================
# Launch size: pixels are numbered in int32 (kernels/_common.py: MAX_PIXELS)
# ========================================================================================
def test_more_pixels_than_a_launch_can_number_is_refused(monkeypatch):
    # stride-0 views: 2**16 x 256 x 256 = 2**32 pixels without the memory
    x = torch.zeros(1, 3, 1, 1, device=DEVICE).expand(2**16, 3, 256, 256)
    with pytest.raises(ValueError, match=r"x has N\*H\*W = 65536\*256\*256 = 4294967296 pixels.*split the batch"):
        sign_pack(x)
    with pytest.raises(ValueError, match="split the batch"):
        sign_pack_pair([x[:, :1], x[:, 1:]], None, None)
    bits = torch.zeros(1, 1, 1, 2, 1, dtype=torch.int32, device=DEVICE).expand(2**16, 256, 256, 2, 1)
    big = PackedActivation._allocated(bits, 3)
    weight = pack_weight(torch.randn(4, 3, 3, 3, device=DEVICE), stride=2, padding=1)
    with pytest.raises(ValueError, match="split the batch"):
        binary_conv2d(big, weight)
    # the references number nothing in int32: with the bound lowered, they still run
    import bimatting_triton.kernels._common as common
    small = torch.randn(2, 3, 4, 4, device=DEVICE)
    monkeypatch.setattr(common, "MAX_PIXELS", 16)
    assert sign_pack_reference(small).shape == (2, 3, 4, 4)
    assert binary_conv2d_reference(sign_pack_reference(small), weight).shape == (2, 4, 2, 2)
    with pytest.raises(ValueError, match="split the batch"):
        sign_pack(small)
    monkeypatch.undo()
    # the bound itself: MAX_PIXELS is taken, one more is not
    check_pixel_count(1, 1, MAX_PIXELS, "x")
    with pytest.raises(ValueError, match="split the batch"):
        check_pixel_count(1, 1, MAX_PIXELS + 1, "x")
