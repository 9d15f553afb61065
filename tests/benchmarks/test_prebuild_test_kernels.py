"""bench/prebuild_test_kernels.py: the GPU tests' launches compiled for sm_90 and still run.

The plugin compiles each launch of a test for sm_90 into TRITON_CACHE_DIR, then runs it in
Triton's interpreter, so the test passes as it would on the GPU (and reaches its later
launches). Checked on two tests: sign_pack against its reference, and the sparse tile lists,
whose kernels call Triton's own jit helpers (``tl.max``) from inside the interpreter.
"""
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
TESTS = os.path.join(os.path.dirname(__file__), "..", "kernels")


def test_launches_are_compiled_and_the_tests_still_pass(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env.update(BIMATTING_TEST_CUDA="1", TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=BENCH)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:warnings",
         "-p", "prebuild_test_kernels",
         os.path.join(TESTS, "test_pack.py") + "::test_sign_pack_matches_reference",
         os.path.join(TESTS, "test_sparse_unit.py") + "::test_frame_lists_for_recurrent_steps",
         "-k", "dtype0 and 70 or recurrent"],
        capture_output=True, text=True, env=env, timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    summary = next(line for line in out.splitlines() if line.startswith("prebuild_test_kernels:"))
    compiled = int(summary.split()[1])
    assert compiled >= 3 and "0 failed to compile" in summary
    assert "2 passed" in out.splitlines()[-1]
    entries = os.listdir(tmp_path)
    assert len(entries) == compiled  # one cache entry per specialisation
