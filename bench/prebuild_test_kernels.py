"""pytest plugin: compile, for sm_90 and without a GPU, what the GPU tests launch.

    BIMATTING_TEST_CUDA=1 TRITON_CACHE_DIR=DIR PYTHONPATH=bench \\
        python -m pytest -p prebuild_test_kernels tests/kernels tests/test_fuse.py ...

Every test runs with the launch sites told they are on CUDA (``compile_model.pretend_cuda``:
the GPU's tiles and code paths) and each Triton launch first compiled for sm_90 exactly as
launched (the tests' own shapes, dtypes and flags), then run by Triton's interpreter on
the CPU, so that the tests go on to their later launches: ``DIR`` then holds what
``gpu_session.sh``'s tests step compiles on the GPU (``bench/prebuild_triton_cache.sh``
packs it with the benchmarks' kernels). Test outcomes are reported but are not the point:
the interpreter runs the GPU's tiles, and paths it cannot run (bf16 arithmetic) fail.
``BIMATTING_TEST_CUDA=1`` keeps ``TRITON_INTERPRET`` unset (tests/conftest.py), so the
kernels are compilable; on a machine without CUDA the tests' tensors stay on the CPU.
"""
from __future__ import annotations

import contextlib

import pytest
from compile_model import Recorder, pretend_cuda  # bench/compile_model.py
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction


COMPILED: dict = {}  # one entry per specialisation, over all tests (each reported once)
_INTERPRETED: dict = {}  # raw function -> its InterpretedFunction


def _interpreted(fn) -> InterpretedFunction:
    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


@contextlib.contextmanager
def _helpers_interpreted():
    """``@triton.jit`` helpers called inside an interpreted kernel run interpreted too (they
    are ``JITFunction``s, since the interpreter was off when they were decorated, Triton's
    own ``tl.max`` & co. included)."""
    # triton.language and triton.language.core patched for the interpreter once, for the
    # whole run (the kernel's own run patches and restores on top of this): nested patches,
    # as InterpretedFunction.__call__ makes them, are never restored and would break the
    # next compile.
    namespace = {"tl": tl, "core": tl.core}
    exec("def uses_the_language(): pass", namespace)
    scope = _patch_lang(namespace["uses_the_language"])
    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn).rewrite()(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = original
        scope.restore()


class CompileThenInterpret:
    """Stands in for a ``@triton.jit`` kernel: ``k[grid](...)`` compiles the launch for sm_90
    (a :class:`compile_model.Recorder`), then runs it in Triton's interpreter."""

    def __init__(self, kernel):
        self.recorder = Recorder(kernel, 90, COMPILED)
        self.interpreted = _interpreted(kernel.fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.recorder[grid](*args, **kwargs)
            if kwargs.get("HW_POPC"):  # (compiled with the GPU's popc; interpreted with the
                kwargs = dict(kwargs, HW_POPC=False)  # bit count it can run: same results)
            with _helpers_interpreted():
                self.interpreted.run(*args, grid=grid, warmup=False, **kwargs)
        return launch


@pytest.fixture(autouse=True)
def _launches_compiled_then_interpreted():
    with pretend_cuda(90, COMPILED, stand_in=CompileThenInterpret):
        yield


def pytest_terminal_summary(terminalreporter):
    failed = [r for r in COMPILED.values() if r["error"]]
    terminalreporter.write_line(f"prebuild_test_kernels: {len(COMPILED)} specialisations compiled for sm_90, "
                                f"{len(failed)} failed to compile (the outcomes above are the GPU's tiles in the "
                                f"interpreter; bf16 and the no-Triton fallbacks fail here by design)")
    for r in failed:
        terminalreporter.write_line(f"  {r['kernel']} {r['tile']}: {r['error']}")
