"""Smoke test of bench/complexity.py: it runs, and its figures keep the properties the report states."""
import importlib.util
import json
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


@pytest.fixture(scope="module")
def complexity():
    sys.path.insert(0, os.path.abspath(BENCH))  # as when run as `python bench/complexity.py`
    spec = importlib.util.spec_from_file_location("complexity_bench", os.path.join(BENCH, "complexity.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_small_size_report_and_packed_files(complexity, tmp_path, capsys):
    path = tmp_path / "complexity.json"
    complexity.main(["--size", "256x144:1", "--size", "640x360:0.25", "--no-elementwise", "--json", str(path)])
    printed = capsys.readouterr().out
    assert "RVM" in printed and "BiMatting" in printed
    data = json.loads(path.read_text())
    assert [r["summary"]["size"] for r in data["results"]] == [[144, 256], [360, 640]]
    for r in data["results"]:
        s = r["summary"]
        # Counted, not copied: fewer OPs than RVM dense, fewer still with the masked units sparse,
        # and skipping every masked unit bounds both.
        assert 1 < s["ops_ratio_dense"] <= s["ops_ratio_sparse"] <= s["ops_ratio_upper_bound"]
        assert s["bimatting_ops_dense"] == r["bimatting"]["total"]["ops"]
    # The packed checkpoint, measured as files: above the paper's 21.6x (RESULTS.md: 22.06x).
    packed = data["packed"]
    assert packed["ratio"] > complexity.PAPER_STORAGE_RATIO
    assert packed["ratio_sign_bits_only"] > packed["ratio"]
