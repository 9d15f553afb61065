"""Registers, spills and shared memory of the packed binary conv, compiled for a GPU that
need not be here: no device time spent (the first thing to read when a kernel is slow).

    python bench/compile_report.py                          # BiMatting's layers at 512x288@1, sm_90
    python bench/compile_report.py --size 1920x1080@0.25 --tiles 64,64,64,4,3 128,64,32,4,3
    python bench/compile_report.py --kernel sparse         # the tile-sparse decoder units' conv

For each distinct binary conv layer of BiMatting at ``--size`` (the shapes of
``bench/kernels.py``), the kernel is specialised as ``convert``'s models launch it (fused
BN scale/shift, PReLU, the next layer's sign + pack) and compiled by Triton to PTX for
``--arch``; the bundled ``ptxas -v`` then reports registers per thread, spill stores/loads
(bytes of local memory traffic per thread) and the kernel's shared memory. By default each
layer gets the CUDA heuristic tile (``kernels/binary_conv._heuristic_config``); ``--tiles``
compiles the given ``BM,BN,BK,num_warps,num_stages`` tiles instead, for every layer.

Nothing is launched and no GPU is needed; the numbers are this Triton version's (register
allocation can differ a little between versions).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (the interpreter compiles nothing)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from bimatting_triton.kernels import binary_conv, sparse_unit  # noqa: E402
from bimatting_triton.kernels.pack import words_for  # noqa: E402

_PTXAS_LINE = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")

# Pointer arguments holding int32 words (packed bits, tile lists); every other ``*_ptr`` is a
# float vector/map (float32 here), ``w_ptr`` is int8 (dot) or int32 (popcount) weights, and
# the remaining non-constexpr arguments are 32-bit ints (sizes, strides).
_INT32_POINTERS = {"x_ptr", "p_ptr", "tiles_ptr", "count_ptr"}


def _signature(fn, constexprs: dict, method: int) -> tuple[dict, dict]:
    """Triton signature and divisibility attributes for a launch like convert's."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        if not name.endswith("_ptr"):
            sig[name] = "i32"
            continue
        if name == "w_ptr":
            sig[name] = "*i8" if method == 0 else "*i32"
        else:
            sig[name] = "*i32" if name in _INT32_POINTERS else "*fp32"
        attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
    return sig, attrs


def _constexprs(kernel: str, shape, tile: dict, method: int) -> dict:
    """The constexprs of a typical launch: BN scale/shift, PReLU; the dense conv packs its
    output for the next layer, the sparse unit writes ``y * mask + addend``."""
    _, _, _, _, k, s = shape
    common = dict(KH=k, KW=k, STRIDE=s, PAD=k // 2, METHOD=method, HW_POPC=True, HAS_SHIFT=True, R1_MODE=0,
                  HAS_BA=False, ACT=1, HAS_BB=False, R2_MODE=0, BN=tile["BN"], BK=tile["BK"])
    if kernel == "sparse":
        return dict(common, MASK_MODE=2, TH=8, TW=8)
    return dict(common, EPILOGUE=1, MASK_MODE=0, STORE_Y=False, STORE_P=True, HAS_NB=True, BM=tile["BM"])


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


def compile_layer(shape, tile: dict, arch: int, method: int = 0, kernel: str = "dense") -> dict:
    """Compile the packed conv (``kernel`` 'dense', or 'sparse': the tile-sparse unit, 8x8
    tiles) for ``shape`` = (Cin, Cout, H, W, k, stride) with ``tile`` = dict(BM, BN, BK,
    num_warps, num_stages) (BM unused by 'sparse');
    -> {'regs', 'spill_stores', 'spill_loads', 'stack', 'shared'}."""
    fn = sparse_unit._sparse_conv_kernel if kernel == "sparse" else binary_conv._binary_conv_kernel
    constexprs = _constexprs(kernel, shape, tile, method)
    sig, attrs = _signature(fn, constexprs, method)
    src = ASTSource(fn, sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=tile["num_warps"], num_stages=tile["num_stages"]))
    return dict(shared=compiled.metadata.shared, **ptxas_report(compiled.asm["ptx"], arch))


def default_tile(kernel: str, method: int, shape) -> dict:
    """The tile the library launches this layer with on CUDA (no autotuning)."""
    from kernels import output_pixels  # bench/kernels.py (this script's folder is on sys.path)

    cin, cout = shape[:2]
    if kernel == "sparse":
        return dict(BM=0, **sparse_unit.sparse_heuristic_config(method, cout, words_for(cin) * 32))
    return binary_conv._heuristic_config(method, output_pixels(shape), cout, words_for(cin) * 32)


def _parse_tile(text: str) -> dict:
    try:
        bm, bn, bk, warps, stages = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BM,BN,BK,num_warps,num_stages, got {text!r}") from None
    return dict(BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def main(argv: list[str] | None = None) -> list[tuple]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x288@1", help="WIDTHxHEIGHT@DOWNSAMPLE_RATIO (default 512x288@1)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90, H100/H200)")
    parser.add_argument("--method", choices=("dot", "popcount"), default="dot")
    parser.add_argument("--kernel", choices=("dense", "sparse"), default="dense",
                        help="the dense packed conv, or the tile-sparse unit's conv (stride 1 layers only)")
    parser.add_argument("--tiles", type=_parse_tile, nargs="*", default=None,
                        help="BM,BN,BK,num_warps,num_stages tiles to compile for every layer "
                             "(default: each layer's heuristic tile)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N layer shapes")
    parser.add_argument("--only", nargs="*", default=None,
                        help="only these layers, by label (e.g. 3x3s1-64to64-128x72)")
    parser.add_argument("--check", action="store_true",
                        help="exit with status 1 if any compiled kernel spills registers")
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from kernels import layer_shapes  # bench/kernels.py

    method = 0 if args.method == "dot" else 1
    shapes = layer_shapes(args.size)
    if args.kernel == "sparse":
        shapes = [sh for sh in shapes if sh[5] == 1]
    shapes = shapes[: args.limit]
    label_of = {sh: f"{sh[4]}x{sh[4]}s{sh[5]}-{sh[0]}to{sh[1]}-{sh[3]}x{sh[2]}" for sh in shapes}
    if args.only is not None:
        missing = sorted(set(args.only) - set(label_of.values()))
        if missing:
            parser.error(f"--only: no such layer at {args.size}: {missing}")
        shapes = [sh for sh in shapes if label_of[sh] in args.only]
    rows = []
    print(f"{'layer (k x k s, cin to cout, W x H)':<34} {'tile BM,BN,BK,w,s':<20} {'regs':>5} {'spill st/ld B':>14} "
          f"{'stack B':>8} {'smem KiB':>9}")
    for shape in shapes:
        cin, cout, h, w, k, s = shape
        for tile in args.tiles or [default_tile(args.kernel, method, shape)]:
            r = compile_layer(shape, tile, args.arch, method, args.kernel)
            label = label_of[shape]
            t = f"{tile['BM']},{tile['BN']},{tile['BK']},{tile['num_warps']},{tile['num_stages']}"
            print(f"{label:<34} {t:<20} {r['regs']:5d} {r['spill_stores']:>6d}/{r['spill_loads']:<7d} "
                  f"{r['stack']:8d} {r['shared'] / 1024:9.1f}", flush=True)
            rows.append((shape, tile, r))
    return rows


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    rows = main(sys.argv[1:])
    if "--check" in sys.argv[1:]:
        spilled = [(shape, tile) for shape, tile, r in rows if r["spill_stores"] or r["spill_loads"] or r["stack"]]
        if spilled:
            print(f"{len(spilled)} kernel(s) spill registers: {spilled}", file=sys.stderr)
            sys.exit(1)
