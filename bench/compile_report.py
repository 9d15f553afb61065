"""Registers, spills, shared memory and the inner loop's instructions of the packed binary
conv, compiled for a GPU that need not be here: no device time spent (the first thing to
read when a kernel is slow).

    python bench/compile_report.py                          # BiMatting's layers at 512x288@1, sm_90
    python bench/compile_report.py --size 1920x1080@0.25 --tiles 64,64,64,4,3 128,64,32,4,3
    python bench/compile_report.py --kernel sparse         # the tile-sparse decoder units' conv

For each distinct binary conv layer of BiMatting at ``--size`` (the shapes of
``bench/kernels.py``), the kernel is launched through the library as ``convert``'s models
launch it (fused BN scale/shift, PReLU, the next layer's sign + pack) on pretend-CUDA
tensors and compiled by Triton's own JIT path for ``--arch`` (``bench/compile_model.py``:
the specialisation a GPU would compile); the bundled ``ptxas -v`` then reports registers per
thread, spill stores/loads (bytes of local memory traffic per thread) and the kernel's
shared memory, and the tensor-core loop of its machine code (``bench/sass_loop.py``):
instructions a warp issues per iteration, tensor-core (MMA) instructions among them, and
the multiply-adds per clock and SM that instruction issue allows at most, also as a
fraction of Hopper's fp16 tensor-core peak (cuDNN fp16's ceiling). By default each
layer gets the CUDA heuristic tile (``kernels/binary_conv._heuristic_config``); ``--tiles``
compiles the given ``BM,BN,BK,num_warps,num_stages`` tiles instead, for every layer.

Nothing is launched and no GPU is needed; the numbers are this Triton version's (register
allocation can differ a little between versions).
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (the interpreter compiles nothing)

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_model import pretend_cuda  # noqa: E402  (bench/compile_model.py)
from sass_loop import PEAK_MACS_PER_CLK, loop_report  # noqa: E402  (bench/sass_loop.py)

from bimatting_triton.kernels import binary_conv, sparse_unit  # noqa: E402
from bimatting_triton.kernels.binary_conv import Epilogue, binary_conv2d, pack_weight  # noqa: E402
from bimatting_triton.kernels.pack import sign_pack, words_for  # noqa: E402

KERNEL_NAMES = {"dense": "_binary_conv_kernel", "sparse": "_sparse_conv_kernel"}


def compile_layer(shape, tile: dict, arch: int, method: int = 0, kernel: str = "dense") -> dict:
    """Compile the packed conv (``kernel`` 'dense', or 'sparse': the tile-sparse conv, 8x8
    tiles) for ``shape`` = (Cin, Cout, H, W, k, stride) with ``tile`` = dict(BM, BN, BK,
    num_warps, num_stages) (BM unused by 'sparse'), launched as ``convert``'s models launch
    it: folded BN scale/shift and PReLU, then (dense) the next layer's sign + pack only, or
    (sparse) ``y * mask + out`` into an existing output. The launch goes through the library
    on pretend-CUDA tensors and is compiled by Triton's own JIT path
    (``bench/compile_model.py``); -> {'regs', 'spill_stores', 'spill_loads', 'stack', 'shared'}
    and the tensor-core loop's {'loop_instr', 'mma_instr', 'byte_stores', 'mac_per_clk',
    'opcodes'} (``bench/sass_loop.py``)."""
    cin, cout, h, w, k, s = shape
    results: dict = {}
    options = {KERNEL_NAMES[kernel]: dict(num_warps=tile["num_warps"], num_stages=tile["num_stages"])}
    with torch.no_grad(), pretend_cuda(arch, results, options=options, keep_cubin=True):
        x = sign_pack(torch.randn(1, cin, h, w))  # (its own launch is compiled too, and not reported)
        weight = pack_weight(torch.randn(cout, cin, k, k), stride=s)
        epilogue = Epilogue(scale=torch.rand(cout), shift=torch.randn(cout), act="prelu",
                            prelu_weight=torch.rand(cout))
        code = "dot" if method == 0 else "popcount"
        if kernel == "sparse":
            ho, wo = weight.output_size(h, w)
            out, mask = torch.empty(1, cout, ho, wo), torch.ones(1, 1, ho, wo)
            epilogue.out, epilogue.mask, epilogue.addend = out, mask, out
            tiles = sparse_unit.active_tiles_reference(mask.unsqueeze(1), (8, 8))
            sparse_unit.sparse_binary_conv2d(x, weight, epilogue, tiles, method=code, block=(tile["BN"], tile["BK"]))
        else:
            epilogue.store_float, epilogue.pack, epilogue.next_bias = False, True, torch.randn(cout)
            binary_conv2d(x, weight, epilogue, method=code, block=(tile["BM"], tile["BN"], tile["BK"]))
    (row,) = [r for r in results.values() if r["kernel"] == KERNEL_NAMES[kernel]]
    if row["error"]:
        raise RuntimeError(f"{KERNEL_NAMES[kernel]} for {shape} with {tile}: {row['error']}")
    bm = 64 if kernel == "sparse" else tile["BM"]  # (the sparse kernels' 8x8-pixel tiles)
    loop = loop_report(row["cubin"], bm * tile["BN"] * tile["BK"], tile["num_warps"])
    return {**{key: row[key] for key in ("regs", "spill_stores", "spill_loads", "stack", "shared")}, **loop}


def default_tile(kernel: str, method: int, shape) -> dict:
    """The tile the library launches this layer with on CUDA (no autotuning), for the
    epilogue compiled here (no residual)."""
    cin, cout = shape[:2]
    if kernel == "sparse":
        return dict(BM=0, **sparse_unit.sparse_heuristic_config(method, cout, words_for(cin) * 32))
    return binary_conv._heuristic_config(method, cout, words_for(cin) * 32, taps=shape[4] ** 2)


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

    from kernels import layer_shapes  # bench/kernels.py (this script's folder is on sys.path)

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
          f"{'stack B':>8} {'smem KiB':>9} {'loop instr':>10} {'MMA':>4} {'MAC/clk/SM':>10} {'x fp16 peak':>11}")
    for shape in shapes:
        cin, cout, h, w, k, s = shape
        for tile in args.tiles or [default_tile(args.kernel, method, shape)]:
            r = compile_layer(shape, tile, args.arch, method, args.kernel)
            label = label_of[shape]
            t = f"{tile['BM']},{tile['BN']},{tile['BK']},{tile['num_warps']},{tile['num_stages']}"
            # (no loop: the compiler unrolled a short one, e.g. a 1x1 layer of one channel block)
            loop = (f"{r['loop_instr']:10d} {r['mma_instr']:4d} {r['mac_per_clk']:10.0f} "
                    f"{r['mac_per_clk'] / PEAK_MACS_PER_CLK['fp16']:11.2f}" if r["loop_instr"] else
                    f"{'unrolled':>10} {'-':>4} {'-':>10} {'-':>11}")
            print(f"{label:<34} {t:<20} {r['regs']:5d} {r['spill_stores']:>6d}/{r['spill_loads']:<7d} "
                  f"{r['stack']:8d} {r['shared'] / 1024:9.1f} {loop}", flush=True)
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
