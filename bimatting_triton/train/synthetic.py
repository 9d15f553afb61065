"""A procedural matting dataset that needs no download.

Each clip is drawn from its own seed: a textured foreground object with a wobbly outline
(soft or sharp edge, sometimes a semi-transparent veil) and thin hair-like strands
(sub-pixel to ~2 px wide, partial opacity) that sway over time, moving (translation,
rotation, zoom) over a procedural background (multi-octave value noise, colour ramps and
stripes) that pans on its own. Everything is rendered analytically at the target size
with exact alpha, and the foreground colour is the true un-premultiplied colour, so
``fgr * pha + bgr * (1 - pha)`` is the composite a camera would see.

Items are ``(fgr, pha, bgr)`` float32 (T, 3, S, S), (T, 1, S, S), (T, 3, S, S) in [0, 1],
like :class:`~bimatting_triton.train.data.VideoMatteDataset`'s.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import MattingAugmentation, _EpochDataset, _uniform, item_generator

__all__ = ["SyntheticMatteDataset", "render_clip", "procedural_texture", "hsv_colors", "FG_SATURATION", "BG_SATURATION"]

# Foregrounds form a recognisable class, as people do in real matting data: vivid colours
# over greyish backgrounds. Equal ranges give an ambiguous task (any texture may be either).
FG_SATURATION = (0.55, 1.0)
BG_SATURATION = (0.0, 0.45)


def hsv_colors(g: torch.Generator, n: int, saturation: tuple[float, float], value: tuple[float, float]) -> Tensor:
    """``n`` random RGB colours (n, 3) in [0, 1]: any hue, saturation and value drawn from the ranges."""
    h = torch.rand(n, generator=g) * 6
    s = saturation[0] + (saturation[1] - saturation[0]) * torch.rand(n, generator=g)
    v = value[0] + (value[1] - value[0]) * torch.rand(n, generator=g)
    # Standard HSV -> RGB: each channel is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + h) mod 6.
    k = (torch.tensor([5.0, 3.0, 1.0])[None] + h[:, None]) % 6
    return v[:, None] - v[:, None] * s[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


def procedural_texture(
    g: torch.Generator,
    height: int,
    width: int,
    octaves: int = 4,
    saturation: tuple[float, float] = (0.0, 1.0),
    value: tuple[float, float] = (0.2, 1.0),
) -> Tensor:
    """A random colour texture (3, height, width) in [0, 1].

    Value noise: random grids of growing resolution, bicubically upsampled and summed with
    halving amplitude, mapped through a ramp of three random colours (HSV saturation and
    value drawn from the given ranges); sometimes stripes.
    """
    noise = torch.zeros(1, 1, height, width)
    amplitude, total = 1.0, 0.0
    cells = 2 + int(torch.randint(3, (), generator=g))
    for _ in range(octaves):
        grid = torch.rand(1, 1, cells + 1, cells + 1, generator=g)
        noise += amplitude * F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=True)
        total += amplitude
        amplitude, cells = amplitude * 0.5, cells * 2
    v = (noise[0, 0] / total - 0.5) * _uniform(g, 1.5, 3.0) + 0.5  # stretch the contrast
    if torch.rand((), generator=g).item() < 0.3:
        angle, freq = _uniform(g, 0, math.pi), _uniform(g, 0.1, 0.6)
        yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
        v = v + 0.35 * torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * freq)
    v = v.clamp(0, 1)
    colors = hsv_colors(g, 3, saturation, value)  # ramp stops at v = 0, 0.5, 1
    lo = colors[0][:, None, None] * (1 - 2 * v) + colors[1][:, None, None] * (2 * v)
    hi = colors[1][:, None, None] * (2 - 2 * v) + colors[2][:, None, None] * (2 * v - 1)
    return torch.where(v < 0.5, lo, hi).clamp(0, 1)


def _strand_coverage(screen: Tensor, width: Tensor, opacity: Tensor, size: int) -> Tensor:
    """Alpha (size * size,) of N anti-aliased polylines ``screen`` (N, K + 1, 2) as (x, y) pixels.

    A pixel centre at distance d from a strand of width w is covered
    ``clamp(w / 2 + 0.5 - d, 0, 1) * min(w, 1)`` (a box-filtered line: a one-pixel ramp on
    each side, peak ``w`` for sub-pixel strands), times the strand's opacity; strands
    combine as independent layers, ``1 - prod(1 - a_i)``. Each strand is only evaluated
    on a window around its bounding box.
    """
    n = screen.shape[0]
    pad = 3.0
    lo = (screen.amin(1) - pad).floor()  # (N, 2)
    side = int(((screen.amax(1) - screen.amin(1)).amax() + 2 * pad + 2).ceil().item())
    offs = torch.arange(side, dtype=screen.dtype)
    wx = (lo[:, 0:1] + offs).view(n, 1, side).expand(n, side, side).reshape(n, -1)  # (N, W*W)
    wy = (lo[:, 1:2] + offs).view(n, side, 1).expand(n, side, side).reshape(n, -1)
    a, b = screen[:, :-1], screen[:, 1:]  # (N, K, 2)
    rx = (wx + 0.5)[..., None] - a[:, None, :, 0]  # (N, W*W, K)
    ry = (wy + 0.5)[..., None] - a[:, None, :, 1]
    abx, aby = (b - a)[:, None, :, 0], (b - a)[:, None, :, 1]
    # Closest point of each segment: the projection parameter clamped to [0, 1].
    t = ((rx * abx + ry * aby) / (abx * abx + aby * aby).clamp_min(1e-12)).clamp_(0, 1)
    dx, dy = rx - t * abx, ry - t * aby
    dist = (dx * dx + dy * dy).amin(-1).sqrt()  # (N, W*W)
    cover = (width[:, None] / 2 + 0.5 - dist).clamp(0, 1) * width.clamp(max=1)[:, None] * opacity[:, None]
    inside = (wx >= 0) & (wx < size) & (wy >= 0) & (wy < size)
    log_keep = torch.where(inside, (1 - cover).clamp_min(1e-7).log(), torch.zeros_like(cover))
    index = (wy.clamp(0, size - 1) * size + wx.clamp(0, size - 1)).long()
    acc = torch.zeros(size * size, dtype=screen.dtype).index_add_(0, index.flatten(), log_keep.flatten())
    return 1 - acc.exp()


def render_clip(
    g: torch.Generator,
    size: int,
    seq_length: int,
    fg_saturation: tuple[float, float] = FG_SATURATION,
    bg_saturation: tuple[float, float] = BG_SATURATION,
) -> tuple[Tensor, Tensor, Tensor]:
    """One synthetic clip ``(fgr, pha, bgr)``: (T, 3, S, S), (T, 1, S, S), (T, 3, S, S) float32.

    ``fg_saturation`` / ``bg_saturation``: HSV saturation ranges of the foreground's and the
    background's colours (see :class:`SyntheticMatteDataset`).
    """
    s, t = size, seq_length
    u = torch.linspace(0, 1, t) if t > 1 else torch.zeros(1)

    # Background: a larger texture panned linearly over time (camera motion).
    margin = max(2, s // 4)
    texture = procedural_texture(g, s + 2 * margin, s + 2 * margin, saturation=bg_saturation)
    start = torch.rand(2, generator=g) * 2 * margin
    end = torch.rand(2, generator=g) * 2 * margin
    bgr = []
    for k in range(t):
        off = start * (1 - u[k]) + end * u[k]
        # Sub-pixel pan by bilinear sampling of the big texture.
        ys = torch.arange(s, dtype=torch.float32) + off[0]
        xs = torch.arange(s, dtype=torch.float32) + off[1]
        gy = ys / (s + 2 * margin - 1) * 2 - 1
        gx = xs / (s + 2 * margin - 1) * 2 - 1
        grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
        bgr.append(F.grid_sample(texture[None], grid, mode="bilinear", align_corners=True)[0])
    bgr = torch.stack(bgr)

    # Foreground object in its own coordinates (units of pixels), moved per frame.
    radius = s * _uniform(g, 0.18, 0.32)
    harmonics = torch.arange(2, 6, dtype=torch.float32)
    amps = torch.rand(4, generator=g) * 0.15 / harmonics * 2
    phases = torch.rand(4, generator=g) * 2 * math.pi
    # Edge ramp width in pixels: 1 is an anti-aliased sharp edge, more is a soft (blurred) one.
    softness = _uniform(g, 1.5, 5.0) if torch.rand((), generator=g).item() < 0.5 else 1.0
    fg_texture = procedural_texture(g, s, s, saturation=fg_saturation)
    veil = torch.rand((), generator=g).item() < 0.35
    veil_alpha, veil_angle = _uniform(g, 0.25, 0.75), _uniform(g, 0, 2 * math.pi)
    strand_color = hsv_colors(g, 1, fg_saturation, (0.15, 0.6))[0]  # darker, like hair

    centre0 = torch.tensor([_uniform(g, 0.3, 0.7), _uniform(g, 0.3, 0.7)]) * s
    centre1 = centre0 + (torch.rand(2, generator=g) - 0.5) * s * 0.3
    rot0 = _uniform(g, -math.pi, math.pi)
    rot1 = rot0 + _uniform(g, -0.6, 0.6)
    zoom0, zoom1 = _uniform(g, 0.85, 1.15), _uniform(g, 0.85, 1.15)

    # Strands: random walks from the outline outwards, in object coordinates.
    n_strands = int(torch.randint(4, 20, (), generator=g))
    n_seg = 8
    strand_base = torch.rand(n_strands, generator=g) * 2 * math.pi
    strand_len = radius * (0.4 + 0.8 * torch.rand(n_strands, generator=g))
    strand_width = 0.2 + 1.6 * torch.rand(n_strands, generator=g) ** 2  # mostly thin
    strand_opacity = 0.5 + 0.5 * torch.rand(n_strands, generator=g)
    curvature = (torch.rand(n_strands, n_seg, generator=g) - 0.5) * 0.6
    sway_phase = torch.rand(n_strands, generator=g) * 2 * math.pi
    sway_amp = _uniform(g, 0.05, 0.4)

    def outline(theta: Tensor) -> Tensor:
        wobble = (amps[:, None] * torch.cos(harmonics[:, None] * theta.reshape(1, -1) + phases[:, None])).sum(0)
        return radius * (1 + wobble.reshape(theta.shape))

    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32) + 0.5, torch.arange(s, dtype=torch.float32) + 0.5, indexing="ij")
    pixels = torch.stack([xx.flatten(), yy.flatten()], 1)  # (P, 2) as (x, y)
    fgrs, phas = [], []
    for k in range(t):
        c = centre0 * (1 - u[k]) + centre1 * u[k]
        rot = rot0 * (1 - u[k].item()) + rot1 * u[k].item()
        zoom = zoom0 * (1 - u[k].item()) + zoom1 * u[k].item()
        cos, sin = math.cos(rot), math.sin(rot)
        rel = pixels - c[[1, 0]]  # (x, y) relative to the centre
        ox = (cos * rel[:, 0] + sin * rel[:, 1]) / zoom  # object coordinates
        oy = (-sin * rel[:, 0] + cos * rel[:, 1]) / zoom
        r, theta = torch.sqrt(ox**2 + oy**2), torch.atan2(oy, ox)
        # Signed distance to the outline, in screen pixels (approximately).
        d = (r - outline(theta)) * zoom
        body = (0.5 - d / softness).clamp(0, 1)
        if veil:  # a half-transparent cape beyond one side of the outline
            lobe = torch.cos(theta - veil_angle).clamp_min(0) ** 2
            cape = veil_alpha * lobe * ((radius * 1.45 - r) * zoom / 2 + 0.5).clamp(0, 1)
            body = body + (1 - body) * cape

        # Strand polylines for this frame (object coordinates): each segment turns by its
        # curvature, and the whole strand sways more towards its tip.
        sway = sway_amp * torch.sin(2 * math.pi * u[k] + sway_phase)[:, None] * (torch.arange(n_seg) + 1) / n_seg
        direction = strand_base[:, None] + torch.cumsum(curvature, 1) + sway  # (N, n_seg)
        steps = (strand_len / n_seg)[:, None, None] * torch.stack([torch.cos(direction), torch.sin(direction)], -1)
        root = torch.stack([torch.cos(strand_base), torch.sin(strand_base)], -1) * outline(strand_base)[:, None] * 0.92
        pts = torch.cat([root[:, None], root[:, None] + torch.cumsum(steps, 1)], 1)  # (N, n_seg + 1, 2)
        sx = (cos * pts[..., 0] - sin * pts[..., 1]) * zoom + c[1]
        sy = (sin * pts[..., 0] + cos * pts[..., 1]) * zoom + c[0]
        screen = torch.stack([sx, sy], -1)
        strands = _strand_coverage(screen, strand_width, strand_opacity, s)  # (P,)

        alpha = strands + (1 - strands) * body
        # Un-premultiplied colour: strands over the textured body.
        # The body's texture is painted on the object: sample it at the object coordinates.
        tex_grid = torch.stack([ox, oy], -1).reshape(1, s, s, 2) / (s / 2)
        body_rgb = F.grid_sample(fg_texture[None], tex_grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        body_rgb = body_rgb[0].flatten(1).T  # (P, 3)
        premult = strands[:, None] * strand_color + (1 - strands[:, None]) * body[:, None] * body_rgb
        fgr = torch.where(alpha[:, None] > 1e-6, premult / alpha[:, None].clamp_min(1e-6), body_rgb)
        fgrs.append(fgr.T.reshape(3, s, s).clamp(0, 1))
        phas.append(alpha.reshape(1, s, s).clamp(0, 1))
    return torch.stack(fgrs), torch.stack(phas), bgr


class SyntheticMatteDataset(_EpochDataset):
    """Procedural video matting clips (see the module docstring); no files needed.

    ``length`` clips per epoch of side ``size`` and ``seq_length`` frames. Item ``i`` of
    epoch ``e`` is drawn from ``(seed, e, i)``: a held-out set is simply another ``seed``
    (keep the epoch at 0). ``augment=True`` adds :class:`MattingAugmentation`'s colour,
    crop and motion augmentation on top. ``fg_saturation`` / ``bg_saturation`` are the HSV
    saturation ranges of foreground and background colours: by default foregrounds are
    vivid and backgrounds greyish, so that "foreground" is a learnable class (the role
    people play in real matting data); pass ``(0, 1)`` for both to make them ambiguous.
    """

    def __init__(
        self,
        length: int,
        size: int,
        seq_length: int,
        seed: int = 0,
        augment: bool = False,
        fg_saturation: tuple[float, float] = FG_SATURATION,
        bg_saturation: tuple[float, float] = BG_SATURATION,
    ):
        if length < 1 or size < 8 or seq_length < 1:
            raise ValueError(f"SyntheticMatteDataset: need length >= 1, size >= 8, seq_length >= 1; got {length}, {size}, {seq_length}")
        for name, (lo, hi) in (("fg_saturation", fg_saturation), ("bg_saturation", bg_saturation)):
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{name}: expected a range 0 <= low <= high <= 1, got {(lo, hi)}")
        self.length, self.size, self.seq_length, self.seed = length, size, seq_length, seed
        self.fg_saturation, self.bg_saturation = tuple(fg_saturation), tuple(bg_saturation)
        self.augmentation = MattingAugmentation(size, enabled=True, scale=(0.5, 1.0)) if augment else None

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        g = item_generator(self.seed, self.epoch, index)
        fgr, pha, bgr = render_clip(g, self.size, self.seq_length, self.fg_saturation, self.bg_saturation)
        if self.augmentation is not None:
            fgr, pha = self.augmentation.foreground(fgr, pha, g)
            bgr = self.augmentation.background(bgr, g)
        return fgr, pha, bgr
