"""Float baselines that BiMatting is compared against (plain PyTorch, no torchvision)."""
from .rvm import RVMMobileNetV3

__all__ = ["RVMMobileNetV3"]
