"""Kernel benchmarks (pytest-benchmark): packed binary conv against cuDNN fp16, per real layer shape.

    python bench/kernels.py                          # runs pytest-benchmark on this file
    python bench/kernels.py --size 1920x1080@0.25 -- --benchmark-json out.json

The layer shapes are BiMatting's own binary convolutions at the chosen frame size
(collected with forward hooks on a meta-device forward, so no compute), deduplicated.
For each shape, one benchmark group compares:

* ``packed-dot``       our packed binary conv, int8 ``tl.dot`` inner loop, fused epilogue
                       (alpha/BN scale+shift), float16 output;
* ``packed-popcount``  the same with the AND/XOR + popcount inner loop;
* ``packed-dot-tuned`` the same, autotuned over the kernel's CUDA configs
                       (``BIMATTING_AUTOTUNE=1``); the chosen tile goes to ``extra_info``,
                       next to the default heuristic tile of ``packed-dot``;
* ``cudnn-fp16``       ``F.conv2d`` in float16 (cuDNN) on the same shape, channels-last,
                       with the BN folded into its bias (the float model's equivalent);
* ``sign-pack``        packing the float16 input to bits (the cost our conv pays once
                       per layer input, usually fused into the previous epilogue).

And for each masked unit of the decoder (decode3..1: ``conv``, ``gru.ih``, ``gru.hh``; group
``unit <block.name> <shape>``), ``unit3x3(x) * m + unit1x1(x)`` as the model computes it:

* ``masked-unit-d30`` / ``masked-unit-d100``  ``sparse_unit`` (one launch: the 1x1 on every
                       tile, the 3x3 on the active ones) with a mask whose pixels are 30 %
                       / 100 % non-zero (a clustered mask, as ``bench/sparse.py`` draws it);
* ``cudnn-fp16``       the float model's equivalent: two ``F.conv2d`` in float16 (3x3 and
                       1x1, biases) and ``* m +``.

The Triton kernels need CUDA: on a machine without it every benchmark is skipped with
that reason (this file is not part of the test suite; see bench/RESULTS.md). With
``--benchmark-json FILE`` the run ends with a compact table per shape (medians in µs and
cuDNN fp16 / packed ratios), :func:`summarize`.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

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


def unit_shapes(size: str = DEFAULT_SIZE) -> list[tuple[str, int, int, int, int]]:
    """(block.unit, Cin, Cout, H, W) of the decoder's masked units with a 1x1 twin (decode3..1)."""
    from sparse import decoder_units  # bench/sparse.py

    return [(f"{u.block}.{u.name}", u.cin, u.cout, u.size[0], u.size[1])
            for u in decoder_units(size) if u.binary and u.block != "decode0"]


SHAPES = layer_shapes() if torch.cuda.is_available() else []
UNITS = unit_shapes() if torch.cuda.is_available() else []
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels and cuDNN fp16 need CUDA")


def output_pixels(shape) -> int:
    """Output pixels per image, Ho * Wo, of a (Cin, Cout, H, W, k, stride) layer with k // 2 padding."""
    _, _, h, w, k, s = shape
    return ((h + 2 * (k // 2) - k) // s + 1) * ((w + 2 * (k // 2) - k) // s + 1)


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


# Calls per timed round: the GPU is synchronised once a round, not after each call, so that a
# ~10 µs kernel is timed back to back as in the model, not with a host round trip each (which
# would pull every cuDNN / packed ratio toward 1). pytest-benchmark's own table shows the time of
# a round; summarize() divides by this (stored in each benchmark's extra_info).
CALLS_PER_ROUND = 20


def _timed(benchmark, fn):
    def run():
        for _ in range(CALLS_PER_ROUND):
            fn()
        torch.cuda.synchronize()

    run()  # compile / autotune outside the measurement
    benchmark.extra_info["calls_per_round"] = CALLS_PER_ROUND
    benchmark.pedantic(run, rounds=12, iterations=1, warmup_rounds=2)  # ~280 calls, as before


@needs_cuda
@pytest.mark.parametrize("method", ["dot", "popcount"])
@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_packed_conv(benchmark, shape, method):
    from bimatting_triton.kernels.binary_conv import binary_conv2d

    from bimatting_triton.kernels.binary_conv import _heuristic_config

    _, packed_x, packed_w, epilogue, _, _ = _inputs(shape)
    benchmark.group = _ids(shape)
    benchmark.name = f"packed-{method}"
    benchmark.extra_info["config"] = str(
        _heuristic_config(0 if method == "dot" else 1, shape[1], packed_x.words * 32, taps=shape[4] ** 2))
    _timed(benchmark, lambda: binary_conv2d(packed_x, packed_w, epilogue, method=method))


@needs_cuda
@pytest.mark.parametrize("shape", SHAPES, ids=[_ids(s) for s in SHAPES])
def test_packed_conv_autotuned(benchmark, shape, monkeypatch):
    from bimatting_triton.kernels import binary_conv

    monkeypatch.setenv("BIMATTING_AUTOTUNE", "1")
    _, packed_x, packed_w, epilogue, _, _ = _inputs(shape)
    benchmark.group = _ids(shape)
    benchmark.name = "packed-dot-tuned"
    _timed(benchmark, lambda: binary_conv.binary_conv2d(packed_x, packed_w, epilogue, method="dot"))
    tuner = binary_conv._TUNED.get(0)
    benchmark.extra_info["config"] = str(getattr(tuner, "best_config", None))


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


def _unit_ids(unit) -> str:
    name, cin, cout, h, w = unit
    return f"unit {name} {cin}to{cout}-{w}x{h}"


def _unit_inputs(unit, density: float, device: str = "cuda"):
    """Packed input, weights, epilogues, mask and tile list of a masked unit, and the float16
    tensors of its cuDNN equivalent; the mask drawn as bench/sparse.py draws it."""
    from sparse import coarse_size, mask_for_density, parse_size  # bench/sparse.py

    from bimatting_triton.kernels.binary_conv import Epilogue, pack_weight
    from bimatting_triton.kernels.pack import sign_pack
    from bimatting_triton.kernels.sparse_unit import active_tiles

    _, cin, cout, h, w = unit
    fh, fw, ratio = parse_size(DEFAULT_SIZE)
    net = (int(fh * ratio), int(fw * ratio)) if ratio != 1 else (fh, fw)
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(1, cin, h, w, generator=gen).to(device).half().contiguous(memory_format=torch.channels_last)
    w3, w1 = torch.randn(cout, cin, 3, 3, generator=gen).to(device), torch.randn(cout, cin, 1, 1, generator=gen).to(device)
    scale, shift = torch.rand(cout, generator=gen).to(device) + 0.5, torch.randn(cout, generator=gen).to(device)
    mask = mask_for_density(density, coarse_size(net), (h, w)).to(device).half()
    epi = Epilogue(scale=scale, shift=shift, act="sigmoid", out_dtype=torch.float16)
    packed = sign_pack(x)
    binary = (packed, pack_weight(w3, 1, 1), epi, packed, pack_weight(w1, 1, 0), epi, mask,
              active_tiles(mask, (8, 8)))
    cl = torch.channels_last
    floats = (x, w3.half().contiguous(memory_format=cl), w1.half().contiguous(memory_format=cl), shift.half(), mask)
    return binary, floats


@needs_cuda
@pytest.mark.parametrize("density", [0.3, 1.0], ids=["d30", "d100"])
@pytest.mark.parametrize("unit", UNITS, ids=[_unit_ids(u) for u in UNITS])
def test_masked_unit(benchmark, unit, density):
    from bimatting_triton.kernels.sparse_unit import sparse_unit

    args, _ = _unit_inputs(unit, density)
    benchmark.group = _unit_ids(unit)
    benchmark.name = f"masked-unit-d{round(density * 100)}"
    benchmark.extra_info["tile_density"] = float(args[-1].density())
    _timed(benchmark, lambda: sparse_unit(*args))


@needs_cuda
@pytest.mark.parametrize("unit", UNITS, ids=[_unit_ids(u) for u in UNITS])
def test_cudnn_fp16_unit(benchmark, unit):
    torch.backends.cudnn.benchmark = True
    _, (x, w3, w1, bias, mask) = _unit_inputs(unit, 0.3)
    benchmark.group = _unit_ids(unit)
    benchmark.name = "cudnn-fp16"
    _timed(benchmark, lambda: F.conv2d(x, w3, bias, padding=1) * mask + F.conv2d(x, w1, bias))


SUMMARY_COLUMNS = ("cudnn-fp16", "packed-dot", "packed-dot-tuned", "packed-popcount", "sign-pack",
                   "masked-unit-d30", "masked-unit-d100")


def summarize(report: dict) -> str:
    """A pytest-benchmark JSON report -> one line per layer shape: median µs of each
    variant and cuDNN fp16 time / packed time (> 1: the packed conv is faster)."""
    medians: dict[str, dict[str, float]] = defaultdict(dict)
    for b in report.get("benchmarks", []):
        calls = b.get("extra_info", {}).get("calls_per_round", 1)  # a round times that many calls
        medians[b["group"]][b["name"]] = 1e6 * b["stats"]["median"] / calls
    head = f"{'layer (k x k s, cin to cout, W x H)':<34}" + "".join(f"{c:>17}" for c in SUMMARY_COLUMNS)
    lines = ["median µs per call; ratios are cuDNN fp16 / packed",
             head + f"{'cudnn/dot':>10}{'cudnn/tuned':>12}{'cudnn/unit30':>13}"]
    for group, row in medians.items():
        cells = "".join(f"{row[c]:17.1f}" if c in row else f"{'-':>17}" for c in SUMMARY_COLUMNS)
        ratio = [f"{row['cudnn-fp16'] / row[c]:.2f}x" if "cudnn-fp16" in row and c in row else "-"
                 for c in ("packed-dot", "packed-dot-tuned", "masked-unit-d30")]
        lines.append(f"{group.replace(' ', '_'):<34}{cells}{ratio[0]:>10}{ratio[1]:>12}{ratio[2]:>13}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description="Kernel benchmarks (pytest-benchmark); arguments after -- go to pytest.",
        usage="python bench/kernels.py [--size WxH@RATIO] [-- PYTEST_ARGS ...]",
    )
    parser.add_argument("--size", default=DEFAULT_SIZE,
                        help=f"WIDTHxHEIGHT@RATIO of the frames whose layers are benchmarked (default {DEFAULT_SIZE})")
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    size = parser.parse_args(ours).size
    try:
        parse_frame_size(size)
    except argparse.ArgumentTypeError as e:
        parser.error(f"argument --size: {e}")
    os.environ["BIMATTING_BENCH_SIZE"] = size  # as given (a reformatted ratio could round); read on import
    if not torch.cuda.is_available():
        print("bench/kernels.py: no CUDA device; the Triton kernels and cuDNN fp16 need one, nothing to measure.")
    rc = pytest.main([__file__, "-q", "-p", "no:cacheprovider", "--benchmark-enable",
                      "--benchmark-group-by=group", "--benchmark-columns=min,median,max,ops", *extra])
    json_path = next((a.split("=", 1)[1] for a in extra if a.startswith("--benchmark-json=")), None)
    if json_path is None and "--benchmark-json" in extra:
        json_path = extra[extra.index("--benchmark-json") + 1]
    if json_path and os.path.exists(json_path) and os.path.getsize(json_path):
        with open(json_path) as f:
            print(summarize(json.load(f)))
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
