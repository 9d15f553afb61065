"""kernels/_common.py: tile heuristics switches and the compiled-kernel statistics."""
from types import SimpleNamespace

from bimatting_triton.kernels import _common


def test_pow2():
    assert [_common.pow2(n) for n in (0, 1, 2, 3, 31, 32, 33, 100)] == [1, 1, 2, 4, 32, 32, 64, 128]


def test_autotuning_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv("BIMATTING_AUTOTUNE", raising=False)
    assert not _common.autotuning()
    monkeypatch.setenv("BIMATTING_AUTOTUNE", "1")
    assert _common.autotuning()
    monkeypatch.setenv("BIMATTING_AUTOTUNE", "0")
    assert not _common.autotuning()


def test_note_compiled_records_registers_and_spills_only_when_asked(monkeypatch):
    monkeypatch.setattr(_common, "KERNEL_STATS", {})
    compiled = SimpleNamespace(n_regs=128, n_spills=40)
    monkeypatch.delenv("BIMATTING_KERNEL_STATS", raising=False)
    _common.note_compiled("binary_conv3x3s1", {"BM": 64, "BN": 32}, compiled)
    assert _common.KERNEL_STATS == {}
    monkeypatch.setenv("BIMATTING_KERNEL_STATS", "1")
    _common.note_compiled("binary_conv3x3s1", {"BN": 32, "BM": 64}, compiled)
    _common.note_compiled("sparse_conv3x3", {"BN": 16}, None)  # the interpreter returns no compiled kernel
    assert _common.KERNEL_STATS == {("binary_conv3x3s1", "BM=64, BN=32"): {"n_regs": 128, "n_spills": 40}}
