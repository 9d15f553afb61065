"""The float RVM MobileNetV3 baseline: RVM's state_dict layout and forward contract."""
import pytest
import torch
import torch.nn.functional as F

from bimatting_triton import CheckpointError
from bimatting_triton.baselines import RVMMobileNetV3

# MobileNetV3-Large as torchvision builds it and RVM configures it (RVM's
# model/mobilenetv3.py): (in, kernel, expanded, out, squeeze width or 0, stride).
# Squeeze widths are torchvision's _make_divisible(expanded // 4, 8), spelled out.
BLOCKS = [
    (16, 3, 16, 16, 0, 1), (16, 3, 64, 24, 0, 2), (24, 3, 72, 24, 0, 1),
    (24, 5, 72, 40, 24, 2), (40, 5, 120, 40, 32, 1), (40, 5, 120, 40, 32, 1),
    (40, 3, 240, 80, 0, 2), (80, 3, 200, 80, 0, 1), (80, 3, 184, 80, 0, 1),
    (80, 3, 184, 80, 0, 1), (80, 3, 480, 112, 120, 1), (112, 3, 672, 112, 168, 1),
    (112, 5, 672, 160, 168, 2), (160, 5, 960, 160, 240, 1), (160, 5, 960, 160, 240, 1),
]  # fmt: skip


def bn(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
            f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}  # fmt: skip


def conv_bn(prefix, cout, cin, k):
    return {f"{prefix}.0.weight": (cout, cin, k, k), **bn(f"{prefix}.1", cout)}


def expected_layout() -> dict:
    """Every state_dict key of RVM's MattingNetwork('mobilenetv3') with its shape."""
    e = conv_bn("backbone.features.0", 16, 3, 3)
    for i, (cin, k, exp, cout, sq, _) in enumerate(BLOCKS, start=1):
        p, j = f"backbone.features.{i}.block", 0
        if exp != cin:  # torchvision omits the 1x1 expansion when it would not widen
            e |= conv_bn(f"{p}.{j}", exp, cin, 1)
            j += 1
        e |= conv_bn(f"{p}.{j}", exp, 1, k)  # depthwise
        j += 1
        if sq:
            e |= {f"{p}.{j}.fc1.weight": (sq, exp, 1, 1), f"{p}.{j}.fc1.bias": (sq,),
                  f"{p}.{j}.fc2.weight": (exp, sq, 1, 1), f"{p}.{j}.fc2.bias": (exp,)}  # fmt: skip
            j += 1
        e |= conv_bn(f"{p}.{j}", cout, exp, 1)  # linear projection
    e |= conv_bn("backbone.features.16", 960, 160, 1)
    e |= conv_bn("aspp.aspp1", 128, 960, 1)
    e["aspp.aspp2.1.weight"] = (128, 960, 1, 1)
    for name, c in (("decode4", 64), ("decode3", 40), ("decode2", 20), ("decode1", 16)):
        g = f"decoder.{name}.gru"
        e |= {f"{g}.ih.0.weight": (2 * c, 2 * c, 3, 3), f"{g}.ih.0.bias": (2 * c,),
              f"{g}.hh.0.weight": (c, 2 * c, 3, 3), f"{g}.hh.0.bias": (c,)}  # fmt: skip
    e |= conv_bn("decoder.decode3.conv", 80, 128 + 40 + 3, 3)
    e |= conv_bn("decoder.decode2.conv", 40, 80 + 24 + 3, 3)
    e |= conv_bn("decoder.decode1.conv", 32, 40 + 16 + 3, 3)
    e |= conv_bn("decoder.decode0.conv", 16, 32 + 3, 3)
    e |= {"decoder.decode0.conv.3.weight": (16, 16, 3, 3), **bn("decoder.decode0.conv.4", 16)}
    e |= {"project_mat.conv.weight": (4, 16, 1, 1), "project_mat.conv.bias": (4,),
          "project_seg.conv.weight": (1, 16, 1, 1), "project_seg.conv.bias": (1,),
          "refiner.box_filter.weight": (4, 1, 3, 3)}  # fmt: skip
    e |= conv_bn("refiner.conv", 16, 24, 1)
    e |= {"refiner.conv.3.weight": (16, 16, 1, 1), **bn("refiner.conv.4", 16)}
    e |= {"refiner.conv.6.weight": (4, 16, 1, 1), "refiner.conv.6.bias": (4,)}
    return e


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1)
    m = RVMMobileNetV3()
    # Non-trivial BN statistics so that eval-mode outputs depend on every buffer.
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_state_dict_keys_and_shapes_match_rvm():
    state = RVMMobileNetV3().state_dict()
    expected = expected_layout()
    assert sorted(state) == sorted(expected)
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


def test_parameter_count_is_rvms_published_3_749m():
    expected = expected_layout()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    n_expected = sum(torch.Size(s).numel() for k, s in expected.items() if not k.endswith(buffers))
    n_model = sum(p.numel() for p in RVMMobileNetV3().parameters())
    assert n_model == n_expected
    assert round(n_model / 1e6, 3) == 3.749  # RVM paper: 3.749 M parameters for MobileNetV3


def test_checkpoint_round_trip_and_strict_loading(tmp_path, model):
    path = tmp_path / "rvm_mobilenetv3.pth"
    torch.save(model.state_dict(), path)
    loaded = RVMMobileNetV3.from_pretrained(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    broken = dict(model.state_dict())
    del broken["refiner.box_filter.weight"]
    torch.save(broken, path)
    with pytest.raises(CheckpointError, match="1 missing keys: refiner.box_filter.weight"):
        RVMMobileNetV3.from_pretrained(path)


def test_feature_pyramid_channels_and_strides(model):
    with torch.no_grad():
        f1, f2, f3, f4 = model.backbone(torch.rand(1, 3, 32, 48))
    assert [tuple(f.shape) for f in (f1, f2, f3, f4)] == [
        (1, 16, 16, 24), (1, 24, 8, 12), (1, 40, 4, 6), (1, 960, 2, 3)  # last stage dilated: still 1/16
    ]  # fmt: skip


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_forward_contract_5d(model, ratio):
    src = torch.rand(2, 2, 3, 64, 96) if ratio != 1 else torch.rand(2, 2, 3, 32, 48)
    with torch.no_grad():
        fgr, pha, *rec = model(src, downsample_ratio=ratio)
    h, w = 32, 48
    assert fgr.shape == src.shape and pha.shape == (*src.shape[:2], 1, *src.shape[-2:])
    assert [tuple(r.shape) for r in rec] == [
        (2, 16, h // 2, w // 2), (2, 20, h // 4, w // 4), (2, 40, h // 8, w // 8), (2, 64, h // 16, w // 16)
    ]
    assert fgr.min() >= 0 and fgr.max() <= 1 and pha.min() >= 0 and pha.max() <= 1
    with torch.no_grad():
        seg, *rec2 = model(src, *rec, downsample_ratio=ratio, segmentation_pass=True)
    assert seg.shape == (2, 2, 1, h, w) and [r.shape for r in rec2] == [r.shape for r in rec]


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_4d_input_is_the_single_frame_case(model, ratio):
    src = torch.rand(2, 1, 3, 32, 48)
    with torch.no_grad():
        out5 = model(src, downsample_ratio=ratio)
        out4 = model(src[:, 0], downsample_ratio=ratio)
    for a, b in zip(out5[:2], out4[:2]):
        assert a.shape[0] == 2 and a.ndim == 5 and b.ndim == 4
        torch.testing.assert_close(a[:, 0], b, atol=1e-5, rtol=1e-5)
    for a, b in zip(out5[2:], out4[2:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_recurrent_state_carries_over_frames(model):
    src = torch.rand(1, 3, 3, 32, 48)
    with torch.no_grad():
        fgr, pha, *rec = model(src)
        rec_step = [None] * 4
        phas = []
        for t in range(3):
            _, p, *rec_step = model(src[:, t], *rec_step)
            phas.append(p)
        # A different state gives a different result: the state is really used.
        _, p_fresh, *_ = model(src[:, 2])
    torch.testing.assert_close(torch.stack(phas, 1), pha, atol=1e-5, rtol=1e-5)
    for a, b in zip(rec_step, rec):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(p_fresh, phas[2], atol=1e-6)


def test_refiner_box_filter_is_a_3x3_mean_with_zero_padding():
    # With its initial 1/9 weights the box filter equals avg_pool2d(3, 1, 1) counting the padding.
    refiner = RVMMobileNetV3().refiner
    x = torch.rand(2, 4, 9, 13)
    with torch.no_grad():
        torch.testing.assert_close(refiner.box_filter(x), F.avg_pool2d(x, 3, 1, 1, count_include_pad=True))


def test_bad_arguments_are_named():
    m = RVMMobileNetV3()
    with pytest.raises(ValueError, match="src"):
        m(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="downsample_ratio"):
        m(torch.rand(1, 3, 32, 32), downsample_ratio=0)
    with pytest.raises(ValueError, match="refiner"):
        RVMMobileNetV3(refiner="fast_guided_filter")
