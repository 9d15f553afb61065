"""Video matting metrics with the conventions of Robust Video Matting's evaluation.

BiMatting reports its quality the way RVM's benchmark computes it (SPEC §5): every
metric is computed per frame, averaged over the frames of a clip, then over clips.
This module holds the per-frame metrics; :mod:`bimatting_triton.evaluate` walks the
dataset folders.

Inputs
------
Alpha mattes are ``(..., H, W)`` arrays, any number of leading (frame) dimensions;
foregrounds are ``(..., C, H, W)`` (channels first, as the model returns them). Each
argument may be a ``numpy.ndarray`` or a ``torch.Tensor``; float values are taken as
they are (alpha in [0, 1]); ``uint8`` values are divided by 255 and ``uint16`` values
by 65535 (so 8-bit PNG frames can be passed directly); half/bfloat16 are upcast to
float32. Computation runs in torch on the device of the tensors (a GPU when they are
on one). Every function returns one value per frame: a float64 array of the leading
shape (a NumPy float64 scalar for a single ``(H, W)`` frame) when the inputs were
NumPy arrays, a float64 tensor on the input device otherwise.

Definitions (p = predicted alpha, g = true alpha, both in [0, 1], N = H·W pixels)
------------------------------------------------------------------------------
* ``mad``   = 1e3 · Σ|p − g| / N                        (pha MAD, "×1e3")
* ``mse``   = 1e3 · Σ(p − g)² / N                       (pha MSE, "×1e3")
* ``grad``  = Σ (|∇p̂| − |∇ĝ|)² / 1000, where ∇ is the pair of first-derivative-of-
  Gaussian filters (σ = 1.4, 9×9, unit L2 norm, see :func:`gaussian_derivative_filters`)
  applied with replicated borders. With ``normalize=True`` (RVM's 512×288 script)
  p̂ and ĝ are each min–max normalised to [0, 1] per frame first (a constant frame
  becomes 0, as OpenCV's ``NORM_MINMAX`` does); with ``normalize=False`` (RVM's HD
  script) the frames are used as they are. A sum, not a mean: it grows with the
  resolution, which is why HD Grad numbers are ~7× the 512×288 ones.
* ``conn``  = Σ |φ(g) − φ(p)| / 1000 with φ(a) = 1 − d·1{d ≥ 0.15}, d = a − l, where
  l is the highest threshold level at which the pixel still belonged to the largest
  4-connected component of {g ≥ t} ∩ {p ≥ t} (levels t = k·step, k = 1 … 1/step;
  l = t_{k−1} for the first level t_k that drops it, 0 if the first level does, 1 if
  none does). Rhemann et al. (CVPR 2009) with RVM's step 0.1. A sum, like ``grad``.
  Ties between equally large components go to the one whose first pixel comes
  first in raster order.
* ``dtssd`` = 100 · sqrt(Σ((p_t − p_{t−1}) − (g_t − g_{t−1}))² / N) for t ≥ 1 and 0 for
  the first frame (Erofeev et al. 2015, RVM's ×100 and frame-0 convention; the 0 is
  included when averaging a clip). Needs a time axis: ``(..., T, H, W)``.
* ``fgr_mad`` / ``fgr_mse`` = 1e3 · mean of |F_p − F_g| / (F_p − F_g)² over all channels
  of the pixels where the true alpha g > 0. NaN for a frame without such pixels (the
  clip averages in :mod:`bimatting_triton.evaluate` skip NaN frames).

Numerics: the elementwise work runs in the input precision (float32 for 8-bit
frames, as RVM's float32 NumPy/OpenCV code), the reductions accumulate in float64,
and Conn's threshold comparisons are made in float64 against ``k · step`` exactly as
``np.arange(0, 1 + step, step)`` produces them.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PHA_METRICS",
    "FGR_METRICS",
    "METRICS",
    "mad",
    "mse",
    "grad",
    "conn",
    "dtssd",
    "fgr_mad",
    "fgr_mse",
    "clip_metrics",
    "gaussian_derivative_filters",
]

PHA_METRICS = ("pha_mad", "pha_mse", "pha_grad", "pha_conn", "pha_dtssd")
FGR_METRICS = ("fgr_mad", "fgr_mse")
METRICS = PHA_METRICS + FGR_METRICS

# OpenCV's NORM_MINMAX treats a range of at most DBL_EPSILON as a constant image.
_DBL_EPSILON = float(np.finfo(np.float64).eps)
# Frames of Conn's label propagation processed at once are limited to about this
# many (thresholds x frames x pixels) elements, to bound memory.
_CONN_CHUNK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------- input handling
def _as_tensor(x, name: str) -> tuple[Tensor, bool]:
    """``x`` as a float tensor (see module docstring) and whether it came from NumPy."""
    if isinstance(x, np.ndarray):
        from_numpy = True
        if x.dtype == np.uint16:  # torch's uint16 support is partial: widen first
            x = x.astype(np.int32) / 65535.0
            x = x.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(x))
    elif isinstance(x, Tensor):
        from_numpy = False
        t = x
    else:
        raise TypeError(f"{name}: expected a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif t.dtype == torch.uint16:
        t = t.to(torch.int32).float() / 65535.0
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    elif t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name}: expected a float, uint8 or uint16 array, got dtype {t.dtype}")
    return t, from_numpy


def _pair(pred, true, min_ndim: int, what: str) -> tuple[Tensor, Tensor, bool]:
    """Validate and convert a (pred, true) pair of equal shapes with at least ``min_ndim`` dims."""
    p, p_np = _as_tensor(pred, "pred")
    g, g_np = _as_tensor(true, "true")
    if p.shape != g.shape:
        raise ValueError(f"pred and true must have the same shape, got pred {tuple(p.shape)} and true {tuple(g.shape)}")
    if p.ndim < min_ndim:
        raise ValueError(f"pred/true: expected {what}, got shape {tuple(p.shape)}")
    if p.device != g.device:
        raise ValueError(f"pred and true must be on the same device, got {p.device} and {g.device}")
    dtype = torch.promote_types(p.dtype, g.dtype)
    return p.to(dtype), g.to(dtype), p_np and g_np


def _out(values: Tensor, to_numpy: bool):
    """Per-frame results as float64: NumPy (scalar for 0-d) or a tensor on the input device."""
    values = values.to(torch.float64)
    if to_numpy:
        return values.cpu().numpy()[()]
    return values


# ----------------------------------------------------------------------------- MAD, MSE, dtSSD
def mad(pred, true):
    """Mean absolute difference ×1e3 per frame. ``pred``, ``true``: (..., H, W) alpha in [0, 1].

    Returns the leading shape (...). Symmetric; zero iff equal; scales as |c| under
    ``(c·pred, c·true)``.
    """
    p, g, to_np = _pair(pred, true, 2, "(..., H, W) alpha mattes")
    return _out((p - g).abs().mean(dim=(-2, -1), dtype=torch.float64) * 1e3, to_np)


def mse(pred, true):
    """Mean squared difference ×1e3 per frame. ``pred``, ``true``: (..., H, W) alpha in [0, 1].

    Returns the leading shape (...). Symmetric; scales as c² under ``(c·pred, c·true)``.
    """
    p, g, to_np = _pair(pred, true, 2, "(..., H, W) alpha mattes")
    return _out((p - g).square().mean(dim=(-2, -1), dtype=torch.float64) * 1e3, to_np)


def dtssd(pred, true):
    """Temporal-derivative error ×100 per frame (Erofeev et al.); the first frame is 0.

    ``pred``, ``true``: (..., T, H, W) alpha in [0, 1], T ≥ 1. Returns (..., T):
    ``out[..., t] = 100·sqrt(mean(((p_t − p_{t−1}) − (g_t − g_{t−1}))²))`` for t ≥ 1.
    """
    p, g, to_np = _pair(pred, true, 3, "(..., T, H, W) alpha sequences")
    d = torch.diff(p, dim=-3) - torch.diff(g, dim=-3)
    rest = d.square().mean(dim=(-2, -1), dtype=torch.float64).sqrt() * 1e2
    # frame 0 is 0; a sequence of no frames has no values (T = 0 gives (..., 0))
    first = torch.zeros(rest.shape[:-1] + (min(p.shape[-3], 1),), dtype=torch.float64, device=rest.device)
    return _out(torch.cat([first, rest], dim=-1), to_np)


# ----------------------------------------------------------------------------- Grad
def _gaussian_1d(sigma: float, epsilon: float) -> tuple[np.ndarray, np.ndarray, float]:
    """The 1-D factors of the Grad filters: (G, G', L2 norm of outer(G, G')), float64."""
    half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2.0 * math.pi) * sigma * epsilon)))
    x = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-(x**2) / (2.0 * sigma**2)) / (sigma * math.sqrt(2.0 * math.pi))
    dgauss = -x * gauss / sigma**2
    # ||outer(a, b)||_2 = ||a||_2 * ||b||_2
    return gauss, dgauss, float(np.linalg.norm(gauss) * np.linalg.norm(dgauss))


def gaussian_derivative_filters(sigma: float = 1.4, epsilon: float = 1e-2) -> tuple[np.ndarray, np.ndarray]:
    """The x and y first-derivative-of-Gaussian filters of the Grad metric, float64.

    Half size ``h = ceil(σ·sqrt(−2·ln(sqrt(2π)·σ·ε)))`` (4 for σ = 1.4, ε = 0.01), so the
    filters are (2h+1)×(2h+1). ``fx[i, j] = G(i − h)·G'(j − h)`` with G the 1-D Gaussian
    density of std σ and G'(x) = −x·G(x)/σ², scaled to unit L2 norm; ``fy = fxᵀ``.
    Applied by correlation (``fx`` differentiates along the width axis).
    """
    gauss, dgauss, norm = _gaussian_1d(sigma, epsilon)
    fx = np.outer(gauss, dgauss) / norm
    return fx, fx.T.copy()


def _minmax_normalize(x: Tensor) -> Tensor:
    """Per-frame (last two dims) min–max scaling to [0, 1]; constant frames become 0."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    rng = hi - lo
    scale = torch.where(rng > _DBL_EPSILON, 1.0 / rng.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(rng))
    return (x - lo) * scale


def _gradient_magnitude(x: Tensor, sigma: float) -> Tensor:
    """|∇x| with the Gaussian derivative filters, replicated borders. ``x``: (N, H, W)."""
    # fx = outer(G, G') / norm is separable: a vertical pass with G and a horizontal
    # pass with G'/norm give the same correlation as the 2-D filter (fy = fxᵀ swaps them).
    gauss, dgauss, norm = _gaussian_1d(sigma, 1e-2)
    half = len(gauss) // 2
    dgauss = dgauss / norm
    h, w = x.shape[-2:]
    padded = F.pad(x.unsqueeze(1), (half, half, half, half), mode="replicate").squeeze(1)  # (N, H+2h, W+2h)

    def along_h(img: Tensor, taps: np.ndarray) -> Tensor:
        # correlation along H, "valid" part: out[:, y, :] = sum_i taps[i] * img[:, y + i, :]
        return sum(float(c) * img[:, i : i + h, :] for i, c in enumerate(taps))

    def along_w(img: Tensor, taps: np.ndarray) -> Tensor:
        return sum(float(c) * img[:, :, i : i + w] for i, c in enumerate(taps))

    # d/dx: smooth along H with G, differentiate along W with G'; d/dy the other way.
    gx = along_w(along_h(padded, gauss), dgauss)
    gy = along_h(along_w(padded, gauss), dgauss)
    return torch.sqrt(gx.square() + gy.square())


def grad(pred, true, sigma: float = 1.4, normalize: bool = True):
    """Gradient error per frame: Σ(|∇p̂| − |∇ĝ|)² / 1000 (see module docstring).

    ``pred``, ``true``: (..., H, W) alpha in [0, 1]. ``normalize``: min–max normalise
    each frame first (True: RVM's 512×288 script; False: RVM's HD script). Returns the
    leading shape (...). Symmetric; with ``normalize=False`` scales as c².
    """
    p, g, to_np = _pair(pred, true, 2, "(..., H, W) alpha mattes")
    lead, (h, w) = p.shape[:-2], p.shape[-2:]
    p, g = p.reshape(-1, h, w), g.reshape(-1, h, w)
    if normalize:
        p, g = _minmax_normalize(p), _minmax_normalize(g)
    diff = _gradient_magnitude(p, sigma) - _gradient_magnitude(g, sigma)
    return _out((diff.square().sum(dim=(-2, -1), dtype=torch.float64) / 1000.0).reshape(lead), to_np)


# ----------------------------------------------------------------------------- Conn
def _shift_right(x: Tensor) -> Tensor:
    """``out[..., j] = x[..., j - 1]``, ``out[..., 0] = False``. ``x``: bool (..., W)."""
    return F.pad(x[..., :-1], (1, 0))


def _shift_left(x: Tensor) -> Tensor:
    """``out[..., j] = x[..., j + 1]``, ``out[..., W - 1] = False``. ``x``: bool (..., W)."""
    return F.pad(x[..., 1:], (0, 1))


def _merge_labels(labels: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Connected components of a graph by min-label propagation.

    ``labels``: (R,) int64 ``arange(R)``; ``a``, ``b``: (E,) int64 node indices of the
    edges. Returns (R,) labels: each node's label is the smallest node index of its
    component. Each round hooks the nodes (and the nodes their labels point at) at
    both ends of every edge to the smaller of the two labels, then jumps labels to
    their label's label until stable. Invariants: a label always names a node of the
    same component and never exceeds the node's own index; labels only decrease, so
    the loop ends, and it ends only when both ends of every edge agree, i.e. when
    labels are constant on components, hence equal to their smallest index.
    """
    while True:
        while True:  # pointer jumping to a fixed point: labels[labels] == labels
            jumped = labels[labels]
            if torch.equal(jumped, labels):
                break
            labels = jumped
        la, lb = labels[a], labels[b]
        if torch.equal(la, lb):
            return labels
        low = torch.minimum(la, lb)
        for index in (la, lb, a, b):
            labels.scatter_reduce_(0, index, low, reduce="amin")


def _largest_component(mask: Tensor) -> Tensor:
    """Largest 4-connected component of each image. ``mask``: (B, H, W) bool → (B, H, W) bool.

    Empty images give empty results; ties go to the component whose first pixel comes
    first in raster order (the numbering of a raster-scan labelling such as OpenCV's).

    Works on horizontal runs of mask pixels rather than on pixels: a run is a node
    (numbered in raster order), and two runs in consecutive rows of an image are
    joined by an edge when they overlap. Each maximal stretch of columns where both
    rows are set lies in exactly one run of each row, so the stretch starts list each
    edge once. Only the run graph goes through label propagation; pixels are touched
    by a few streaming passes.
    """
    b, h, w = mask.shape
    device = mask.device
    rows = mask.reshape(b * h, w)
    starts = torch.nonzero((rows & ~_shift_right(rows)).reshape(-1)).squeeze(1)  # (R,) first pixel of each run
    if starts.numel() == 0:
        return torch.zeros_like(mask)
    ends = torch.nonzero((rows & ~_shift_left(rows)).reshape(-1)).squeeze(1)  # (R,) last pixel, same order
    n_runs = starts.numel()
    # Overlap stretches between row y and row y + 1 of the same image.
    both = mask[:, :-1, :] & mask[:, 1:, :]  # (B, H-1, W)
    stretch = torch.nonzero(both & ~_shift_right(both))  # (E, 3): image, row, column
    upper = (stretch[:, 0] * h + stretch[:, 1]) * w + stretch[:, 2]
    run_a = torch.searchsorted(starts, upper, right=True) - 1
    run_b = torch.searchsorted(starts, upper + w, right=True) - 1
    labels = _merge_labels(torch.arange(n_runs, device=device), run_a, run_b)

    # Component sizes at their root runs, then the largest (first on ties) per image.
    sizes = torch.zeros(n_runs, dtype=torch.int64, device=device)
    sizes.scatter_add_(0, labels, ends - starts + 1)
    image = starts // (h * w)
    best = torch.zeros(b, dtype=torch.int64, device=device).scatter_reduce_(0, image, sizes, reduce="amax")
    node = torch.arange(n_runs, device=device)
    candidate = (sizes == best[image]) & (sizes > 0)
    chosen = torch.full((b,), n_runs, dtype=torch.int64, device=device)
    chosen.scatter_reduce_(0, image[candidate], node[candidate], reduce="amin")
    keep = labels == chosen[image]  # (R,) runs in their image's largest component

    # Paint the kept runs back to pixels, row by row: +1 at a run's first column, -1 one
    # past its last, prefix sum along the row. Runs of a row are separated by a gap, so
    # no two marks share a position.
    row_of, col_start = starts[keep] // w, starts[keep] % w
    marks = torch.zeros((b * h, w + 1), dtype=torch.int8, device=device)
    marks[row_of, col_start] = 1
    marks[row_of, ends[keep] % w + 1] = -1
    return torch.cumsum(marks, dim=1, dtype=torch.int8)[:, :w].view(b, h, w).bool()


def _conn_frames(p: Tensor, g: Tensor, step: float) -> Tensor:
    """Conn for (N, H, W) float frames → (N,) float64."""
    levels = np.arange(0, 1 + step, step)  # RVM's levels, float64, levels[0] = 0
    thresholds = torch.as_tensor(levels[1:], dtype=torch.float64, device=p.device).view(-1, 1, 1, 1)
    k = thresholds.shape[0]
    # Intersection of the thresholded mattes at every level: (K, N, H, W).
    both = (p.double().unsqueeze(0) >= thresholds) & (g.double().unsqueeze(0) >= thresholds)
    n, h, w = p.shape
    in_lcc = _largest_component(both.view(k * n, h, w)).view(k, n, h, w)
    # kept[n, y, x] = number of leading levels t_1..t_j whose largest component holds
    # the pixel; it is rounded down to levels[kept] (t_{j}), or to 1 when no level drops it.
    alive = torch.ones((n, h, w), dtype=torch.bool, device=p.device)
    kept = torch.zeros((n, h, w), dtype=torch.int64, device=p.device)
    for level in range(k):
        alive &= in_lcc[level]
        kept += alive
    table = torch.as_tensor(np.append(levels[:k], 1.0), dtype=p.dtype, device=p.device)
    round_down = table[kept]
    d_g = g - round_down
    d_p = p - round_down
    phi_g = 1 - d_g * (d_g >= 0.15)
    phi_p = 1 - d_p * (d_p >= 0.15)
    return (phi_g - phi_p).abs().sum(dim=(-2, -1), dtype=torch.float64) / 1000.0


def conn(pred, true, step: float = 0.1):
    """Connectivity error per frame (Rhemann et al. 2009; see module docstring).

    ``pred``, ``true``: (..., H, W) alpha in [0, 1]. ``step``: threshold spacing (0.1).
    Returns the leading shape (...). Symmetric; zero for identical inputs.
    """
    if not 0 < step <= 1:
        raise ValueError(f"step: expected a threshold spacing in (0, 1], got {step}")
    p, g, to_np = _pair(pred, true, 2, "(..., H, W) alpha mattes")
    lead, (h, w) = p.shape[:-2], p.shape[-2:]
    p, g = p.reshape(-1, h, w), g.reshape(-1, h, w)
    levels = len(np.arange(0, 1 + step, step)) - 1
    per_chunk = max(1, _CONN_CHUNK_ELEMENTS // max(1, levels * h * w))
    parts = [_conn_frames(p[i : i + per_chunk], g[i : i + per_chunk], step) for i in range(0, p.shape[0], per_chunk)]
    out = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=p.device)
    return _out(out.reshape(lead), to_np)


# ----------------------------------------------------------------------------- foreground
def _fgr_inputs(pred_fgr, true_fgr, true_pha) -> tuple[Tensor, Tensor, Tensor, bool]:
    p, g, to_np = _pair(pred_fgr, true_fgr, 3, "(..., C, H, W) foregrounds")
    a, a_np = _as_tensor(true_pha, "true_pha")
    frame_shape = p.shape[:-3] + p.shape[-2:]
    if a.shape == p.shape[:-3] + (1,) + p.shape[-2:]:
        a = a.squeeze(-3)
    if a.shape != frame_shape:
        raise ValueError(
            f"true_pha: expected shape {tuple(frame_shape)} (or with a channel of 1) to match "
            f"the foregrounds {tuple(p.shape)}, got {tuple(a.shape)}"
        )
    if a.device != p.device:
        raise ValueError(f"true_pha must be on the foregrounds' device {p.device}, got {a.device}")
    return p, g, (a > 0).unsqueeze(-3), to_np and a_np


def _masked_mean(err: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``err`` (..., C, H, W) over the pixels of ``mask`` (..., 1, H, W); NaN if none."""
    zero = torch.zeros((), dtype=err.dtype, device=err.device)
    total = torch.where(mask, err, zero).sum(dim=(-3, -2, -1), dtype=torch.float64)
    count = mask.sum(dim=(-3, -2, -1)).to(torch.float64) * err.shape[-3]
    return total / count  # 0/0 = NaN for frames without foreground


def fgr_mad(pred_fgr, true_fgr, true_pha):
    """Foreground MAD ×1e3 over the pixels where ``true_pha > 0``, per frame.

    ``pred_fgr``, ``true_fgr``: (..., C, H, W) in [0, 1]; ``true_pha``: (..., H, W) or
    (..., 1, H, W). Returns (...); NaN for frames whose true alpha is all zero.
    """
    p, g, m, to_np = _fgr_inputs(pred_fgr, true_fgr, true_pha)
    return _out(_masked_mean((p - g).abs(), m) * 1e3, to_np)


def fgr_mse(pred_fgr, true_fgr, true_pha):
    """Foreground MSE ×1e3 over the pixels where ``true_pha > 0``, per frame (see :func:`fgr_mad`)."""
    p, g, m, to_np = _fgr_inputs(pred_fgr, true_fgr, true_pha)
    return _out(_masked_mean((p - g).square(), m) * 1e3, to_np)


# ----------------------------------------------------------------------------- all at once
def clip_metrics(
    pred_pha,
    true_pha,
    pred_fgr=None,
    true_fgr=None,
    metrics: tuple[str, ...] | list[str] = METRICS,
    grad_normalize: bool = True,
) -> dict[str, object]:
    """Per-frame values of the named metrics for one clip.

    ``pred_pha``, ``true_pha``: (T, H, W) alpha; ``pred_fgr``, ``true_fgr``: (T, C, H, W),
    needed only when an ``fgr_*`` metric is asked for. ``metrics``: names from
    :data:`METRICS`. ``grad_normalize``: see :func:`grad`. Returns ``{name: (T,) values}``
    in the requested order (NumPy or torch as the inputs).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics: unknown name(s) {unknown}; expected names from {list(METRICS)}")
    if any(m in FGR_METRICS for m in metrics) and (pred_fgr is None or true_fgr is None):
        raise ValueError("pred_fgr/true_fgr: required for the fgr_* metrics")
    table: dict[str, Callable[[], object]] = {
        "pha_mad": lambda: mad(pred_pha, true_pha),
        "pha_mse": lambda: mse(pred_pha, true_pha),
        "pha_grad": lambda: grad(pred_pha, true_pha, normalize=grad_normalize),
        "pha_conn": lambda: conn(pred_pha, true_pha),
        "pha_dtssd": lambda: dtssd(pred_pha, true_pha),
        "fgr_mad": lambda: fgr_mad(pred_fgr, true_fgr, true_pha),
        "fgr_mse": lambda: fgr_mse(pred_fgr, true_fgr, true_pha),
    }
    return {name: table[name]() for name in metrics}
