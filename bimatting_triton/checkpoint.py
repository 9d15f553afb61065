"""Reading official (and our own training) checkpoints into a model, with clear errors.

Also knows the header of :mod:`bimatting_triton.packed`'s inference checkpoints
(:data:`PACKED_FORMAT`, :func:`is_packed_file`), so that one passed where a state_dict
is expected is named as such.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .devices import usable_device

NESTED_KEYS = ("state_dict", "model")
DDP_PREFIX = "module."
# BatchNorm counters that old checkpoints may lack; they never change the outputs.
OPTIONAL_SUFFIXES = (".num_batches_tracked",)
#: The ``'format'`` entry of a packed inference checkpoint (``bimatting_triton.packed.FORMAT``).
PACKED_FORMAT = "bimatting-packed"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (missing, unexpected or mis-shaped keys)."""


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a state_dict from ``path`` with ``torch.load(weights_only=True)``.

    Accepts a plain state_dict, a dict holding one under ``state_dict`` or ``model``
    (training checkpoints), and keys prefixed by ``module.`` (DDP). Returns a plain
    ``{name: tensor}`` dict.
    """
    path = os.fspath(path)
    if isinstance(map_location, (str, torch.device)):  # (torch.load also takes dicts and functions)
        usable_device(map_location, "map_location")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint path {path!r} is a folder, expected a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:  # (a file that cannot be read, e.g. no permission, says so itself, naming it)
        raise
    except Exception as exc:  # corrupt file, pickle with code in it, not a torch file ...
        raise CheckpointError(
            f"checkpoint {path!r} is not a readable PyTorch checkpoint (not written by torch.save, truncated or "
            f"corrupted, or holding objects that weights-only loading refuses): {type(exc).__name__}: {exc}"
        ) from exc
    return unwrap_state_dict(obj, source=path)


def is_packed_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a packed inference checkpoint (``bimatting_triton.packed.save_packed``).

    Reads only the header (the tensors are memory-mapped, not read); ``False`` for any file
    that cannot be read so (the loader that follows then reports why).
    """
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return _is_packed(obj)


def _is_packed(obj: object) -> bool:
    return isinstance(obj, Mapping) and obj.get("format") == PACKED_FORMAT


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Find the state_dict inside a loaded checkpoint object and strip DDP prefixes."""
    if _is_packed(obj):
        raise CheckpointError(f"{source}: this is a packed inference checkpoint: use bimatting_triton.packed.load_packed")
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    expected = (f"{source}: expected a state_dict (a mapping of names to tensors), or a dict holding one "
                f"under {' or '.join(repr(k) for k in NESTED_KEYS)}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{expected}; got {type(obj).__name__}")
    keys = [repr(k) for k in obj if not isinstance(k, str)]
    if keys:
        raise CheckpointError(f"{expected}; got keys that are not parameter names (str): {', '.join(keys[:5])}")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        shown = ", ".join(bad[:5]) + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else "")
        raise CheckpointError(f"{expected}; got a {type(obj).__name__} whose values are not all tensors: {shown}")
    if obj and all(k.startswith(DDP_PREFIX) for k in obj):
        obj = {k[len(DDP_PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "integer"


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state_dict`` into ``model``, naming every key that does not fit.

    Raises :class:`CheckpointError` listing missing keys, unexpected keys, keys whose
    shapes differ (with both shapes) and keys whose kind of dtype differs (an integer, bool
    or complex tensor for a float parameter, or a float for an integer counter: loading
    would convert them silently). Float precisions may differ (a float16 checkpoint loads
    into a float32 model). BatchNorm ``num_batches_tracked`` counters may be absent.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    kinds = [
        f"{k}: checkpoint {state_dict[k].dtype} vs model {v.dtype}"
        for k, v in expected.items()
        if k in state_dict and _dtype_kind(state_dict[k].dtype) != _dtype_kind(v.dtype)
    ]
    if missing or unexpected or mismatched or kinds:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched),
                             ("dtype mismatches", kinds)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)
