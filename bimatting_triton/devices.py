"""Checking a device a user asked for, once, with an error that names where it came from."""
from __future__ import annotations

import contextlib
import re

import torch

__all__ = ["usable_device", "current_cuda_device"]


def usable_device(device: str | torch.device | None, name: str = "device") -> torch.device:
    """``device`` as a :class:`torch.device` this PyTorch can use here (``None``: cuda if
    available, else cpu).

    Raises ``ValueError`` starting with ``name`` (e.g. ``'--device'``) and the value for a
    string that is no device, ``cuda`` without CUDA or past the device count, ``meta`` (no
    data), or a device type this build lacks (found by allocating an empty tensor there):
    checked before any work, instead of the AssertionError torch raises at the first transfer.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name} {device!r} is not a torch device ({exc})") from None
    where = f"{name} {str(device)!r}"
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{where}: CUDA is not available here (this PyTorch has no CUDA support or sees no "
                             "GPU); use cpu")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{where}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "meta":
        raise ValueError(f"{where}: the meta device holds no data and cannot run the model")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as exc:  # a device type this build lacks: AssertionError, NotImplementedError ...
            reason = re.split(r"\.\s", str(exc).strip())[0] or type(exc).__name__  # its first sentence
            raise ValueError(f"{where} cannot be used by this PyTorch: {reason}") from None
    return dev


def current_cuda_device(device: torch.device):
    """A context in which ``device`` is the current CUDA device, where it is another one.

    Triton launches its kernels, and ``torch.cuda.graph`` captures, on the *current* CUDA
    device, whatever device the tensors are on: a model on ``cuda:1`` while ``cuda:0`` is
    current would launch on the wrong GPU. PyTorch's own operators switch devices themselves.
    A no-op context for other devices, on a machine with one GPU, and under ``torch.compile``
    (whose generated code sets the device itself). Used around ``BiMatting.forward``,
    ``CudaGraphStep`` and ``capture``; another model converted with ``convert`` (its
    ``PackedBiConv2d`` s launch the kernels from its own forward) needs
    ``with torch.cuda.device(x.device):`` around its call when its GPU is not the current one.
    """
    if (device.type != "cuda" or torch.compiler.is_compiling() or torch.cuda.device_count() < 2
            or device.index is None or device.index == torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)
