"""End-to-end matting speed: BiMatting (fused and plain) against float RVM, in one run.

    python bench/throughput.py                              # all variants, the three RVM sizes
    python bench/throughput.py --sizes 1920x1080@0.25 --frames 1,8 --json
    python bench/throughput.py --profile                    # time by stage and by kernel

Variants, measured side by side on the same random clip:

* ``bimatting-fused``  BiMatting through ``bimatting_triton.convert`` (Triton kernels,
  sparse decoder) on CUDA; elsewhere the same converted model through its plain-PyTorch
  references (packed weights, exact integer convolutions, no Triton).
  ``bimatting-fused-fp16``: the same in half precision
  (fp16 activations and float parts, fp32 epilogue arithmetic), against RVM fp16.
* ``bimatting-plain``  BiMatting in plain PyTorch, binary layers simulated in float32
  (what the published BiMatting code runs).
* ``rvm-fp32`` / ``rvm-fp16``  Robust Video Matting MobileNetV3 (float); fp16 needs CUDA.

Each variant runs ``--warmup`` untimed calls, then ``--repeats`` timed calls of
B x T frames, carrying the recurrent state as a streaming user does. Reported: median
and range (max - min) of ms per frame, frames/s, peak memory (CUDA: ``max_memory_allocated``;
CPU: the process's peak RSS so far, which only grows, so a variant measured later includes
the earlier ones'), the first call's time (compilation) and fps ratios between variants.
``--json`` adds every timed call and the run's settings. ``--cuda-graph`` times CUDA-graph replays of one streaming
step (``bimatting_triton.CudaGraphStep``) instead of eager calls (at T=1 every variant is
launch-bound on a GPU); ``--compile`` uses ``torch.compile`` on the float variants. The notes column says which was used.
On CUDA, ``torch.backends.cudnn.benchmark`` is on for every variant (the float baselines run
cuDNN's fastest algorithms for each shape, chosen during the warm-up calls).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from cli_args import parse_frame_size  # bench/cli_args.py

from bimatting_triton import BiMatting, CudaGraphStep
from bimatting_triton.baselines import RVMMobileNetV3
from bimatting_triton.cli import non_negative_int, positive_int
from bimatting_triton.devices import usable_device

DEFAULT_SIZES = "512x288@1,1920x1080@0.25,3840x2160@0.125"
VARIANT_NAMES = ("bimatting-fused", "bimatting-fused-fp16", "bimatting-plain", "rvm-fp32", "rvm-fp16")


@dataclass
class Setting:
    width: int
    height: int
    ratio: float
    batch: int
    frames: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}@{self.ratio:g} B={self.batch} T={self.frames}"


@dataclass
class Measurement:
    variant: str
    setting: str
    status: str  # "ok" or why it did not run
    ms_per_frame: float | None = None  # median over the repeats
    range_ms: float | None = None  # max - min over the repeats (None with one repeat)
    repeats_ms: list[float] = field(default_factory=list)  # every timed call, ms per frame
    fps: float | None = None
    peak_memory_mib: float | None = None
    # The first (untimed) call: Triton compilation, cuDNN algorithm search, allocator growth.
    # Triton keeps compiled kernels in its cache (~/.triton/cache), so a later process is quicker.
    first_call_s: float | None = None
    notes: list[str] = field(default_factory=list)


def parse_sizes(text: str) -> list[tuple[int, int, float]]:
    """'512x288@1,1920x1080@0.25' -> [(512, 288, 1.0), (1920, 1080, 0.25)]."""
    return [parse_frame_size(item) for item in text.split(",")]


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


# --------------------------------------------------------------------------- variants
def bimatting(weights: dict | None) -> BiMatting:
    """The BiMatting the variants run: random weights, or ``weights`` (a state_dict read once
    from ``--checkpoint``: the decoder's mask, and so the sparse units' work, then comes from
    trained weights)."""
    model = BiMatting()
    if weights is not None:
        model.load_state_dict(weights)
    return model.eval()


def build_variant(name: str, device: torch.device, compile_float: bool,
                  weights: dict | None = None) -> tuple[Callable | None, str, list[str]]:
    """(model or None, dtype name or the reason it cannot run, notes)."""
    notes: list[str] = []
    if name.startswith("bimatting-fused"):
        dtype = torch.float16 if name.endswith("fp16") else torch.float32
        if device.type != "cuda" and dtype == torch.float16:
            return None, "skipped: the fused Triton kernels need a CUDA device", notes
        try:
            from bimatting_triton import convert  # added with the kernels
        except ImportError:
            return None, "skipped: bimatting_triton.convert is not available in this version", notes
        if dtype == torch.float16:
            notes.append("fp16 activations, fp32 epilogues")
        backend = "auto"
        if device.type != "cuda":
            # the same packed model through its plain-PyTorch references (what convert() runs
            # where Triton cannot: exact integer convolutions of the unpacked bits)
            backend = "reference"
            notes.append("no CUDA: its plain-PyTorch references")
        model = convert(bimatting(weights).to(device, dtype), backend=backend)
        return model, str(dtype).removeprefix("torch."), notes
    if name == "rvm-fp16" and device.type != "cuda":
        return None, "skipped: fp16 convolutions need a CUDA device", notes
    if name == "bimatting-plain":
        model, dtype = bimatting(weights), torch.float32
    else:
        model, dtype = RVMMobileNetV3().eval(), torch.float16 if name == "rvm-fp16" else torch.float32
    model = model.to(device=device, dtype=dtype)
    if compile_float:
        model = torch.compile(model)
        notes.append("torch.compile")
    return model, str(dtype).removeprefix("torch."), notes


# --------------------------------------------------------------------------- timing
class Timer:
    """Wall time per call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    @contextlib.contextmanager
    def measure(self, out: list[float]):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            yield
            out.append(time.perf_counter() - start)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # ru_maxrss is KiB on Linux


def run_variant(model, dtype_name: str, setting: Setting, device: torch.device, warmup: int, repeats: int,
                cuda_graph: bool = False) -> Measurement:
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator(device="cpu").manual_seed(0)
    src = torch.rand(setting.batch, setting.frames, 3, setting.height, setting.width, generator=generator)
    src = src.to(device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    timer, times, first, rec, notes = Timer(device), [], [], [None] * 4, []
    call = model
    with torch.inference_mode():
        for i in range(max(warmup, 1)):  # eager warm-up; the first call also compiles
            with timer.measure(first if i == 0 else []):
                _, _, *rec = model(src, *rec, downsample_ratio=setting.ratio)
        if cuda_graph:
            # CudaGraphStep runs a signature's first call eagerly and captures on its second.
            step = CudaGraphStep(model)
            try:
                for _ in range(2):
                    _, _, *rec = step(src, *rec, downsample_ratio=setting.ratio)
                call = step
                notes.append("CUDA graph")
            except Exception as exc:  # reported, then timed eagerly
                notes.append(f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:120]}), eager")
        for _ in range(repeats):
            with timer.measure(times):
                _, _, *rec = call(src, *rec, downsample_ratio=setting.ratio)
    n = setting.batch * setting.frames
    median = statistics.median(times)
    spread = max(times) - min(times) if len(times) > 1 else None
    if spread is not None and spread > median:
        notes.append("noisy: the repeats' range exceeds their median (a busy machine?)")
    return Measurement(
        variant="", setting=setting.label, status="ok",
        ms_per_frame=1e3 * median / n, range_ms=None if spread is None else 1e3 * spread / n,
        repeats_ms=[1e3 * t / n for t in times],
        fps=n / median, peak_memory_mib=peak_memory_mib(device), first_call_s=first[0], notes=notes,
    )


def density_note(model) -> str | None:
    """For a converted (fused) model after a forward: the fraction of each decoder level's
    tiles its sparse units computed, e.g. 'active tiles d3 0.53 d2 0.44 d1 0.44 d0 0.36'
    (random weights give whatever mask they give: say it next to the speed). None otherwise."""
    from bimatting_triton.fuse_decoder import tile_densities

    densities = tile_densities(getattr(model, "_orig_mod", model))
    if not densities:
        return None
    return "active tiles " + " ".join(f"d{k.removeprefix('decode')} {v:.2f}" for k, v in densities.items())


# --------------------------------------------------------------------------- profile
def profile_stages(model, setting: Setting, device: torch.device, dtype_name: str) -> str:
    """Time per top-level stage (forward hooks) and the heaviest operators/kernels."""
    dtype = getattr(torch, dtype_name)
    src = torch.rand(setting.batch, setting.frames, 3, setting.height, setting.width, device=device, dtype=dtype)
    inner = getattr(model, "_orig_mod", model)
    stages = [s for s in ("backbone", "aspp", "decoder", "refiner") if hasattr(inner, s)]
    totals = {s: 0.0 for s in stages}
    starts: dict[str, float] = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def pre(name):
        def hook(module, args):
            sync()
            starts[name] = time.perf_counter()
        return hook

    def post(name):
        def hook(module, args, out):
            sync()
            totals[name] += time.perf_counter() - starts[name]
        return hook

    handles = []
    for s in stages:
        handles += [getattr(inner, s).register_forward_pre_hook(pre(s)), getattr(inner, s).register_forward_hook(post(s))]
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with torch.inference_mode():
            model(src, downsample_ratio=setting.ratio)  # warm-up (compilation)
            for s in stages:
                totals[s] = 0.0
            sync()
            start = time.perf_counter()
            model(src, downsample_ratio=setting.ratio)  # stage times: a plain call, synchronised per stage
            sync()
            total = time.perf_counter() - start
    finally:
        for h in handles:
            h.remove()
    with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
        # A separate call under the profiler (its start-up would swamp the stage times).
        model(src, downsample_ratio=setting.ratio)
        sync()
    lines = [f"stage breakdown ({setting.label}), one call, synchronised at each stage boundary, ms:"]
    for s in stages:
        lines.append(f"  {s:<10} {1e3 * totals[s]:9.2f}  ({100 * totals[s] / total:5.1f} %)")
    rest = total - sum(totals.values())
    lines.append(f"  {'other':<10} {1e3 * rest:9.2f}  ({100 * rest / total:5.1f} %)  (heads, resizing, glue)")
    from bimatting_triton.kernels._common import KERNEL_STATS

    if KERNEL_STATS:
        lines.append("compiled Triton kernels (registers per thread, spilled registers):")
        for (kname, tile), st in sorted(KERNEL_STATS.items()):
            lines.append(f"  {kname:<22} {tile:<60} regs {st['n_regs']:4d}  spills {st['n_spills']:5d}")
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    lines.append("heaviest operators / kernels:")
    lines.append(prof.key_averages().table(sort_by=sort_key, row_limit=15))
    return "\n".join(lines)


# --------------------------------------------------------------------------- report
RATIO_PAIRS = (
    ("bimatting-fused", "bimatting-plain"), ("bimatting-fused", "rvm-fp16"), ("bimatting-fused", "rvm-fp32"),
    ("bimatting-fused-fp16", "bimatting-plain"), ("bimatting-fused-fp16", "rvm-fp16"),
    ("bimatting-fused-fp16", "bimatting-fused"), ("bimatting-plain", "rvm-fp32"), ("rvm-fp16", "rvm-fp32"),
)


def ratio_values(results: list[Measurement]) -> list[dict]:
    """fps(a) / fps(b) for each pair of variants measured on the same setting in this run."""
    by_setting: dict[str, dict[str, Measurement]] = {}
    for m in results:
        if m.status == "ok":
            by_setting.setdefault(m.setting, {})[m.variant] = m
    return [
        {"setting": setting, "variant": a, "baseline": b, "fps_ratio": ms[a].fps / ms[b].fps}
        for setting, ms in by_setting.items() for a, b in RATIO_PAIRS if a in ms and b in ms
    ]


def ratios(results: list[Measurement]) -> list[str]:
    return [f"  {r['setting']}: {r['variant']} / {r['baseline']} = {r['fps_ratio']:.3g}x fps"
            for r in ratio_values(results)]


def print_table(results: list[Measurement], device_name: str) -> None:
    print(f"device: {device_name}")
    vw = max([len("variant"), *(len(m.variant) for m in results)])  # the variant column's width
    header = (f"{'variant':<{vw}} {'setting':<30} {'ms/frame':>9} {'range':>8} {'fps':>8} {'peak MiB':>9} "
              f"{'1st call s':>10}  notes")
    print(header)
    print("-" * len(header))
    for m in results:
        if m.status != "ok":
            print(f"{m.variant:<{vw}} {m.setting:<30} {m.status}")
            continue
        spread = "-" if m.range_ms is None else f"{m.range_ms:.2f}"
        print(f"{m.variant:<{vw}} {m.setting:<30} {m.ms_per_frame:9.2f} {spread:>8} {m.fps:8.2f} "
              f"{m.peak_memory_mib:9.0f} {m.first_call_s:10.2f}  {', '.join(m.notes)}")
    print("ms/frame: median of the timed calls; range: their max - min (ms per frame)")
    lines = ratios(results)
    if lines:
        print("ratios (same run, same inputs):")
        print("\n".join(lines))
        if any(m.status == "ok" and m.variant.startswith("bimatting-fused") for m in results):
            print("  (the fused model's sparse decoder computes only the active tiles in its notes, from the "
                  "mask its weights give; the plain model computes every pixel)")


def main(argv: list[str] | None = None) -> list[Measurement]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                        help=f"WIDTHxHEIGHT@DOWNSAMPLE_RATIO items (default {DEFAULT_SIZES})")
    parser.add_argument("--variants", default=",".join(VARIANT_NAMES),
                        help=f"comma-separated subset of {', '.join(VARIANT_NAMES)}")
    parser.add_argument("--batch", type=positive_int, default=1, help="batch size B (default 1)")
    parser.add_argument("--frames", type=parse_ints, default=None,
                        help="frames per call T, comma-separated (default 1,8 on CUDA, 1 on CPU)")
    parser.add_argument("--warmup", type=non_negative_int, default=2,
                        help="untimed calls before timing (default 2; at least one runs whatever the value: "
                             "the first call compiles, and its time is reported as '1st call s')")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed calls (default 5)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--checkpoint", default=None,
                        help="BiMatting weights for the bimatting variants (default: random weights, whose "
                             "decoder mask, and so the sparse units' work, is whatever they give)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the plain/float variants")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time CUDA-graph replays of one streaming step (CUDA only; a variant that "
                             "cannot be captured is timed eagerly and says why)")
    parser.add_argument("--profile", action="store_true",
                        help="also break the first runnable variant's time down by stage and kernel (at the "
                             "first size with a downsample ratio < 1, where the refiner runs, else the first)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)

    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))  # in order, once
    unknown = sorted(set(variants) - set(VARIANT_NAMES))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANT_NAMES)}")
    if not variants:
        parser.error(f"--variants: none given; choose from {', '.join(VARIANT_NAMES)}")
    try:  # the library's one device check (CUDA present, index in range, not meta ...)
        device = usable_device(args.device, "--device")
    except ValueError as e:
        parser.error(str(e))
    if device.type not in ("cuda", "cpu"):
        parser.error(f"--device {args.device!r}: expected cpu or cuda")
    if args.cuda_graph and device.type != "cuda":
        parser.error("--cuda-graph: CUDA graphs need a CUDA device")
    weights = None
    if args.checkpoint is not None:
        try:  # read once, and now: a file that does not load is named before any variant runs
            weights = BiMatting.from_pretrained(args.checkpoint, map_location="cpu").state_dict()
        except (OSError, ValueError) as e:
            parser.error(f"--checkpoint: {e}")
    frames = args.frames or ([1, 8] if device.type == "cuda" else [1])
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu ({torch.get_num_threads()} threads)")
    torch.manual_seed(0)
    if device.type == "cuda":  # every variant's PyTorch convolutions with cuDNN's fastest algorithms
        torch.backends.cudnn.benchmark = True
    if args.profile:  # registers/spills of the compiled kernels (CUDA), printed with the profile
        import os
        os.environ.setdefault("BIMATTING_KERNEL_STATS", "1")

    results: list[Measurement] = []
    profiles: list[str] = []
    for name in variants:
        model, dtype_or_reason, notes = build_variant(name, device, args.compile, weights)
        for w, h, r in args.sizes:
            for t in frames:
                setting = Setting(w, h, r, args.batch, t)
                if model is None:
                    results.append(Measurement(name, setting.label, dtype_or_reason))
                    continue
                m = run_variant(model, dtype_or_reason, setting, device, args.warmup, args.repeats,
                                cuda_graph=args.cuda_graph)
                m.variant, m.notes = name, [dtype_or_reason, *notes, *m.notes]
                if name.startswith("bimatting-fused") and (note := density_note(model)):
                    m.notes.append(note)
                results.append(m)
                # Progress on stderr (stdout stays the table or the JSON): long runs show what they did.
                print(f"  {name} {setting.label}: {m.ms_per_frame:.2f} ms/frame", file=sys.stderr, flush=True)
        if args.profile and model is not None and not profiles:
            # the first size with a downsample ratio < 1 (the refiner runs there), else the first
            w, h, r = next((size for size in args.sizes if size[2] < 1), args.sizes[0])
            profiles.append(f"[{name}] " + profile_stages(model, Setting(w, h, r, args.batch, frames[0]), device,
                                                          dtype_or_reason))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    fused_selected = any(v.startswith("bimatting-fused") for v in variants)
    if args.json:
        import triton

        settings = {"checkpoint": args.checkpoint, "warmup": args.warmup, "repeats": args.repeats,
                    "batch": args.batch, "frames": frames,
                    "sizes": [f"{w}x{h}@{r:g}" for w, h, r in args.sizes], "compile": args.compile,
                    "cuda_graph": args.cuda_graph, "torch": torch.__version__, "triton": triton.__version__,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "peak_memory": "max_memory_allocated" if device.type == "cuda"
                    else "process peak RSS so far (cumulative over the variants)"}
        print(json.dumps({"device": device_name, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                          "settings": settings, "results": [asdict(m) for m in results],
                          "ratios": ratio_values(results), "profile": profiles}, indent=1))
    else:
        print_table(results, device_name)
        print(f"BiMatting weights: {args.checkpoint or 'random (--checkpoint PATH for trained ones)'}")
        for p in profiles:
            print(p)
        if device.type != "cuda":
            if fused_selected:
                print("note: no CUDA device: bimatting-fused ran the converted model's plain-PyTorch references "
                      "(packed weights, exact integer convolutions), not the Triton kernels, which need CUDA "
                      "(as do the fp16 variants).")
            print("note: peak MiB on a CPU is the process's peak RSS so far: it only grows, so a variant "
                  "measured later includes the earlier ones' memory.")
        else:
            print("note: cuDNN autotuning on (torch.backends.cudnn.benchmark) for every variant's PyTorch "
                  "convolutions; the warm-up calls pay for it.")
            if not args.cuda_graph:
                print("note: eager calls; at T=1 every variant is bound by launching kernels from Python: "
                      "--cuda-graph times CUDA-graph replays instead (bimatting_triton.CudaGraphStep).")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
