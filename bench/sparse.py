"""Sparse decoder units: time and skipped binary operations against mask density.

    python bench/sparse.py                                   # 1920x1080@0.25, CUDA timings
    python bench/sparse.py --size 1920x1080@1 --tile 8x16 --json sparse.json
    python bench/sparse.py --counts-only                     # no GPU: skipped BOPs only
    TRITON_INTERPRET=1 python bench/sparse.py --size 128x72@1 --densities 0,10,100 --check-only

For every masked unit of BiMatting's decoder at the chosen frame size (its real
shapes, read from the model on the ``meta`` device: decode3..1 ``conv``, ``gru.ih``,
``gru.hh``; decode0's binary ``conv`` and its float 3x3) and each mask density
(default 0, 1, 5, 10, 25, 50, 100 %), one frame (N = 1):

* the mask: a clustered random set of cells of the coarse grid (1/16 of the network
  input, where BiMatting builds its mask; clusters from a smoothed random field, like
  the band along a silhouette), bilinearly resized to the level as the decoder does,
  with the number of cells chosen so that the level's fraction of pixels with
  ``m != 0`` is the target density (``pixels`` column; 0 and 100 % exact);
* ``tiles``: fraction of the level's pixels inside active tiles (the work done);
  decode0's binary unit uses the tiles grown by one pixel (its float conv's input ring);
* ``skipped GBOPs``: binary MACs not computed, per frame (profiler convention:
  Cin * 9 * Cout per pixel); for decode0's float conv, skipped float MACs (GFLOPs);
* ``dense ms``: the dense kernel with the same fused epilogue and ``* m + y1`` stage
  (``binary_conv2d`` over every pixel; decode0 float: ``sparse_float_conv2d`` with every
  tile active); ``sparse ms``: ``sparse_binary_conv2d`` / ``sparse_float_conv2d`` on the
  active tiles (list prebuilt; ``list ms`` is building it, once per level and forward,
  shared by the level's units; decode0 builds two). Medians of
  ``triton.testing.do_bench`` on CUDA. (decode0's binary unit is timed with the mask
  stage too; in the model it stores its result unmasked for the float conv: same work.)
* ``unit dense ms`` / ``unit ms`` (decode3..1): the whole masked unit as the model runs it,
  ``unit3x3 * m + unit1x1``: two dense launches (the 1x1, then the 3x3 with the mask
  stage) against ``sparse_unit``'s one launch (the 1x1 on every tile, the 3x3 on the
  active ones). Its time keeps the 1x1 branch's dense cost at any density.

Before timing, every case checks that the sparse result equals the dense one
(bitwise where the mask is 0; within 1e-3 relative elsewhere, an FMA apart).
``--counts-only`` (any machine) skips the kernels; ``--check-only`` runs each kernel
once and checks it (on the CPU under ``TRITON_INTERPRET=1``; small sizes only).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from cli_args import parse_frame_size  # bench/cli_args.py

DEFAULT_DENSITIES = (0, 1, 5, 10, 25, 50, 100)


def parse_size(text: str) -> tuple[int, int, float]:
    """'1920x1080@0.25' -> (H, W, downsample_ratio)."""
    w, h, ratio = parse_frame_size(text)
    return h, w, ratio


@dataclass
class Unit:
    block: str  # decode3 .. decode0
    name: str  # conv, gru.ih, gru.hh, conv.float
    cin: int
    cout: int
    size: tuple[int, int]  # output (H, W) of the level
    binary: bool = True


def decoder_units(size: str) -> list[Unit]:
    """The masked 3x3 units of BiMatting's decoder at ``size`` (from the model's own modules)."""
    from bimatting_triton import BiMatting
    from bimatting_triton.profile import level_sizes

    h, w, ratio = parse_size(size)
    sizes = level_sizes((h, w), ratio)
    with torch.device("meta"):
        dec = BiMatting().decoder
    units = []
    for block in ("decode3", "decode2", "decode1"):
        b = getattr(dec, block)
        for name, conv in (("conv", b.conv[2]), ("gru.ih", b.gru.ih[2]), ("gru.hh", b.gru.hh[2])):
            units.append(Unit(block, name, conv.in_channels, conv.out_channels, sizes[block]))
    conv, fconv = dec.decode0.conv[2], dec.decode0.conv[5]
    units.append(Unit("decode0", "conv", conv.in_channels, conv.out_channels, sizes["decode0"]))
    units.append(Unit("decode0", "conv.float", fconv.in_channels, fconv.out_channels, sizes["decode0"], False))
    return units


def coarse_size(net_size: tuple[int, int]) -> tuple[int, int]:
    h, w = net_size
    for _ in range(4):  # the backbone's stride-2 stages, ceil as the pooling
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def mask_for_density(target: float, coarse: tuple[int, int], level: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(1, 1, H, W) float32 soft mask whose fraction of non-zero pixels is closest to ``target``."""
    h, w = level
    if target <= 0:
        return torch.zeros(1, 1, h, w)
    if target >= 1:
        return torch.ones(1, 1, h, w)
    gen = torch.Generator().manual_seed(seed)
    field = torch.rand(1, 1, *coarse, generator=gen)
    field = F.avg_pool2d(field, 5, stride=1, padding=2, count_include_pad=False)  # clusters
    order = field.flatten().argsort(descending=True)

    def make(k: int) -> torch.Tensor:
        cells = torch.zeros(coarse[0] * coarse[1])
        cells[order[:k]] = 1.0
        return F.interpolate(cells.reshape(1, 1, *coarse), size=level, mode="bilinear", align_corners=False)

    def density(k: int) -> float:
        return float((make(k) != 0).float().mean())

    lo, hi = 1, order.numel()
    while lo < hi:  # smallest k (at least one cell) reaching the target
        mid = (lo + hi) // 2
        if density(mid) < target:
            lo = mid + 1
        else:
            hi = mid
    k = min((max(lo - 1, 1), lo), key=lambda c: abs(density(c) - target))
    return make(k)


@dataclass
class Row:
    block: str
    unit: str
    shape: str
    target: float
    pixels: float  # fraction of pixels with m != 0
    tiles: float  # fraction of pixels computed (active tiles)
    skipped_g: float  # skipped GBOPs (binary) or GMACs (float) per frame
    dense_ms: float | None = None
    sparse_ms: float | None = None
    list_ms: float | None = None
    unit_dense_ms: float | None = None
    unit_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        if self.dense_ms is None or self.sparse_ms is None or self.sparse_ms == 0:
            return None
        return self.dense_ms / self.sparse_ms


def _time(fn, timing: bool) -> float | None:
    if not timing:
        fn()
        return None
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _check(got: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, what: str) -> None:
    zero = (mask == 0).expand_as(got)
    if not torch.equal(got[zero], dense[zero]):
        raise AssertionError(f"{what}: sparse != dense where the mask is 0")
    err = ((got - dense).abs() / (dense.abs() + 1)).max().item() if got.numel() else 0.0
    if err > 1e-3:
        raise AssertionError(f"{what}: sparse differs from dense by {err:.3g} (relative)")


def run(args, on_row=None, pretend_cuda: bool = False) -> tuple[list[Row], str]:
    """The table's rows (and the device's name). ``on_row(row)``: called as each row is
    measured (a run cut short by a time limit still shows what it measured).
    ``pretend_cuda``: launch the kernels on the CPU tensors without checking their outputs
    (bench/compile_model.py's prebuild, whose kernels only compile)."""
    from bimatting_triton.kernels.binary_conv import Epilogue, binary_conv2d, pack_weight
    from bimatting_triton.kernels.pack import sign_pack
    from bimatting_triton.kernels.sparse_unit import active_tiles, skipped_bops, sparse_binary_conv2d, \
        sparse_float_conv2d, sparse_unit

    cuda = torch.cuda.is_available()
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    run_kernels = not args.counts_only and (cuda or interp or pretend_cuda)
    check = (lambda *a: None) if pretend_cuda else _check
    timing = run_kernels and cuda and not args.check_only
    dev = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    dtype = {"float16": torch.float16, "float32": torch.float32}[args.dtype]
    th, tw = (int(v) for v in args.tile.lower().split("x"))
    h, w, ratio = parse_size(args.size)
    net = (math.floor(h * ratio), math.floor(w * ratio)) if ratio != 1 else (h, w)
    coarse = coarse_size(net)
    units = decoder_units(args.size)
    gen = torch.Generator().manual_seed(0)
    rows: list[Row] = []
    for target in args.densities:
        masks, lists, list_ms = {}, {}, {}
        for unit in units:
            level = unit.size
            if unit.block not in masks:
                m = mask_for_density(target / 100, coarse, level, seed=len(masks)).to(dev, dtype)
                masks[unit.block] = m
                for halo in (0, 1):
                    lists[unit.block, halo] = active_tiles(m, (th, tw), halo)
                if run_kernels:
                    list_ms[unit.block] = _time(lambda: active_tiles(m, (th, tw), 0), timing)
            m = masks[unit.block]
            halo = 1 if unit.block == "decode0" and unit.binary else 0
            tiles = lists[unit.block, halo]
            skipped = float(skipped_bops(tiles, unit.cin, unit.cout, 3)) / 1e9
            row = Row(unit.block, unit.name, f"{unit.cin}->{unit.cout} {level[1]}x{level[0]}", target / 100,
                      float((m != 0).float().mean()), float(tiles.density()), skipped,
                      list_ms=list_ms.get(unit.block))
            rows.append(row)
            if not run_kernels:
                if on_row is not None:
                    on_row(row)
                continue
            x = torch.randn(1, unit.cin, *level, generator=gen).to(dev)
            y1 = torch.randn(1, unit.cout, *level, generator=gen).to(dev, dtype)
            out = y1.clone()
            what = f"{unit.block} {unit.name} at {target}%"
            if unit.binary:
                px = sign_pack(x)
                pw = pack_weight(torch.randn(unit.cout, unit.cin, 3, 3, generator=gen).to(dev))
                kw = dict(scale=torch.rand(unit.cout, generator=gen).to(dev) * 0.1,
                          shift=torch.randn(unit.cout, generator=gen).to(dev), act="relu", out_dtype=dtype,
                          mask=m, addend=y1)
                dense_epi = Epilogue(**kw)
                sparse_epi = Epilogue(**kw, out=out)
                dense = binary_conv2d(px, pw, dense_epi).y
                sparse_binary_conv2d(px, pw, sparse_epi, tiles)
                check(out, dense, m, what)
                row.dense_ms = _time(lambda: binary_conv2d(px, pw, dense_epi), timing)
                row.sparse_ms = _time(lambda: sparse_binary_conv2d(px, pw, sparse_epi, tiles), timing)
                if unit.block != "decode0":  # the masked pair: 1x1 + 3x3 * m
                    pw1 = pack_weight(torch.randn(unit.cout, unit.cin, 1, 1, generator=gen).to(dev))
                    e3 = Epilogue(scale=kw["scale"], shift=kw["shift"], act="relu", out_dtype=dtype)
                    e1 = Epilogue(scale=kw["scale"].flip(0), shift=kw["shift"], act="relu", out_dtype=dtype)

                    def dense_unit():
                        y1u = binary_conv2d(px, pw1, e1).y
                        return binary_conv2d(px, pw, dataclasses.replace(e3, mask=m, addend=y1u)).y

                    check(sparse_unit(px, pw, e3, px, pw1, e1, m, tiles), dense_unit(), m, what + " (unit)")
                    row.unit_dense_ms = _time(dense_unit, timing)
                    row.unit_ms = _time(lambda: sparse_unit(px, pw, e3, px, pw1, e1, m, tiles), timing)
            else:
                xf = x.to(dtype).contiguous(memory_format=torch.channels_last)
                weight = torch.randn(unit.cout, unit.cin, 3, 3, generator=gen).to(dev, dtype) * 0.1
                scale, shift = torch.rand(unit.cout, device=dev) + 0.5, torch.randn(unit.cout, device=dev)
                every = active_tiles(torch.ones_like(m), (th, tw))
                dense = y1.clone()
                sparse_float_conv2d(xf, weight, scale, shift, "relu", dense, every, mask=m, addend=y1)
                sparse_float_conv2d(xf, weight, scale, shift, "relu", out, tiles, mask=m, addend=y1)
                check(out, dense, m, what)
                row.dense_ms = _time(
                    lambda: sparse_float_conv2d(xf, weight, scale, shift, "relu", dense, every, mask=m, addend=y1),
                    timing)
                row.sparse_ms = _time(
                    lambda: sparse_float_conv2d(xf, weight, scale, shift, "relu", out, tiles, mask=m, addend=y1),
                    timing)
            if on_row is not None:
                on_row(row)
    return rows, device_name


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(rows: list[Row], device: str, args) -> str:
    lines = [f"# sparse decoder units, {args.size}, tile {args.tile}, {args.dtype}, device: {device}", ""]
    lines.append("| target | block | unit | shape | pixels | tiles | skipped G(B)OPs | dense ms | sparse ms | speedup "
                 "| list ms | unit dense ms | unit ms |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r.target:.0%} | {r.block} | {r.unit} | {r.shape} | {r.pixels:.3f} | {r.tiles:.3f} | "
            f"{r.skipped_g:.4f} | {_fmt(r.dense_ms, '.4f')} | {_fmt(r.sparse_ms, '.4f')} | "
            f"{_fmt(r.speedup, '.2f')} | {_fmt(r.list_ms, '.4f')} | {_fmt(r.unit_dense_ms, '.4f')} | "
            f"{_fmt(r.unit_ms, '.4f')} |"
        )
    lines += ["", "| target | skipped GBOPs (binary) | skipped GFLOPs (decode0 float) | dense ms (sum) | "
              "sparse ms (sum, + lists) | speedup |", "|---|---|---|---|---|---|"]
    for target in sorted({r.target for r in rows}):
        rs = [r for r in rows if r.target == target]
        bops = sum(r.skipped_g for r in rs if r.unit != "conv.float")
        flops = sum(r.skipped_g for r in rs if r.unit == "conv.float")
        dense = sum(r.dense_ms for r in rs) if all(r.dense_ms is not None for r in rs) else None
        sparse = None
        if all(r.sparse_ms is not None for r in rs):
            lists = {r.block: r.list_ms or 0.0 for r in rs}
            sparse = sum(r.sparse_ms for r in rs) + 2 * lists.get("decode0", 0.0) + sum(
                v for k, v in lists.items() if k != "decode0")
        speed = dense / sparse if dense is not None and sparse else None
        lines.append(f"| {target:.0%} | {bops:.4f} | {flops:.4f} | {_fmt(dense, '.4f')} | {_fmt(sparse, '.4f')} | "
                     f"{_fmt(speed, '.2f')} |")
    return "\n".join(lines)


def _write_json(path: str, payload: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sparse-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, checked (argparse exits with a message naming a bad flag)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1920x1080@0.25", help="WIDTHxHEIGHT[@RATIO] of the frames")
    parser.add_argument("--densities", default=",".join(map(str, DEFAULT_DENSITIES)),
                        help="mask densities in percent, comma separated")
    parser.add_argument("--tile", default="8x8", help="THxTW output pixels per tile (powers of two)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                        help="activations / output dtype (the epilogue computes in float32)")
    parser.add_argument("--counts-only", action="store_true", help="skipped BOPs only, no kernels")
    parser.add_argument("--check-only", action="store_true", help="run each kernel once and check it, no timing")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    try:
        parse_frame_size(args.size)
    except argparse.ArgumentTypeError as err:
        parser.error(f"--size: {err}")
    try:
        args.densities = [float(v) for v in args.densities.split(",")]
    except ValueError:
        parser.error(f"--densities: expected comma-separated numbers, got {args.densities!r}")
    if any(not 0 <= d <= 100 for d in args.densities):
        parser.error("--densities: percentages in [0, 100]")
    return args


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.counts_only and not args.check_only:
        print("bench/sparse.py: no CUDA device: reporting the skipped operations only (timings need a GPU).")
        args.counts_only = True

    def progress(row: Row) -> None:  # one line per row as it is measured; the tables follow at the end
        print(f"  {row.target:.0%} {row.block} {row.unit}: dense {_fmt(row.dense_ms, '.4f')} ms, sparse "
              f"{_fmt(row.sparse_ms, '.4f')} ms, unit {_fmt(row.unit_dense_ms, '.4f')} -> {_fmt(row.unit_ms, '.4f')} ms",
              file=sys.stderr, flush=True)

    rows, device = run(args, on_row=progress)
    print(render(rows, device, args))
    if args.json:
        _write_json(args.json, {"size": args.size, "tile": args.tile, "dtype": args.dtype, "device": device,
                                "rows": [{**asdict(r), "speedup": r.speedup} for r in rows]})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
