"""bimatting_triton: binarized video matting (BiMatting) with fused Triton kernels.

The network and its building blocks import eagerly; the tools (evaluation, video,
training, profiling) load on first use, so that ``python -m bimatting_triton.<tool>``
runs its module once and ``import bimatting_triton`` stays light.
"""
from importlib import import_module

from .checkpoint import CheckpointError
from .cuda_graph import CudaGraphStep
from .fuse import convert
from .model import BiMatting
from .packed import PackedCheckpointError, load_packed, save_packed
from .nn import BiConv2d, BinaryActivation, LearnableBias
from .profile import Profile, profile  # bimatting_triton.profile is the function
from .swap import binarize_, swap_modules

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None means the module itself
_LAZY = {
    "metrics": ("metrics", None),
    "convert_video": ("video", "convert_video"),
    "evaluate_model": ("evaluate", "evaluate_model"),
    "evaluate_folders": ("evaluate", "evaluate"),
}

__all__ = [
    "BiMatting",
    "BiConv2d",
    "BinaryActivation",
    "LearnableBias",
    "CheckpointError",
    "convert",
    "CudaGraphStep",
    "save_packed",
    "load_packed",
    "PackedCheckpointError",
    "swap_modules",
    "binarize_",
    "profile",
    "Profile",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = import_module(f".{module_name}", __name__)
        return module if attribute is None else getattr(module, attribute)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
