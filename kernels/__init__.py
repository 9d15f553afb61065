"""Triton kernels of bimatting_triton, installed as ``bimatting_triton.kernels``.

Each op lives in its own module beside the plain-PyTorch reference it must equal:
``pack`` (LearnableBias + sign + bit-pack), ``binary_conv`` (packed 1x1/3x3 binary
convolution), ``epilogue`` (what the convolutions do with their integer sums: folded
BatchNorm, residuals, activations, mask, the next layer's sign + pack) and ``sparse_unit``
(the tile-sparse masked units of the decoder, over the active-tile lists of ``tile_list``);
``packed_weight`` holds the weights' bit layout. Under ``TRITON_INTERPRET=1`` (set before import)
the kernels run on the CPU.
"""
from .binary_conv import (
    Epilogue,
    EpiloguePlan,
    PackedWeight,
    Residual,
    binary_conv2d,
    binary_conv2d_reference,
    pack_weight,
)
from .pack import PackedActivation, sign_pack, sign_pack_pair, sign_pack_reference
from .sparse_unit import (
    skipped_bops,
    sparse_binary_conv2d,
    sparse_binary_conv2d_reference,
    sparse_float_conv2d,
    sparse_float_conv2d_reference,
)
from .tile_list import TileList, active_tiles, active_tiles_reference

__all__ = [
    "PackedActivation",
    "sign_pack",
    "sign_pack_pair",
    "sign_pack_reference",
    "PackedWeight",
    "pack_weight",
    "Epilogue",
    "EpiloguePlan",
    "Residual",
    "binary_conv2d",
    "binary_conv2d_reference",
    "TileList",
    "active_tiles",
    "active_tiles_reference",
    "sparse_binary_conv2d",
    "sparse_binary_conv2d_reference",
    "sparse_float_conv2d",
    "sparse_float_conv2d_reference",
    "skipped_bops",
]
