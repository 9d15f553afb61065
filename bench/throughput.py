"""End-to-end throughput of BiMatting: frames per second on random frames.

    python bench/throughput.py                       # 512x288, downsample_ratio 1
    python bench/throughput.py --size 1920x1080 --downsample-ratio 0.25 --frames 8

Warm-up runs first, then ``--repeats`` timed runs of ``--frames`` frames each
(recurrent state carried across runs, as in streaming). On a machine without CUDA
this measures the plain-PyTorch (float-simulated binary) model and says so; the
fused Triton path needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from bimatting_triton import BiMatting


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (H, W)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: expected WIDTHxHEIGHT such as 512x288, got {text!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"--size: width and height must be positive, got {text!r}")
    return h, w


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, src: torch.Tensor, ratio: float, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``model(src, *rec)``, one value per timed repeat."""
    device = src.device
    rec = [None] * 4
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            synchronize(device)
            start = time.perf_counter()
            _, _, *rec = model(src, *rec, downsample_ratio=ratio)
            synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=(288, 512), help="frame size WIDTHxHEIGHT (default 512x288)")
    parser.add_argument("--downsample-ratio", type=float, default=1.0, help="RVM downsample ratio (default 1)")
    parser.add_argument("--batch", type=int, default=1, help="batch size B (default 1)")
    parser.add_argument("--frames", type=int, default=1, help="frames per call T (default 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls (default 5)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        parser.error("--dtype float16 needs a CUDA device")
    h, w = args.size
    torch.manual_seed(0)
    model = BiMatting().eval().to(device=device, dtype=dtype)
    src = torch.rand(args.batch, args.frames, 3, h, w, device=device, dtype=dtype)
    times = measure(model, src, args.downsample_ratio, args.warmup, args.repeats)

    frames = args.batch * args.frames
    median = statistics.median(times)
    result = {
        "model": "BiMatting (plain PyTorch, float-simulated binary layers)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "size": f"{w}x{h}",
        "downsample_ratio": args.downsample_ratio,
        "batch": args.batch,
        "frames_per_call": args.frames,
        "dtype": args.dtype,
        "median_ms_per_frame": 1e3 * median / frames,
        "spread_ms_per_frame": 1e3 * (max(times) - min(times)) / frames,
        "fps": frames / median,
        "repeats": args.repeats,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>22}: {value:.2f}" if isinstance(value, float) else f"{key:>22}: {value}")
        if device.type != "cuda":
            print("note: no CUDA device, so this is the plain-PyTorch path; the fused Triton kernels need CUDA.")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
