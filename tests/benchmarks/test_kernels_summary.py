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
    ]}
    lines = kernels.summarize(report).splitlines()
    assert len(lines) == 4
    first = lines[2].split()
    assert first[0] == "3x3s1-64to64-480x270"
    assert first[1:4] == ["40.0", "20.0", "10.0"] and first[-2:] == ["2.00x", "4.00x"]
    second = lines[3].split()
    assert second[1] == "9.0" and second[2] == "-" and second[4] == "12.0" and second[-2:] == ["-", "-"]
