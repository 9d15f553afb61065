"""bench/host_overhead.py: launches per call, host synchronisations, host time (no GPU needed).

Run in subprocesses: the script must import the kernels without ``TRITON_INTERPRET`` (the
launch sites then take the compiled-kernel path, where its stand-ins count launches).
"""
import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
KERNELS = {"_binary_conv_kernel", "_sign_pack_kernel", "_sparse_conv_kernel", "_tile_flags_kernel",
           "_compact_kernel", "_sparse_float_conv_kernel", "_masked_pair_kernel"}


def _run(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          cwd=BENCH)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fused_model_launches_and_never_synchronises():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "host_overhead.py"), "--size", "256x192@0.5",
                          "--frames", "2", "--calls", "2", "--json", "--check"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["syncs"] == {}  # what CudaGraphStep's capture needs
    assert set(r["triton_launches"]) == KERNELS
    # the timing frame (low-resolution pass 64 wide: 128x96) runs the same launches
    assert r["timing_size"] == "128x96@0.5" and r["timing_triton_launches"] == r["triton_total"]
    # T=2: the GRUs run per frame, everything else once; the sparse decoder builds one
    # tile list per level and call (tile_flags / compact once per level, not per frame)
    assert r["triton_launches"]["_tile_flags_kernel"] == r["triton_launches"]["_compact_kernel"] == 5
    assert r["launches"] == r["triton_total"] + r["torch_total"] and r["host_ms"] > 0
    # Triton's argument binding of every launch, timed with this Triton's binders for sm_90
    assert r["host_ms_with_binding"] is not None and r["host_ms_with_binding"] > 0


def test_triton_binder_binds_a_real_launch():
    # The binder host_overhead.py times is the one Triton runs at launch: on the model's own
    # arguments it returns their specialisation (a tensor's dtype and alignment, ...).
    code = """
import json, torch
from host_overhead import triton_binder
from bimatting_triton.kernels.pack import _sign_pack_kernel
binder = triton_binder(_sign_pack_kernel)
x = torch.randn(1, 40, 3, 5)
out = torch.empty(1, 3, 5, 2, 2, dtype=torch.int32)
args = (x, x, x, x, x, out, x, out, *x.stride() * 4, 15, 40, 40, 40, 3, 5, 2, 0)
flags = dict(SOURCES=1, GATED=False, HAS_BIAS=False, PAIR=False, HAS_BIAS2=False, BP=64, BW=1)
bound, specialization, _ = binder(*args, **flags)
print(json.dumps(dict(n=len(bound),  # 32 arguments and 7 constexprs
                 spec=[str(s[0]) for s in specialization][:6])))
"""
    r = _run(code)
    assert r["n"] == 32 + 7 and r["spec"][0] == "*fp32" and r["spec"][5] == "*i32", r


def test_a_host_synchronisation_is_reported():
    code = """
import json, torch
from host_overhead import host_overhead
from bimatting_triton import BiMatting, convert

class Syncing(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = convert(BiMatting().eval())
    def forward(self, src, *rec, downsample_ratio=1):
        if src.mean() > 2:  # bool() of a tensor reads its value on the host
            raise AssertionError
        return self.inner(src, *rec, downsample_ratio=downsample_ratio)

print(json.dumps(host_overhead("64x48@1", 1, 1, model=Syncing())))
"""
    r = _run(code)
    assert r["syncs"] and sum(r["syncs"].values()) >= 1, r["syncs"]
