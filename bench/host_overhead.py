"""What one call of the fused model costs the host, on any machine: launches, host time,
and whether its forward ever waits for the GPU (which would make a CUDA graph capture fail).

    python bench/host_overhead.py                          # 512x288@1, T=1
    python bench/host_overhead.py --size 1920x1080@0.25 --frames 8 --json

At T = 1 a GPU finishes BiMatting's small kernels faster than Python can launch them, so
the count of launches and the host time per call bound the eager frame rate; this script
measures both without a GPU, for tuning on a machine that has none. How: the converted
model runs on the CPU with its Triton launch sites told they are on CUDA (as
``bench/compile_model.py`` does) and every Triton kernel replaced by a counter (nothing is
launched: outputs stay uninitialised, which the model's Python never branches on); a
``TorchDispatchMode`` sees every PyTorch op.

Reported per call (the second streaming call, with recurrent state):

* Triton launches by kernel, and the PyTorch ops that launch GPU work (views, allocations
  and no-op casts left out: an estimate of what a GPU would run);
* host synchronisations: ops that read a device value on the host (``.item()``,
  ``nonzero``, ...), which a CUDA graph cannot capture; the fused model must have none;
* host time per call: Python, PyTorch dispatch, and the CPU work of the PyTorch ops,
  measured on a smaller frame with the same layers (low-resolution pass 64 pixels wide),
  so that the CPU's work on full-size tensors does not pass for host overhead; and again
  with Triton's argument binding of every launch (its binder for an sm_90 GPU, run on the
  real arguments: the largest part of Triton's launch cost that needs no GPU). The rest of
  a Triton launch (kernel cache lookup, the driver call) is not in either.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the launch sites must take the compiled-kernel path

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_args import parse_frame_size  # noqa: E402  (bench/cli_args.py)
from compile_model import pretend_cuda, target_only_driver  # noqa: E402  (bench/compile_model.py)

from bimatting_triton import BiMatting, convert  # noqa: E402

# Ops that read a device tensor's value on the host: each one waits for the GPU.
SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "equal", "allclose", "masked_select",
            "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc",
            "_assert_async", "tolist"}
# Ops that launch nothing on a GPU (allocation, metadata, casts to the same dtype).
NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "promote_types",
             "result_type", "to", "contiguous", "alias", "detach", "lift_fresh", "size", "stride", "dim",
             "sym_size", "sym_stride", "sym_numel", "is_same_size", "set_"}


class LaunchCounter:
    """Stands in for a ``@triton.jit`` function: ``k[grid](...)`` counts one launch; with a
    ``binder`` it also runs Triton's argument binding of the launch (see :func:`triton_binder`)."""

    def __init__(self, kernel, counts: collections.Counter, binder=None):
        self.name = getattr(kernel, "__name__", None) or kernel.fn.__name__
        self.counts = counts
        self.binder = binder

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        self.counts[self.name] += 1
        if self.binder is not None:
            self.binder(*args, **kwargs)


def triton_binder(kernel, arch: int = 90):
    """Triton's argument binder of ``kernel`` for a CUDA GPU of compute capability ``arch``: the
    function ``JITFunction.run`` calls at every launch (it specialises each argument: dtype,
    16-byte alignment, ints equal to 1) before looking the compiled kernel up and calling the
    driver. It needs no GPU, so its host cost can be timed here; the rest of a launch (cache
    lookup, grid, the driver call) cannot. Built by the kernel itself (``create_binder``, what
    its JIT does on a device's first launch) with Triton's driver naming an ``arch`` GPU (as
    for ``bench/compile_model.py``). None where this Triton does not build binders so."""
    try:
        with target_only_driver(arch):
            return kernel.create_binder()[-1]  # (kernel cache, key cache, target, backend, binder)
    except (AttributeError, TypeError, IndexError):  # pragma: no cover - other Triton releases
        return None


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (by name without overload) and the syncs."""

    def __init__(self):
        super().__init__()
        self.launching = collections.Counter()
        self.syncs = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs[name] += 1
        elif not func.is_view and name not in NO_KERNEL:
            self.launching[name] += 1
        return func(*args, **(kwargs or {}))


TIMING_WIDTH = 64  # width of the low-resolution pass at which the host time is measured


def timing_size(w: int, h: int, ratio: float) -> tuple[int, int]:
    """A frame of the same aspect and ``downsample_ratio`` whose low-resolution pass is
    ``TIMING_WIDTH`` wide (never larger than the frame): the same layers and launches, with
    little CPU work in the PyTorch ops (which on a GPU would not be host time)."""
    scale = min(1.0, TIMING_WIDTH / (w * ratio))
    return max(round(w * scale), 8), max(round(h * scale), 8)


def _streaming_call(model, src: torch.Tensor, ratio: float):
    """The first call (no state) and the state a second call gets."""
    _, _, *rec = model(src, downsample_ratio=ratio)
    return rec


def host_overhead(size: str = "512x288@1", frames: int = 1, calls: int = 10, model=None,
                  dtype: torch.dtype = torch.float32) -> dict:
    """Launches and syncs of one streaming call of ``model`` (default: the converted
    BiMatting, random weights, in ``dtype``) on a (1, frames, 3, H, W) clip at ``size`` in
    the model's dtype; host time per call at :func:`timing_size` of it."""
    w, h, ratio = parse_frame_size(size)
    torch.manual_seed(0)
    if model is None:
        model = convert(BiMatting().eval().to(dtype))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), dtype)
    triton_counts: collections.Counter = collections.Counter()
    with pretend_cuda(90, {}, stand_in=lambda k: LaunchCounter(k, triton_counts)):
        # Counted under no_grad: under inference_mode composite ops (.to, .contiguous) reach
        # the dispatch mode undecomposed, and the copies they make would not be seen.
        with torch.no_grad():
            src = torch.rand(1, frames, 3, h, w).to(dtype)
            rec = _streaming_call(model, src, ratio)
            triton_counts.clear()
            with OpCounter() as ops:
                model(src, *rec, downsample_ratio=ratio)
        per_call = dict(triton_counts)
    # Timed under inference_mode, as convert_video runs (less dispatch work than no_grad),
    # without and with Triton's argument binding of each launch (calls alternate).
    binders: dict = {}

    def binding(kernel):
        if kernel not in binders:
            binders[kernel] = triton_binder(kernel)
        return LaunchCounter(kernel, triton_counts, binders[kernel])

    times: dict[str, list[float]] = {"plain": [], "binding": []}
    tw, th = timing_size(w, h, ratio)
    with torch.inference_mode():
        src = torch.rand(1, frames, 3, th, tw).to(dtype)
        with pretend_cuda(90, {}, stand_in=lambda k: LaunchCounter(k, triton_counts)):
            rec = _streaming_call(model, src, ratio)
        for _ in range(calls):
            for kind, stand_in in (("plain", lambda k: LaunchCounter(k, triton_counts)), ("binding", binding)):
                with pretend_cuda(90, {}, stand_in=stand_in):
                    triton_counts.clear()
                    start = time.perf_counter()
                    model(src, *rec, downsample_ratio=ratio)
                    times[kind].append(time.perf_counter() - start)
    timing_launches = sum(triton_counts.values())
    bound = all(b is not None for b in binders.values())
    triton_total = sum(per_call.values())
    torch_total = sum(ops.launching.values())
    return dict(
        size=size, frames=frames, dtype=str(dtype).removeprefix("torch."), triton_launches=per_call,
        triton_total=triton_total,
        torch_launches=dict(ops.launching.most_common()), torch_total=torch_total,
        launches=triton_total + torch_total, syncs=dict(ops.syncs),
        timing_size=f"{tw}x{th}@{ratio:g}", timing_triton_launches=timing_launches,
        host_ms=1e3 * statistics.median(times["plain"]),
        host_ms_spread=1e3 * (max(times["plain"]) - min(times["plain"])),
        host_ms_with_binding=1e3 * statistics.median(times["binding"]) if bound else None,
        triton_version=triton.__version__, calls=calls, torch_threads=torch.get_num_threads(),
    )


def report(r: dict) -> str:
    triton = ", ".join(f"{k.strip('_').removesuffix('_kernel')} {v}" for k, v in
                       sorted(r["triton_launches"].items(), key=lambda kv: -kv[1]))
    torch_ops = ", ".join(f"{k} {v}" for k, v in r["torch_launches"].items())
    syncs = ", ".join(f"{k} {v}" for k, v in r["syncs"].items()) or "none (capturable as a CUDA graph)"
    return "\n".join([
        f"fused BiMatting, {r['size']}, T={r['frames']}, {r['dtype']}: one streaming call (kernels stubbed out)",
        f"launches per call: {r['launches']} = {r['triton_total']} Triton ({triton})",
        f"                   + {r['torch_total']} PyTorch ops ({torch_ops})",
        f"host synchronisations: {syncs}",
        f"host time per call: {r['host_ms']:.2f} ms (median of {r['calls']}, spread {r['host_ms_spread']:.2f}) at "
        f"{r['timing_size']} ({r['timing_triton_launches']} Triton launches; {r['torch_threads']} threads): Python, "
        "dispatch and the PyTorch ops' CPU work",
        f"  with Triton's argument binding of each launch (triton {r['triton_version']}): "
        + (f"{r['host_ms_with_binding']:.2f} ms" if r["host_ms_with_binding"] is not None else "not measurable here")
        + "; the rest of Triton's launch (cache lookup, driver call) not included",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="512x288@1", help="WIDTHxHEIGHT@DOWNSAMPLE_RATIO (default 512x288@1)")
    parser.add_argument("--frames", type=int, default=1, help="frames per call T (default 1)")
    parser.add_argument("--calls", type=int, default=10, help="timed calls (default 10)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"), default="float32",
                        help="the model's dtype (default float32)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--check", action="store_true", help="exit with status 1 if the forward synchronises")
    args = parser.parse_args(argv)
    if args.frames < 1 or args.calls < 1:
        parser.error("--frames and --calls must be positive")
    result = host_overhead(args.size, args.frames, args.calls, dtype=getattr(torch, args.dtype))
    print(json.dumps(result, indent=1) if args.json else report(result))
    if args.check and result["syncs"]:
        sys.exit(1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
