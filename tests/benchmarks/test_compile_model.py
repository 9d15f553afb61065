"""bench/compile_model.py: every kernel specialisation a converted BiMatting launches compiles
for sm_90 (no GPU needed) without register spills.

The interpreter that runs the kernel tests on CPU skips Triton's compiler, so a kernel can
pass them and still fail to compile for a GPU (it happened on triton 3.6: a float64
``tl.dot`` rejected at compile time). This compiles what the model really launches.
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "compile_model.py")
ARCHIVE = os.path.join(os.path.dirname(SCRIPT), "triton_cache_archive.py")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_every_launched_specialisation_compiles_without_spills(dtype):
    # float16: half activations and outputs with float32 epilogues, a path the interpreter
    # runs but whose compiled form only this checks.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run([sys.executable, SCRIPT, "--size", "128x96@1", "--check", "--dtype", dtype],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = done.stdout.strip().splitlines()[-1]
    assert "0 failed, 0 spill" in summary
    kernels = {line.split()[0] for line in done.stdout.splitlines()[1:-1]}
    assert {"_binary_conv_kernel", "_sparse_conv_kernel", "_sign_pack_kernel", "_tile_flags_kernel",
            "_compact_kernel", "_sparse_float_conv_kernel"} <= kernels


# Runs a script as another build of the same Triton release would: the same triton_key()
# but for the hash of its compiled library (as Triton 3.6.0 for Python 3.12 is to the one for
# Python 3.11: see bench/triton_cache_archive.py).
OTHER_BUILD = """
import runpy, sys
import triton.runtime.cache as cache
sys.path.insert(0, {bench!r})
import triton_cache_archive as archive
real_key, real_lib = cache.triton_key(), archive.libtriton_hash()
cache.triton_key = lambda: real_key.replace(real_lib, "f" * 64)
archive.libtriton_hash = lambda: "f" * 64
sys.argv = sys.argv[1:]
if sys.argv[0].endswith("triton_cache_archive.py"):
    archive.main(sys.argv[1:])  # (its patched module: runpy would load a second copy)
else:
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_prebuilt_kernels_are_found_in_another_cache_dir_and_triton_build(tmp_path):
    # compile_model compiles through the kernels' own warmup (Triton's JIT path), so what it
    # writes to TRITON_CACHE_DIR is what Triton looks up at launch; packed, carried and
    # unpacked into another directory (bench/prebuild_triton_cache.sh -> gpu_session.sh),
    # and under another build of the same Triton, every specialisation is found there and
    # nothing is compiled again. The launches: what bench/kernels.py launches on a GPU
    # (--bench-kernels, at a small size), which this also checks compiles without spills.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_DEFAULT_FP_FUSION")}
    env["BIMATTING_BENCH_SIZE"] = "64x48@1"
    other_build = tmp_path / "other_build.py"
    other_build.write_text(OTHER_BUILD.format(bench=os.path.dirname(SCRIPT)))

    def run(cache_dir, *args, build=()):
        done = subprocess.run([sys.executable, *build, *args], capture_output=True, text=True, timeout=900,
                              env={**env, "TRITON_CACHE_DIR": str(cache_dir)})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout.strip().splitlines()

    built, archive = tmp_path / "built", tmp_path / "kernels.tar.xz"
    lines = run(built, SCRIPT, "--bench-kernels", "--check")
    assert "0 failed, 0 spill" in lines[-1]
    assert {"_binary_conv_kernel", "_masked_pair_kernel", "_sign_pack_kernel", "_tile_flags_kernel"} <= {
        line.split()[0] for line in lines[1:-1]}
    count = int(lines[-1].split()[0])  # "N specialisations, ..."
    entries = sorted(os.listdir(built))
    assert len(entries) == count > 10
    assert all(os.path.exists(built / e / "bimatting-key.json") for e in entries)
    run(built, ARCHIVE, "pack", str(built), str(archive))

    for name, build, expected in (("same", (), f"{count} as built, 0 under"),
                                  ("other", (str(other_build),), f"0 as built, {count} under")):
        cache_dir = tmp_path / name
        assert expected in run(cache_dir, *build, ARCHIVE, "unpack", str(archive), str(cache_dir))[-1]
        unpacked = sorted(os.listdir(cache_dir))
        assert (unpacked == entries) == (name == "same") and len(unpacked) == count
        groups = [json.loads(g.read_text()) for g in cache_dir.glob("*/__grp__*.json")]
        assert len(groups) == count and all(p.startswith(str(cache_dir / "")) and os.path.exists(p)
                                            for g in groups for p in g["child_paths"].values())
        run(cache_dir, *build, SCRIPT, "--bench-kernels", "--check")
        assert sorted(os.listdir(cache_dir)) == unpacked  # every launch found its kernel: none added


def test_sparse_bench_prebuild_reaches_its_kernels(monkeypatch):
    # compile_model.py --bench-sparse runs bench/sparse.py's launches with CUDA pretended (its
    # outputs unchecked: the kernels only compile there). Here with stand-ins that only note
    # the launches, at a small size: every masked kernel of the bench is reached.
    monkeypatch.syspath_prepend(os.path.dirname(SCRIPT))
    # compile_model drops TRITON_INTERPRET from the environment when imported (it compiles for
    # a GPU); the interpreted tests that run after this one in the same process need it back
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    import torch

    import bimatting_triton.kernels  # noqa: F401  (first, interpreted: compile_model would import it compiled)
    from compile_model import pretend_cuda

    import sparse as bench_sparse

    launched = set()

    class Noted:
        def __init__(self, kernel):
            self.name = kernel.fn.__name__

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.add(self.name)

    args = bench_sparse.parse_args(["--size", "64x36@1", "--densities", "0,50", "--check-only"])
    with torch.inference_mode(), pretend_cuda(90, {}, stand_in=Noted):
        rows, _ = bench_sparse.run(args, pretend_cuda=True)
    assert len(rows) == 22
    assert {"_binary_conv_kernel", "_sparse_conv_kernel", "_masked_pair_kernel", "_sparse_float_conv_kernel",
            "_tile_flags_kernel", "_sign_pack_kernel"} <= launched
