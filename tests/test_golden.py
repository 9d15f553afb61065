"""SPEC §2 golden check: the reference network's float64 outputs, reproduced to 1e-6."""
import pytest
import torch

from bimatting_triton import BiMatting

ATOL = 1e-6


@pytest.fixture(scope="module")
def model(golden_model):
    return golden_model


def assert_close(actual, expected, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= ATOL, f"{name}: max abs error {err:.3g} > {ATOL}"


@pytest.mark.parametrize("case_index", [0, 1], ids=["ratio1.0", "ratio0.5"])
def test_golden_outputs_and_recurrent_continuation(golden, model, case_index):
    case = golden["cases"][case_index]
    ratio = case["downsample_ratio"]
    with torch.no_grad():
        fgr, pha, *rec, _fgr_s, pha_s = model(golden["src"].double(), downsample_ratio=ratio, return_coarse=True)
        assert_close(fgr, case["fgr"], "fgr")
        assert_close(pha, case["pha"], "pha")
        assert_close(pha_s, case["pha_s"], "pha_s")
        for i, (r, expected) in enumerate(zip(rec, case["rec"]), start=1):
            assert_close(r, expected, f"r{i}")

        fgr, pha, *rec = model(golden["src_next"].double(), *rec, downsample_ratio=ratio)
        assert_close(fgr, case["fgr_next"], "fgr_next")
        assert_close(pha, case["pha_next"], "pha_next")
        for i, (r, expected) in enumerate(zip(rec, case["rec_next"]), start=1):
            assert_close(r, expected, f"r{i}_next")


def test_golden_segmentation_pass(golden, model):
    with torch.no_grad():
        seg, *rec = model(golden["src"].double(), segmentation_pass=True)
    assert_close(seg, golden["seg"], "seg")
    assert len(rec) == 4


def test_golden_depends_on_every_part(golden):
    """The check can fail: a model with one perturbed decoder weight misses the reference."""
    model = BiMatting()
    state = dict(golden["state_dict"])
    state["decoder.decode1.gru.hh_1x1.3.bias"] = state["decoder.decode1.gru.hh_1x1.3.bias"] + 0.5
    model.load_state_dict(state)
    model = model.double().eval()
    case = golden["cases"][0]
    with torch.no_grad():
        _, pha, *_ = model(golden["src"].double())
    assert (pha - case["pha"]).abs().max().item() > ATOL
