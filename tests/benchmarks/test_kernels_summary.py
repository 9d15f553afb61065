"""bench/kernels.py's summary of a pytest-benchmark report (the GPU figures themselves need CUDA)."""
import importlib.util
import os
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def _load():
    sys.path.insert(0, os.path.abspath(BENCH))  # as when run as `python bench/kernels.py`
    spec = importlib.util.spec_from_file_location("kernels_bench", os.path.join(BENCH, "kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench(group, name, median_s):
    return {"group": group, "name": name, "stats": {"median": median_s}}


def test_summary_has_one_line_per_shape_with_ratios():
    kernels = _load()
    report = {"benchmarks": [
        _bench("3x3s1-64to64-480x270", "cudnn-fp16", 40e-6),
        _bench("3x3s1-64to64-480x270", "packed-dot", 20e-6),
        _bench("3x3s1-64to64-480x270", "packed-dot-tuned", 10e-6),
        _bench("1x1s1-32to16-240x135", "cudnn-fp16", 9e-6),
        _bench("1x1s1-32to16-240x135", "packed-popcount", 12e-6),
        _bench("unit decode1.gru.hh 32to16-240x135", "cudnn-fp16", 30e-6),
        _bench("unit decode1.gru.hh 32to16-240x135", "masked-unit-d30", 6e-6),
        _bench("unit decode1.gru.hh 32to16-240x135", "masked-unit-d100", 15e-6),
    ]}
    lines = kernels.summarize(report).splitlines()
    assert len(lines) == 5
    first = lines[2].split()
    assert first[0] == "3x3s1-64to64-480x270"
    assert first[1:4] == ["40.0", "20.0", "10.0"] and first[-3:] == ["2.00x", "4.00x", "-"]
    second = lines[3].split()
    assert second[1] == "9.0" and second[2] == "-" and second[4] == "12.0" and second[-3:] == ["-", "-", "-"]
    unit = lines[4].split()  # a masked unit: its two densities and cuDNN's two convs
    assert unit[0] == "unit_decode1.gru.hh_32to16-240x135"
    assert unit[1] == "30.0" and unit[6:8] == ["6.0", "15.0"] and unit[-3:] == ["-", "-", "5.00x"]


def test_summary_divides_a_round_by_its_calls():
    # _timed synchronises once per round of CALLS_PER_ROUND calls: the summary is per call.
    kernels = _load()
    calls = kernels.CALLS_PER_ROUND
    report = {"benchmarks": [
        {"group": "g", "name": "cudnn-fp16", "stats": {"median": calls * 30e-6}, "extra_info": {"calls_per_round": calls}},
        {"group": "g", "name": "packed-dot", "stats": {"median": calls * 10e-6}, "extra_info": {"calls_per_round": calls}},
    ]}
    row = kernels.summarize(report).splitlines()[2].split()
    assert row[1:3] == ["30.0", "10.0"] and row[-3] == "3.00x"


def test_masked_unit_inputs_run(monkeypatch):
    # The masked-unit benchmark's inputs on the CPU (kernels under the interpreter): the one
    # launch and the cuDNN-style float expression it is timed against agree where m == 0.
    import torch

    from bimatting_triton.kernels.binary_conv import binary_conv2d
    from bimatting_triton.kernels.sparse_unit import sparse_unit

    kernels = _load()
    args, (x, w3, w1, bias, mask) = kernels._unit_inputs(("test.unit", 20, 16, 48, 80), 0.3, device="cpu")
    got = sparse_unit(*args)
    assert got.shape == (1, 16, 48, 80) and got.dtype == torch.float16
    assert 0 < float(args[-1].density()) < 1  # a partial mask
    y1 = binary_conv2d(args[3], args[4], args[5]).y
    zero = (mask == 0).expand_as(got)
    assert torch.equal(got[zero], y1[zero])
    assert x.dtype == w3.dtype == w1.dtype == bias.dtype == torch.float16 and w3.shape[-1] == 3
