"""BiMatting as a network: official layout, RVM's forward contract, batches, odd sizes."""
import os

import pytest
import torch

from bimatting_triton import BiMatting


@pytest.fixture(scope="module")
def model(golden_model):
    """The golden weights give masks that are neither empty nor full: every path matters."""
    return golden_model


def read_layout(reference_dir):
    with open(os.path.join(reference_dir, "bimatting_state_dict.tsv")) as f:
        header, *rows = f.read().strip().split("\n")
    assert header.split("\t") == ["key", "shape", "dtype"]
    return [row.split("\t") for row in rows]


def test_state_dict_matches_official_layout(reference_dir):
    layout = read_layout(reference_dir)
    state = BiMatting().state_dict()
    assert list(state) == [key for key, _, _ in layout]
    for key, shape, dtype in layout:
        tensor = state[key]
        assert ("x".join(map(str, tensor.shape)) or "scalar") == shape, key
        assert str(tensor.dtype).removeprefix("torch.") == dtype, key
    assert len(layout) == 670
    assert sum(p.numel() for p in BiMatting().parameters()) == pytest.approx(4.27e6, rel=0.01)


def test_fast_guided_filter_refiner_has_no_parameters():
    state = BiMatting(refiner="fast_guided_filter").state_dict()
    assert not any(k.startswith("refiner.") for k in state)


@pytest.mark.parametrize("refiner", ["deep_guided_filter", "fast_guided_filter"])
@pytest.mark.parametrize("ratio", [1, 0.5])
def test_rvm_contract_shapes(refiner, ratio):
    model = BiMatting(refiner=refiner).eval()
    src = torch.rand(2, 3, 3, 40, 56)
    with torch.no_grad():
        fgr, pha, *rec = model(src, downsample_ratio=ratio)
        assert fgr.shape == (2, 3, 3, 40, 56) and pha.shape == (2, 3, 1, 40, 56)
        h, w = int(40 * ratio), int(56 * ratio)
        expected = [(2, 16, -(-h // 2), -(-w // 2)), (2, 20, -(-h // 4), -(-w // 4)),
                    (2, 40, -(-h // 8), -(-w // 8)), (2, 64, -(-h // 16), -(-w // 16))]
        assert [tuple(r.shape) for r in rec] == expected
        assert 0 <= pha.min() and pha.max() <= 1 and 0 <= fgr.min() and fgr.max() <= 1
        seg, *rec2 = model(src, *rec, downsample_ratio=ratio, segmentation_pass=True)
        assert seg.shape == (2, 3, 1, h, w) and len(rec2) == 4
        out = model(src, downsample_ratio=ratio, return_coarse=True)
        assert len(out) == 8
        assert out[6].shape == (2, 3, 3, -(-h // 16), -(-w // 16)) and out[7].shape == (2, 3, 1, -(-h // 16), -(-w // 16))


def test_four_d_input_is_the_single_frame_case(model):
    src = torch.rand(2, 3, 36, 52, dtype=torch.float64)
    with torch.no_grad():
        out4 = model(src, downsample_ratio=0.5)
        out5 = model(src.unsqueeze(1), downsample_ratio=0.5)
    assert out4[0].shape == (2, 3, 36, 52) and out4[1].shape == (2, 1, 36, 52)
    for a, b in zip(out4, out5):
        assert torch.equal(a, b.squeeze(1) if b.ndim == 5 else b)


def test_chunked_clip_equals_whole_clip(model, golden):
    """Recurrent state carried across calls: T=3 at once equals frames one by one."""
    src = golden["src"].double()
    with torch.no_grad():
        fgr, pha, *rec = model(src)
        rec_step = [None] * 4
        phas = []
        for t in range(src.shape[1]):
            _, p, *rec_step = model(src[:, t], *rec_step)
            phas.append(p)
    assert torch.allclose(torch.stack(phas, 1), pha, rtol=0, atol=1e-12)
    for a, b in zip(rec, rec_step):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def capture_masks(model):
    masks = []
    handle = model.decoder.register_forward_hook(lambda mod, args, out: masks.append(out[-1]))
    return masks, handle


def test_batch_items_use_their_own_masks(model, golden):
    clip_a = golden["src"].double()
    clip_b = golden["src_next"].double().flip(-1)[:, [0, 1, 0]]
    masks, handle = capture_masks(model)
    try:
        with torch.no_grad():
            batch = model(torch.cat([clip_a, clip_b]), downsample_ratio=0.5)
            alone_a = model(clip_a, downsample_ratio=0.5)
            alone_b = model(clip_b, downsample_ratio=0.5)
    finally:
        handle.remove()
    # The two clips' masks differ and are neither empty nor full, so a shared mask would show.
    batch_mask = masks[0]
    assert not torch.equal(batch_mask[0], batch_mask[1])
    assert 0 < batch_mask.mean() < 1
    for out, a, b in zip(batch, alone_a, alone_b):
        assert torch.allclose(out[:1], a, rtol=0, atol=1e-12)
        assert torch.allclose(out[1:], b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("size", [(17, 23), (33, 50), (2, 3), (65, 31)])
def test_odd_sizes(size):
    model = BiMatting().eval()
    src = torch.rand(1, 2, 3, *size)
    with torch.no_grad():
        fgr, pha, *rec = model(src)
        fgr, pha, *rec = model(src, *rec)
        fgr2, pha2, *rec = model(src, downsample_ratio=0.5)
        fgr2, pha2, *rec = model(src, *rec, downsample_ratio=0.5)
    assert fgr.shape == fgr2.shape == (1, 2, 3, *size)
    assert pha.shape == pha2.shape == (1, 2, 1, *size)
    assert torch.isfinite(fgr).all() and torch.isfinite(pha2).all()


def test_training_mode_backward_reaches_every_parameter():
    model = BiMatting().train()
    fgr, pha, *rec, fgr_s, pha_s = model(torch.rand(2, 2, 3, 32, 32), downsample_ratio=0.5, return_coarse=True)
    (fgr.mean() + pha.mean() + fgr_s.mean() + pha_s.mean()).backward()
    no_grad = [n for n, p in model.named_parameters()
               if p.grad is None and "channel_threshold" not in n and not n.startswith("project_seg")]
    assert no_grad == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(src=torch.rand(1, 3, 4, 8, 8)), "src: expected shape"),
        (dict(src=torch.rand(3, 8, 8)), "src: expected shape"),
        (dict(src=torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), "src: expected a floating point"),
        (dict(src=torch.rand(1, 3, 8, 8), downsample_ratio=0), "downsample_ratio"),
        (dict(src=torch.rand(1, 3, 1, 9), downsample_ratio=0.5), "downsample_ratio: 0.5 turns the 9x1"),
        (dict(src=torch.rand(2, 3, 8, 8), r1=torch.zeros(1, 16, 4, 4)), r"r1: expected .* shape \(2, 16, 4, 4\)"),
        # The published code returns fgr, pha, fgr_s, pha_s, *rec: its unpacking feeds r1, r2 into r3, r4.
        (dict(src=torch.rand(1, 3, 64, 64), r3=torch.zeros(1, 16, 32, 32)), r"r3: expected .* shape \(1, 40, 8, 8\)"),
        (dict(src=torch.rand(1, 3, 64, 64), r2=torch.zeros(1, 20, 16, 16), downsample_ratio=0.5),
         r"r2: expected .* shape \(1, 20, 8, 8\) for these frames at downsample_ratio=0.5"),
        (dict(src=torch.rand(1, 3, 64, 64), r4=torch.zeros(1, 64, 4, 4, dtype=torch.float64)), "r4: on cpu/torch.float64"),
        (dict(src=torch.rand(1, 0, 3, 8, 8)), "src: expected shape .* no empty dimension"),
        (dict(src=torch.rand(1, 3, 8, 8), downsample_ratio=True), "downsample_ratio: expected a number"),
    ],
)
def test_bad_inputs_name_the_argument(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        BiMatting()(**kwargs)


def test_numpy_and_fraction_ratios_are_numbers(model):
    from fractions import Fraction

    import numpy as np

    src = torch.rand(1, 3, 3, 24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(src, downsample_ratio=0.5)
        for ratio in (np.float32(0.5), np.float64(0.5), Fraction(1, 2)):
            for a, b in zip(model(src, downsample_ratio=ratio), expected):
                assert torch.equal(a, b)


@pytest.mark.parametrize("height, ratio", [(90, "7/10"), (100, "float32 0.29")])
def test_states_round_trip_at_ratios_whose_own_product_rounds_otherwise(height, ratio):
    """90 * Fraction(7, 10) is exactly 63 but 90 * 0.7 is 62.99...; float32(0.29) * 100 rounds up:
    the sizes follow the float the model resizes with, so its own states are accepted back."""
    from fractions import Fraction

    import numpy as np

    r = Fraction(7, 10) if ratio == "7/10" else np.float32(0.29)
    model = BiMatting().eval()
    src = torch.rand(1, 3, height, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, _, *rec = model(src, downsample_ratio=r)
        fgr, *_ = model(src, *rec, downsample_ratio=r)
    assert fgr.shape == src.shape


def test_streaming_under_autocast_feeds_the_states_back():
    """RVM's loop under autocast: the states come back in the autocast dtype, src stays float32."""
    model = BiMatting().eval()
    src = torch.rand(1, 3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    rec = [None] * 4
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for t in range(3):
            fgr, pha, *rec = model(src[:, t], *rec, downsample_ratio=0.5)
    assert any(r.dtype == torch.bfloat16 for r in rec)
    assert fgr.shape == (1, 3, 32, 48) and torch.isfinite(pha).all()
    # Outside autocast a state of another dtype is still a mistake worth naming.
    with pytest.raises(ValueError, match="r4: on cpu/torch.bfloat16"):
        model(src[:, 0], *[r.float() for r in rec[:3]], rec[3].bfloat16(), downsample_ratio=0.5)


def test_coarse_foreground_adds_the_full_resolution_source_resized():
    """fgr_s = clamp(coarse residual + src resized to the coarse size): the published network
    resizes the full-resolution src, which differs from resizing the downsampled one."""
    import torch.nn.functional as F

    model = BiMatting().eval().double()
    src = torch.rand(1, 2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    captured = []
    handle = model.decoder.register_forward_hook(lambda mod, args, out: captured.append(out[5]))
    try:
        with torch.no_grad():
            *_, fgr_s, pha_s = model(src, downsample_ratio=0.25, return_coarse=True)
    finally:
        handle.remove()
    coarse = captured[0]  # (B, T, 4, h, w): the projected coarse output
    src_small = F.interpolate(src.flatten(0, 1), size=coarse.shape[-2:], mode="bilinear", align_corners=False)
    expected = (coarse[:, :, :3] + src_small.unflatten(0, (1, 2))).clamp(0, 1)
    assert torch.equal(fgr_s, expected)
    assert torch.equal(pha_s, coarse[:, :, 3:].clamp(0, 1))


def test_fast_guided_filter_is_rvms_formula():
    """The parameter-free refiner against the guided filter written out with separable box
    sums (zero padding, divided by the full 3x3 window, eps 1e-5), as RVM defines it."""
    import torch.nn.functional as F

    from bimatting_triton.model.refiner import FastGuidedFilterRefiner

    g = torch.Generator().manual_seed(2)
    fine = torch.rand(2, 3, 3, 40, 60, dtype=torch.float64, generator=g)
    base = F.interpolate(fine.flatten(0, 1), size=(10, 15), mode="bilinear", align_corners=False).unflatten(0, (2, 3))
    base_fgr = torch.rand(2, 3, 3, 10, 15, dtype=torch.float64, generator=g)
    base_pha = torch.rand(2, 3, 1, 10, 15, dtype=torch.float64, generator=g)

    def box(x):
        c = x.shape[1]
        row = torch.full((c, 1, 1, 3), 1 / 3, dtype=x.dtype)
        return F.conv2d(F.conv2d(x, row, padding=(0, 1), groups=c), row.transpose(2, 3), padding=(1, 0), groups=c)

    def with_gray(x):
        return torch.cat([x, x.mean(1, keepdim=True)], 1)

    lr_x, lr_y, hr_x = with_gray(base.flatten(0, 1)), torch.cat([base_fgr, base_pha], 2).flatten(0, 1), with_gray(fine.flatten(0, 1))
    mean_x, mean_y = box(lr_x), box(lr_y)
    a = (box(lr_x * lr_y) - mean_x * mean_y) / (box(lr_x * lr_x) - mean_x * mean_x + 1e-5)
    b = mean_y - a * mean_x
    up = lambda v: F.interpolate(v, size=(40, 60), mode="bilinear", align_corners=False)  # noqa: E731
    expected = (up(a) * hr_x + up(b)).unflatten(0, (2, 3))
    fgr, pha = FastGuidedFilterRefiner()(fine, base, base_fgr, base_pha, None)
    torch.testing.assert_close(fgr, expected[:, :, :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(pha, expected[:, :, 3:], rtol=0, atol=1e-12)


def test_published_variant_name_is_accepted():
    """The published code builds this network as MattingNetwork('bimobilenet')."""
    assert list(BiMatting("bimobilenet").state_dict()) == list(BiMatting().state_dict())


@pytest.mark.parametrize("kwargs, message", [
    (dict(variant="mobilenetv3"), "variant="),
    (dict(refiner="unknown"), "refiner="),
])
def test_constructor_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiMatting(**kwargs)


def test_pretrained_backbone_is_accepted_with_a_warning():
    """RVM's training script passes pretrained_backbone=True; there are no such weights here."""
    with pytest.warns(UserWarning, match="no pretrained binary backbone"):
        model = BiMatting(pretrained_backbone=True)
    assert isinstance(model, BiMatting)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 1, 17, 23), (1, 1, 1, 1), (3, 1, 2, 5), (1, 1, 36, 64)])
def test_incoherence_mask_is_the_published_formula(dtype, shape):
    # The decoder's mask, written with comparisons into float32 tensors (fewer kernels), is
    # the published ((pha > 0).float(), bilinear round trip, |m - blur| >= 0.01).float():
    # float32 0/1 whatever the input dtype, on random, all-zero, all-one, non-contiguous alphas.
    import torch.nn.functional as F

    from bimatting_triton.model.decoder import MASK_THRESHOLD, incoherence_mask

    def published(pha):
        h, w = pha.shape[-2:]
        support = (pha > 0).float()
        half = F.interpolate(support, size=(max(h // 2, 1), max(w // 2, 1)), mode="bilinear", align_corners=False)
        blurred = F.interpolate(half, size=(h, w), mode="bilinear", align_corners=False)
        return ((support - blurred).abs() >= MASK_THRESHOLD).float()

    torch.manual_seed(0)
    pha = torch.rand(shape[0], 2, *shape[2:])[:, 1:]  # a channel slice: not contiguous
    pha[pha < 0.5] = 0
    for alpha in (pha, torch.zeros(shape), torch.ones(shape)):
        alpha = alpha.to(dtype)
        got = incoherence_mask(alpha)
        assert got.dtype == torch.float32 and torch.equal(got, published(alpha))


def test_torch_export_traces_the_streaming_model(model, golden):
    """torch.export (what torch.onnx.export(dynamo=True) and AOTInductor build on) traces the
    plain model with the states as inputs and a fixed downsample_ratio; the program computes
    what the eager model does."""

    class Step(torch.nn.Module):
        def __init__(self, net, ratio):
            super().__init__()
            self.net, self.ratio = net, ratio

        def forward(self, src, r1, r2, r3, r4):
            return self.net(src, r1, r2, r3, r4, downsample_ratio=self.ratio)

    src = golden["src"].double()[:, :2]
    with torch.no_grad():
        rec = model(src, downsample_ratio=0.5)[2:]
        expected = model(src, *rec, downsample_ratio=0.5)
        program = torch.export.export(Step(model, 0.5), (src, *rec))
        got = program.module()(src, *rec)
    assert len(got) == 6
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-12)
