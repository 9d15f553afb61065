"""CudaGraphStep (bimatting_triton/cuda_graph.py): the streaming logic around CUDA graphs.

On the CPU the graph itself is replaced by a stand-in that records the step's closure at
capture and reruns it on replay, writing into the same output tensors, as a CUDA graph
does. That checks everything the wrapper owns: when it runs eagerly or captures, that each
call's ``src`` and states reach the static inputs (a stale input changes the outputs),
the outputs' ownership, and its errors. With ``BIMATTING_TEST_CUDA=1`` the fused model is
also captured for real and compared with eager calls.
"""
import os

import pytest
import torch

from bimatting_triton import BiMatting, CudaGraphStep, convert, cuda_graph

from graph_utils import use_fake_graphs

CUDA = bool(os.environ.get("BIMATTING_TEST_CUDA")) and torch.cuda.is_available()


@pytest.fixture
def fake_graphs(monkeypatch):
    return use_fake_graphs(monkeypatch)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BiMatting().eval()


def _clip(t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, t, 3, 48, 64, generator=g)


def test_replays_equal_eager_calls(model, fake_graphs):
    step = CudaGraphStep(model)
    plan = [2, 2, 2, 2, 1, 1, 1]  # clip lengths T: a new signature at T=1
    rec_eager, rec_graph, kept = [None] * 4, [None] * 4, []
    with torch.no_grad():
        for i, t in enumerate(plan):
            src = _clip(t, i)
            fgr_e, pha_e, *rec_eager = model(src, *rec_eager, downsample_ratio=0.5)
            fgr_g, pha_g, *rec_graph = step(src, *rec_graph, downsample_ratio=0.5)
            assert torch.equal(fgr_g, fgr_e) and torch.equal(pha_g, pha_e), f"call {i}"
            for a, b in zip(rec_graph, rec_eager):
                assert torch.equal(a, b), f"call {i}: state"
            kept.append((pha_g, pha_e))
    # Call 0 has no state and call 1 is the first of its signature: eager. Call 2 captures
    # (T=2), calls 3 replay; T=1: call 4 eager, call 5 captures, call 6 replays.
    assert step.graphs == 2 and len(fake_graphs) == 2
    assert [g.replays for g in fake_graphs] == [2, 2]
    # Frame outputs are copies: a later replay did not overwrite an earlier result.
    for got, want in kept:
        assert torch.equal(got, want)


def test_inference_mode_and_no_grad_calls_mix(model, fake_graphs):
    # Captured under inference_mode (as convert_video runs), then called under no_grad.
    step = CudaGraphStep(model)
    rec = [None] * 4
    with torch.inference_mode():
        for i in range(3):
            _, pha, *rec = step(_clip(1, i), *rec)
    assert step.graphs == 1
    with torch.no_grad():
        states = [r.clone() for r in rec]  # normal tensors (the graph's own change at the next call)
        _, want, *_ = model(_clip(1, 3), *states)
        _, pha, *_ = step(_clip(1, 3), *states)
    assert torch.equal(pha, want) and step.graphs == 1


def test_graph_owned_outputs_and_reset(model, fake_graphs):
    step = CudaGraphStep(model, clone_outputs=False)
    rec = [None] * 4
    with torch.no_grad():
        outs = []
        for i in range(4):
            fgr, pha, *rec = step(_clip(1, i), *rec)
            outs.append(pha)
    assert outs[2] is outs[3]  # the graph's own tensor, overwritten by each replay
    assert outs[1] is not outs[2]
    step.reset()
    assert step.graphs == 0
    with torch.no_grad():
        step(_clip(1, 9), *rec)  # first of its signature again: eager
    assert step.graphs == 0


def test_segmentation_pass_and_other_models(model, fake_graphs):
    step = CudaGraphStep(model)
    rec = [None] * 4
    with torch.no_grad():
        for i in range(3):
            src = _clip(1, i)
            seg, *rec_new = step(src, *rec, segmentation_pass=True)
            want, *_ = model(src, *rec, segmentation_pass=True)
            assert seg.shape == (1, 1, 1, 48, 64) and torch.equal(seg, want)
            rec = rec_new
    assert step.graphs == 1


def test_convert_video_through_the_step(model, fake_graphs, tmp_path):
    # convert_video takes the step as its model: same matte as the model itself.
    pytest.importorskip("av", reason="PyAV (a dependency, absent from the GPU image where this file also runs)")
    from bimatting_triton.video import convert_video

    from video_utils import make_video, read_png

    clip = make_video(str(tmp_path / "in.mp4"), 6, 64, 48)
    for name, runner in (("eager", model), ("graph", CudaGraphStep(model))):
        convert_video(runner, clip, output_alpha=str(tmp_path / f"{name}"), output_type="png_sequence",
                      seq_chunk=2, progress=False, downsample_ratio=0.5)
    assert len(fake_graphs) == 1 and fake_graphs[0].replays == 1  # chunks 0, 1 eager; 2 captured
    eager = sorted(os.listdir(tmp_path / "eager"))
    assert eager == sorted(os.listdir(tmp_path / "graph")) and len(eager) == 6
    for f in eager:
        a, b = (read_png(str(tmp_path / kind / f), "gray") for kind in ("eager", "graph"))
        assert (a == b).all(), f
    assert len({read_png(str(tmp_path / "graph" / f), "gray").tobytes() for f in eager}) > 1  # not one frame


def test_errors(model, fake_graphs, monkeypatch):
    with pytest.raises(TypeError, match="model must be callable"):
        CudaGraphStep("model")
    step = CudaGraphStep(model)
    with pytest.raises(TypeError, match="src must be a torch.Tensor"):
        step([1, 2])
    with pytest.raises(TypeError, match="recurrent states must be tensors or None"):
        step(_clip(1, 0), 1, 2, 3, 4)

    def failing(forward, example, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "capture", failing)
    with torch.no_grad():
        _, _, *rec = model(_clip(1, 0))
        step(_clip(1, 1), *rec)
        with pytest.raises(RuntimeError, match=r"could not capture the model for src \(1, 1, 3, 48, 64\)"):
            step(_clip(1, 2), *rec)


def test_real_capture_needs_cuda(model):
    """A CPU src is refused on the first call (not only at the capture, after two eager
    calls), and on every later one, without running the model."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return model(*args, **kwargs)

    step = CudaGraphStep(counting)
    with torch.no_grad():
        _, _, *rec = model(_clip(1, 0))
        for args in [(_clip(1, 0),), (_clip(1, 1), *rec), (_clip(1, 2), *rec), (_clip(1, 3), *rec)]:
            with pytest.raises(ValueError, match="src must be a CUDA tensor .* got one on cpu"):
                step(*args)
    assert calls == [] and step.graphs == 0


@pytest.mark.skipif(not CUDA, reason="needs BIMATTING_TEST_CUDA=1 and a CUDA device")
def test_fused_model_captures_on_cuda():
    torch.manual_seed(0)
    fused = convert(BiMatting().eval()).cuda()
    step = CudaGraphStep(fused)
    rec_e, rec_g = [None] * 4, [None] * 4
    with torch.inference_mode():
        for i in range(5):
            src = torch.rand(1, 1, 3, 288, 512, device="cuda")
            fgr_e, pha_e, *rec_e = fused(src, *rec_e, downsample_ratio=0.5)
            fgr_g, pha_g, *rec_g = step(src, *rec_g, downsample_ratio=0.5)
            torch.testing.assert_close(pha_g, pha_e, rtol=0, atol=1e-5)
            torch.testing.assert_close(fgr_g, fgr_e, rtol=0, atol=1e-5)
    assert step.graphs == 1
