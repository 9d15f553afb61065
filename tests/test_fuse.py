"""``bimatting_triton.fuse.convert``: the converted model reproduces the plain model.

The golden data (SPEC §2) is checked in float64 to the golden tolerance (1e-6): with
the Triton kernels (the interpreter on CPU) on the downsample_ratio 0.5 case, which
runs every kind of binary layer including the refiner's chained units, and with the
plain-PyTorch reference backend on every case (same packed weights and folded
epilogues; this checks the wiring quickly). In float64 the fused model differs from
the reference network only by rounding (folded BatchNorm, exact integer sums): ~1e-15.
"""
import copy
import os

import pytest
import torch

from bimatting_triton import BiMatting
from bimatting_triton.fuse import BinaryConvUnit, FusedBackbone, FusedSequential, convert
from bimatting_triton.kernels.binary_conv import binary_conv2d
from bimatting_triton.nn import BiConv2d, BinaryActivation, LearnableBias

ATOL = 1e-6
# With BIMATTING_TEST_CUDA=1 (tests/conftest.py) the kernels run compiled on the GPU.
DEVICE = torch.device("cuda" if os.environ.get("BIMATTING_TEST_CUDA") and torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def model(golden_model):
    return copy.deepcopy(golden_model).to(DEVICE)


@pytest.fixture(scope="module")
def fused(model):
    return convert(model)


def assert_close(actual, expected, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.cpu() - expected.cpu()).abs().max().item()
    assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL}"


def check_case(fused, golden, case):
    ratio = case["downsample_ratio"]
    src = golden["src"].double().to(DEVICE)
    fgr, pha, *rec, _fgr_s, pha_s = fused(src, downsample_ratio=ratio, return_coarse=True)
    assert_close(fgr, case["fgr"], "fgr")
    assert_close(pha, case["pha"], "pha")
    assert_close(pha_s, case["pha_s"], "pha_s")
    for i, (r, expected) in enumerate(zip(rec, case["rec"]), start=1):
        assert_close(r, expected, f"r{i}")
    fgr, pha, *rec = fused(golden["src_next"].double().to(DEVICE), *rec, downsample_ratio=ratio)
    assert_close(fgr, case["fgr_next"], "fgr_next")
    assert_close(pha, case["pha_next"], "pha_next")
    for i, (r, expected) in enumerate(zip(rec, case["rec_next"]), start=1):
        assert_close(r, expected, f"r{i}_next")


def test_golden_with_kernels(golden, fused):
    check_case(fused, golden, golden["cases"][1])  # downsample_ratio 0.5: with the refiner


def test_golden_with_reference_backend(golden, model):
    # downsample_ratio 1.0 (0.5 runs with the kernels above); convert does not touch
    # the segmentation head, so the seg pass adds nothing here.
    check_case(convert(model, backend="reference"), golden, golden["cases"][0])


def test_single_frame_batch_matches_plain_model(model, fused):
    # 4-D input, batch 2 (folded into N), a size that is no multiple of 16.
    src = torch.rand(2, 3, 40, 56, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        want = model(src)
    got = fused(src)
    for name, a, b in zip(["fgr", "pha", "r1", "r2", "r3", "r4"], got, want):
        assert_close(a, b, name)


def test_batch_and_time_stream_matches_plain_model(model, fused):
    """B = 2 and T = 2 at once through the kernels (B x T folded into N, the GRUs stepping over T,
    the sparse units), at a ratio that runs the refiner, then a second call carrying the states."""
    src = torch.rand(2, 4, 3, 24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    with torch.no_grad():
        want = model(src[:, :2], downsample_ratio=0.5)
        want_next = model(src[:, 2:], *want[2:], downsample_ratio=0.5)
    got = fused(src[:, :2], downsample_ratio=0.5)
    got_next = fused(src[:, 2:], *got[2:], downsample_ratio=0.5)
    for (name, a, b) in zip(["fgr", "pha", "r1", "r2", "r3", "r4"] * 2, [*got, *got_next], [*want, *want_next]):
        assert_close(a, b, name)


def test_convert_structure(model, fused):
    assert fused is not model and not fused.training
    assert isinstance(fused.backbone, FusedBackbone)
    assert isinstance(fused.refiner.conv, FusedSequential)
    assert not any(isinstance(m, BiConv2d) for m in fused.modules())
    assert any(isinstance(m, BiConv2d) for m in model.modules())  # the original is untouched
    units = [m for m in fused.modules() if isinstance(m, BinaryConvUnit)]
    assert units and all(u.bits.dtype == torch.int32 for u in units)
    # The dense block 17 (256 -> 1024) is one stacked 1x1 conv: 4 branches of 256.
    assert fused.backbone.blocks[16].pointwise.out_channels == 1024
    # The refiner's two binary units are chained: the second gets packed bits.
    ops = list(fused.refiner.conv.ops)
    assert isinstance(ops[0], BinaryConvUnit) and isinstance(ops[1], BinaryConvUnit)


def test_convert_gives_lone_binary_convs_the_generic_packed_path():
    from bimatting_triton.fuse_generic import PackedBiConv2d

    lonely = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), BinaryActivation(), BiConv2d(8, 8, 3))
    fused = convert(torch.nn.ModuleDict({"head": lonely}))
    assert not any(isinstance(m, BiConv2d) for m in fused.modules())
    assert isinstance(fused["head"][2], PackedBiConv2d)  # (a Sequential without a unit keeps its names)
    x = torch.randn(2, 3, 7, 9)
    with torch.no_grad():
        assert torch.allclose(fused["head"](x), lonely(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="backend must be one of"):
        convert(torch.nn.Sequential(LearnableBias(4), BinaryActivation(), BiConv2d(4, 4, 1)), backend="cuda")


@pytest.mark.parametrize(
    "conv_kwargs",
    [dict(dilation=2, padding=2), dict(groups=2, padding=1), dict(stride=(1, 2), padding=1), dict(padding=(1, 0))],
    ids=["dilated", "grouped", "stride_1x2", "padding_1x0"],
)
def test_units_the_kernel_cannot_compute_stay_plain(conv_kwargs):
    """LB -> sign -> BiConv2d with a geometry the packed kernel lacks: fusing it gave wrong shapes
    or values silently; now it stays plain PyTorch (same outputs), and convert() says so."""
    torch.manual_seed(0)
    seq = torch.nn.Sequential(LearnableBias(8), BinaryActivation(), BiConv2d(8, 8, 3, **conv_kwargs),
                              torch.nn.BatchNorm2d(8)).eval().double()
    with torch.no_grad():
        seq[0].bias.normal_()
    with pytest.warns(UserWarning, match="grouped, dilated or have a non-square"):
        fused = convert(torch.nn.ModuleDict({"block": seq}))
    assert not any(isinstance(m, BinaryConvUnit) for m in fused.modules())
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused["block"](x), seq(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="grouped, dilated or has a non-square"):
        BinaryConvUnit([seq[2]], in_bias=seq[0])


def test_packed_weight_is_built_once_and_follows_the_buffers():
    # BinaryConvUnit.packed_weight() is asked at every launch: reused while the buffers are
    # the same tensors, rebuilt when .to() replaces them (a stale cache would keep old dtypes).
    torch.manual_seed(0)
    fused = convert(BiMatting().eval())
    unit = fused.decoder.decode3.conv
    first = unit.packed_weight()
    assert unit.packed_weight() is first
    fused.double()
    second = unit.packed_weight()
    assert second is not first and second.alpha.dtype == torch.float64 and second.bits is unit.bits
    unit.alpha = unit.alpha * 2  # a new buffer tensor
    assert torch.equal(unit.packed_weight().alpha, second.alpha * 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model(golden, model, dtype):
    # A half-precision model keeps half activations and outputs, with its epilogues in
    # float32. Binary layers amplify rounding (a value within rounding of 0 before a sign
    # flips it), so half precision is compared with the golden float64 outputs as the
    # plain half model is: the fused one must be about as accurate, and equal to the
    # reference backend in the same dtype (the same math, densely, in plain PyTorch).
    case = golden["cases"][1]
    ratio = case["downsample_ratio"]
    src = golden["src"].to(DEVICE, dtype)
    plain = copy.deepcopy(model).to(dtype)
    with torch.no_grad():
        want = plain(src, downsample_ratio=ratio)
    # converted in half precision, or converted first and then cast (weights binarized in
    # float64: a different, equally valid rounding of the same network; the reference
    # backend, which takes the same vectors and dtypes, keeps the interpreter's time down)
    outputs = {}
    ways = (("convert(half)", convert(plain)), ("convert().to(half)", convert(model, backend="reference").to(dtype)))
    for way, fused in ways:
        got = outputs[way] = fused(src, downsample_ratio=ratio)
        assert all(t.dtype == dtype for t in got), way
        for i, name in enumerate(["fgr", "pha"]):
            golden_out = case[name].to(DEVICE)
            err_fused = (got[i].double() - golden_out).abs().mean().item()
            err_plain = (want[i].double() - golden_out).abs().mean().item()
            assert err_fused <= 1.5 * err_plain + 1e-3, f"{way} {name}: fused {err_fused:.3g} vs plain {err_plain:.3g}"
    ref = convert(plain, backend="reference")(src, downsample_ratio=ratio)
    for name, a, b in zip(["fgr", "pha", "r1", "r2", "r3", "r4"], outputs["convert(half)"], ref):
        diff = (a.double() - b.double()).abs()
        assert diff.mean().item() <= 1e-3 and (diff > 1e-2).double().mean().item() <= 0.01, name


def test_half_unit_computes_its_epilogue_in_float32():
    # One unit (3x3, BN, LearnableBias, PReLU) in float32 and in float16, same packed input:
    # the integer sums are exact, the epilogue runs in float32 in both, so the half unit's
    # output is the float32 one rounded to half (plus the half rounding of its folded
    # vectors): within a few half ulps. Its float32 vectors are made once and reused.
    torch.manual_seed(0)
    conv = BiConv2d(40, 24, 3, padding=1)
    bn = torch.nn.BatchNorm2d(24).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    unit32 = BinaryConvUnit([conv], [bn], LearnableBias(40), LearnableBias(24), torch.nn.PReLU(24)).to(DEVICE)
    unit16 = copy.deepcopy(unit32).half()
    x = torch.randn(2, 40, 9, 11, device=DEVICE)
    packed = unit32.pack(x)
    y32 = unit32.run(packed).y
    y16 = unit16.run(packed).y
    assert y32.dtype == torch.float32 and y16.dtype == torch.float16
    assert unit16.epilogue().scale.dtype == torch.float32
    assert unit16.epilogue().scale is unit16.epilogue().scale  # the copy is cached
    tol = 4 * torch.finfo(torch.float16).eps * (y32.abs() + 1)
    assert bool(((y16.float() - y32).abs() <= tol).all())
    unit16.scale = unit16.scale * 2  # a new buffer: a new float32 copy
    assert torch.equal(unit16.epilogue().scale, (unit16.scale).float())
    unit16.load_state_dict(unit32.half().state_dict())  # in place: the copies follow
    assert torch.equal(unit16.epilogue().scale, unit32.scale.float())
    assert torch.equal(unit16.epilogue().shift, unit32.shift.float())


def test_epilogue_plan_is_built_once_and_follows_the_buffers():
    # BinaryConvUnit.run launches with an EpiloguePlan (vectors checked once) cached per
    # option set: reused while the buffers are the same tensors, rebuilt when they are
    # replaced; where the plan holds copies (a single PReLU slope expanded to Cout, float32
    # copies of half buffers) also when they are written in place (load_state_dict).
    torch.manual_seed(0)
    conv = BiConv2d(40, 24, 3, padding=1)
    prelu = torch.nn.PReLU()  # one slope: the plan expands it
    unit = BinaryConvUnit([conv], [None], LearnableBias(40), None, prelu).to(DEVICE)
    x = torch.randn(2, 40, 9, 11, device=DEVICE)
    packed = unit.pack(x)

    def fresh_run(u):  # the unit's epilogue built now, without a plan
        return binary_conv2d(packed, u.packed_weight(), u.epilogue()).y

    plan = unit.epilogue_plan()
    assert unit.epilogue_plan() is plan and unit.epilogue_plan(pack_next=True) is not plan
    y = unit.run(packed).y
    assert unit.epilogue_plan() is plan and torch.equal(y, fresh_run(unit))
    with torch.no_grad():
        unit.slope.fill_(-0.75)  # in place: the expanded copy must follow
    assert unit.epilogue_plan() is not plan
    assert torch.equal(unit.run(packed).y, fresh_run(unit)) and not torch.equal(unit.run(packed).y, y)
    unit.shift = unit.shift + 1  # a new buffer
    assert torch.equal(unit.run(packed).y, fresh_run(unit))
    unit.double()
    assert unit.epilogue_plan().checked.scale.dtype == torch.float64
    half = copy.deepcopy(unit).half()
    first = half.epilogue_plan()
    assert half.epilogue_plan() is first
    half.load_state_dict(unit.float().half().state_dict())  # in place, same values: rebuilt anyway
    assert half.epilogue_plan() is not first
    half.load_state_dict({k: v * 2 if k == "scale" else v for k, v in half.state_dict().items()})
    assert torch.equal(half.run(packed).y, fresh_run(half))


# ---------------------------------------------------------------- models convert does not know
def _unit(c=9, k=3, bn=None):
    """LB -> sign -> BiConv2d -> BN -> PReLU with random values (float64, eval)."""
    layers = [LearnableBias(c), BinaryActivation(), BiConv2d(c, c, k, padding=k // 2), bn or torch.nn.BatchNorm2d(c),
              torch.nn.PReLU(c)]
    return layers


def _randomised(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_var is not None:
                m.running_mean.normal_(generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return module.double().eval()


def _same_outputs(plain, fused, x):
    with torch.no_grad():
        torch.testing.assert_close(fused(x), plain(x), rtol=0, atol=1e-12)


def test_sequential_subclass_with_its_own_forward_keeps_it():
    # A subclass of nn.Sequential may add a residual (or anything): replacing it by a
    # FusedSequential dropped that silently; its convs now take the generic packed path.
    class Residual(torch.nn.Sequential):
        def forward(self, x):
            return x + super().forward(x)

    plain = _randomised(Residual(*_unit()))
    plain.note = "kept"
    fused = convert(plain)
    assert type(fused) is Residual and fused.note == "kept"
    _same_outputs(plain, fused, torch.randn(2, 9, 6, 7, dtype=torch.float64))


def test_subclasses_with_their_own_forward_are_not_fused():
    class GainBiConv(BiConv2d):
        def forward(self, x):
            return super().forward(x) * 2

    seq = [LearnableBias(9), BinaryActivation(), GainBiConv(9, 9, 3, padding=1), torch.nn.BatchNorm2d(9)]
    plain = _randomised(torch.nn.ModuleDict({"a": torch.nn.Sequential(*seq), "b": GainBiConv(9, 9, 1)}))
    with pytest.warns(UserWarning, match=r"\['a.2', 'b'\] are subclasses of BiConv2d with a forward of their own"):
        fused = convert(plain)
    assert not any(isinstance(m, BinaryConvUnit) for m in fused.modules())
    x = torch.randn(2, 9, 6, 7, dtype=torch.float64)
    _same_outputs(plain["a"], fused["a"], x)
    _same_outputs(plain["b"], fused["b"], x)


def test_a_top_level_sequential_also_gets_its_nested_units_fused():
    from bimatting_triton.fuse_generic import PackedBiConv2d

    plain = _randomised(torch.nn.Sequential(*_unit(), torch.nn.Sequential(*_unit(k=1)), BinaryActivation(),
                                            BiConv2d(9, 9, 3, padding=1)))
    fused = convert(plain)
    assert isinstance(fused, FusedSequential) and isinstance(fused.ops[1], FusedSequential)
    assert isinstance(fused.ops[3], PackedBiConv2d)  # (was left a plain BiConv2d)
    _same_outputs(plain, fused, torch.randn(2, 9, 6, 7, dtype=torch.float64))


def test_batchnorm_without_running_statistics_stays_a_module():
    bn = torch.nn.BatchNorm2d(9, track_running_stats=False)
    plain = _randomised(torch.nn.Sequential(*_unit(bn=bn)))
    fused = convert(plain)  # (raised "batchnorm must track running statistics")
    assert isinstance(fused.ops[0], BinaryConvUnit) and fused.ops[1] is not bn and isinstance(fused.ops[1], torch.nn.BatchNorm2d)
    _same_outputs(plain, fused, torch.randn(2, 9, 6, 7, dtype=torch.float64))


def test_a_module_used_under_two_names_is_converted_under_both():
    from bimatting_triton.fuse_generic import PackedBiConv2d

    shared_unit = torch.nn.Sequential(*_unit())
    shared_conv = BiConv2d(9, 9, 3, padding=1)
    plain = _randomised(torch.nn.ModuleDict({"a": shared_unit, "b": shared_unit, "c": shared_conv, "d": shared_conv}))
    fused = convert(plain)
    assert isinstance(fused["a"], FusedSequential) and fused["b"] is fused["a"]
    assert isinstance(fused["c"], PackedBiConv2d) and fused["d"] is fused["c"]
