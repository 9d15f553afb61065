"""bench/compile_report.py: the default tiles compile for sm_90 without register spills.

Compiling needs no GPU (Triton's bundled ptxas); spills were what made the first GPU
measurement of the packed conv slow (bench/RESULTS.md), so this guards the tile choice.
The report runs in a subprocess: this process's kernels were imported for the interpreter.
"""
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "compile_report.py")


def _run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("kernel, layers", [
    # a 3x3 backbone layer (it spilled 2 KB a thread before) and decode0's full-resolution 3x3
    ("dense", ["3x3s1-64to64-128x72", "3x3s1-35to16-512x288"]),
    ("sparse", ["3x3s1-128to128-64x36"]),  # a decoder unit's masked 3x3, 128 channels
])
def test_default_tiles_compile_without_spills(kernel, layers):
    done = _run("--kernel", kernel, "--only", *layers, "--check")
    if "ptxas" in done.stderr and "No such file" in done.stderr:  # pragma: no cover - triton build
        pytest.skip("no ptxas in this triton build")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in done.stdout.splitlines() if line.split()[:1] and line.split()[0] in layers]
    assert len(rows) == len(layers)
    for row in rows:
        regs = int(row.split()[2])
        assert 0 < regs <= 255


def test_bad_layer_name_is_named():
    done = _run("--only", "3x3s1-1to1-1x1")
    assert done.returncode == 2 and "--only" in done.stderr and "3x3s1-1to1-1x1" in done.stderr
