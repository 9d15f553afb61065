"""The BiMatting network, one file per part (backbone, aspp, decoder, refiner)."""
from .bimatting import BiMatting

__all__ = ["BiMatting"]
