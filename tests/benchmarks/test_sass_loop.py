"""bench/sass_loop.py: the tensor-core loop read from a kernel's SASS, and the packed conv's
'dot' loop as compiled for sm_90 (no GPU needed: Triton's bundled ptxas and nvdisasm)."""
import json
import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")
sys.path.insert(0, BENCH)
import sass_loop  # noqa: E402

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
.L_x_1:
        /*0020*/                   LDS R4, [R3] ;
        /*0030*/                   STS.U8 [R5], R4 ;
        /*0040*/                   IGMMA.64x64x32.S8.S8 R24, R56, gdesc[UR4], R24 ;
        /*0050*/              @!P1 IMAD R6, R6, 0x2, RZ ;
        /*0060*/               @P2 BRA `(.L_x_1) ;
        /*0070*/                   ISETP.GE.AND P0, PT, R2, 0x8, PT ;
        /*0080*/              @!P0 BRA `(.L_x_0) ;
        /*0090*/                   BRA `(.L_x_2) ;
.L_x_2:
        /*00a0*/                   EXIT ;
"""


def test_innermost_mma_loop_and_its_opcodes():
    body = sass_loop.mma_loop(SASS)
    ops = sass_loop.opcodes(body)
    # the inner loop (.L_x_1 to its backward branch), not the outer one nor the forward branch
    assert dict(ops) == {"LDS": 1, "STS": 1, "IGMMA": 1, "IMAD": 1, "BRA": 1}
    assert sass_loop.mma_loop(SASS.replace("IGMMA", "IMAD")) == []


def test_dot_loop_unpacks_in_registers():
    # The int8 operand is made from each packed word in the thread that loaded it and stored
    # to shared memory in vectors: no single-byte stores in the loop, and far fewer than the
    # 522 instructions per iteration of the layout that spread a word's bits over the lanes
    # (one shared load, ~6 ALU ops and a byte store per value; bench/RESULTS.md).
    code = ("import json, sys; sys.path.insert(0, {bench!r}); import compile_report as cr; "
            "r = cr.compile_layer((64, 64, 72, 128, 3, 1), dict(BM=64, BN=64, BK=64, num_warps=4, num_stages=3), 90); "
            "r.pop('opcodes'); print(json.dumps(r))").format(bench=BENCH)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if "No such file" in done.stderr and ("ptxas" in done.stderr or "nvdisasm" in done.stderr):  # pragma: no cover
        pytest.skip("no ptxas / nvdisasm in this triton build")
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["mma_instr"] >= 1 and r["byte_stores"] == 0
    assert 0 < r["loop_instr"] < 300
    assert r["mac_per_clk"] == pytest.approx(4 * 64 * 64 * 64 / (r["loop_instr"] * 4))
