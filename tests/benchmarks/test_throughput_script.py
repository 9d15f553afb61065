"""Smoke test of bench/throughput.py: it runs, measures what it can and skips the rest clearly."""
import importlib.util
import json
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
SCRIPT = os.path.join(BENCH, "throughput.py")


@pytest.fixture(scope="module")
def throughput():
    sys.path.insert(0, os.path.abspath(BENCH))  # as when run as `python bench/throughput.py`
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_runs_all_variants_on_a_tiny_size(throughput, capsys):
    results = throughput.main(["--sizes", "64x48@1,64x48@0.5", "--warmup", "0", "--repeats", "1", "--json",
                               "--device", "cpu"])
    report = json.loads(capsys.readouterr().out)
    assert report["device"].startswith("cpu")
    by_variant = {(m.variant, m.setting): m for m in results}
    for setting in ("64x48@1 B=1 T=1", "64x48@0.5 B=1 T=1"):
        for name in ("bimatting-plain", "rvm-fp32", "bimatting-fused"):
            m = by_variant[(name, setting)]
            assert m.status == "ok" and m.fps > 0 and m.ms_per_frame > 0
        # without CUDA the converted model runs its references, and says so
        assert any("no CUDA: its plain-PyTorch references" in n for n in by_variant[("bimatting-fused", setting)].notes)
        assert "CUDA" in by_variant[("rvm-fp16", setting)].status
        assert "CUDA" in by_variant[("bimatting-fused-fp16", setting)].status
    pairs = {(r["setting"], r["variant"], r["baseline"]): r["fps_ratio"] for r in report["ratios"]}
    for setting in ("64x48@1 B=1 T=1", "64x48@0.5 B=1 T=1"):
        for a, b in (("bimatting-plain", "rvm-fp32"), ("bimatting-fused", "bimatting-plain")):
            # computed from this run's measurements, not copied from anywhere
            assert pairs[(setting, a, b)] == pytest.approx(by_variant[(a, setting)].fps / by_variant[(b, setting)].fps)
    assert report["settings"]["repeats"] == 1 and report["settings"]["torch"] == throughput.torch.__version__
    measured = [r for r in report["results"] if r["status"] == "ok"]
    assert all(len(r["repeats_ms"]) == 1 and r["range_ms"] is None for r in measured)


def test_repeats_give_median_and_range(throughput):
    from bimatting_triton.baselines import RVMMobileNetV3

    setting = throughput.Setting(48, 32, 1.0, 2, 1)
    m = throughput.run_variant(RVMMobileNetV3().eval(), "float32", setting, throughput.torch.device("cpu"), 0, 3)
    assert len(m.repeats_ms) == 3
    assert m.ms_per_frame == pytest.approx(sorted(m.repeats_ms)[1])
    assert m.range_ms == pytest.approx(max(m.repeats_ms) - min(m.repeats_ms))
    assert m.fps == pytest.approx(1e3 / m.ms_per_frame)


def test_profile_breaks_time_down_by_stage(throughput, capsys):
    throughput.main(["--sizes", "48x32@0.5", "--warmup", "0", "--repeats", "1", "--variants", "bimatting-plain",
                     "--profile", "--device", "cpu"])
    out = capsys.readouterr().out
    for stage in ("backbone", "aspp", "decoder", "refiner"):
        assert stage in out
    assert "heaviest operators" in out


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "64by48"], "--sizes"),
    (["--variants", "bogus"], "--variants"),
    (["--variants", ",,"], "--variants: none given"),
    (["--repeats", "0"], "--repeats"),
    (["--batch", "0"], "--batch"),
    (["--warmup", "-3"], "--warmup"),
    (["--device", "tpu"], "--device"),
    (["--device", "meta"], "--device 'meta': the meta device holds no data"),
    (["--device", f"cuda:{torch.cuda.device_count() + 7}"], "--device 'cuda:"),  # (a GPU this machine lacks)
])
def test_bad_arguments(throughput, capsys, argv, message):
    with pytest.raises(SystemExit):
        throughput.main(argv)
    assert message in capsys.readouterr().err


def test_cuda_graph_needs_cuda(throughput, capsys):
    with pytest.raises(SystemExit):
        throughput.main(["--sizes", "48x32@1", "--device", "cpu", "--cuda-graph"])
    assert "--cuda-graph" in capsys.readouterr().err


def test_cuda_graph_capture_failure_is_reported_and_timed_eagerly(throughput, monkeypatch):
    # No CUDA here: the capture itself is replaced by one that fails as a model with a host
    # synchronisation would; the variant must still be timed, eagerly, and say why.
    def failing_capture(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")

    from bimatting_triton import cuda_graph
    from bimatting_triton.baselines import RVMMobileNetV3

    monkeypatch.setattr(cuda_graph, "capture", failing_capture)
    monkeypatch.setattr(cuda_graph, "_check_device", lambda src: None)  # as on CUDA

    model = RVMMobileNetV3().eval()
    setting = throughput.Setting(48, 32, 1.0, 1, 1)
    m = throughput.run_variant(model, "float32", setting, throughput.torch.device("cpu"), 1, 1, cuda_graph=True)
    assert m.status == "ok" and m.fps > 0
    assert any("CUDA graph capture failed (RuntimeError" in note and "eager" in note for note in m.notes)


def test_cuda_graph_variant_times_replays(throughput, monkeypatch):
    # With a stand-in graph (replay = rerun the recorded step) the timed calls are replays.
    from bimatting_triton.baselines import RVMMobileNetV3

    from graph_utils import use_fake_graphs

    graphs = use_fake_graphs(monkeypatch)
    setting = throughput.Setting(48, 32, 1.0, 1, 1)
    m = throughput.run_variant(RVMMobileNetV3().eval(), "float32", setting, throughput.torch.device("cpu"), 1, 3,
                               cuda_graph=True)
    assert m.notes == ["CUDA graph"] and len(graphs) == 1
    assert graphs[0].replays == 1 + 3  # the capturing call, then the timed ones


def test_density_note_of_a_converted_model(throughput):
    # The fused variant reports how much of each decoder level its sparse units computed
    # (here on the CPU through the interpreter; on a GPU the same call follows its timing).
    from bimatting_triton import BiMatting, convert

    torch = throughput.torch
    torch.manual_seed(0)
    plain = BiMatting().eval()
    assert throughput.density_note(plain) is None
    fused = convert(plain)
    with torch.inference_mode():
        fused(torch.rand(1, 1, 3, 48, 64), downsample_ratio=1)
    note = throughput.density_note(fused)
    parts = note.split()
    assert parts[:2] == ["active", "tiles"] and parts[2::2] == ["d3", "d2", "d1", "d0"]
    assert all(0.0 <= float(v) <= 1.0 for v in parts[3::2])


def test_checkpoint_weights_are_used_and_a_bad_one_is_named(throughput, golden, tmp_path, capsys):
    """--checkpoint: the bimatting variants run those weights (the golden ones give a mask that
    is neither empty nor full); a file that is not a checkpoint is a usage error."""
    path = tmp_path / "golden.pth"
    throughput.torch.save({"state_dict": golden["state_dict"]}, path)
    results = throughput.main(["--sizes", "104x72@1", "--warmup", "0", "--repeats", "1", "--device", "cpu",
                               "--variants", "bimatting-fused,bimatting-plain", "--checkpoint", str(path)])
    out = capsys.readouterr().out
    assert f"BiMatting weights: {path}" in out
    fused = next(m for m in results if m.variant == "bimatting-fused")
    tiles = [float(v) for v in next(n for n in fused.notes if n.startswith("active tiles")).split()[3::2]]
    assert any(0 < t < 1 for t in tiles)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        throughput.main(["--sizes", "48x32@1", "--device", "cpu", "--checkpoint", str(tmp_path / "junk.pth")])
    assert "--checkpoint" in capsys.readouterr().err
