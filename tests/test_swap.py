"""swap_modules / binarize_: existing RVM-style code onto bimatting_triton's modules.

The "published-style" modules below are written here from the published BiMatting
code's *shape* (a Conv2d subclass with ``channel_threshold`` and the clamp STE trick, a
sign activation module, a learnable-bias module); they are not copies of it.
"""
import copy

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
    with pytest.warns(UserWarning, match=r"\['backbone.ops.2'\] are grouped"):
        fused = convert(model)
    assert isinstance(fused.backbone.ops[3], PackedBiConv2d)
    assert isinstance(fused.backbone.ops[2], SignInputBiConv2d)
    x = torch.rand(2, 3, 9, 9)
    with torch.no_grad():
        assert torch.allclose(fused(x), model(x), rtol=0, atol=ATOL)
