"""swap_modules / binarize_: existing RVM-style code onto bimatting_triton's modules.

The "published-style" modules below are written here from the published BiMatting
code's *shape* (a Conv2d subclass with ``channel_threshold`` and the clamp STE trick, a
sign activation module, a learnable-bias module); they are not copies of it.
"""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bimatting_triton import BiMatting
from bimatting_triton.nn import BiConv2d, BinaryActivation, LearnableBias
from bimatting_triton.swap import SignInputBiConv2d, binarize_, swap_modules

# Outputs after a swap equal the original's up to the rounding of the published STE
# trick ``a.detach() - b.detach() + b``, which is not exactly ``a`` in floating point
# (one ulp per binary layer): 1e-5 absolute is orders of magnitude above that and far
# below any real difference (a flipped sign changes outputs by ~alpha ~ 0.1).
ATOL = 1e-5


class PublishedStyleBinaryConv(nn.Conv2d):
    def __init__(self, cin, cout, k, stride=1, bias=False):
        super().__init__(cin, cout, k, stride=stride, padding=k // 2, bias=bias)
        self.channel_threshold = nn.Parameter(torch.zeros(1, cin, 1, 1))

    def forward(self, x):
        centred = self.weight - self.weight.mean(dim=[1, 2, 3], keepdim=True)
        scale = centred.abs().mean(dim=[1, 2, 3], keepdim=True).detach()
        clipped = centred.clamp(-1.0, 1.0)
        w = scale * centred.sign().detach() - clipped.detach() + clipped
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class PublishedStyleBinaryActivation(nn.Module):
    def forward(self, x):
        clipped = x.clamp(-1.0, 1.0)
        return x.sign().detach() - clipped.detach() + clipped


class PublishedStyleBias(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        return x + self.bias.expand_as(x)


class TinyRVMStyle(nn.Module):
    """Float stem, two binary units (3x3 stride 2 and 1x1 with bias), a float head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(
            PublishedStyleBias(8), PublishedStyleBinaryActivation(), PublishedStyleBinaryConv(8, 16, 3, stride=2),
            nn.BatchNorm2d(16), PublishedStyleBias(16), nn.PReLU(16),
            PublishedStyleBias(16), PublishedStyleBinaryActivation(), PublishedStyleBinaryConv(16, 16, 1, bias=True),
        )
        self.project_mat = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.project_mat(self.block(self.stem(x)))


def randomised(model):
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


def test_swap_replaces_by_structure_and_keeps_state_dict():
    original = randomised(TinyRVMStyle())
    before = {k: v.clone() for k, v in original.state_dict().items()}
    report = swap_modules(original, inplace=False)
    swapped = report.model
    assert report.counts() == {"BiConv2d": 2, "BinaryActivation": 2, "LearnableBias": 3}
    assert "block.2: PublishedStyleBinaryConv -> BiConv2d" in str(report)
    assert isinstance(swapped.block[2], BiConv2d) and isinstance(swapped.block[1], BinaryActivation)
    assert isinstance(swapped.block[0], LearnableBias)
    assert type(swapped.stem) is nn.Conv2d and type(swapped.project_mat) is nn.Conv2d
    state = swapped.state_dict()
    assert list(state) == list(before)
    assert all(torch.equal(state[k], before[k]) for k in before)
    assert isinstance(original.block[2], PublishedStyleBinaryConv), "inplace=False must not touch the input"


@pytest.mark.parametrize("train", [False, True])
def test_swapped_model_gives_same_outputs_and_gradients(train):
    original = randomised(TinyRVMStyle()).train(train)
    swapped = swap_modules(copy.deepcopy(original)).model
    x = torch.rand(2, 3, 11, 13)
    out_a, out_b = original(x), swapped(x)
    assert torch.allclose(out_a, out_b, rtol=0, atol=ATOL)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, pa), pb in zip(original.named_parameters(), swapped.parameters()):
        if pa.grad is None:
            assert pb.grad is None, name
            continue
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name


def test_swap_shares_parameters_so_an_existing_optimizer_keeps_training():
    model = randomised(TinyRVMStyle())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    weight = model.block[2].weight
    swap_modules(model)
    assert model.block[2].weight is weight
    model(torch.rand(1, 3, 8, 8)).mean().backward()
    optimizer.step()
    assert weight.grad is not None


def test_swap_filter_and_nothing_to_swap():
    report = swap_modules(randomised(TinyRVMStyle()), filter_fn=lambda m, name: not name.startswith("block.2"))
    assert all(not name.startswith("block.2") for name, _, _ in report.swapped)
    assert str(swap_modules(nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU()))) == "no module swapped"
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        swap_modules("not a model")


def test_swap_leaves_lookalikes_alone():
    class SignButScaled(nn.Module):  # named like a sign, but is not one
        def forward(self, x):
            return 2 * torch.sign(x)

    class BiasNotAdded(nn.Module):  # a lone (1, C, 1, 1) bias that is multiplied
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.full((1, 4, 1, 1), 2.0))

        def forward(self, x):
            return x * self.bias

    report = swap_modules(nn.Sequential(SignButScaled(), BiasNotAdded()))
    assert len(report) == 0


class TinyFloatRVM(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1))
        self.project_mat = nn.Conv2d(16, 4, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        f = self.backbone(x)
        return self.project_mat(f) + self.head(f)


def test_swap_leaves_a_sign_with_state_or_another_training_forward_alone():
    class ThresholdSign(nn.Module):  # a sign of x - threshold: BinaryActivation has no threshold
        def __init__(self):
            super().__init__()
            self.register_buffer("threshold", torch.zeros(()))

        def forward(self, x):
            return PublishedStyleBinaryActivation()(x - self.threshold)

    class TrainingDiffersSign(nn.Module):  # sign in eval, a +-1 step (no zeros) in training
        def forward(self, x):
            out = PublishedStyleBinaryActivation()(x)
            return out if not self.training else torch.where(x >= 0, 1.0, -1.0) + (out - out.detach())

    model = nn.Sequential(ThresholdSign(), TrainingDiffersSign()).eval()
    report = swap_modules(model)
    assert len(report) == 0 and list(model.state_dict()) == ["0.threshold"]
    assert [type(m) for m in model] == [ThresholdSign, TrainingDiffersSign]


def test_a_module_used_under_two_names_is_swapped_or_kept_under_both():
    shared_sign, shared_conv = PublishedStyleBinaryActivation(), nn.Conv2d(8, 8, 3, padding=1)
    model = nn.ModuleDict({"s1": shared_sign, "s2": shared_sign, "c1": shared_conv, "c2": shared_conv})
    report = swap_modules(model)
    assert isinstance(model["s1"], BinaryActivation) and model["s2"] is model["s1"]
    assert [name for name, _, _ in report.swapped] == ["s1", "s2"]
    binarize_(model, filter_fn=lambda m, name: True)
    assert isinstance(model["c1"], SignInputBiConv2d) and model["c2"] is model["c1"]
    vetoed = nn.ModuleDict({"first": shared_conv, "second": shared_conv})
    binarize_(vetoed, filter_fn=lambda m, name: name != "first")  # decided at the first name, for both
    assert vetoed["first"] is shared_conv and vetoed["second"] is shared_conv


def test_binarize_turns_inner_convs_binary():
    model = randomised(TinyFloatRVM())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = binarize_(model)
    assert [name for name, _, _ in report.swapped] == ["backbone.2", "backbone.3"]
    assert type(model.backbone[0]) is nn.Conv2d and type(model.project_mat) is nn.Conv2d
    assert isinstance(model.backbone[2], SignInputBiConv2d) and model.backbone[2].groups == 8
    for name, value in weights.items():  # latent weights are the original float weights
        assert torch.equal(model.get_parameter(name), value)
    x = torch.rand(2, 3, 9, 9)
    conv = model.backbone[3]
    feature = model.backbone[:3](x)
    assert torch.equal(conv(feature), F.conv2d(torch.sign(feature), conv.binary_weight(), conv.bias))
    loss = model(x).mean()
    loss.backward()
    assert model.backbone[2].weight.grad is not None


def test_bimatting_is_a_drop_in_for_rvm_calls():
    """RVM's inference loop passes states and the ratio positionally."""
    model = BiMatting().eval()
    src = torch.rand(1, 2, 3, 32, 32)
    rec = [None] * 4
    with torch.no_grad():
        fgr, pha, *rec = model(src, *rec, 0.5)
        fgr2, pha2, *rec2 = model(src, *rec, 0.5)
        seg = model(src, segmentation_pass=True)[0]
    assert fgr2.shape == src.shape and pha2.shape == (1, 2, 1, 32, 32) and seg.shape == (1, 2, 1, 32, 32)


def test_convert_after_swap_gives_the_fused_model():
    """Issue 10 item 3: swapped code converts like our own BiMatting (same outputs).

    Tolerance: the fused path folds alpha and BatchNorm into one scale/shift per channel,
    which rounds differently from the float-simulated path by a few float32 ulps.
    """
    from bimatting_triton import convert
    from bimatting_triton.fuse import BinaryConvUnit

    model = swap_modules(randomised(TinyRVMStyle())).model.eval()
    fused = convert(model)
    assert not any(isinstance(m, BiConv2d) for m in fused.modules())
    assert sum(isinstance(m, BinaryConvUnit) for m in fused.modules()) == 2
    x = torch.rand(2, 3, 9, 11)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), rtol=0, atol=ATOL)


def test_convert_after_binarize():
    from bimatting_triton import convert
    from bimatting_triton.fuse_generic import PackedBiConv2d

    model = randomised(TinyFloatRVM())
    binarize_(model)
    model.eval()
    # backbone.2 is depthwise (groups=8): the packed kernel has no groups, so it stays in plain
    # PyTorch with a warning; backbone.3 is a plain 1x1 binary conv on the packed path.
    # (A Sequential without a LB -> sign -> conv unit keeps its modules, so the names are the user's.)
    with pytest.warns(UserWarning, match=r"\['backbone.2'\] are grouped"):
        fused = convert(model)
    assert isinstance(fused.backbone[3], PackedBiConv2d)
    assert isinstance(fused.backbone[2], SignInputBiConv2d)
    x = torch.rand(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), rtol=0, atol=ATOL)


# --- behaviour probes: look-alikes that would change the numbers are not swapped -------------


class FloatConvWithThreshold(nn.Conv2d):
    """Carries a (1, Cin, 1, 1) ``channel_threshold`` but is a float conv (uses it as an input shift)."""

    def __init__(self, cin, cout, k, threshold=0.0):
        super().__init__(cin, cout, k, padding=k // 2)
        self.channel_threshold = nn.Parameter(torch.full((1, cin, 1, 1), threshold))

    def forward(self, x):
        return super().forward(x - self.channel_threshold)


class ReActNetBinaryActivation(nn.Module):
    """sign forward, ReActNet / Bi-Real ApproxSign STE (gradient 2 + 2x on [-1, 0), 2 - 2x on [0, 1))."""

    def forward(self, x):
        m1, m2, m3 = (x < -1).float(), (x < 0).float(), (x < 1).float()
        o1 = -1 * m1 + (x * x + 2 * x) * (1 - m1)
        o2 = o1 * m2 + (-x * x + 2 * x) * (1 - m2)
        o3 = o2 * m3 + 1 * (1 - m3)
        return torch.sign(x).detach() - o3.detach() + o3


class UnclampedBinaryConv(PublishedStyleBinaryConv):
    """Same forward as the published conv, identity STE instead of the clamp one."""

    def forward(self, x):
        centred = self.weight - self.weight.mean(dim=[1, 2, 3], keepdim=True)
        scale = centred.abs().mean(dim=[1, 2, 3], keepdim=True).detach()
        w = scale * centred.sign().detach() - centred.detach() + centred
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("threshold", [0.1, 0.0])
def test_swap_skips_a_float_conv_that_carries_channel_threshold(threshold):
    # threshold 0.0 (a fresh init) gives the float output on the real parameters too:
    # the probe uses its own nonzero parameters, so it still sees the conv is not binary.
    torch.manual_seed(0)
    model = nn.Sequential(FloatConvWithThreshold(4, 4, 3, threshold))
    x = torch.randn(1, 4, 8, 8)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"left 1 look-alike.*0 \(FloatConvWithThreshold\): forward"):
        report = swap_modules(model)
    assert type(model[0]) is FloatConvWithThreshold and len(report) == 0
    assert [(n, c) for n, c, _ in report.skipped] == [("0", "FloatConvWithThreshold")]
    assert "differs from BiConv2d's" in report.skipped[0][2]
    assert "skipped 1 look-alike modules:\n  0: FloatConvWithThreshold (forward" in str(report)
    assert torch.equal(model(x), expected)


def test_swap_skips_a_sign_with_another_straight_through_estimator():
    model = nn.Sequential(ReActNetBinaryActivation())
    x = torch.tensor([-0.5, 0.25, 0.9], requires_grad=True)
    (expected,) = torch.autograd.grad(model(x).sum(), x)  # [1.0, 1.5, 0.2]
    with pytest.warns(UserWarning, match="ReActNetBinaryActivation"):
        report = swap_modules(model)
    assert type(model[0]) is ReActNetBinaryActivation and len(report) == 0
    assert "gradient is not the hardtanh STE" in report.skipped[0][2]
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert torch.equal(grad, expected)
    # forward-only matching (inference before convert) swaps it on request
    report = swap_modules(model, check_gradients=False)
    assert report.counts() == {"BinaryActivation": 1} and not report.skipped


def test_swap_skips_a_binary_conv_with_another_weight_gradient():
    model = randomised(nn.Sequential(UnclampedBinaryConv(4, 8, 3)))
    with pytest.warns(UserWarning, match="gradient of weight"):
        report = swap_modules(model)
    assert type(model[0]) is UnclampedBinaryConv and report.skipped[0][:2] == ("0", "UnclampedBinaryConv")
    assert swap_modules(model, check_gradients=False).counts() == {"BiConv2d": 1}


class PublishedStyleGeneralConv(nn.Conv2d):
    """The published conv's forward, passing dilation and groups on."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channel_threshold = nn.Parameter(torch.zeros(1, self.in_channels, 1, 1))

    def forward(self, x):
        centred = self.weight - self.weight.mean(dim=[1, 2, 3], keepdim=True)
        scale = centred.abs().mean(dim=[1, 2, 3], keepdim=True).detach()
        clipped = centred.clamp(-1.0, 1.0)
        w = scale * centred.sign().detach() - clipped.detach() + clipped
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class HardtanhBinaryActivation(nn.Module):  # the same STE written with hardtanh
    def forward(self, x):
        return torch.sign(x).detach() - F.hardtanh(x).detach() + F.hardtanh(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_swap_still_swaps_genuine_published_style_modules_and_probes_without_side_effects(dtype):
    conv = PublishedStyleGeneralConv(8, 16, 3, stride=2, padding=2, dilation=2, groups=2, bias=True)
    model = randomised(nn.Sequential(PublishedStyleBias(8), HardtanhBinaryActivation(), conv,
                                     PublishedStyleBinaryActivation(), PublishedStyleBinaryConv(16, 16, 1)))
    model = model.to(dtype).train()
    model[4].eval()
    reference = copy.deepcopy(model)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped, nothing warned
        report = swap_modules(model)
    assert report.counts() == {"BiConv2d": 2, "BinaryActivation": 2, "LearnableBias": 1} and not report.skipped
    assert torch.equal(torch.get_rng_state(), rng), "probing must not consume the global RNG"
    assert all(p.grad is None for p in model.parameters()), "probing must not touch .grad"
    assert [m.training for m in model] == [True, True, True, True, False]
    assert model[2].weight is conv.weight and model[2].dilation == (2, 2) and model[2].groups == 2
    x = torch.randn(2, 8, 13, 11, dtype=dtype)
    out_a, out_b = reference(x), model(x)
    assert torch.allclose(out_a, out_b, rtol=0, atol=ATOL)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for (name, pa), pb in zip(reference.named_parameters(), model.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name


def test_swap_works_in_inference_mode_on_meta_and_without_firing_hooks():
    """Three ways a caller's context reached the probes: inside inference_mode (autograd off:
    every candidate was skipped), a model built on the meta device to be loaded later (the
    probe failed on .item()), and forward hooks (they saw the random probe data)."""
    calls = []
    model = TinyRVMStyle()
    model.block[2].register_forward_hook(lambda mod, args, out: calls.append(tuple(out.shape)))
    with torch.inference_mode():
        report = swap_modules(model, inplace=False)
    assert report.counts() == {"BiConv2d": 2, "BinaryActivation": 2, "LearnableBias": 3} and not report.skipped
    assert calls == []
    with torch.device("meta"):
        on_meta = TinyRVMStyle()
    report = swap_modules(on_meta)
    assert report.counts() == {"BiConv2d": 2, "BinaryActivation": 2, "LearnableBias": 3} and not report.skipped
    assert on_meta.block[2].weight.is_meta
