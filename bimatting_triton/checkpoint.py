"""Reading official (and our own training) checkpoints into a model, with clear errors."""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

NESTED_KEYS = ("state_dict", "model")
DDP_PREFIX = "module."
# BatchNorm counters that old checkpoints may lack; they never change the outputs.
OPTIONAL_SUFFIXES = (".num_batches_tracked",)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model (missing, unexpected or mis-shaped keys)."""


def read_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Load a state_dict from ``path`` with ``torch.load(weights_only=True)``.

    Accepts a plain state_dict, a dict holding one under ``state_dict`` or ``model``
    (training checkpoints), and keys prefixed by ``module.`` (DDP). Returns a plain
    ``{name: tensor}`` dict.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code in it, not a torch file ...
        raise CheckpointError(f"checkpoint {path!r} could not be read as a weights-only torch file: {exc}") from exc
    return unwrap_state_dict(obj, source=path)


def unwrap_state_dict(obj: object, source: str = "checkpoint") -> dict[str, Tensor]:
    """Find the state_dict inside a loaded checkpoint object and strip DDP prefixes."""
    if isinstance(obj, Mapping):
        for key in NESTED_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{source}: expected a state_dict (a mapping of names to tensors), or a dict holding one "
            f"under {' or '.join(repr(k) for k in NESTED_KEYS)}; got {type(obj).__name__}"
        )
    if obj and all(k.startswith(DDP_PREFIX) for k in obj):
        obj = {k[len(DDP_PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def load_into(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly load ``state_dict`` into ``model``, naming every key that does not fit.

    Raises :class:`CheckpointError` listing missing keys, unexpected keys and keys
    whose shapes differ (with both shapes). BatchNorm ``num_batches_tracked`` counters
    may be absent.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith(OPTIONAL_SUFFIXES)]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)
