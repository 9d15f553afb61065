"""Active-tile lists: which ``TH x TW`` output tiles of a mask hold a pixel with ``m != 0``,
for the tile-sparse units of :mod:`~bimatting_triton.kernels.sparse_unit`.

Masks are (B, T, 1, H, W) (or (N, 1, H, W), read as T = 1). The list has one row per
frame ``t`` (a *group*) holding the active tiles of the B items of that frame, so that
a GRU step (frame t, batch B) and a whole-clip conv (B*T frames folded) share it:

* ``flags`` int32 (T, L), ``L = B * tiles_h * tiles_w``: 1 where tile ``e`` of frame
  ``t`` is active, ``e = (b * tiles_h + ty) * tiles_w + tx``;
* ``index`` int32 (T, L): the first ``count[t]`` entries are the active ``e`` in
  increasing order (the rest is unused memory);
* ``count`` int32 (T,).

Built on the device without a host sync: a flags kernel (one tile a lane: any
``m != 0`` in the tile, grown by ``halo`` pixels) and a compaction kernel (one program
per frame: ``pos = running + cumsum(flags) - 1``, scatter ``e`` to ``index[pos]``).
The sparse kernels are launched with a grid of the *capacity* L per frame and each
program beyond ``count[t]`` returns at once, so no count ever travels to the host.
A tensor folded as (B*T, C, H, W) (``n = b*T + t``) is addressed with the whole list;
a frame's (B, C, H, W) slice with ``tiles.select(t)`` (``n = b``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._common import cdiv, interpreting, triton_can_run
from ._common import pow2 as _pow2

__all__ = ["TileList", "active_tiles", "active_tiles_reference", "default_tile"]

CUDA_TILE = (8, 8)
INTERPRETER_TILE = (16, 16)  # the interpreter pays per program: fewer, bigger tiles


def default_tile() -> tuple[int, int]:
    """Tile (TH, TW) used when none is given: 8x8 on CUDA, 16x16 under the interpreter."""
    return INTERPRETER_TILE if interpreting() else CUDA_TILE


# ----------------------------------------------------------------------------------------
# The list and its reference
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TileList:
    """Active tiles of a (B, T, 1, H, W) mask, one row per frame (layout in the module docstring).

    ``index``, ``flags``: int32 (G, L) with ``L = items * tiles_h * tiles_w``; ``count``:
    int32 (G,). ``items``: B. ``size``: (H, W) of the masked output. ``tile``: (TH, TW).
    ``halo``: pixels by which a tile was grown when testing the mask (1 for the input of
    a following 3x3 conv). G is T for a whole-clip list, 1 after :meth:`select`.
    """

    index: Tensor
    count: Tensor
    flags: Tensor
    items: int
    size: tuple[int, int]
    tile: tuple[int, int]
    halo: int = 0

    def __post_init__(self):
        g, cap = self.flags.shape if self.flags.dim() == 2 else (None, None)
        ok = (
            g is not None and self.index.shape == self.flags.shape and self.count.shape == (g,)
            and all(t.dtype == torch.int32 for t in (self.index, self.count, self.flags))
            and cap == self.items * self.tiles_per_item
        )
        if not ok:
            raise ValueError(
                "TileList: index and flags must be int32 (G, items * tiles_h * tiles_w) and count int32 (G,), got "
                f"{tuple(self.index.shape)}, {tuple(self.flags.shape)}, {tuple(self.count.shape)}"
            )

    @property
    def groups(self) -> int:
        """G: frames (rows) of the list."""
        return self.flags.shape[0]

    @property
    def tiles_h(self) -> int:
        return -(-self.size[0] // self.tile[0])

    @property
    def tiles_w(self) -> int:
        return -(-self.size[1] // self.tile[1])

    @property
    def tiles_per_item(self) -> int:
        return self.tiles_h * self.tiles_w

    @property
    def capacity(self) -> int:
        """L: tiles per frame row (the launch grid of the sparse kernels)."""
        return self.flags.shape[1]

    @property
    def device(self) -> torch.device:
        return self.flags.device

    def select(self, t: int) -> "TileList":
        """The list of frame ``t`` alone (G = 1), for (B, C, H, W) tensors of that frame."""
        if not 0 <= t < self.groups:
            raise IndexError(f"frame {t} out of range for a tile list of {self.groups} frames")
        return dataclasses.replace(
            self, index=self.index[t : t + 1], count=self.count[t : t + 1], flags=self.flags[t : t + 1]
        )

    def coverage(self) -> Tensor:
        """Bool (items * G, 1, H, W) in folded order (``n = b*G + g``): pixels of active tiles."""
        th, tw = self.tile
        f = self.flags.reshape(self.groups, self.items, self.tiles_h, self.tiles_w).transpose(0, 1)
        f = f.reshape(-1, self.tiles_h, self.tiles_w).bool()
        f = f.repeat_interleave(th, dim=1).repeat_interleave(tw, dim=2)
        return f[:, None, : self.size[0], : self.size[1]]

    def computed_pixels(self) -> Tensor:
        """int64 scalar tensor: in-image output pixels of the active tiles (over all items and frames)."""
        return (self.flags.reshape(self.groups, self.items, self.tiles_h, self.tiles_w).to(torch.int64)
                * _tile_pixels(self).to(self.device)).sum()

    def total_pixels(self) -> int:
        return self.groups * self.items * self.size[0] * self.size[1]

    def density(self) -> Tensor:
        """float64 scalar tensor: computed pixels / all pixels (the fraction of the dense work done)."""
        return self.computed_pixels().to(torch.float64) / max(self.total_pixels(), 1)


def _tile_pixels(tiles: TileList) -> Tensor:
    """int64 (tiles_h, tiles_w): in-image pixels of each tile position (edge tiles are partial)."""
    (h, w), (th, tw) = tiles.size, tiles.tile
    rows = (h - torch.arange(tiles.tiles_h) * th).clamp(max=th)
    cols = (w - torch.arange(tiles.tiles_w) * tw).clamp(max=tw)
    return rows[:, None] * cols[None, :]


def _as_clip_mask(mask) -> Tensor:
    """(B, T, 1, H, W) view of a (B, T, 1, H, W) or (N, 1, H, W) mask."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 4:
        mask = mask.unsqueeze(1)
    if mask.dim() != 5 or mask.shape[2] != 1 or not mask.is_floating_point():
        raise ValueError(f"mask must be a float (B, T, 1, H, W) or (N, 1, H, W) tensor, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    return mask


def _check_tile(tile, halo) -> tuple[int, int]:
    ok = (isinstance(tile, tuple) and len(tile) == 2 and all(isinstance(v, int) and v > 0 for v in tile)
          and all(v & (v - 1) == 0 for v in tile) and tile[0] * tile[1] >= 16)
    if not ok:
        raise ValueError(f"tile must be (TH, TW), powers of two with TH * TW >= 16, got {tile!r}")
    if not (isinstance(halo, int) and halo >= 0):
        raise ValueError(f"halo must be a non-negative int, got {halo!r}")
    return tile


def active_tiles_reference(mask: Tensor, tile: tuple[int, int] | None = None, halo: int = 0) -> TileList:
    """Plain-PyTorch :func:`active_tiles`: (mask != 0), grown by ``halo`` (max-pool), tile max-pool,
    cumsum positions and a scatter; the unused ``index`` entries are -1."""
    mask = _as_clip_mask(mask)
    tile = _check_tile(tile or default_tile(), halo)
    b, t, _, h, w = mask.shape
    th, tw = tile
    nz = (mask != 0).transpose(0, 1).reshape(t * b, 1, h, w).float()  # frames first
    if halo:
        nz = F.max_pool2d(nz, 2 * halo + 1, stride=1, padding=halo)
    nth, ntw = -(-h // th), -(-w // tw)
    nz = F.pad(nz, (0, ntw * tw - w, 0, nth * th - h))
    flags = nz.reshape(t, b, nth, th, ntw, tw).amax(dim=(3, 5)).reshape(t, -1).to(torch.int32)
    pos = flags.cumsum(1) - 1
    cap = flags.shape[1]
    index = torch.full((t, cap + 1), -1, dtype=torch.int64, device=mask.device)
    slot = torch.where(flags.bool(), pos, torch.full_like(pos, cap)).to(torch.int64)
    index.scatter_(1, slot, torch.arange(cap, device=mask.device).expand(t, cap).clone())
    count = flags.sum(1, dtype=torch.int32)
    return TileList(index[:, :cap].to(torch.int32).contiguous(), count, flags.contiguous(), b, (h, w), tile, halo)


@triton.jit
def _tile_flags_kernel(
    m_ptr, m_sb, m_st, m_sh, m_sw,  # mask (B, T, 1, H, W), any strides
    flags_ptr,  # int32 (T, L)
    H, W, L, TPI, TILES_W,
    TH: tl.constexpr, TW: tl.constexpr, HALO: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
):
    # Lanes: BT tiles x BQ pixels of the tile grown by HALO on each side.
    pid = tl.program_id(0)
    g = tl.program_id(1)
    e = pid * BT + tl.arange(0, BT)
    e_ok = e < L
    b = e // TPI
    r = e % TPI
    ty = r // TILES_W
    tx = r % TILES_W
    q = tl.arange(0, BQ)  # pixel of the grown tile, row-major with rows of TW + 2 * HALO
    q_ok = q < (TH + 2 * HALO) * (TW + 2 * HALO)
    py = ty[:, None] * TH - HALO + (q // (TW + 2 * HALO))[None, :]
    px = tx[:, None] * TW - HALO + (q % (TW + 2 * HALO))[None, :]
    ok = e_ok[:, None] & q_ok[None, :] & (py >= 0) & (py < H) & (px >= 0) & (px < W)
    off = b.to(tl.int64)[:, None] * m_sb + g.to(tl.int64) * m_st + py.to(tl.int64) * m_sh + px.to(tl.int64) * m_sw
    v = tl.load(m_ptr + off, mask=ok, other=0.0)
    flag = tl.max(((v != 0) & ok).to(tl.int32), axis=1)  # NaN counts as set
    tl.store(flags_ptr + g * L + e, flag, mask=e_ok)


@triton.jit
def _compact_kernel(flags_ptr, index_ptr, count_ptr, L, BLOCK: tl.constexpr):
    # One program per frame: stream compaction of the flags row by a running prefix sum.
    g = tl.program_id(0)
    row = g.to(tl.int64) * L
    running = tl.sum(tl.zeros((BLOCK,), dtype=tl.int32), axis=0)
    for start in range(0, L, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = offs < L
        f = tl.load(flags_ptr + row + offs, mask=ok, other=0)
        pos = running + tl.cumsum(f, axis=0) - 1
        tl.store(index_ptr + row + pos, offs, mask=ok & (f != 0))
        running += tl.sum(f, axis=0)
    tl.store(count_ptr + g, running)


def active_tiles(mask: Tensor, tile: tuple[int, int] | None = None, halo: int = 0) -> TileList:
    """The active tiles of ``mask``: tiles holding a pixel with ``mask != 0`` (NaN included).

    ``mask``: float (B, T, 1, H, W) or (N, 1, H, W) (read as T = 1), any strides: the
    level's resized incoherence mask, per batch item and frame. ``tile``: (TH, TW) output
    pixels, powers of two (default :func:`default_tile`). ``halo``: grow each tile by this
    many pixels before testing (a tile is then active when any pixel within ``halo``
    of it is set: the input tiles a following 3x3 conv needs). Returns a
    :class:`TileList`; built by two Triton launches and no host sync where Triton runs,
    else by :func:`active_tiles_reference` (identical lists; unused ``index`` entries
    differ: never read).
    """
    mask = _as_clip_mask(mask)
    tile = _check_tile(tile or default_tile(), halo)
    if not triton_can_run(mask):
        return active_tiles_reference(mask, tile, halo)
    if interpreting() and mask.dtype == torch.bfloat16:
        mask = mask.float()
    b, t, _, h, w = mask.shape
    th, tw = tile
    nth, ntw = -(-h // th), -(-w // tw)
    cap = b * nth * ntw
    dev = mask.device
    flags = torch.empty((t, cap), dtype=torch.int32, device=dev)
    index = torch.empty((t, cap), dtype=torch.int32, device=dev)
    count = torch.empty((t,), dtype=torch.int32, device=dev)
    if cap > 0 and t > 0:
        bq = _pow2((th + 2 * halo) * (tw + 2 * halo))  # lanes per tile
        budget = 16384 if interpreting() else 4096  # lanes per program
        bt = 1 << (max(budget // bq, 1).bit_length() - 1)  # tiles per program, a power of two
        sb, st, _, sh, sw = mask.stride()
        _tile_flags_kernel[(cdiv(cap, bt), t)](
            mask, sb, st, sh, sw, flags, h, w, cap, nth * ntw, ntw, TH=th, TW=tw, HALO=halo, BT=bt, BQ=bq
        )
        block = min(_pow2(cap), 4096)
        _compact_kernel[(t,)](flags, index, count, cap, BLOCK=block)
    else:
        count.zero_()
    return TileList(index, count, flags, b, (h, w), tile, halo)


def _check_tiles(tiles, n: int, ho: int, wo: int, device) -> None:
    if not isinstance(tiles, TileList):
        raise TypeError(f"tiles must be a TileList (see active_tiles), got {type(tiles).__name__}")
    if tiles.items * tiles.groups != n or tiles.size != (ho, wo):
        raise ValueError(
            f"tiles cover {tiles.items} items x {tiles.groups} frames of size {tiles.size}, but the output is "
            f"(N={n}, {ho}, {wo}); use the whole list for B*T folded frames and tiles.select(t) for one frame"
        )
    if tiles.device != device:
        raise ValueError(f"tiles are on {tiles.device}, the tensors on {device}")


# ----------------------------------------------------------------------------------------
# Reading the list in the sparse kernels
# ----------------------------------------------------------------------------------------
@triton.jit
def _tile_coords(tiles_ptr, count_ptr, L, TPI, TILES_W, G, HO, WO, TH: tl.constexpr, TW: tl.constexpr):
    """(active, n_img, oh, ow, m_ok) of this program's tile: program (i, g) takes entry i of row g."""
    i = tl.program_id(0)
    g = tl.program_id(1)
    active = i < tl.load(count_ptr + g)
    e = tl.load(tiles_ptr + g.to(tl.int64) * L + i, mask=active, other=0)
    item = e // TPI
    r = e % TPI
    n_img = item * G + g  # folded (B*G) order: n = b*G + g
    p = tl.arange(0, TH * TW)
    oh = (r // TILES_W) * TH + p // TW
    ow = (r % TILES_W) * TW + p % TW
    m_ok = (oh < HO) & (ow < WO)
    return active, n_img, oh, ow, m_ok
