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
import triton.language as tl  # noqa: F401  (seen by _uses_the_language)
import triton.language.core as core  # noqa: F401  (seen by _uses_the_language)
from compile_model import Recorder, pretend_cuda  # bench/compile_model.py
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction


COMPILED: dict = {}  # one entry per specialisation, over all tests (each reported once)
_INTERPRETED: dict = {}  # raw function -> its InterpretedFunction


def _interpreted(fn) -> InterpretedFunction:
    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = InterpretedFunction(fn)
    return _INTERPRETED[fn]


def _uses_the_language():
    """Sees ``tl`` and ``tl.core`` in its globals (this module's): what ``_patch_lang`` patches."""


@contextlib.contextmanager
def _helpers_interpreted():
    """``@triton.jit`` helpers called inside an interpreted kernel run interpreted too (they
    are ``JITFunction``s, since the interpreter was off when they were decorated, Triton's
    own ``tl.max`` & co. included)."""
    # triton.language and triton.language.core patched for the interpreter once, for the
    # whole run (the kernel's own run patches and restores on top of this): nested patches,
    # as InterpretedFunction.__call__ makes them, are never restored and would break the
    # next compile.
    scope = _patch_lang(_uses_the_language)
    original = JITFunction.__call__
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn).rewrite()(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = original
        scope.restore()


class Interpreted:
    """Stands in for a ``@triton.jit`` kernel (compiled or interpreted): ``k[grid](...)`` runs
    the launch in Triton's interpreter, with the SWAR bit count where the launch asks for the
    GPU's ``popc`` (which the interpreter lacks: the same integers)."""

    def __init__(self, kernel):
        self.interpreted = _interpreted(kernel.fn)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if kwargs.get("HW_POPC"):
                kwargs = dict(kwargs, HW_POPC=False)
            with _helpers_interpreted():
                self.interpreted.run(*args, grid=grid, warmup=False, **kwargs)
        return launch


class CompileThenInterpret(Interpreted):
    """Stands in for a ``@triton.jit`` kernel: ``k[grid](...)`` compiles the launch for sm_90
    exactly as launched (a :class:`compile_model.Recorder`), then runs it interpreted."""

    def __init__(self, kernel):
        super().__init__(kernel)
        self.recorder = Recorder(kernel, 90, COMPILED)

    def __getitem__(self, grid):
        interpreted = super().__getitem__(grid)

        def launch(*args, **kwargs):
            self.recorder[grid](*args, **kwargs)
            interpreted(*args, **kwargs)
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
