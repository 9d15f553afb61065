"""The tensor-core loop of a compiled kernel, read from its machine code (SASS): how many
instructions a warp issues per iteration, and what that allows at most.

Used by ``bench/compile_report.py`` (no GPU needed: Triton's bundled ``nvdisasm`` reads the
cubin that its ``ptxas`` wrote). The packed conv's ``'dot'`` loop unpacks activation bits to
int8 with ordinary integer instructions before each ``tl.dot``; when those outnumber the
tensor-core work, the kernel is bound by instruction issue, not by the tensor cores. A warp
scheduler issues one instruction per clock and an SM has four, so a loop iteration of
``I`` instructions per warp in a program of ``w`` warps takes at least ``I * w / 4`` clocks
of an SM, and the tile's ``BM * BN * BK`` multiply-adds run at most at

    issue-bound MAC/clk/SM = 4 * BM * BN * BK / (I * w)

against Hopper's dense tensor-core rates per SM and clock: 4096 int8 MACs, 2048 fp16 (what
cuDNN's fp16 convolutions run on). A static bound for comparing kernel versions, not a time:
latencies, memory, occupancy and the other pipes' limits come on top.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import tempfile

SCHEDULERS_PER_SM = 4
PEAK_MACS_PER_CLK = {"int8": 4096, "fp16": 2048}  # dense tensor cores, per SM, Hopper (sm_90)

_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\s+`?\(?(\.L_x_\d+)\)?")
# "        /*0a10*/   @!P1 IGMMA.64x64x32.S8.S8 R24, ..." -> "IGMMA"
_OPCODE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_MMA = ("GMMA", "HMMA", "IMMA")  # wgmma (sm_90: IGMMA / HGMMA), mma.sync


def nvdisasm() -> str:
    """Path of the ``nvdisasm`` bundled with Triton's NVIDIA backend (beside its ``ptxas``)."""
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.path.exists(path):
        raise FileNotFoundError(f"nvdisasm not found at {path} (this triton build does not bundle it)")
    return path


def disassemble(cubin: bytes) -> str:
    """SASS text of a cubin (``nvdisasm -c``: code sections only)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([nvdisasm(), "-c", path], capture_output=True, text=True, check=True).stdout


def mma_loop(sass: str) -> list[str]:
    """The SASS lines of the innermost loop that holds a tensor-core instruction (from a
    label to the backward branch to it); empty if there is none."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    best: list[str] = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if not m or labels.get(m.group(1), i) >= i:
            continue  # not a backward branch
        body = lines[labels[m.group(1)]:i + 1]
        if any(mma in b for b in body for mma in _MMA) and (not best or len(body) < len(best)):
            best = body
    return best


def opcodes(lines: list[str]) -> collections.Counter:
    """Opcode (without modifiers) -> count over SASS lines."""
    return collections.Counter(m.group(1) for line in lines if (m := _OPCODE.match(line)))


def loop_report(cubin: bytes, tile_macs: int, num_warps: int) -> dict:
    """{'loop_instr', 'mma_instr', 'byte_stores', 'mac_per_clk', 'opcodes'} of the tensor-core
    loop of a compiled kernel whose iteration does ``tile_macs`` multiply-adds (``byte_stores``:
    single-byte shared-memory stores in it, the sign of an operand built one value at a time);
    zeros where no such loop is found."""
    body = mma_loop(disassemble(cubin))
    ops = opcodes(body)
    n = sum(ops.values())
    return dict(loop_instr=n, mma_instr=sum(c for op, c in ops.items() if any(m in op for m in _MMA)),
                byte_stores=sum(1 for line in body if re.search(r"\bSTS\.[US]8\b", line)),
                mac_per_clk=SCHEDULERS_PER_SM * tile_macs / (n * num_warps) if n else 0.0, opcodes=dict(ops))
