"""Helpers shared by the Triton kernels: where Triton can run, and a 32-bit popcount.

* :func:`interpreting` — whether ``TRITON_INTERPRET`` is on (kernels then run on the CPU
  through Triton's interpreter; it has no libdevice, no ``popc``).
* :func:`triton_can_run` — whether a kernel can run on a tensor: on CUDA, or anywhere
  under the interpreter. Elsewhere the ops fall back to their plain-PyTorch reference.
* :func:`popcount32` (``@triton.jit``) — bit count of 32-bit words, with the hardware
  instruction (libdevice ``popc``) when ``HW`` is set and a SWAR count otherwise.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # The dispatching libdevice stubs (triton >= 3.0); only used on CUDA.
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the installed triton
    libdevice = None

__all__ = ["interpreting", "autotuning", "cdiv", "pow2", "triton_can_run", "hardware_popcount", "popcount32",
           "KERNEL_STATS", "note_compiled", "version_counter"]

# (kernel name, tile) -> {"n_regs": int, "n_spills": int}, filled only with BIMATTING_KERNEL_STATS=1
# on CUDA (bench/throughput.py --profile prints it): register spills are the first suspect
# when a kernel is far slower than its arithmetic and bytes allow.
KERNEL_STATS: dict[tuple[str, str], dict[str, int]] = {}


def _env_flag(name: str) -> bool:
    # Read at each use (the benchmarks and tests set these after import), so kept cheap:
    # the launch sites ask a few times per launch.
    value = os.environ.get(name)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no")


# Read once, when the kernels are imported: that is when Triton decides whether the
# ``@triton.jit`` functions run under its interpreter, so a later change of the variable
# would not change what the kernels are (and the launch sites ask this hundreds of times
# a frame: an environment lookup each time cost ~0.5 ms a frame of host time).
_INTERPRETING = _env_flag("TRITON_INTERPRET")


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` was set to a true value at import (kernels run on the CPU)."""
    return _INTERPRETING


def autotuning() -> bool:
    """True when ``BIMATTING_AUTOTUNE=1``: the conv kernels autotune their tiles on CUDA.

    Off by default: every distinct layer (shape, epilogue flags) would compile and time all
    configs, minutes of start-up for the whole model; the default is one heuristic tile
    per layer shape (see the kernels' ``_heuristic_config``).
    """
    return _env_flag("BIMATTING_AUTOTUNE")


def note_compiled(name: str, tile: dict, compiled) -> None:
    """Record the registers and spills of a launched kernel (``kernel[grid](...)``'s return
    value, a triton ``CompiledKernel``) when ``BIMATTING_KERNEL_STATS=1``; else nothing."""
    if not _env_flag("BIMATTING_KERNEL_STATS"):
        return
    regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
    if regs is None:  # the interpreter and autotuner wrappers return no compiled kernel
        return
    label = ", ".join(f"{k}={v}" for k, v in sorted(tile.items()))
    KERNEL_STATS[(name, label)] = {"n_regs": int(regs), "n_spills": int(spills or 0)}


# The dense kernels (sign + pack, packed conv) number the pixels of a launch (n*H*W + h*W + w)
# in int32, and widen to int64 only for memory offsets: one launch takes fewer than 2**31
# pixels, less a margin for the last program's block, which runs past the end before its mask
# is applied. (The plain-PyTorch references have no such limit.)
MAX_PIXELS = 2**31 - 2**16


def check_pixel_count(n: int, h: int, w: int, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` when an (N, ., H, W) tensor holds more pixels than
    one launch can number (:data:`MAX_PIXELS`, about 259 frames of 3840x2160)."""
    if n * h * w > MAX_PIXELS:
        raise ValueError(f"{name} has N*H*W = {n}*{h}*{w} = {n * h * w} pixels, more than the {MAX_PIXELS} "
                         "one kernel launch can index (int32): split the batch")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints, on the host (``triton.cdiv`` is a constexpr function
    object in recent Triton releases, ~1.5 µs a call: too slow for launch grids)."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def version_counter(t: torch.Tensor) -> int | None:
    """``t``'s version counter (bumped by in-place writes: what keeps caches of values derived
    from ``t`` honest); None for an inference-mode tensor, which has none."""
    return None if t.is_inference() else t._version


def triton_can_run(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``tensor``'s device (CUDA, or any under the interpreter)."""
    return interpreting() or tensor.is_cuda


def hardware_popcount(tensor: torch.Tensor) -> bool:
    """Whether to use libdevice ``popc`` (compiled CUDA kernels only) instead of the SWAR count."""
    return (
        libdevice is not None
        and not interpreting()
        and tensor.is_cuda
        and torch.version.cuda is not None
    )


@triton.jit
def _swar_popcount32(x):
    # Classic SWAR bit count on unsigned words (logical shifts): sums of 2, 4, 8 bits,
    # then the four byte counts folded into the low byte (no multiply, so no overflow).
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    u = u + (u >> 8)
    u = u + (u >> 16)
    return (u & 0x3F).to(tl.int32, bitcast=True)


@triton.jit
def popcount32(x, HW: tl.constexpr):
    """Number of set bits of each 32-bit word of ``x`` (int32 or uint32) -> int32 in [0, 32]."""
    if HW:
        return libdevice.popc(x.to(tl.int32, bitcast=True))
    else:
        return _swar_popcount32(x)

