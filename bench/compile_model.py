"""Compile every Triton kernel specialisation that a converted BiMatting launches, for a GPU
that need not be here: the first call's compile time on a cold machine, and registers and
spills of each kernel as really launched (flags, dtypes, tiles), with no device time.

    python bench/compile_model.py                          # 512x288@1, T=1, sm_90
    python bench/compile_model.py --size 1920x1080@0.25 --frames 8

How: the converted model runs on the CPU with the kernels' launch sites told that they are
on CUDA (``triton_can_run``/``interpreting``/``hardware_popcount`` patched) and every
``kernel[grid](...)`` replaced by a recorder, which hands the launch to the kernel's own
``warmup`` (Triton's ahead-of-time entry: the JIT's binder, specialisation and options)
with Triton's driver told that the device is a GPU of ``--arch``, then runs ``ptxas -v`` on
the result. Nothing is executed: outputs are left uninitialised, which the model's Python
never branches on. The compiled kernels land in Triton's cache under the keys the JIT uses,
with each key's parts beside them, so ``TRITON_CACHE_DIR=DIR`` here fills a cache that a GPU
machine with the same Triton release reads instead of compiling, once
``bench/triton_cache_archive.py`` has moved it there (``bench/prebuild_triton_cache.sh``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions (the interpreter compiles nothing)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import parse_frame_size  # noqa: E402  (bench/cli_args.py)
from triton_cache_archive import recording_keys, write_sidecar  # noqa: E402

from bimatting_triton import BiMatting, convert  # noqa: E402
from bimatting_triton.kernels import _common, binary_conv, epilogue, pack, sparse_unit, tile_list  # noqa: E402

KERNELS = {
    binary_conv: ["_binary_conv_kernel"],
    sparse_unit: ["_sparse_conv_kernel", "_sparse_float_conv_kernel", "_masked_pair_kernel"],
    tile_list: ["_tile_flags_kernel", "_compact_kernel"],
    pack: ["_sign_pack_kernel"],
}


_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_report(ptx_source: str, arch: int) -> dict:
    """``ptxas -v`` on a PTX module -> {'regs', 'spill_stores', 'spill_loads', 'stack'} (bytes per thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(ptx_source)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([get_ptxas(arch).path, f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    spill = _SPILL.search(out)
    stack = _STACK.search(out)
    return dict(regs=int(_PTXAS_LINE.search(out).group(1)),
                spill_stores=int(spill.group(1)) if spill else 0, spill_loads=int(spill.group(2)) if spill else 0,
                stack=int(stack.group(1)) if stack else 0)


class TargetOnlyDriver:
    """Stands in for Triton's active driver where there is no GPU: it names a CUDA device of
    compute capability ``arch`` (device 0, stream 0) and can do nothing else. Enough for
    ``JITFunction.warmup``, which binds, specialises and compiles a launch as ``kernel[grid]``
    would, without launching it."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def target_only_driver(arch: int):
    """Triton's active driver replaced by a :class:`TargetOnlyDriver` (restored on exit)."""
    previous = driver._active  # (reading ``driver.active`` would create the real one, which needs a GPU)
    driver.set_active(TargetOnlyDriver(arch))
    try:
        yield
    finally:
        driver._active = previous


class Recorder:
    """Stands in for a ``@triton.jit`` function: ``rec[grid](*args, **kwargs)`` compiles the
    launch instead of running it, through the kernel's own ``warmup`` (Triton's binder,
    specialisation and options, as its JIT on a GPU of ``arch``): the compiled kernel is the
    one a GPU would run, stored in Triton's cache (``TRITON_CACHE_DIR``) under the key its JIT
    looks up there, so a cache filled here spares a GPU machine with the same Triton build
    the compilation. One result per distinct specialisation."""

    def __init__(self, fn, arch: int, results: dict, options: dict | None = None, keep_cubin: bool = False):
        self.fn, self.arch, self.results = fn, arch, results
        self.options = options or {}  # e.g. num_warps / num_stages to launch with instead
        self.keep_cubin = keep_cubin  # the result also holds the machine code ('cubin', bytes)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, {**kwargs, **self.options})

    def launch(self, grid, args, kwargs):
        options = dict(num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))
        tile = {k: kwargs[k] for k in ("BM", "BN", "BK", "BP", "BW", "BT", "BQ", "BC", "TH", "TW", "BLOCK")
                if k in kwargs}
        start = time.perf_counter()
        try:
            with target_only_driver(self.arch), recording_keys() as keys:
                compiled = self.fn.warmup(*args, grid=grid, **kwargs)
            write_sidecar(compiled, keys)  # the key's parts, for another build of this Triton
            error = None
        except Exception as exc:  # reported: a specialisation that does not compile is a bug
            compiled, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        seconds = time.perf_counter() - start
        key = (self.fn.__name__, compiled.hash if compiled is not None else repr(sorted(kwargs.items())))
        if key in self.results:
            self.results[key]["launches"] += 1
            return None
        report = {}
        if compiled is not None:
            report = dict(shared=compiled.metadata.shared, **ptxas_report(compiled.asm["ptx"], self.arch))
            if self.keep_cubin:
                report["cubin"] = compiled.asm["cubin"]
        self.results[key] = dict(kernel=self.fn.__name__, tile=tile, options=options, launches=1,
                                 compile_s=seconds, error=error, **report)
        return None


@contextlib.contextmanager
def pretend_cuda(arch: int, results: dict, stand_in=None, options: dict | None = None, keep_cubin: bool = False):
    """Launch sites believe they are on CUDA; kernels are Recorders (or ``stand_in(kernel)``
    if given: anything indexable by a grid and then callable). ``options``: kernel name ->
    launch options the Recorder sets (e.g. ``num_warps``); ``keep_cubin``: results hold the
    compiled machine code too. Restored on exit."""
    patches = []

    def patch(module, name, value):
        patches.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    for module in (_common, binary_conv, epilogue, pack, sparse_unit, tile_list):
        for name, value in (("triton_can_run", lambda t: True), ("interpreting", lambda: False),
                            ("hardware_popcount", lambda t: True)):
            if hasattr(module, name):
                patch(module, name, value)
    for module, names in KERNELS.items():
        for name in names:
            kernel = getattr(module, name, None)
            if kernel is None:  # (an older kernels/ checked out beside this script)
                continue
            patch(module, name, stand_in(kernel) if stand_in is not None
                  else Recorder(kernel, arch, results, (options or {}).get(name), keep_cubin))
    try:
        yield
    finally:
        for module, name, value in reversed(patches):
            setattr(module, name, value)


def compile_model(size: str = "512x288@1", frames: int = 1, arch: int = 90, float64: bool = False,
                  dtype: torch.dtype | None = None) -> list[dict]:
    """Every distinct kernel specialisation of three streaming calls of ``convert(BiMatting())``
    at ``size`` (the first frame; then with the returned recurrent states; then with copies of
    them, as :class:`~bimatting_triton.CudaGraphStep` captures the model: the returned states
    are strided views of larger buffers, their clones are packed, and Triton specialises on
    strides and alignment); one dict per specialisation.
    ``float64``: the model in float64, as the exactness tests run it (``BIMATTING_TEST_CUDA``);
    ``dtype``: any model dtype (float16: half activations, float32 epilogues)."""
    w, h, ratio = parse_frame_size(size)
    torch.manual_seed(0)
    dtype = dtype or (torch.float64 if float64 else torch.float32)  # float32: as bench/throughput.py runs it
    model = convert(BiMatting().eval().to(dtype))
    src = torch.rand(1, frames, 3, h, w, dtype=dtype)
    results: dict = {}
    with torch.inference_mode(), pretend_cuda(arch, results):
        _, _, *rec = model(src, downsample_ratio=ratio)
        model(src, *rec, downsample_ratio=ratio)
        model(src.clone(), *[r.clone() for r in rec], downsample_ratio=ratio)  # CudaGraphStep._capture's call
    return list(results.values())


def compile_bench_kernels(arch: int = 90) -> list[dict]:
    """Every distinct specialisation that ``bench/kernels.py`` launches at its frame size
    (``BIMATTING_BENCH_SIZE``, default HD@0.25) with the default tiles: the packed convs
    (``packed-dot``), their inputs' ``sign_pack`` and the masked units (tile lists and
    ``sparse_unit``); not the autotuned or popcount variants. One dict per specialisation."""
    import kernels as bench_kernels  # bench/kernels.py

    results: dict = {}
    with torch.inference_mode(), pretend_cuda(arch, results):
        for shape in bench_kernels.layer_shapes(bench_kernels.DEFAULT_SIZE):
            _, packed_x, packed_w, epilogue, _, _ = bench_kernels._inputs(shape, device="cpu")
            binary_conv.binary_conv2d(packed_x, packed_w, epilogue, method="dot")
        for unit in bench_kernels.unit_shapes(bench_kernels.DEFAULT_SIZE):
            for density in (0.3, 1.0):
                args, _ = bench_kernels._unit_inputs(unit, density, device="cpu")
                sparse_unit.sparse_unit(*args)
    return list(results.values())


def compile_bench_sparse(densities: str, arch: int = 90) -> list[dict]:
    """Every distinct specialisation that ``bench/sparse.py --densities DENSITIES`` launches at
    its defaults (HD@0.25, float16, 8x8 tiles): dense and masked convs, the masked units, the
    tile lists. One dict per specialisation."""
    import sparse as bench_sparse  # bench/sparse.py

    args = bench_sparse.parse_args(["--densities", densities, "--check-only"])
    results: dict = {}
    with torch.inference_mode(), pretend_cuda(arch, results):
        bench_sparse.run(args, pretend_cuda=True)
    return list(results.values())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x288@1", help="WIDTHxHEIGHT@DOWNSAMPLE_RATIO (default 512x288@1)")
    parser.add_argument("--frames", type=int, default=1, help="frames per call T (default 1)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90)")
    parser.add_argument("--float64", action="store_true", help="the model in float64 (the exactness tests' dtype)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), default=None,
                        help="the model's dtype (default float32; --float64 is --dtype float64)")
    parser.add_argument("--bench-kernels", action="store_true",
                        help="instead of the model, what bench/kernels.py launches (packed-dot, masked units; "
                             "its size from BIMATTING_BENCH_SIZE)")
    parser.add_argument("--bench-sparse", metavar="DENSITIES",
                        help="instead of the model, what bench/sparse.py --densities DENSITIES launches")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if a specialisation fails to compile or spills")
    args = parser.parse_args(argv)
    if args.bench_kernels:
        rows = compile_bench_kernels(args.arch)
    elif args.bench_sparse is not None:
        rows = compile_bench_sparse(args.bench_sparse, args.arch)
    else:
        rows = compile_model(args.size, args.frames, args.arch, args.float64,
                             getattr(torch, args.dtype) if args.dtype else None)
    print(f"{'kernel':<26} {'tile':<44} {'w,s':>5} {'launches':>8} {'regs':>5} {'spill st/ld':>12} "
          f"{'compile s':>9}")
    for r in sorted(rows, key=lambda r: (r["kernel"], str(r["tile"]))):
        tile = ",".join(f"{k}={v}" for k, v in r["tile"].items())
        ws = f"{r['options']['num_warps']},{r['options']['num_stages']}"
        if r["error"]:
            print(f"{r['kernel']:<26} {tile:<44} {ws:>5} {r['launches']:8d}  FAILED: {r['error']}")
            continue
        print(f"{r['kernel']:<26} {tile:<44} {ws:>5} {r['launches']:8d} {r['regs']:5d} "
              f"{r['spill_stores']:>5d}/{r['spill_loads']:<6d} {r['compile_s']:9.2f}")
    failed = [r for r in rows if r["error"]]
    spilled = [r for r in rows if not r["error"] and (r["spill_stores"] or r["spill_loads"])]
    total = sum(r["compile_s"] for r in rows)
    launches = f"{sum(r['launches'] for r in rows)} launches" + ("" if args.bench_kernels or args.bench_sparse is not None else " in three calls")
    print(f"{len(rows)} specialisations, {launches}; compiled in {total:.1f} s here (triton {triton.__version__}, "
          f"one process, cold cache needs TRITON_CACHE_DIR empty); {len(failed)} failed, {len(spilled)} spill")
    if args.check and (failed or spilled):
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
