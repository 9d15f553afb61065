"""bimatting_triton.profile: BOPs / FLOPs / OPs, parameters, storage and sparse densities."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bimatting_triton import BiConv2d, BiMatting
from bimatting_triton.baselines import RVMMobileNetV3
from bimatting_triton.profile import BOPS_PER_OP, level_sizes, profile

MASKED_UNITS = {
    f"decoder.{b}.{u}.2" for b in ("decode3", "decode2", "decode1") for u in ("conv", "gru.ih", "gru.hh")
} | {"decoder.decode0.conv.2", "decoder.decode0.conv.5"}


class TinyNet(nn.Module):
    """A two-stage net with RVM's call signature and hand-countable work."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8))
        self.body = nn.Sequential(BiConv2d(8, 16, 3, bias=True), nn.Conv2d(16, 4, 1, groups=4))

    def forward(self, src, downsample_ratio=1.0):
        y = self.stem(src)
        return [torch.relu(self.body(y)) * 2]


@pytest.fixture(scope="module")
def bimatting():
    return BiMatting().eval()


@pytest.fixture(scope="module")
def golden(reference_dir):
    return torch.load(os.path.join(reference_dir, "bimatting_golden.pt"), weights_only=True)


def test_counts_of_a_hand_checked_model():
    p = profile(TinyNet(), (16, 20), downsample_ratio=1.0, elementwise=True)
    # stem conv: out 8 x 8 x 10, 3*3*3 MACs each; BiConv2d: 16 x 8 x 10 outputs, 8*3*3 each;
    # grouped 1x1: 4 x 8 x 10 outputs, 16/4 inputs each.
    stem, bconv, grouped = 8 * 8 * 10 * 27, 16 * 8 * 10 * 72, 4 * 8 * 10 * 4
    t = p.totals()
    assert t["bops"] == bconv and t["flops"] == stem + grouped
    assert t["ops"] == bconv / BOPS_PER_OP + stem + grouped
    assert p.stages()["stem"]["flops"] == stem and p.stages()["body"]["bops"] == bconv
    # BN (8x8x10), relu and *2 (4x8x10 each): one op per output element. The BiConv2d's
    # weight binarization is not per-frame work and is not counted.
    assert p.elementwise == {"stem": 8 * 8 * 10, "model": 2 * 4 * 8 * 10}
    # Parameters: binary = BiConv2d weight only; its bias and channel_threshold are float.
    assert t["params_binary"] == 16 * 8 * 9
    assert t["params_float"] == 8 * 27 + 2 * 8 + 16 + 8 + 4 * 4 + 4
    # Storage: BN buffers 2 x 8 floats + one int64 counter; packed drops channel_threshold
    # and stores 1 bit per binary weight plus one fp32 alpha per output channel.
    float_entries = 8 * 27 + 2 * 8 + 2 * 8 + 16 + 4 * 4 + 4
    assert t["storage_bits_fp32"] == 32 * (float_entries + 16 * 8 * 9 + 8) + 64
    assert t["storage_bits_packed"] == 32 * float_entries + 64 + 16 * 8 * 9 + 16 * 32
    p16 = profile(TinyNet(), (16, 20), downsample_ratio=1.0, alpha_bits=16, float_bits=16)
    assert p16.totals()["storage_bits_packed"] == 16 * float_entries + 64 + 16 * 8 * 9 + 16 * 16


def conv_macs_by_module(model, prefix, src, ratio):
    """Reference: torch's own FlopCounterMode (conv FLOPs = 2 x MACs) per module name."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(src, downsample_ratio=ratio)
    counts = counter.get_flop_counts()
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            flops = counts.get(f"{prefix}.{name}", {}).get(torch.ops.aten.convolution, 0)
            out[name] = flops // 2
    return out


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_rvm_flops_match_torch_flop_counter(ratio):
    model = RVMMobileNetV3().eval()
    p = profile(model, (48, 64), downsample_ratio=ratio)
    ref = conv_macs_by_module(model, "RVMMobileNetV3", torch.rand(1, 3, 48, 64), ratio)
    got = {ly.name: ly.macs for ly in p.layers}
    assert got == {k: v for k, v in ref.items() if v}
    assert p.totals()["bops"] == 0 and p.totals()["params_binary"] == 0
    assert ("refiner" in {ly.stage for ly in p.layers}) == (ratio != 1)


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_bimatting_bops_and_flops_match_torch_flop_counter(bimatting, ratio):
    p = profile(bimatting, (48, 64), downsample_ratio=ratio)
    ref = conv_macs_by_module(bimatting, "BiMatting", torch.rand(1, 3, 48, 64), ratio)
    assert {ly.name: ly.macs for ly in p.layers} == {k: v for k, v in ref.items() if v}
    kinds = dict(bimatting.named_modules())
    bops = sum(v for k, v in ref.items() if isinstance(kinds[k], BiConv2d))
    assert p.totals()["bops"] == bops and p.totals()["flops"] == sum(ref.values()) - bops


def test_meta_run_equals_real_run(bimatting):
    a = profile(bimatting, (40, 56), downsample_ratio=0.5, elementwise=True)
    b = profile(bimatting, (40, 56), downsample_ratio=0.5, elementwise=True, on_meta=False)
    rows = lambda p: [(ly.name, ly.macs, ly.out_shape) for ly in p.layers]  # noqa: E731
    assert rows(a) == rows(b)
    assert a.elementwise == b.elementwise
    assert bimatting.backbone.feature[0].conv1.weight.device.type == "cpu"  # the model itself is untouched


def test_bimatting_parameters_and_storage_match_the_official_layout(bimatting, reference_dir):
    with open(os.path.join(reference_dir, "bimatting_state_dict.tsv")) as f:
        rows = [line.split("\t") for line in f.read().strip().split("\n")[1:]]
    shapes = {k: [int(v) for v in s.split("x")] if s != "scalar" else [] for k, s, _ in rows}
    dtypes = {k: d for k, _, d in rows}
    # A binary conv is one that carries the (unused) channel_threshold of BiConv2d.
    owners = {k.rsplit(".", 1)[0] for k in shapes if k.endswith(".channel_threshold")}
    binary = {k for k in shapes if k.rsplit(".", 1)[0] in owners and k.endswith(".weight")}
    numel = {k: math.prod(s) for k, s in shapes.items()}
    is_param = lambda k: not k.endswith(("running_mean", "running_var", "num_batches_tracked"))  # noqa: E731
    t = profile(bimatting, (32, 32)).totals()
    assert t["params_binary"] == sum(numel[k] for k in binary)
    assert t["params"] == sum(numel[k] for k in shapes if is_param(k))
    assert round(t["params"] / 1e6, 2) == 4.27
    ints = sum(numel[k] * 64 for k in shapes if dtypes[k] == "int64")
    floats = [k for k in shapes if dtypes[k] == "float32"]
    assert t["storage_bits_fp32"] == 32 * sum(numel[k] for k in floats) + ints
    packed = sum(numel[k] + shapes[k][0] * 32 for k in binary) + ints + 32 * sum(
        numel[k] for k in floats if k not in binary and not k.endswith("channel_threshold")
    )
    assert t["storage_bits_packed"] == packed


def test_sparse_density_scales_exactly_the_masked_units(bimatting):
    dense = profile(bimatting, (64, 96), 1.0)
    zero = profile(bimatting, (64, 96), 0.0)
    assert {ly.name for ly in dense.layers if ly.sparse} == MASKED_UNITS
    masked = {ly.name: ly.macs for ly in dense.layers if ly.sparse}
    masked_bops = sum(v for k, v in masked.items() if k != "decoder.decode0.conv.5")
    d, z = dense.totals(), zero.totals()
    assert d["ops_sparse"] == d["ops"] and d["bops_sparse"] == d["bops"]
    assert z["bops_sparse"] == d["bops"] - masked_bops
    assert z["flops_sparse"] == d["flops"] - masked["decoder.decode0.conv.5"]
    per_level = {"decode3": 0.5, "decode2": 0.25, "decode1": 0.125, "decode0": 0.0625}
    p = profile(bimatting, (64, 96), per_level)
    expected = d["ops"] - sum(
        (1 - per_level[k.split(".")[1]]) * v / (1 if k.endswith("conv.5") else BOPS_PER_OP) for k, v in masked.items()
    )
    assert p.totals()["ops_sparse"] == pytest.approx(expected, rel=1e-12)
    assert p.totals()["ops"] == d["ops"]  # the dense numbers stay beside the sparse ones


def test_sparse_is_refused_for_models_without_masked_units():
    with pytest.raises(ValueError, match="sparse"):
        profile(RVMMobileNetV3(), (32, 32), 0.5)
    assert not any(ly.sparse for ly in profile(RVMMobileNetV3(), (32, 32)).layers)


def test_converted_models_are_refused_with_the_way_out(bimatting):
    """convert()'s packed units hold no Conv2d: counting them would report 0 BOPs, silently."""
    from bimatting_triton import convert

    with pytest.raises(TypeError, match=r"model: holds \d+ packed units .*profile the model before convert\(\)"):
        profile(convert(bimatting, backend="reference"), (32, 32))
    assert profile(bimatting, (32, 32)).totals()["bops"] > 0  # convert() left the plain model as it was


def test_measured_densities_follow_the_mask(golden):
    model = BiMatting()
    model.load_state_dict(golden["state_dict"])
    model.eval()
    src = golden["src"]  # (1, 3, 3, 72, 104)
    p = profile(model, sparse="measured", src=src, downsample_ratio=1.0)
    assert p.size == (72, 104)
    # Independent rebuild of the mask (SPEC §2) from the coarse alpha.
    with torch.no_grad():
        pha_s = model(src, return_coarse=True)[-1].flatten(0, 1)
    m = (pha_s > 0).float()
    h, w = m.shape[-2:]
    up = lambda x, s: F.interpolate(x, size=s, mode="bilinear", align_corners=False)  # noqa: E731
    mask = ((m - up(up(m, (h // 2, w // 2)), (h, w))).abs() >= 0.01).float()
    sizes = {ly.name.split(".")[1]: ly.out_shape[-2:] for ly in p.layers if ly.sparse}
    assert sizes == level_sizes((72, 104))
    for block, size in sizes.items():
        assert p.densities[block] == pytest.approx((up(mask, size) > 0).float().mean().item(), abs=1e-7)
    assert 0 < min(p.densities.values()) and max(p.densities.values()) < 1  # golden masks are partial


def test_table_and_dict(bimatting):
    p = profile(bimatting, (1080, 1920), 0.25, downsample_ratio=0.25, elementwise=True)
    text = str(p)
    for word in ("backbone", "decoder.decode0", "refiner", "total", "MACs", "1920x1080", "network input 480x270"):
        assert word in text
    d = json.loads(json.dumps(p.to_dict()))
    assert d["total"]["ops"] == pytest.approx(d["total"]["bops"] / 64 + d["total"]["flops"])
    assert d["total"]["ops_sparse"] < d["total"]["ops"]
    assert sum(s["bops"] for s in d["stages"].values()) == d["total"]["bops"]
    assert sum(s["params"] for s in d["stages"].values()) == d["total"]["params"]
    assert "decoder.decode3.conv.2" in p.layer_table()


def test_auto_downsample_ratio_is_rvms():
    p = profile(RVMMobileNetV3(), (1080, 1920))
    assert p.downsample_ratio == pytest.approx(512 / 1920) and p.model_size == (288, 512)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"size": (0, 32)}, "size"),
        ({"size": (32,)}, "size"),
        ({"size": (32, 32), "downsample_ratio": 1.5}, "downsample_ratio"),
        ({"size": (32, 32), "alpha_bits": 8}, "alpha_bits"),
        ({"size": (32, 32), "sparse": "dense"}, "sparse"),
        ({"size": (32, 32), "sparse": 1.5}, "sparse"),
        ({"size": (32, 32), "sparse": {"decode3": 0.5}}, "sparse"),
        ({"size": (32, 32), "sparse": "measured"}, "src"),
        ({"size": None}, "size"),
        ({"size": (32, 32), "src": torch.rand(1, 3, 16, 16)}, "size"),
    ],
)
def test_bad_arguments_are_named(bimatting, kwargs, word):
    with pytest.raises(ValueError, match=word):
        profile(bimatting, **kwargs)


def test_tile_densities_cover_the_pixel_densities():
    """Whole tiles are computed: their density is >= the pixel density, 0 and 1 at the ends."""
    from bimatting_triton.profile import densities_from_mask, tile_densities_from_mask

    size, ratio = (288, 512), 1.0
    mask = torch.zeros(2, 1, 18, 32)
    mask[0, :, 5, 7] = 1  # one coarse pixel: a few tiles per level
    mask[1, :, 10:14, 20:30] = 1
    pixels = densities_from_mask(mask, size, ratio)
    tiles = tile_densities_from_mask(mask, size, ratio, tile=(8, 8))
    assert set(tiles) == set(pixels)
    for level in pixels:
        assert 0 < pixels[level] <= tiles[level] < 1
    assert all(v == 0 for v in tile_densities_from_mask(torch.zeros(1, 1, 18, 32), size, ratio).values())
    assert all(v == 1 for v in tile_densities_from_mask(torch.ones(1, 1, 18, 32), size, ratio).values())
