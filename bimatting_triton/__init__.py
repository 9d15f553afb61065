"""bimatting_triton: binarized video matting (BiMatting) with fused Triton kernels."""
from . import metrics
from .checkpoint import CheckpointError
from .evaluate import evaluate, evaluate_model
from .model import BiMatting
from .nn import BiConv2d, BinaryActivation, LearnableBias
from .swap import binarize_, swap_modules

__version__ = "0.1.0"

__all__ = [
    "BiMatting",
    "BiConv2d",
    "BinaryActivation",
    "LearnableBias",
    "CheckpointError",
    "swap_modules",
    "binarize_",
    "metrics",
    "evaluate",
    "evaluate_model",
]
