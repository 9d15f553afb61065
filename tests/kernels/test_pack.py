"""Sign + bit-pack kernel (kernels/pack.py) against its plain-PyTorch reference.

All comparisons are exact: packing is integer/bit work, and the sign of ``x + bias``
does not depend on rounding (see the kernel's docstring), so the Triton kernel, the
reference and ``torch.sign(x + bias)`` must agree bit for bit, including adversarial
values (zeros, ``x == -bias`` exactly, its float neighbours, -0.0, subnormals).
"""
import math
import os

import pytest
import torch

from bimatting_triton.kernels import _common
from bimatting_triton.kernels.pack import (
    NONZERO,
    SIGN,
    PackedActivation,
    Product,
    pack_values,
    sign_pack,
    sign_pack_pair,
    sign_pack_reference,
    unpack_values,
    words_for,
)

# With BIMATTING_TEST_CUDA=1 (tests/conftest.py) the kernels run compiled on the GPU.
DEVICE = torch.device("cuda" if os.environ.get("BIMATTING_TEST_CUDA") and torch.cuda.is_available() else "cpu")


def _adversarial(n, c, h, w, bias, dtype):
    """Random activations with exact zeros of ``x + bias`` and values one ulp around them."""
    x = torch.randn(n, c, h, w, dtype=torch.float64).to(dtype)
    x[x.abs() < 0.2] = 0  # zeros of x itself (sign 0 where bias is 0)
    if bias is not None:
        b = bias.reshape(1, c, 1, 1).to(dtype).expand(n, c, h, w)
        pick = torch.rand(n, c, h, w) < 0.25
        x[pick] = -b[pick]  # x + bias == 0 exactly
        up = torch.nextafter(-b, torch.full_like(b, math.inf))
        down = torch.nextafter(-b, torch.full_like(b, -math.inf))
        pick2 = (torch.rand(n, c, h, w) < 0.1) & ~pick
        pick3 = (torch.rand(n, c, h, w) < 0.1) & ~pick & ~pick2
        x[pick2] = up[pick2]
        x[pick3] = down[pick3]
    # -0.0 and the smallest subnormals of this dtype
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    flat = x.view(-1)
    flat[0::7] = -0.0
    flat[3::11] = tiny
    flat[5::13] = -tiny
    return x.to(DEVICE)


def test_pack_values_layout_and_roundtrip():
    # Layout: channel c -> bit c % 32 of word c // 32; plane 0 = (v < 0), plane 1 = (v != 0).
    v = torch.zeros(2, 70, dtype=torch.int8)
    v[0, 37] = -1  # word 1, bit 5
    v[1, 31] = 1  # word 0, bit 31 (the int32 sign bit)
    bits = pack_values(v)
    assert bits.shape == (2, 2, 3) and bits.dtype == torch.int32
    assert bits[0, SIGN].tolist() == [0, 1 << 5, 0]
    assert bits[0, NONZERO].tolist() == [0, 1 << 5, 0]
    assert bits[1, SIGN].tolist() == [0, 0, 0]
    assert bits[1, NONZERO].tolist() == [-(2**31), 0, 0]
    for c in (1, 31, 32, 33, 70):
        vals = torch.randint(-1, 2, (3, 4, c), dtype=torch.int8)
        packed = pack_values(vals)
        assert packed.shape == (3, 4, 2, words_for(c))
        assert torch.equal(unpack_values(packed, c), vals)
        # padding channels carry no bits in either plane
        pad = (packed.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        assert pad.reshape(3, 4, 2, -1)[..., c:].sum() == 0


@pytest.mark.parametrize("shape, dim", [((2, 70, 3, 5), 1), ((1, 33, 1, 1), 1), ((4, 3, 40), -1), ((5, 2, 7), 0)])
def test_pack_values_along_any_dimension(shape, dim):
    # Packing along ``dim`` equals moving it last and packing there; size-1 dimensions (the
    # ASPP's pooled 1x1 branch) and non-contiguous values included.
    v = torch.randint(-1, 2, shape).float()
    expected = pack_values(v.movedim(dim, -1).contiguous())
    assert torch.equal(pack_values(v, dim=dim), expected)
    strided = torch.randint(-1, 2, (*shape[:-1], 2 * shape[-1])).float()[..., ::2]
    assert not strided.is_contiguous()
    assert torch.equal(pack_values(strided, dim=dim), pack_values(strided.movedim(dim, -1).contiguous()))


def test_unpack_ignores_sign_without_nonzero():
    bits = torch.zeros(1, 2, 1, dtype=torch.int32)
    bits[0, SIGN, 0] = 0b11
    bits[0, NONZERO, 0] = 0b10
    assert unpack_values(bits, 3).tolist() == [[0, -1, 0]]


@pytest.mark.parametrize("c", [5, 32, 70])
def test_reference_pack_remembers_the_values_it_packed(c):
    # sign_pack_reference hands its int8 values to PackedActivation.unpack (the plain-PyTorch
    # convolutions then unpack nothing): they must be exactly what the bits unpack to, for
    # adversarial values (x == -bias, -0.0, subnormals, NaN counted 0), a strided input, and
    # batch > 1; a later write into the bits is seen (version counter), not the stale values.
    bias = torch.randn(c, dtype=torch.float64).float()
    bias[::3] = 0
    x = _adversarial(3, c, 5, 7, bias, torch.float32).cpu()
    x.view(-1)[2::17] = math.nan
    strided = torch.cat([x, x], dim=3)[..., ::2]
    for source in (x, strided):
        packed = sign_pack_reference(source, bias)
        assert "_values" in packed.__dict__
        from_bits = unpack_values(packed.bits, c, torch.int8).permute(0, 3, 1, 2)
        for dtype in (torch.float32, torch.float64, torch.int8):
            assert torch.equal(packed.unpack(dtype), from_bits.to(dtype))
        assert packed.unpack().is_contiguous()
        assert torch.equal(packed.unpack(), PackedActivation(packed.bits.clone(), c).unpack())
    packed = sign_pack_reference(x, bias)
    packed.bits[..., NONZERO, :] = 0  # every value now 0
    assert packed.unpack().abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [5, 32, 70])
def test_sign_pack_matches_reference(c, dtype):
    bias = torch.randn(c, dtype=torch.float64).to(dtype)
    bias[::3] = 0  # channels where the zeros of x stay zeros
    x = _adversarial(2, c, 5, 7, bias, dtype)
    bias = bias.to(DEVICE)
    got = sign_pack(x, bias.reshape(1, c, 1, 1))
    ref = sign_pack_reference(x, bias.reshape(1, c, 1, 1))
    assert got.shape == (2, c, 5, 7)
    assert torch.equal(got.bits, ref.bits)
    # The reference is the model's math: torch.sign(x + bias), sign(0) == 0.
    expect = torch.sign(x + bias.reshape(1, c, 1, 1)).to(torch.float32)
    assert torch.equal(ref.unpack(), expect)
    assert (expect == 0).any() and (expect == 1).any() and (expect == -1).any()
    # and without a bias
    assert torch.equal(sign_pack(x).bits, sign_pack_reference(x).bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_values_pack_as_torch_sign(dtype):
    """NaN and inf + -inf (NaN) are 0 for torch.sign: the kernel, whose comparisons with -bias never
    form the sum, and the reference, which does, both pack them as 0 (they packed +1 / 0 before)."""
    inf, nan = math.inf, math.nan
    xs = [inf, -inf, nan, inf, -inf, nan, 1.0, -1.0, 0.0, inf, -inf, 2.0, nan, -0.0]
    bs = [-inf, inf, 0.0, 0.0, 0.0, inf, inf, -inf, nan, inf, -inf, nan, -inf, 0.0]
    c = len(xs)
    x = torch.tensor(xs, dtype=dtype).reshape(1, c, 1, 1).expand(2, c, 3, 2).contiguous().to(DEVICE)
    bias = torch.tensor(bs, dtype=dtype).to(DEVICE)
    expect = torch.sign(x + bias.reshape(1, c, 1, 1)).float()
    assert (expect == 0).sum() > 2 * 3 * 2 * 3  # the NaN cases are among the zeros
    ref = sign_pack_reference(x, bias)
    assert torch.equal(ref.unpack(), expect)
    assert torch.equal(PackedActivation(ref.bits.clone(), c).unpack(), expect)  # the bits, not the kept values
    assert torch.equal(sign_pack(x, bias).bits, ref.bits)
    assert torch.equal(sign_pack(x).bits, sign_pack_reference(x).bits)
    assert torch.equal(sign_pack_reference(x).unpack(), torch.sign(x).float())


def test_sign_pack_layouts_and_strides():
    c = 45
    base = torch.randn(3, 2 * c, 7, 6, device=DEVICE)
    base[base.abs() < 0.3] = 0
    bias = torch.randn(c, device=DEVICE)
    bias[0] = 0
    x = base[:, ::2, :, 1:]  # non-contiguous view (N, C, H, W) = (3, 45, 7, 5)
    ref = sign_pack_reference(x.contiguous(), bias)
    variants = {
        "strided view": (x, "NCHW"),
        "channels_last": (x.contiguous(memory_format=torch.channels_last), "NCHW"),
        "NHWC tensor": (x.permute(0, 2, 3, 1).contiguous(), "NHWC"),
        "NHWC view": (x.permute(0, 2, 3, 1), "NHWC"),
    }
    for name, (t, layout) in variants.items():
        assert torch.equal(sign_pack(t, bias, layout=layout).bits, ref.bits), name
        assert torch.equal(sign_pack_reference(t, bias, layout=layout).bits, ref.bits), name


def test_sign_pack_mixed_dtypes_are_exact():
    # float16 activations with a float32 bias: torch promotes to float32 before adding.
    c = 33
    bias = torch.randn(c)
    x = _adversarial(1, c, 3, 4, bias.to(torch.float16).to(torch.float32), torch.float16)
    bias = bias.to(DEVICE)
    assert torch.equal(sign_pack(x, bias).bits, sign_pack_reference(x, bias).bits)
    # float64 activations with a float32 bias
    x64 = _adversarial(1, c, 3, 4, bias.double().cpu(), torch.float64)
    assert torch.equal(sign_pack(x64, bias).bits, sign_pack_reference(x64, bias).bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("c", [5, 70])
def test_sign_pack_pair_equals_two_packs(c, dtype):
    # Two biases over one read of x (the decoder's 3x3 / 1x1 pair): each output is exactly
    # the single pack with its own bias, adversarial values (x == -bias, neighbours) for both.
    b1 = torch.randn(c, dtype=torch.float64).to(dtype)
    b1[::3] = 0
    b2 = torch.randn(c, dtype=torch.float64).to(dtype)
    x = _adversarial(2, c, 5, 7, b1, dtype)
    x2 = _adversarial(2, c, 5, 7, b2, dtype)
    x[:, :, :, 3:] = x2[:, :, :, 3:]  # half the pixels are adversarial for the second bias
    b1, b2 = b1.to(DEVICE), b2.to(DEVICE)
    first, second = sign_pack_pair(x, b1.reshape(1, c, 1, 1), b2)
    assert torch.equal(first.bits, sign_pack_reference(x, b1).bits)
    assert torch.equal(second.bits, sign_pack_reference(x, b2).bits)
    assert not torch.equal(first.bits, second.bits)
    # either bias may be absent
    for a, b in ((None, b2), (b1, None), (None, None)):
        got = sign_pack_pair(x, a, b)
        assert torch.equal(got[0].bits, sign_pack_reference(x, a).bits)
        assert torch.equal(got[1].bits, sign_pack_reference(x, b).bits)


def test_sign_pack_pair_strided_input_and_errors():
    base = torch.randn(3, 90, 7, 6, device=DEVICE)
    base[base.abs() < 0.3] = 0
    x = base[:, ::2, :, 1:]  # non-contiguous (3, 45, 7, 5)
    b1, b2 = torch.randn(45, device=DEVICE), torch.randn(45, device=DEVICE)
    nhwc = x.permute(0, 2, 3, 1)
    first, second = sign_pack_pair(nhwc, b1, b2, layout="NHWC")
    assert torch.equal(first.bits, sign_pack_reference(x.contiguous(), b1).bits)
    assert torch.equal(second.bits, sign_pack_reference(x.contiguous(), b2).bits)
    with pytest.raises(ValueError, match="bias2 must have 45 elements"):
        sign_pack_pair(x, b1, torch.randn(44, device=DEVICE))
    with pytest.raises(ValueError, match="x must be 4-D"):
        sign_pack_pair(x[0], b1, b2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("widths", [(20, 45, 3), (32, 1), (1, 1, 1), (64, 16, 3), (70,)])
def test_sign_pack_of_sources_equals_pack_of_their_concatenation(widths, dtype):
    # The decoder packs [upsampled, skip, source] without torch.cat: channel c of source i
    # lands on bit (offset_i + c) % 32 of word (offset_i + c) // 32, words shared across the
    # boundary (20 + 45 splits a word), bias values exact zeros of x + bias on both sides.
    c = sum(widths)
    b1 = torch.randn(c, dtype=torch.float64).to(dtype)
    b1[::3] = 0
    b2 = torch.randn(c, dtype=torch.float64).to(dtype)
    whole = _adversarial(2, c, 5, 7, b1, dtype)
    parts = list(whole.split(widths, dim=1))
    # non-contiguous sources: one channels_last, one a strided view of a bigger tensor
    parts[0] = parts[0].contiguous(memory_format=torch.channels_last)
    if len(parts) > 1:
        big = torch.zeros(2, 2 * widths[1], 5, 9, dtype=dtype, device=DEVICE)
        big[:, ::2, :, 1:8] = parts[1]
        parts[1] = big[:, ::2, :, 1:8]
    b1, b2 = b1.to(DEVICE), b2.to(DEVICE)
    ref1, ref2 = sign_pack_reference(whole, b1), sign_pack_reference(whole, b2)
    assert torch.equal(sign_pack(parts, b1).bits, ref1.bits)
    assert torch.equal(sign_pack(tuple(parts)).bits, sign_pack_reference(whole).bits)
    assert torch.equal(sign_pack_reference(parts, b1).bits, ref1.bits)
    first, second = sign_pack_pair(parts, b1, b2)
    assert first.channels == second.channels == c
    assert torch.equal(first.bits, ref1.bits) and torch.equal(second.bits, ref2.bits)
    # NHWC sources
    nhwc = [t.permute(0, 2, 3, 1) for t in parts]
    assert torch.equal(sign_pack(nhwc, b1, layout="NHWC").bits, ref1.bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_product_source_equals_packing_the_product(dtype):
    # The GRU's [x, reset * h]: the kernel multiplies as it reads; the product must round
    # as torch's does, so products that land exactly on -bias, next to it, or underflow to
    # 0 pack the same bits as sign(cat([x, r * h]) + bias).
    c0, c1, n, h, w = 20, 45, 2, 5, 7
    bias = torch.randn(c0 + c1, dtype=torch.float64).to(dtype)
    bias[::4] = 0
    x = _adversarial(n, c0, h, w, bias[:c0], dtype)
    target = _adversarial(n, c1, h, w, bias[c0:], dtype)  # values at / around -bias and 0
    r = torch.rand(n, c1, h, w, dtype=torch.float64).to(dtype).to(DEVICE)
    r[..., 0::3] = 1.0  # r * t == t exactly
    r[..., 1::3] = 0.5
    hid = target / r  # r * hid == target up to one rounding (exactly where r is 1 or 0.5)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    hid[:, :, 0, 0], r[:, :, 0, 0] = tiny, 0.25  # underflows to 0: sign 0, not +1
    hid[:, :, 0, 1], r[:, :, 0, 1] = -torch.finfo(dtype).smallest_normal, 0.5  # a subnormal product, not 0
    hid[:, :, 1, 1], r[:, :, 1, 1] = -0.0, 0.7
    gate, hid = r.clone(), hid.clone()
    want_values = torch.cat([x, gate * hid], dim=1)
    b = bias.to(DEVICE)
    assert (want_values + b.reshape(1, -1, 1, 1) == 0).any()  # the adversarial case is there
    got = sign_pack([x, Product(gate, hid)], b)
    assert torch.equal(got.bits, sign_pack_reference(want_values, b).bits)
    assert torch.equal(sign_pack_reference([x, Product(gate, hid)], b).bits, got.bits)
    first, second = sign_pack_pair([x, Product(gate, hid)], b, None)
    assert torch.equal(first.bits, got.bits)
    assert torch.equal(second.bits, sign_pack_reference(want_values).bits)
    # one source, a product of non-contiguous views; three sources with the product last
    big = torch.randn(n, 2 * c1, h, w, dtype=dtype, device=DEVICE)
    assert torch.equal(sign_pack(Product(big[:, ::2], big[:, 1::2]), b[c0:]).bits,
                       sign_pack_reference(big[:, ::2] * big[:, 1::2], b[c0:]).bits)
    three = sign_pack([x[:, :5], x[:, 5:], Product(gate, hid)], b)
    assert torch.equal(three.bits, got.bits)


def test_sign_pack_sources_errors():
    a, b = torch.randn(2, 5, 3, 4, device=DEVICE), torch.randn(2, 7, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"x\[1\] has \(N, H, W\)"):
        sign_pack([a, b[:, :, :2]])
    with pytest.raises(ValueError, match=r"x\[1\] has \(N, H, W\)"):
        sign_pack_pair([a, b[:1]], None, None)
    with pytest.raises(ValueError, match=r"x\[1\] is torch.float64"):
        sign_pack([a, b.double()])
    with pytest.raises(TypeError, match="1 to 3 tensors"):
        sign_pack([a, b, a, b])
    with pytest.raises(TypeError, match="1 to 3 tensors"):
        sign_pack([])
    with pytest.raises(ValueError, match="bias must have 12 elements"):
        sign_pack([a, b], torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match=r"x\[1\] must be 4-D"):
        sign_pack([a, b[0]])
    with pytest.raises(ValueError, match="only be the last source"):
        sign_pack([Product(a, a), b])
    with pytest.raises(ValueError, match="Product factors must have the same shape"):
        sign_pack([b, Product(a, a[:, :4])])
    with pytest.raises(ValueError, match="Product factors must have the same shape"):
        sign_pack([b, Product(a, a.double())])


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the fallback is for devices where Triton cannot run")
def test_sign_pack_fallback_without_triton(monkeypatch):
    # On a CPU tensor without the interpreter the reference runs instead.
    monkeypatch.setattr(_common, "interpreting", lambda: False)  # as without TRITON_INTERPRET
    x = torch.randn(1, 40, 2, 3)
    assert torch.equal(sign_pack(x).bits, sign_pack_reference(x).bits)
    parts = [torch.randn(1, 3, 2, 3), x]
    assert torch.equal(sign_pack(parts).bits, sign_pack_reference(torch.cat(parts, dim=1)).bits)
    # the pair: the concatenation (with a gated last source) built once, packed with each bias
    g, h = torch.rand(1, 5, 2, 3), torch.randn(1, 5, 2, 3)
    whole = torch.cat([parts[0], x, g * h], dim=1)
    b1, b2 = torch.randn(48), torch.randn(48)
    first, second = sign_pack_pair([parts[0], x, Product(h, g)], b1, b2)
    assert torch.equal(first.bits, sign_pack_reference(whole, b1).bits)
    assert torch.equal(second.bits, sign_pack_reference(whole, b2).bits)


def test_sign_pack_bad_arguments():
    x = torch.randn(1, 8, 2, 2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        sign_pack(torch.randn(8, 2, 2))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        sign_pack(torch.ones(1, 8, 2, 2, dtype=torch.int32))
    with pytest.raises(TypeError, match=r"x\[0\] must be a torch.Tensor"):
        sign_pack([1.0, 2.0])
    with pytest.raises(TypeError, match="x must be a tensor or a list"):
        sign_pack("x")
    with pytest.raises(ValueError, match="bias must have 8 elements"):
        sign_pack(x, torch.zeros(7))
    with pytest.raises(ValueError, match="layout must be"):
        sign_pack(x, layout="CHW")
    for pack in (sign_pack, sign_pack_reference):  # the reference runs where Triton cannot
        with pytest.raises(ValueError, match="x must have at least one channel"):
            pack(torch.randn(1, 0, 2, 2))
    with pytest.raises(ValueError, match="bits must be an int32"):
        PackedActivation(torch.zeros(1, 2, 2, 2, 1), 8)
    with pytest.raises(ValueError, match="words per plane"):
        PackedActivation(torch.zeros(1, 2, 2, 2, 2, dtype=torch.int32), 8)
