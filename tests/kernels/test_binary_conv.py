"""Packed binary convolution (kernels/binary_conv.py) against its plain-PyTorch reference.

* Integer accumulators: exact equality with the reference (``F.conv2d`` of the
  unpacked {-1, 0, +1} values, exact for integer sums), for both inner loops.
* The reference itself against ``bimatting_triton.nn`` (LearnableBias -> sign ->
  BiConv2d -> BatchNorm -> residual -> LearnableBias -> PReLU -> LearnableBias).
* Fused epilogue: float outputs within a rounding bound derived below; packed outputs
  exactly equal to ``sign_pack_reference`` of the kernel's own float output.

Tiles are forced small (``block``) so that a few programs cover several pixel
blocks, channel blocks and input-channel steps with masked tails.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from bimatting_triton.kernels import _common
from bimatting_triton.kernels.binary_conv import (
    Epilogue,
    EpiloguePlan,
    PackedWeight,
    Residual,
    binary_conv2d,
    binary_conv2d_reference,
    dot_channel_order,
    fold_scale_shift,
    integer_conv_dtype,
    pack_conv,
    pack_weight,
    unpack_words,
)
from bimatting_triton.kernels.pack import sign_pack, sign_pack_reference
from bimatting_triton.nn import BiConv2d, LearnableBias, binarize_weight

# With BIMATTING_TEST_CUDA=1 (tests/conftest.py) the kernels run compiled on the GPU.
DEVICE = torch.device("cuda" if os.environ.get("BIMATTING_TEST_CUDA") and torch.cuda.is_available() else "cpu")
BLOCK = (32, 32, 64)  # BM pixels, BN output channels, BK input channels (2 words a step)
METHODS = ["dot", "popcount"]


def _activations(n, c, h, w, kind="zeros"):
    x = torch.randn(n, c, h, w)
    if kind == "zeros":
        x[x.abs() < 0.4] = 0  # about a third of the inputs have sign 0
    elif kind == "negative":
        x = -x.abs() - 0.1  # every sign word is all ones (-1), bit 31 included
    return x.to(DEVICE)


def _weights(cout, cin, k):
    w = torch.randn(cout, cin, k, k)
    w[1] = 0.25  # degenerate channel: w_c == 0 everywhere -> sign 0, alpha 0
    if cout > 2:  # a channel whose centred weights are exactly 0 at a third of the taps
        numel, third = cin * k * k, cin * k * k // 3
        v = torch.zeros(numel)
        v[:third], v[third : 2 * third] = 1.0, -1.0  # sums to 0 exactly
        w[2] = (v[torch.randperm(numel)] + 0.5).reshape(cin, k, k)  # mean exactly 0.5, w_c = v
    return w.to(DEVICE)


# ----------------------------------------------------------------------------------------
# weights
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_pack_weight_equals_binarize_weight(k):
    w = _weights(40, 70, k).cpu()
    pw = pack_weight(w)
    vals = pw.values(torch.float32)
    # Same ops as nn.binarize_weight, so equal bit for bit (alpha * sign(w_c)).
    assert torch.equal(pw.alpha.reshape(-1, 1, 1, 1) * vals, binarize_weight(w))
    assert (vals[1] == 0).all() and pw.alpha[1] == 0
    w_c = w - w.mean(dim=(1, 2, 3), keepdim=True)
    assert (w_c[2] == 0).any() and torch.equal(vals, torch.sign(w_c))
    # int8 copy used by the 'dot' path: same values, rows in the dot path's channel order
    # (row 4n + j of a word is channel n + 8j), padding channels zero, rows contiguous
    i8 = pw.int8  # (k, k, 96, 40)
    assert i8.shape == (k, k, 96, 40) and i8.permute(3, 0, 1, 2).is_contiguous()
    order = dot_channel_order(96)
    assert sorted(order.tolist()) == list(range(96)) and order[:8].tolist() == [0, 8, 16, 24, 1, 9, 17, 25]
    natural = torch.empty_like(i8)
    natural[:, :, order] = i8
    assert torch.equal(natural[:, :, :70].permute(3, 2, 0, 1).float(), vals)
    assert (natural[:, :, 70:] == 0).all()
    assert pw.padding == k // 2 and pw.stride == 1


def test_pack_conv_takes_geometry_from_module():
    conv = BiConv2d(20, 8, 3, stride=2)
    pw = pack_conv(conv)
    assert (pw.stride, pw.padding, pw.kernel_size, pw.in_channels, pw.out_channels) == (2, 1, (3, 3), 20, 8)
    with pytest.raises(ValueError, match="groups=1"):
        pack_conv(torch.nn.Conv2d(4, 4, 3, groups=2))


# ----------------------------------------------------------------------------------------
# integer accumulators
# ----------------------------------------------------------------------------------------
CASES = [
    # (k, stride, N (batch x time), Cin, Cout, H, W, input kind)
    (3, 1, 3, 70, 40, 5, 7, "zeros"),  # Cin not a multiple of 32, odd H/W, N > 1
    (3, 2, 2, 70, 40, 7, 9, "zeros"),  # stride 2 with odd sizes
    (3, 1, 1, 32, 64, 3, 2, "negative"),  # all-ones sign words; most taps padded
    (1, 1, 2, 33, 40, 4, 5, "zeros"),
    (1, 2, 2, 5, 16, 5, 3, "zeros"),  # one partial word, Cout < BN
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=[f"k{c[0]}s{c[1]}n{c[2]}c{c[3]}o{c[4]}" for c in CASES])
def test_accumulator_exact(case, method):
    k, s, n, cin, cout, h, w, kind = case
    x = _activations(n, cin, h, w, kind)
    bias = torch.randn(cin, device=DEVICE) * 0.5
    bias[::2] = 0
    pa = sign_pack(x, bias)
    pw = pack_weight(_weights(cout, cin, k), stride=s)
    got = binary_conv2d(pa, pw, method=method, block=BLOCK)
    ref = binary_conv2d_reference(pa, pw)
    assert got.dtype == torch.int32 and ref.dtype == torch.int32
    assert got.shape == (n, cout, (h - 1) // s + 1, (w - 1) // s + 1)
    assert torch.equal(got, ref)
    # The reference is the model's integer math: conv of sign(x + b) with sign(w_c).
    a = torch.sign(x + bias.reshape(1, -1, 1, 1)).double()
    wv = pw.values(torch.float64)
    assert torch.equal(ref, F.conv2d(a, wv, stride=s, padding=k // 2).round().to(torch.int32))


def test_reference_is_exact_at_the_largest_sums():
    # The reference sums in float32 on the CPU (integer_conv_dtype): exact for every integer up
    # to 2**24. Largest sums of the model's layers (3x3 over 1024 channels: |sum| up to 9216),
    # against int64 arithmetic: all products +1 (the extreme), then random signs.
    cin, cout, h, w = 1024, 3, 4, 5
    # channel c's weights and activations s_c = +-1, half of each (w - mean keeps the signs)
    s_c = torch.ones(cin)
    s_c[::2] = -1
    for kind in ("extreme", "mostly agreeing", "random"):
        if kind == "random":
            x, weight = torch.randn(1, cin, h, w), torch.randn(cout, cin, 3, 3)
        else:  # extreme: every product +1 where all taps are inside the image; else ~80 % of them
            flip = 0.1 if kind == "mostly agreeing" else 0.0
            x = s_c.reshape(1, cin, 1, 1) * torch.where(torch.rand(1, cin, h, w) < flip, -1.0, 1.0)
            weight = s_c.reshape(1, cin, 1, 1) * torch.where(torch.rand(cout, cin, 3, 3) < flip, -1.0, 1.0)
            weight = weight * (1 + torch.rand(cout, cin, 3, 3))  # (magnitudes do not matter)
        pa, pw = sign_pack_reference(x.to(DEVICE)), pack_weight(weight.to(DEVICE))
        got = binary_conv2d_reference(pa, pw)
        cols = F.unfold(pa.unpack(torch.float64), 3, padding=1).round().long()  # (1, cin*9, h*w)
        exact = (pw.values(torch.float64).reshape(cout, -1).round().long() @ cols).reshape(1, cout, h, w)
        assert torch.equal(got.long(), exact)
        if kind == "extreme":
            assert exact.max() == cin * 9  # (the centre pixels: every tap inside the image)


def test_integer_conv_dtype(monkeypatch):
    assert integer_conv_dtype(torch.device("cpu"), 9 * 1024) == torch.float32
    assert integer_conv_dtype(torch.device("cpu"), 2**24 + 1) == torch.float64
    assert integer_conv_dtype(torch.device("cuda"), 9) == torch.float64  # (cuDNN may choose FFT/Winograd)
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # (then NNPACK's Winograd may run)
    assert integer_conv_dtype(torch.device("cpu"), 9) == torch.float64


def test_weight_values_are_reused_until_the_bits_change():
    pw = pack_weight(torch.randn(8, 40, 3, 3))
    first = pw.values(torch.float32)
    assert pw.values(torch.float32) is first
    assert pw.values(torch.float64).dtype == torch.float64
    other = pack_weight(torch.randn(8, 40, 3, 3))
    pw.bits.copy_(other.bits)  # as load_state_dict writes a unit's buffers
    assert torch.equal(pw.values(torch.float32), other.values(torch.float32))
    assert not torch.equal(first, other.values(torch.float32))


@triton.jit
def _unpack_kernel(z_ptr, s_ptr, out_ptr, R: tl.constexpr, C: tl.constexpr, BY_JOIN: tl.constexpr):
    offs = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    z = tl.load(z_ptr + offs)
    s = tl.load(s_ptr + offs) & z
    a = tl.reshape(unpack_words(z, s, BY_JOIN), (R, 32 * C))
    tl.store(out_ptr + tl.arange(0, R)[:, None] * (32 * C) + tl.arange(0, 32 * C)[None, :], a)


@pytest.mark.parametrize("by_join", [True, False], ids=["join", "broadcast"])
def test_unpack_words_both_forms(by_join):
    # unpack_words' two forms (tl.join, compiled kernels; a broadcast, the interpreter's
    # default) give every word's values z - 2s in dot_channel_order, exactly.
    if DEVICE.type == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("a test kernel of its own: needs Triton's interpreter or a GPU")
    r, c = 4, 2
    gen = torch.Generator().manual_seed(3)
    z = torch.randint(-2**31, 2**31, (r, c), generator=gen, dtype=torch.int64).to(torch.int32)
    s = torch.randint(-2**31, 2**31, (r, c), generator=gen, dtype=torch.int64).to(torch.int32)
    z[0, 0], s[1, 1] = -1, -1  # all nonzero; all negative where nonzero
    out = torch.empty(r, 32 * c, dtype=torch.int8, device=DEVICE)
    _unpack_kernel[(1,)](z.to(DEVICE), s.to(DEVICE), out, R=r, C=c, BY_JOIN=by_join)
    bits = torch.arange(32)
    zb = (z[:, :, None] >> bits) & 1
    sb = (s[:, :, None] >> bits) & 1 & zb
    natural = (zb - 2 * sb).reshape(r, 32 * c).to(torch.int8)  # channel 32 w + b
    assert torch.equal(out.cpu(), natural[:, dot_channel_order(32 * c)])


@pytest.mark.parametrize("cin, stride, bk", [(20, 1, 128), (20, 2, 64), (50, 1, 128), (50, 2, 128), (10, 1, 32)],
                         ids=["c20-4taps", "c20s2-2taps", "c50-2taps", "c50s2-2taps", "c10-1tap"])
def test_several_taps_per_step(cin, stride, bk):
    # Layers with one or two words of input channels take whole taps a step ('dot' path,
    # taps_per_step): 9 taps in steps of 4 (the last one holding 1) or 2, with their own
    # out-of-image masks, odd sizes, batch > 1; exact against the reference.
    from bimatting_triton.kernels.binary_conv import taps_per_step

    pa = sign_pack(_activations(3, cin, 7, 5, "zeros"))
    pw = pack_weight(_weights(40, cin, 3), stride=stride)
    assert taps_per_step(0, 9, pa.words, bk) == ((bk // 32) // pa.words if pa.words < bk // 32 else 1)
    got = binary_conv2d(pa, pw, method="dot", block=(16, 32, bk))
    assert torch.equal(got, binary_conv2d_reference(pa, pw))
    assert taps_per_step(0, 1, 1, 128) == 1 and taps_per_step(1, 9, 1, 128) == 1 and taps_per_step(0, 9, 3, 128) == 1


def test_accumulator_default_tiles_and_noncontiguous_source():
    # Default interpreter tile (one program), packed from a non-contiguous NHWC view.
    x = _activations(2, 96, 6, 5).permute(0, 2, 3, 1)[:, :, :, ::2]  # (2, 6, 5, 48) view
    pa = sign_pack(x, layout="NHWC")
    pw = pack_weight(_weights(24, 48, 3))
    assert torch.equal(binary_conv2d(pa, pw), binary_conv2d_reference(pa, pw))


# ----------------------------------------------------------------------------------------
# the reference against the plain-PyTorch modules
# ----------------------------------------------------------------------------------------
def test_reference_matches_nn_modules():
    torch.set_default_dtype(torch.float64)
    try:
        cin, cout = 37, 24
        lb11, lb12, lb13, lb_next = (LearnableBias(c) for c in (cin, cout, cout, cout))
        conv = BiConv2d(cin, cout, 3, stride=2, bias=True)
        bn = torch.nn.BatchNorm2d(cout).eval()
        prelu = torch.nn.PReLU(cout)
        with torch.no_grad():
            for m in (lb11, lb12, lb13, lb_next):
                m.bias.normal_()
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.normal_()
            bn.bias.normal_()
            prelu.weight.uniform_(-0.5, 0.5)
        x = _activations(2, cin, 7, 9).double().cpu()
        x[:, :, 2] = -lb11.bias.reshape(1, cin, 1)  # exact zeros after the bias
        shortcut = torch.randn(2, cout, 7, 9)
        with torch.no_grad():
            want = lb13(prelu(lb12(bn(conv(torch.sign(lb11(x)))) + F.avg_pool2d(shortcut, 2, 2, ceil_mode=True))))
        pw = pack_conv(conv)
        scale, shift = fold_scale_shift(pw.alpha, bn, conv.bias)
        epi = Epilogue(scale, shift, Residual(shortcut, "avgpool"), lb12.bias, "prelu", prelu.weight, lb13.bias,
                       pack=True, next_bias=lb_next.bias)
        got = binary_conv2d_reference(sign_pack_reference(x, lb11.bias), pw, epi)
    finally:
        torch.set_default_dtype(torch.float32)
    # float64: the two differ only in rounding (folded BN, reassociated sums): ~1e-15.
    torch.testing.assert_close(got.y, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got.packed.unpack(torch.float64), torch.sign(lb_next(got.y)))


def test_fold_scale_shift_matches_batchnorm():
    bn = torch.nn.BatchNorm2d(6).eval().double()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.1, 3)
        bn.weight.normal_()
        bn.bias.normal_()
    alpha, bias = torch.rand(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    acc = torch.randint(-50, 50, (2, 6, 3, 3)).double()
    scale, shift = fold_scale_shift(alpha, bn, bias)
    want = bn(acc * alpha.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1))
    torch.testing.assert_close(acc * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1), want,
                               rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------
# fused epilogue
# ----------------------------------------------------------------------------------------
def _pooled_abs(r: Residual, cout: int) -> torch.Tensor:
    t = r.tensor.double().abs()
    if r.mode == "add":
        return t.repeat(1, cout // t.shape[1], 1, 1)
    if r.mode == "half_sum":
        return (t[:, :cout] + t[:, cout:]) / 2
    return F.avg_pool2d(t, 2, 2, ceil_mode=True)


def _rounding_bound(acc, epi: Epilogue, y_ref) -> torch.Tensor:
    """Elementwise bound on |kernel - reference| for the float epilogue.

    Both compute the same <= 16 roundings in ``scale.dtype`` (mul, adds, the 4-term pool
    and its division, the PReLU product). Each rounding errs by at most eps/2 times an
    intermediate, and every intermediate is at most ``mag`` = the sum of the absolute
    values of all terms (|PReLU slope| <= 1 in these tests). So each result is within
    16 * eps/2 * mag of the exact value and the two within 16 * eps * mag; the cast to
    ``out_dtype`` adds one ulp of the output (rounding may go opposite ways). In
    practice the interpreter and PyTorch round identically (the difference is 0); on GPU
    FMA contraction may move a result by an ulp.
    """
    cout = acc.shape[1]
    col = lambda v: v.double().abs().reshape(1, cout, 1, 1)  # noqa: E731
    mag = acc.double().abs() * col(epi.scale)
    for v in (epi.shift, epi.bias_a, epi.bias_b):
        if v is not None:
            mag = mag + col(v)
    for r in (epi.residual, epi.post_residual):
        if r is not None:
            mag = mag + _pooled_abs(r if isinstance(r, Residual) else Residual(r), cout)
    if epi.prelu_weight is not None:
        assert epi.prelu_weight.abs().max() <= 1
    out_dtype = epi.out_dtype or (epi.out.dtype if epi.out is not None else epi.scale.dtype)
    eps_c, eps_o = torch.finfo(epi.scale.dtype).eps, torch.finfo(out_dtype).eps
    return 16 * eps_c * mag + eps_o * y_ref.double().abs()


EPILOGUE_CASES = {
    # name: (k, stride, residual mode + channels, act, compute dtype, out dtype, method, post residual, next bias)
    "3x3-add-prelu-f32-dot": (3, 1, ("add", 40), "prelu", torch.float32, None, "dot", True, True),
    "3x3s2-avgpool-prelu-f32-popcount": (3, 2, ("avgpool", 40), "prelu", torch.float32, None, "popcount", False, True),
    "1x1-halfsum-relu-f64-dot": (1, 1, ("half_sum", 80), "relu", torch.float64, None, "dot", False, False),
    "1x1-add-stacked-none-f32-popcount": (1, 1, ("add", 20), None, torch.float32, None, "popcount", True, True),
    "3x3-none-prelu-f32-to-f16-dot": (3, 1, None, "prelu", torch.float32, torch.float16, "dot", False, True),
}


def _epilogue_case(name):
    """An EPILOGUE_CASES entry's packed input and weight: (n, cout, h, w, ho, wo), pa, pw."""
    k, s = EPILOGUE_CASES[name][:2]
    n, cin, cout, h, w = 2, 70, 40, 5, 7
    pa = sign_pack(_activations(n, cin, h, w))
    pw = pack_weight(_weights(cout, cin, k), stride=s)
    return (n, cout, h, w, *pw.output_size(h, w)), pa, pw


@pytest.mark.parametrize("name", list(EPILOGUE_CASES))
def test_fused_epilogue(name):
    _, _, res, act, cd, out_dtype, method, post, next_bias = EPILOGUE_CASES[name]
    (n, cout, h, w, ho, wo), pa, pw = _epilogue_case(name)
    residual = None
    if res is not None:
        mode, rc = res
        rh, rw = (h, w) if mode == "avgpool" else (ho, wo)
        # a non-contiguous residual: a strided channel slice of a bigger tensor
        residual = Residual(torch.randn(n, 2 * rc, rh, rw, dtype=cd, device=DEVICE)[:, ::2], mode)
    kw = dict(dtype=cd, device=DEVICE)
    epi = Epilogue(
        scale=(torch.rand(cout, **kw) + 0.5) * pw.alpha.to(cd).clamp_min(0.1),
        shift=torch.randn(cout, **kw),
        residual=residual,
        bias_a=torch.randn(cout, **kw),
        act=act,
        prelu_weight=(torch.rand(cout, **kw) * 2 - 1) if act == "prelu" else None,
        bias_b=torch.randn(1, cout, 1, 1, **kw),
        post_residual=torch.randn(n, cout, ho, wo, **kw) if post else None,
        out_dtype=out_dtype,
        pack=True,
        next_bias=torch.randn(cout, **kw) if next_bias else None,
    )
    got = binary_conv2d(pa, pw, epi, method=method, block=BLOCK)
    ref = binary_conv2d_reference(pa, pw, epi)
    assert got.y.dtype == ref.y.dtype == (out_dtype or cd) and got.y.shape == (n, cout, ho, wo)
    acc = binary_conv2d_reference(pa, pw)
    bound = _rounding_bound(acc, epi, ref.y)
    diff = (got.y.double() - ref.y.double()).abs()
    assert (diff <= bound).all(), f"max excess {(diff - bound).max().item()}"
    # The packed output is exactly sign(y_out + next_bias) of the kernel's own output.
    assert torch.equal(got.packed.bits, sign_pack_reference(got.y, epi.next_bias).bits)
    # Packing alone (no float store) gives the same bits.
    epi.store_float = False
    only = binary_conv2d(pa, pw, epi, method=method, block=BLOCK)
    assert only.y is None and torch.equal(only.packed.bits, got.packed.bits)


@pytest.mark.parametrize("method", METHODS)
def test_packed_epilogue_keeps_exact_zeros(method):
    # y_out == -next_bias exactly must pack as sign 0. With scale 0 on channels < 20 the
    # output there is exactly `shift`, and next_bias = -shift; a ReLU gives exact zeros too.
    n, cin, cout = 2, 40, 40
    pa = sign_pack(_activations(n, cin, 4, 5))
    pw = pack_weight(_weights(cout, cin, 3))
    scale = torch.rand(cout, device=DEVICE) + 0.1
    scale[:20] = 0
    shift = torch.randn(cout, device=DEVICE)
    next_bias = -shift
    next_bias[20:] = torch.randn(20, device=DEVICE)
    got = binary_conv2d(pa, pw, Epilogue(scale, shift, pack=True, next_bias=next_bias), method=method, block=BLOCK)
    vals = got.packed.unpack()
    assert (vals[:, :20] == 0).all() and (vals[:, 20:] != 0).all()
    assert torch.equal(got.packed.bits, sign_pack_reference(got.y, next_bias).bits)
    relu = binary_conv2d(pa, pw, Epilogue(scale, shift, act="relu", pack=True), method=method, block=BLOCK)
    zeros = relu.y == 0
    assert zeros.any() and torch.equal(relu.packed.unpack() == 0, zeros)
    assert torch.equal(relu.packed.bits, sign_pack_reference(relu.y).bits)  # no stray sign bits


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf * 0, on purpose
def test_epilogue_non_finite_values_follow_torch(method):
    """A NaN output (0 * inf scale) stays NaN through ReLU (torch.relu keeps it) and packs as
    sign 0 (torch.sign(NaN) == 0), as the plain model computes it."""
    n, cin, cout = 1, 32, 32
    pa = sign_pack(_activations(n, cin, 3, 4, kind="zeros"))
    pw = pack_weight(_weights(cout, cin, 1))
    scale = torch.rand(cout, device=DEVICE) + 0.1
    scale[:8] = math.inf  # inf * 0 (the zero sums) is NaN, inf * nonzero is +-inf
    shift = torch.randn(cout, device=DEVICE)
    got = binary_conv2d(pa, pw, Epilogue(scale, shift, act="relu", pack=True), method=method, block=BLOCK)
    acc = binary_conv2d(pa, pw, None, method=method, block=BLOCK)  # the exact int32 sums
    expect = torch.relu(acc.float() * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))
    assert expect.isnan().any() and torch.equal(got.y.isnan(), expect.isnan())
    assert torch.equal(got.packed.unpack(), torch.sign(expect))
    assert torch.equal(got.packed.bits, sign_pack_reference(got.y).bits)


def test_epilogue_writes_into_a_channel_slice():
    # Output into channels 8..47 of a 64-channel NCHW buffer (e.g. a concat); the rest untouched.
    n, cin, cout = 2, 40, 40
    pa = sign_pack(_activations(n, cin, 3, 5))
    pw = pack_weight(_weights(cout, cin, 1))
    buf = torch.full((n, 64, 3, 5), float("nan"), device=DEVICE)
    epi = Epilogue(scale=torch.rand(cout, device=DEVICE), shift=torch.randn(cout, device=DEVICE), act="relu",
                   out=buf[:, 8:48])
    got = binary_conv2d(pa, pw, epi, block=BLOCK)
    ref = binary_conv2d_reference(pa, pw, Epilogue(scale=epi.scale, shift=epi.shift, act="relu"))
    assert got.y.data_ptr() == buf[:, 8:48].data_ptr() and got.packed is None
    diff = (buf[:, 8:48] - ref.y).abs()
    # acc*scale + shift: compiled code may fuse it into one FMA (one rounding instead of
    # two), so the bound is relative to the terms' size, not to the (cancelling) result.
    acc = binary_conv2d_reference(pa, pw).double()
    terms = acc.abs() * epi.scale.double().view(1, -1, 1, 1) + epi.shift.double().abs().view(1, -1, 1, 1)
    assert (diff <= 4 * torch.finfo(torch.float32).eps * terms).all()
    assert buf[:, :8].isnan().all() and buf[:, 48:].isnan().all()


@pytest.mark.parametrize("name", ["3x3-add-prelu-f32-dot", "3x3s2-avgpool-prelu-f32-popcount",
                                  "3x3-none-prelu-f32-to-f16-dot"])
def test_epilogue_plan_launch_equals_the_epilogue(name):
    # An EpiloguePlan (per-channel part checked once) bound per launch computes exactly what the
    # equivalent Epilogue computes: same kernel, same arguments. Also with a single PReLU slope
    # (expanded by the plan), an output buffer, a mask stage, and in the reference.
    _, _, res, act, cd, out_dtype, method, post, next_bias = EPILOGUE_CASES[name]
    (n, cout, h, w, ho, wo), pa, pw = _epilogue_case(name)
    kw = dict(dtype=cd, device=DEVICE)
    mode, rc = res if res is not None else ("add", cout)
    rh, rw = (h, w) if mode == "avgpool" else (ho, wo)
    per_channel = dict(scale=torch.rand(cout, **kw) + 0.5, shift=torch.randn(cout, **kw),
                       bias_a=torch.randn(cout, **kw), act=act,
                       prelu_weight=torch.rand(1, **kw) - 0.5 if act == "prelu" else None,
                       bias_b=torch.randn(1, cout, 1, 1, **kw), out_dtype=out_dtype, pack=True,
                       next_bias=torch.randn(cout, **kw) if next_bias else None)
    plan = EpiloguePlan(Epilogue(**per_channel), cout, DEVICE)
    for _ in range(2):  # the same plan, new per-pixel tensors each launch
        residual = Residual(torch.randn(n, 2 * rc, rh, rw, **kw)[:, ::2], mode)
        post_residual = torch.randn(n, cout, ho, wo, **kw) if post else None
        full = Epilogue(**per_channel, residual=residual, post_residual=post_residual)
        got = binary_conv2d(pa, pw, plan.bind(residual=residual, post_residual=post_residual), method=method,
                            block=BLOCK)
        want = binary_conv2d(pa, pw, full, method=method, block=BLOCK)
        assert torch.equal(got.y, want.y) and torch.equal(got.packed.bits, want.packed.bits)
        ref = binary_conv2d_reference(pa, pw, plan.bind(residual=residual, post_residual=post_residual))
        assert torch.equal(ref.y, binary_conv2d_reference(pa, pw, full).y)
    # out, mask and addend given per launch (the decoder's read-modify-write form)
    plain = EpiloguePlan(Epilogue(per_channel["scale"], per_channel["shift"], act="relu"), cout, DEVICE)
    mask = (torch.rand(n, 1, ho, wo, device=DEVICE) > 0.5).to(cd)
    first = torch.randn(n, cout, ho, wo, **kw)
    outs = [first, first.clone()]
    got = binary_conv2d(pa, pw, plain.bind(out=outs[0], mask=mask, addend=outs[0]), method=method, block=BLOCK)
    want = binary_conv2d(pa, pw, Epilogue(per_channel["scale"], per_channel["shift"], act="relu", out=outs[1],
                                          mask=mask, addend=outs[1]), method=method, block=BLOCK)
    assert got.y is outs[0] and torch.equal(outs[0], outs[1]) and torch.equal(got.y, want.y)


def test_epilogue_plan_errors():
    pa = sign_pack(torch.randn(1, 20, 4, 4))
    pw = pack_weight(torch.randn(8, 20, 3, 3))
    scale = torch.ones(8)
    with pytest.raises(ValueError, match="EpiloguePlan: leave residual, out unset"):
        EpiloguePlan(Epilogue(scale, residual=torch.randn(1, 8, 4, 4), out=torch.empty(1, 8, 4, 4)), 8, "cpu")
    with pytest.raises(TypeError, match="epilogue must be an Epilogue"):
        EpiloguePlan(scale, 8, "cpu")
    with pytest.raises(ValueError, match="epilogue.shift must have 8 elements"):
        EpiloguePlan(Epilogue(scale, shift=torch.zeros(7)), 8, "cpu")  # checked when built
    with pytest.raises(ValueError, match="built for 9 output channels on cpu, this launch has 8"):
        binary_conv2d(pa, pw, EpiloguePlan(Epilogue(torch.ones(9)), 9, "cpu").bind())
    plan = EpiloguePlan(Epilogue(scale), 8)  # on the vectors' device
    assert plan.device == torch.device("cpu")
    with pytest.raises(ValueError, match="epilogue.residual \\(add\\) must have shape"):
        binary_conv2d(pa, pw, plan.bind(residual=torch.randn(1, 8, 2, 2)))  # per-pixel tensors: per launch
    with pytest.raises(ValueError, match="epilogue.out has dtype torch.float16 but out_dtype is torch.float32"):
        binary_conv2d(pa, pw, plan.bind(out=torch.empty(1, 8, 4, 4, dtype=torch.float16)))
    with pytest.raises(ValueError, match="epilogue.addend is only used with a mask"):
        binary_conv2d(pa, pw, plan.bind(addend=torch.empty(1, 8, 4, 4)))


def test_host_cdiv():
    assert [_common.cdiv(a, 4) for a in (1, 4, 5, 8, 9)] == [1, 1, 2, 2, 3]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the fallback is for devices where Triton cannot run")
def test_fallback_without_triton(monkeypatch):
    pa = sign_pack(_activations(1, 20, 3, 3))
    pw = pack_weight(_weights(8, 20, 3))
    monkeypatch.setattr(_common, "interpreting", lambda: False)  # as without TRITON_INTERPRET
    assert torch.equal(binary_conv2d(pa, pw), binary_conv2d_reference(pa, pw))


def test_bad_arguments():
    pa = sign_pack(torch.randn(1, 20, 4, 4))
    pw = pack_weight(torch.randn(8, 20, 3, 3))
    scale = torch.ones(8)
    with pytest.raises(TypeError, match="x must be a PackedActivation"):
        binary_conv2d(torch.randn(1, 20, 4, 4), pw)
    with pytest.raises(TypeError, match="weight must be a PackedWeight"):
        binary_conv2d(pa, torch.randn(8, 20, 3, 3))
    with pytest.raises(ValueError, match="x has 20 channels but weight expects 21"):
        binary_conv2d(pa, pack_weight(torch.randn(8, 21, 3, 3)))
    with pytest.raises(ValueError, match="method must be one of"):
        binary_conv2d(pa, pw, method="xnor")
    with pytest.raises(ValueError, match="block must be"):
        binary_conv2d(pa, pw, block=(32, 24, 64))
    with pytest.raises(ValueError, match="epilogue.residual \\(add\\) must have shape"):
        binary_conv2d(pa, pw, Epilogue(scale, residual=torch.randn(1, 8, 2, 2)))
    with pytest.raises(ValueError, match="epilogue.residual \\(avgpool\\) must have shape"):
        binary_conv2d(pa, pw, Epilogue(scale, residual=Residual(torch.randn(1, 8, 4, 4), "avgpool")))
    with pytest.raises(ValueError, match="epilogue.residual.mode"):
        binary_conv2d(pa, pw, Epilogue(scale, residual=Residual(torch.randn(1, 8, 4, 4), "max")))
    with pytest.raises(ValueError, match="epilogue.shift must have 8 elements"):
        binary_conv2d(pa, pw, Epilogue(scale, shift=torch.zeros(7)))
    with pytest.raises(ValueError, match="prelu_weight must be given exactly when"):
        binary_conv2d(pa, pw, Epilogue(scale, act="prelu"))
    with pytest.raises(TypeError, match="float32 or float64"):
        binary_conv2d(pa, pw, Epilogue(scale.half()))
    with pytest.raises(ValueError, match="store the float output, pack it, or both"):
        binary_conv2d(pa, pw, Epilogue(scale, store_float=False))
    with pytest.raises(TypeError, match="epilogue.next_bias must be a float tensor, got float"):
        binary_conv2d(pa, pw, Epilogue(scale, pack=True, next_bias=0.5))
    with pytest.raises(ValueError, match="epilogue.out must be a float tensor of shape"):
        binary_conv2d(pa, pw, Epilogue(scale, out=torch.empty(1, 8, 3, 3)))
    with pytest.raises(ValueError, match="too small"):
        binary_conv2d(sign_pack(torch.randn(1, 20, 1, 1)), pack_weight(torch.randn(8, 20, 3, 3), padding=0))
    with pytest.raises(ValueError, match="PackedWeight.bits must be an int32"):
        PackedWeight(torch.zeros(3, 3, 2, 1, 8), torch.ones(8), 20)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cin, cout, residual", [(130, 130, False), (70, 130, False), (130, 130, True),
                                                  (40, 70, False), (20, 16, False)],
                         ids=["BN128-BK128", "BN128-BK64", "residual-BN64-BK128", "BN64-BK64", "BN32-BK32"])
def test_cuda_heuristic_tiles_are_exact(method, cin, cout, residual):
    # The tiles the kernels launch with on CUDA (kernels/binary_conv._heuristic_config: BN and
    # BK up to 128, BN at most 64 with a residual), run here on a small input (``residual``
    # only picks the tile): exact accumulators, and packed bits of the stored values.
    from bimatting_triton.kernels.binary_conv import _heuristic_config
    from bimatting_triton.kernels.pack import words_for

    cfg = _heuristic_config(0 if method == "dot" else 1, cout, words_for(cin) * 32, residual)
    block = (cfg["BM"], cfg["BN"], cfg["BK"])
    pa = sign_pack(_activations(2, cin, 5, 7))
    pw = pack_weight(_weights(cout, cin, 3))
    assert torch.equal(binary_conv2d(pa, pw, method=method, block=block), binary_conv2d_reference(pa, pw))
    scale, shift = torch.rand(cout, device=DEVICE) + 0.5, torch.randn(cout, device=DEVICE)
    next_bias = torch.randn(cout, device=DEVICE)
    got = binary_conv2d(pa, pw, Epilogue(scale, shift, pack=True, next_bias=next_bias), method=method, block=block)
    assert torch.equal(got.packed.bits, sign_pack_reference(got.y, next_bias).bits)
    ref = binary_conv2d_reference(pa, pw, Epilogue(scale, shift)).y
    acc = binary_conv2d_reference(pa, pw).double()
    terms = acc.abs() * scale.double().view(1, -1, 1, 1) + shift.double().abs().view(1, -1, 1, 1)
    assert ((got.y - ref).abs() <= 4 * torch.finfo(torch.float32).eps * terms).all()
