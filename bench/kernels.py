"""Kernel benchmarks (pytest-benchmark): packed binary conv against cuDNN fp16, per real layer shape.

    python bench/kernels.py                          # runs pytest-benchmark on this file
    python bench/kernels.py --size 1920x1080@0.25 -- --benchmark-json out.json

The layer shapes are BiMatting's own binary convolutions at the chosen frame size
(collected with forward hooks on a meta-device forward, so no compute), deduplicated.
For each shape, one benchmark group compares:

* ``packed-dot``       our packed binary conv, int8 ``tl.dot`` inner loop, fused epilogue
                       (alpha/BN scale+shift), float16 output;
* ``packed-popcount``  the same with the AND/XOR + popcount inner loop;
* ``cudnn-fp16``       ``F.conv2d`` in float16 (cuDNN) on the same shape, channels-last,
                       with the BN folded into its bias (the float model's equivalent);
* ``sign-pack``        packing the float16 input to bits (the cost our conv pays once
                       per layer input, usually fused into the previous epilogue).

The Triton kernels need CUDA: on a machine without it every benchmark is skipped with
that reason (this file is not part of the test suite; see bench/RESULTS.md).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from cli_args import parse_frame_size  # bench/cli_args.py

DEFAULT_SIZE = os.environ.get("BIMATTING_BENCH_SIZE", "1920x1080@0.25")


def layer_shapes(size: str = DEFAULT_SIZE) -> list[tuple[int, int, int, int, int, int]]:
    """(Cin, Cout, H, W, kernel, stride) of every BiConv2d of BiMatting at ``size``, deduplicated."""
    from bimatting_triton import BiMatting
    from bimatting_triton.nn import BiConv2d

    w, h, ratio = parse_frame_size(size)
    with torch.device("meta"):
        model = BiMatting().eval()
        src = torch.empty(1, 1, 3, h, w)
    shapes: list[tuple[int, int, int, int, int, int]] = []

    def hook(module, args, out):
        x = args[0]
        key = (module.in_channels, module.out_channels, x.shape[-2], x.shape[-1], module.kernel_size[0],
               module.stride[0])
        if key not in shapes:
            shapes.append(key)

    for m in model.modules():
        if isinstance(m, BiConv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(src, downsample_ratio=ratio)
    return shapes


SHAPES = layer_shapes() if torch.cuda.is_available() else []
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels and cuDNN fp16 need CUDA")


def _ids(shape):
    cin, cout, h, w, k, s = shape
    return f"{k}x{k}s{s}-{cin}to{cout}-{w}x{h}"


def _inputs(shape, device: str = "cuda"):
    from bimatting_triton.kernels.binary_conv import Epilogue, pack_weight
    from bimatting_triton.kernels.pack import sign_pack

    cin, cout, h, w, k, s = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, cin, h, w, generator=gen).to(device).half().contiguous(memory_format=torch.channels_last)
    weight = torch.randn(cout, cin, k, k, generator=gen).to(device)
    packed_w = pack_weight(weight, s, k // 2)
    scale = torch.rand(cout, generator=gen).to(device) + 0.5
    shift = torch.randn(cout, generator=gen).to(device)
    epilogue = Epilogue(scale=scale, shift=shift, out_dtype=torch.float16)
    return x, sign_pack(x), packed_w, epilogue, weight.half().contiguous(memory_format=torch.channels_last), shift.half()


def _timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()

    run()  # compile / autotune outside the measurement
    benchmark.pedantic(run, rounds=50, iterations=5, warmup_rounds=5)


@needs_cuda
@pytest.mark.parametrize("method", ["dot", "popcount"])
@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_packed_conv(benchmark, shape, method):
    from bimatting_triton.kernels.binary_conv import binary_conv2d

    _, packed_x, packed_w, epilogue, _, _ = _inputs(shape)
    benchmark.group = _ids(shape)
    benchmark.name = f"packed-{method}"
    _timed(benchmark, lambda: binary_conv2d(packed_x, packed_w, epilogue, method=method))


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_cudnn_fp16(benchmark, shape):
    torch.backends.cudnn.benchmark = True
    x, _, _, _, weight, bias = _inputs(shape)
    k, s = shape[4], shape[5]
    benchmark.group = _ids(shape)
    benchmark.name = "cudnn-fp16"
    _timed(benchmark, lambda: F.conv2d(x, weight, bias, stride=s, padding=k // 2))


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_sign_pack(benchmark, shape):
    from bimatting_triton.kernels.pack import sign_pack

    x, *_ = _inputs(shape)
    benchmark.group = _ids(shape)
    benchmark.name = "sign-pack"
    _timed(benchmark, lambda: sign_pack(x))


def main(argv: list[str]) -> int:
    args = list(argv)
    if "--size" in args:
        i = args.index("--size")
        os.environ["BIMATTING_BENCH_SIZE"] = args[i + 1]
        del args[i : i + 2]
    extra = args[args.index("--") + 1 :] if "--" in args else []
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device; the Triton kernels and cuDNN fp16 need one, nothing to measure.")
    return pytest.main([__file__, "-q", "-p", "no:cacheprovider", "--benchmark-enable",
                        "--benchmark-group-by=group", "--benchmark-columns=min,median,max,ops", *extra])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
