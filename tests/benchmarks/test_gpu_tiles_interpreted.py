"""The fused model with the GPU's code paths and tiles gives the CPU path's outputs, bit for bit.

CI's interpreter runs one small fixed tile per kernel; a GPU runs the heuristic tiles
(BM up to 128, BN 32-128, BK 32/64) and the sparse units' CUDA tiles. Here the launch sites
are told they are on CUDA (``bench/compile_model.pretend_cuda``), so they pick the GPU's
tiles, and each launch still runs in Triton's interpreter (``prebuild_test_kernels.Interpreted``:
the SWAR bit count instead of ``popc``, which the interpreter lacks: same integers). Binary math is integer math and the
epilogues do the same float operations per element whatever the tile, so the two forwards
must be equal to the last bit (float64, a size that is not a multiple of the tiles, T = 2;
128x96 and 256x144, where full-resolution layers take BM = 128, were checked the same way).
"""
import ast
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")

SCRIPT = """
import os, sys, torch
import bimatting_triton.kernels  # interpreted (TRITON_INTERPRET=1)
from bimatting_triton import BiMatting, convert
sys.path.insert(0, {bench!r})
from compile_model import pretend_cuda
from prebuild_test_kernels import Interpreted
os.environ["TRITON_INTERPRET"] = "1"  # (compile_model unsets it: Triton reads it at each launch too)

launches = []

class GpuTilesInterpreted(Interpreted):
    def __getitem__(self, grid):
        interpreted = super().__getitem__(grid)
        def launch(*args, **kwargs):
            launches.append(kwargs.get("BM") or kwargs.get("TH"))
            interpreted(*args, **kwargs)
        return launch

torch.manual_seed(0)
fused = convert(BiMatting().eval().double())
src = torch.rand(1, 2, 3, 28, 40, dtype=torch.float64)
with torch.no_grad():
    cpu = fused(src, downsample_ratio=1)
    with pretend_cuda(90, {{}}, stand_in=GpuTilesInterpreted):
        gpu = fused(src, downsample_ratio=1)
names = ["fgr", "pha", "r1", "r2", "r3", "r4"]
print("GPU-tile launches:", len(launches), "tiles BM/TH:", sorted({{t for t in launches if t}}))
print("unequal:", [n for n, a, b in zip(names, cpu, gpu) if not torch.equal(a, b)])
"""


def test_gpu_tiles_give_the_cpu_paths_outputs():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(bench=BENCH)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "unequal: []"
    # the GPU's tiles were launched (the interpreter's own: BM=128 and 16x16 sparse tiles)
    count, tiles = lines[-2].split("launches: ")[1].split(" tiles BM/TH: ")
    assert int(count) > 50 and {8, 64} <= set(ast.literal_eval(tiles))
