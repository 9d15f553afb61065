"""Computation and storage of BiMatting vs float RVM (MobileNetV3), counted by one tool.

    python bench/complexity.py                      # 512x288 (ratio 1) and 1920x1080 (ratio 0.25)
    python bench/complexity.py --size 1280x720:0.375 --density 0.3 --json out.json

Both networks are profiled by ``bimatting_triton.profile`` (one forward on the meta
device, no weights needed): BOPs (binary MACs), FLOPs (float MACs), OPs = BOPs/64 +
FLOPs, parameters and storage. BiMatting's sparse decoder units are reported dense and
at a mask density: ``--density silhouette`` (default) uses the incoherence mask of a
synthetic upper-body silhouette at each size (illustrative, not measured on video;
a real clip needs a trained checkpoint: ``bimatting_triton.profile(model,
sparse='measured', src=clip)``), or give a number in [0, 1]. The summary also prints
the uniform density at which the OPs ratio reaches the paper's 12.4x.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch
import torch.nn.functional as F
from cli_args import parse_frame_size  # bench/cli_args.py

from bimatting_triton import BiMatting
from bimatting_triton.baselines import RVMMobileNetV3
from bimatting_triton.model.decoder import incoherence_mask
from bimatting_triton.profile import densities_from_mask, level_sizes, profile, tile_densities_from_mask

PAPER_OPS_RATIO = 12.4
PAPER_STORAGE_RATIO = 21.6
GOAL_STORAGE_RATIO = 25.0  # SPEC §4
DEFAULT_SIZES = ((288, 512, 1.0), (1080, 1920, 0.25))  # (H, W, downsample_ratio), RVM's settings
MIB_BITS = 8 * 2**20


def parse_size(text: str) -> tuple[int, int, float]:
    """'WxH' or 'WxH:RATIO' (or '@RATIO') -> (H, W, ratio); the ratio defaults to 1."""
    w, h, r = parse_frame_size(text)
    return h, w, r


def parse_density(text: str):
    if text == "silhouette":
        return text
    try:
        d = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--density: expected 'silhouette' or a number in [0, 1], got {text!r}"
        ) from None
    if not 0 <= d <= 1:
        raise argparse.ArgumentTypeError(f"--density: expected a number in [0, 1], got {text!r}")
    return d


def silhouette_mask(h: int, w: int, ratio: float) -> torch.Tensor:
    """Incoherence mask (1, 1, h/16, w/16) of a synthetic upper-body silhouette.

    The silhouette (head disc + torso ellipse) is drawn at the network input size,
    area-averaged to the coarse (1/16) grid the decoder's coarse alpha lives on, and
    turned into the incoherence mask with the model's own ``incoherence_mask``.
    """
    sizes = level_sizes((h, w), ratio)
    mh, mw = sizes["decode0"]
    s3h, s3w = sizes["decode3"]
    coarse = (-(-s3h // 2), -(-s3w // 2))  # f4 / coarse alpha grid: ceil(s3 / 2)
    y = torch.linspace(0, 1, mh).view(-1, 1)
    x = torch.linspace(0, 1, mw).view(1, -1)
    aspect = mw / mh
    head = ((x - 0.5) * aspect) ** 2 + (y - 0.32) ** 2 <= 0.14**2
    torso = ((x - 0.5) / 0.30) ** 2 + ((y - 1.0) / 0.52) ** 2 <= 1.0
    alpha = (head | torso).to(torch.float32)[None, None]
    return incoherence_mask(F.adaptive_avg_pool2d(alpha, coarse))


def silhouette_densities(h: int, w: int, ratio: float) -> dict[str, float]:
    """Per decoder level, the fraction of pixels where the silhouette's resized mask is set."""
    return densities_from_mask(silhouette_mask(h, w, ratio), (h, w), ratio)


def break_even_density(rvm_ops: float, bim_ops_at_0: float, bim_ops_dense: float, target: float) -> float | None:
    """Uniform density d with rvm_ops / (ops(0) + d * (ops(1) - ops(0))) == target, if in [0, 1]."""
    span = bim_ops_dense - bim_ops_at_0
    if span <= 0:
        return None
    d = (rvm_ops / target - bim_ops_at_0) / span
    return d if 0 <= d <= 1 else None


def run(sizes, density, elementwise: bool) -> dict:
    rvm, bim = RVMMobileNetV3().eval(), BiMatting().eval()
    results = []
    for h, w, ratio in sizes:
        dens = silhouette_densities(h, w, ratio) if density == "silhouette" else density
        p_rvm = profile(rvm, (h, w), downsample_ratio=ratio, elementwise=elementwise)
        p_bim = profile(bim, (h, w), dens, downsample_ratio=ratio, elementwise=elementwise)
        p_bim16 = profile(bim, (h, w), downsample_ratio=ratio, alpha_bits=16, float_bits=16)
        ops_at_0 = profile(bim, (h, w), 0.0, downsample_ratio=ratio).totals()["ops_sparse"]
        r, b = p_rvm.totals(), p_bim.totals()
        summary = {
            "size": [h, w],
            "downsample_ratio": ratio,
            "density": p_bim.densities,
            "density_source": "synthetic silhouette" if density == "silhouette" else "given",
            "rvm_ops": r["ops"],
            "bimatting_ops_dense": b["ops"],
            "bimatting_ops_sparse": b["ops_sparse"],
            "bimatting_ops_all_masked_units_skipped": ops_at_0,
            "ops_ratio_dense": r["ops"] / b["ops"],
            "ops_ratio_sparse": r["ops"] / b["ops_sparse"],
            "ops_ratio_upper_bound": r["ops"] / ops_at_0,
            "density_for_paper_ratio": break_even_density(r["ops"], ops_at_0, b["ops"], PAPER_OPS_RATIO),
            "rvm_storage_bits_fp32": r["storage_bits_fp32"],
            "bimatting_storage_bits_packed": b["storage_bits_packed"],
            "bimatting_storage_bits_packed_fp16_rest": p_bim16.totals()["storage_bits_packed"],
            "storage_ratio": r["storage_bits_fp32"] / b["storage_bits_packed"],
            "storage_ratio_fp16_rest": r["storage_bits_fp32"] / p_bim16.totals()["storage_bits_packed"],
        }
        if density == "silhouette":  # the work the tile-sparse kernels really do (whole tiles)
            tiles = tile_densities_from_mask(silhouette_mask(h, w, ratio), (h, w), ratio, tile=(8, 8))
            ops_tiles = profile(bim, (h, w), tiles, downsample_ratio=ratio).totals()["ops_sparse"]
            summary.update(density_tiles=tiles, bimatting_ops_sparse_tiles=ops_tiles,
                           ops_ratio_sparse_tiles=r["ops"] / ops_tiles)
        if elementwise:
            summary["ops_ratio_dense_with_elementwise"] = r["ops_with_elementwise"] / b["ops_with_elementwise"]
            summary["ops_ratio_sparse_with_elementwise"] = r["ops_with_elementwise"] / b["ops_sparse_with_elementwise"]
        results.append({"rvm": p_rvm, "bimatting": p_bim, "summary": summary})
    return {"results": results}


def format_summary(s: dict) -> str:
    h, w = s["size"]
    dens = ", ".join(f"{k} {v:.3f}" for k, v in s["density"].items())
    d_star = s["density_for_paper_ratio"]
    lines = [
        f"summary {w}x{h} (downsample_ratio {s['downsample_ratio']:g}):",
        f"  OPs  RVM {s['rvm_ops'] / 1e6:.1f} M; BiMatting dense {s['bimatting_ops_dense'] / 1e6:.1f} M "
        f"-> {s['ops_ratio_dense']:.2f}x fewer",
        f"       sparse ({s['density_source']}: {dens}) {s['bimatting_ops_sparse'] / 1e6:.1f} M "
        f"-> {s['ops_ratio_sparse']:.2f}x fewer",
        *(["       computed by the tile-sparse kernels (whole 8x8 tiles: "
           + ", ".join(f"{k} {v:.3f}" for k, v in s["density_tiles"].items())
           + f") {s['bimatting_ops_sparse_tiles'] / 1e6:.1f} M -> {s['ops_ratio_sparse_tiles']:.2f}x fewer"]
          if "density_tiles" in s else []),
        f"       every masked unit skipped (density 0) -> {s['ops_ratio_upper_bound']:.2f}x fewer (upper bound)",
        "       paper's 12.4x reached at uniform density "
        + (f"{d_star:.3f}" if d_star is not None else "(not reachable in [0, 1])"),
    ]
    if "ops_ratio_dense_with_elementwise" in s:
        lines.append(
            f"       with elementwise ops added on both sides: {s['ops_ratio_dense_with_elementwise']:.2f}x dense, "
            f"{s['ops_ratio_sparse_with_elementwise']:.2f}x sparse"
        )
    lines += [
        f"  storage RVM fp32 {s['rvm_storage_bits_fp32'] / MIB_BITS:.3f} MiB; BiMatting packed "
        f"{s['bimatting_storage_bits_packed'] / MIB_BITS:.3f} MiB -> {s['storage_ratio']:.2f}x smaller "
        f"(paper {PAPER_STORAGE_RATIO}x)",
        "          with fp16 alpha and fp16 float entries "
        f"{s['bimatting_storage_bits_packed_fp16_rest'] / MIB_BITS:.3f} MiB "
        f"-> {s['storage_ratio_fp16_rest']:.2f}x smaller",
    ]
    return "\n".join(lines)


def packed_storage(model: BiMatting | None = None, seed: int = 0) -> dict:
    """Measured file sizes: RVM's fp32 checkpoint vs BiMatting's packed one, in bytes on disk.

    RVM: ``torch.save(RVMMobileNetV3().state_dict(), f)``. BiMatting:
    ``bimatting_triton.packed.save_packed(model)`` (exact: outputs equal ``convert(model)``'s).
    Without ``model``, a fresh BiMatting whose every float entry is perturbed by seeded
    noise: a fresh init has all-zero biases and constant slopes that the packed format
    stores as one value each, which a trained checkpoint does not have (the size
    depends only on which values are constant or float16-exact, not on the rest).
    """
    from bimatting_triton.packed import save_packed

    if model is None:
        model = BiMatting().eval()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, t in model.state_dict().items():
                if t.is_floating_point():
                    noise = torch.randn(t.shape, generator=gen)
                    t.mul_(torch.exp(0.1 * noise)) if name.endswith("running_var") else t.add_(0.01 * noise)
    with tempfile.TemporaryDirectory() as tmp:
        rvm_path, packed_path = os.path.join(tmp, "rvm.pth"), os.path.join(tmp, "bimatting.packed")
        with open(rvm_path, "wb") as f:  # a file object: the zip records' prefix is 'archive', as save_packed's
            torch.save(RVMMobileNetV3().state_dict(), f)
        rvm_bytes = os.path.getsize(rvm_path)
        packed_bytes = save_packed(model, packed_path)
        obj = torch.load(packed_path, weights_only=True)
    sign_bytes = obj["signs"].numel()
    float_bytes = sum(v.numel() * v.element_size() for k, v in obj.items() if k.startswith("pool."))
    return {
        "rvm_fp32_bytes": rvm_bytes,
        "bimatting_packed_bytes": packed_bytes,
        "ratio": rvm_bytes / packed_bytes,
        "sign_bytes": sign_bytes,
        "float_bytes": float_bytes,
        "container_bytes": packed_bytes - sign_bytes - float_bytes,
        "ratio_sign_bits_only": rvm_bytes / sign_bytes,
        "bytes_for_goal": rvm_bytes / GOAL_STORAGE_RATIO,
    }


def format_packed(p: dict) -> str:
    mib = 2**20
    return "\n".join([
        "packed checkpoint (measured files, bytes on disk; bimatting_triton.packed, outputs exactly equal):",
        f"  RVM fp32 state_dict {p['rvm_fp32_bytes']} B ({p['rvm_fp32_bytes'] / mib:.3f} MiB); BiMatting packed "
        f"{p['bimatting_packed_bytes']} B ({p['bimatting_packed_bytes'] / mib:.3f} MiB) -> {p['ratio']:.2f}x smaller "
        f"(paper {PAPER_STORAGE_RATIO}x, goal {GOAL_STORAGE_RATIO:g}x)",
        f"  = sign bits {p['sign_bytes']} B + float entries {p['float_bytes']} B + container {p['container_bytes']} B;"
        f" the sign bits alone would be {p['ratio_sign_bits_only']:.2f}x",
        f"  {GOAL_STORAGE_RATIO:g}x needs <= {p['bytes_for_goal']:.0f} B, i.e. <= "
        f"{p['bytes_for_goal'] - p['sign_bytes'] - p['container_bytes']:.0f} B for the float entries",
    ])  # fmt: skip


def write_json_atomic(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".complexity-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", type=parse_size, action="append",
        help="WIDTHxHEIGHT[:RATIO], repeatable (default: 512x288:1 and 1920x1080:0.25)",
    )  # fmt: skip
    parser.add_argument(
        "--density", type=parse_density, default="silhouette", help="'silhouette' (default) or a number in [0, 1]"
    )
    parser.add_argument("--no-elementwise", action="store_true", help="skip the (approximate) elementwise op count")
    parser.add_argument("--layers", action="store_true", help="also print the per-layer tables")
    parser.add_argument("--json", help="write all numbers to this JSON file")
    args = parser.parse_args(argv)
    out = run(args.size or DEFAULT_SIZES, args.density, not args.no_elementwise)
    for res in out["results"]:
        for key in ("rvm", "bimatting"):
            print(res[key].table())
            if args.layers:
                print(res[key].layer_table())
            print()
        print(format_summary(res["summary"]))
        print()
    out["packed"] = packed_storage()
    print(format_packed(out["packed"]))
    if args.json:
        data = [
            {"rvm": r["rvm"].to_dict(), "bimatting": r["bimatting"].to_dict(), "summary": r["summary"]}
            for r in out["results"]
        ]
        write_json_atomic(args.json, {"torch": torch.__version__, "results": data, "packed": out["packed"]})
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
