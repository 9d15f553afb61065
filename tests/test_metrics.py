"""Tests of bimatting_triton.metrics: hand-computed values on tiny arrays, plain
loop references, and the properties each metric must have."""
from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest
import torch

from bimatting_triton import metrics as M

RNG_SEED = 1234


# ----------------------------------------------------------------------------- plain references
def bfs_largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a 2-D bool mask; ties to the first found in raster order."""
    h, w = mask.shape
    label = -np.ones((h, w), dtype=int)
    sizes = []
    for y in range(h):
        for x in range(w):
            if not mask[y, x] or label[y, x] >= 0:
                continue
            label[y, x] = len(sizes)
            queue, count = deque([(y, x)]), 0
            while queue:
                a, b = queue.popleft()
                count += 1
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < h and 0 <= d < w and mask[c, d] and label[c, d] < 0:
                        label[c, d] = len(sizes)
                        queue.append((c, d))
            sizes.append(count)
    if not sizes:
        return np.zeros_like(mask)
    best = max(range(len(sizes)), key=lambda i: (sizes[i], -i))
    return label == best


def naive_conn(pred: np.ndarray, true: np.ndarray, step: float = 0.1) -> float:
    """Connectivity error of one frame, pixel by pixel from the definition."""
    levels = np.arange(0, 1 + step, step)
    h, w = true.shape
    round_down = np.full((h, w), np.nan)
    for i in range(1, len(levels)):
        lcc = bfs_largest_component((true >= levels[i]) & (pred >= levels[i]))
        for y in range(h):
            for x in range(w):
                if math.isnan(round_down[y, x]) and not lcc[y, x]:
                    round_down[y, x] = levels[i - 1]
    round_down[np.isnan(round_down)] = 1.0
    total = 0.0
    for y in range(h):
        for x in range(w):
            dt = float(true[y, x]) - float(np.float32(round_down[y, x]))
            dp = float(pred[y, x]) - float(np.float32(round_down[y, x]))
            phi_t = 1 - dt if dt >= 0.15 else 1.0
            phi_p = 1 - dp if dp >= 0.15 else 1.0
            total += abs(phi_t - phi_p)
    return total / 1000


def naive_grad(pred: np.ndarray, true: np.ndarray, normalize: bool) -> float:
    """Grad of one frame with the full 2-D filters, explicit loops, replicated border."""
    fx, fy = M.gaussian_derivative_filters(1.4)
    half = fx.shape[0] // 2

    def magnitude(img):
        if normalize:
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        padded = np.pad(img, half, mode="edge")
        out = np.zeros_like(img)
        for y in range(img.shape[0]):
            for x in range(img.shape[1]):
                window = padded[y : y + 2 * half + 1, x : x + 2 * half + 1]
                out[y, x] = math.hypot((window * fx).sum(), (window * fy).sum())
        return out

    return float(((magnitude(pred.astype(np.float64)) - magnitude(true.astype(np.float64))) ** 2).sum() / 1000)


def smooth_mattes(rng, shape, levels=255):
    """Blob-like 8-bit mattes (alpha in [0, 1] as uint8) so that components are non-trivial."""
    *lead, h, w = shape
    base = rng.random((*lead, h // 3 + 2, w // 3 + 2))
    up = np.repeat(np.repeat(base, 3, axis=-2), 3, axis=-1)[..., :h, :w]
    up = np.clip((up - 0.3) * 2.0, 0, 1)
    return np.round(up * levels).astype(np.uint8)


# ----------------------------------------------------------------------------- MAD / MSE
def test_mad_mse_hand_values():
    pred = np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32)
    true = np.array([[0.0, 0.0], [0.5, 0.25]], dtype=np.float32)
    # |d| = 0, .5, .5, 0 -> mean .25; d² = 0, .25, .25, 0 -> mean .125; both x1e3
    assert M.mad(pred, true) == pytest.approx(250.0)
    assert M.mse(pred, true) == pytest.approx(125.0)


def test_uint8_inputs_are_divided_by_255():
    pred = np.array([[255, 0]], dtype=np.uint8)
    true = np.zeros((1, 2), dtype=np.uint8)
    assert M.mad(pred, true) == pytest.approx(500.0)
    assert M.mse(pred, true) == pytest.approx(500.0)
    # uint16 frames: /65535
    assert M.mad(np.array([[65535, 0]], dtype=np.uint16), np.zeros((1, 2), np.uint16)) == pytest.approx(500.0)


def test_per_frame_leading_dims():
    rng = np.random.default_rng(RNG_SEED)
    pred = rng.random((2, 3, 5, 6)).astype(np.float32)
    true = rng.random((2, 3, 5, 6)).astype(np.float32)
    out = M.mad(pred, true)
    assert out.shape == (2, 3) and out.dtype == np.float64
    for i in range(2):
        for j in range(3):
            assert out[i, j] == pytest.approx(np.abs(pred[i, j] - true[i, j]).mean() * 1e3, rel=1e-6)
    assert isinstance(M.mad(pred[0, 0], true[0, 0]), np.floating)


def test_torch_inputs_give_tensors_with_same_values():
    rng = np.random.default_rng(RNG_SEED)
    pred = rng.random((3, 7, 9)).astype(np.float32)
    true = rng.random((3, 7, 9)).astype(np.float32)
    for fn in (M.mad, M.mse, M.grad, M.conn, M.dtssd):
        from_np = fn(pred, true)
        from_torch = fn(torch.from_numpy(pred), torch.from_numpy(true))
        assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float64
        np.testing.assert_array_equal(from_torch.numpy(), from_np)


# ----------------------------------------------------------------------------- dtSSD
def test_dtssd_hand_values():
    pred = np.array([[[0.0, 0.0]], [[0.5, 0.0]]])  # (T=2, H=1, W=2)
    true = np.array([[[0.0, 0.0]], [[0.0, 0.5]]])
    # frame 1: d = (.5, -.5), mean d² = .25, sqrt = .5, x100 = 50; frame 0 is 0
    np.testing.assert_allclose(M.dtssd(pred, true), [0.0, 50.0])


def test_dtssd_batched_sequences_and_static_offset():
    rng = np.random.default_rng(RNG_SEED)
    true = rng.random((2, 4, 5, 6))
    # A prediction off by a constant has the same temporal derivative: dtSSD 0.
    np.testing.assert_allclose(M.dtssd(true + 0.1, true), np.zeros((2, 4)), atol=1e-12)
    pred = rng.random((2, 4, 5, 6))
    out = M.dtssd(pred, true)
    assert out.shape == (2, 4)
    expect = np.sqrt((((pred[1, 2] - pred[1, 1]) - (true[1, 2] - true[1, 1])) ** 2).mean()) * 100
    assert out[1, 2] == pytest.approx(expect)


# ----------------------------------------------------------------------------- Grad
def test_gaussian_derivative_filters():
    fx, fy = M.gaussian_derivative_filters(1.4)
    # half size = ceil(1.4 * sqrt(-2 ln(sqrt(2 pi) * 1.4 * 0.01))) = ceil(3.62) = 4
    assert fx.shape == (9, 9)
    assert (fx**2).sum() == pytest.approx(1.0)
    np.testing.assert_array_equal(fy, fx.T)
    np.testing.assert_allclose(fx, -fx[:, ::-1], atol=1e-15)  # odd along x (width)
    np.testing.assert_allclose(fx, fx[::-1, :], atol=1e-15)  # even along y
    assert np.all(fx[:, 4] == 0) and fx[4, 3] > 0 > fx[4, 5]  # -x·G(x): positive left of centre


def test_grad_of_an_impulse_is_the_filters_energy():
    # A unit impulse away from the border: correlation copies the (flipped) filters
    # into the output, so Σ|∇|² = Σfx² + Σfy² = 2 (unit-norm filters); the other frame is 0.
    impulse = np.zeros((9, 9))
    impulse[4, 4] = 1.0
    zeros = np.zeros((9, 9))
    assert M.grad(impulse, zeros, normalize=False) == pytest.approx(2e-3)
    assert M.grad(impulse, zeros, normalize=True) == pytest.approx(2e-3)
    # Amplitude 0.5: x0.25 unnormalised; min-max normalisation rescales it to 1.
    assert M.grad(0.5 * impulse, zeros, normalize=False) == pytest.approx(0.5e-3)
    assert M.grad(0.5 * impulse, zeros, normalize=True) == pytest.approx(2e-3)


@pytest.mark.parametrize("normalize", [True, False])
def test_grad_matches_the_2d_loop_reference(normalize):
    rng = np.random.default_rng(RNG_SEED)
    pred, true = smooth_mattes(rng, (2, 11, 14)), smooth_mattes(rng, (2, 11, 14))
    got = M.grad(pred, true, normalize=normalize)
    for i in range(2):
        ref = naive_grad(pred[i] / 255.0, true[i] / 255.0, normalize)
        assert got[i] == pytest.approx(ref, rel=1e-5, abs=1e-9)


def test_grad_constant_frames():
    a, b = np.full((6, 7), 0.3), np.full((6, 7), 0.8)
    assert M.grad(a, b, normalize=False) == pytest.approx(0.0, abs=1e-12)
    assert M.grad(a, b, normalize=True) == 0.0  # both normalise to 0


# ----------------------------------------------------------------------------- Conn
def test_largest_component_matches_bfs():
    rng = np.random.default_rng(RNG_SEED)
    for _ in range(60):
        b, h, w = rng.integers(1, 4), rng.integers(1, 10), rng.integers(1, 10)
        mask = rng.random((b, h, w)) < rng.random()
        got = M._largest_component(torch.from_numpy(mask)).numpy()
        np.testing.assert_array_equal(got, np.stack([bfs_largest_component(m) for m in mask]))


def test_largest_component_long_snake_and_tie():
    # A one-pixel-wide serpentine (one long component), plus an isolated pixel at (3, 15).
    snake = np.zeros((15, 16), dtype=bool)
    snake[::2, :15] = True
    for r in range(1, 15, 2):
        snake[r, 14 if r % 4 == 1 else 0] = True
    snake[3, 15] = True
    got = M._largest_component(torch.from_numpy(snake[None])).numpy()[0]
    np.testing.assert_array_equal(got, bfs_largest_component(snake))
    assert got.sum() == snake.sum() - 1
    # Two equal components: the one starting first in raster order wins.
    tie = np.array([[0, 0, 1], [1, 0, 1], [1, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(
        M._largest_component(torch.from_numpy(tie[None])).numpy()[0],
        np.array([[0, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=bool),
    )


def test_conn_hand_values():
    # Disconnected true pixels: [1, 0, 1] vs pred [1, 1, 1]. At every level the
    # intersection is {0, 2}, two single-pixel components; the first wins. Pixel 0
    # is never dropped (rounded down to 1); pixels 1 and 2 drop at level 0.1 -> 0.
    # phi_true = (1, 1, 0), phi_pred = (1, 0, 0): error 1 / 1000.
    assert M.conn(np.array([[1.0, 1.0, 1.0]]), np.array([[1.0, 0.0, 1.0]])) == pytest.approx(1e-3)
    # Connected soft pixels: true (.55, .95), pred (.35, .95). Pixel 0 leaves the
    # intersection at 0.4 -> 0.3, pixel 1 at 1.0 -> 0.9. d_true = (.25, .05),
    # d_pred = (.05, .05): phi_true = (.75, 1), phi_pred = (1, 1): error .25 / 1000.
    assert M.conn(np.array([[0.35, 0.95]]), np.array([[0.55, 0.95]])) == pytest.approx(0.25e-3)
    # 4-connectivity: diagonal neighbours are separate components. true = I,
    # pred = diag(1, .75): pixel (1, 1) drops at 0.1 -> 0, phi_true = 0, phi_pred = .25.
    # (8-connectivity would round it down to 0.7 and give .3 / 1000.)
    true = np.array([[1.0, 0.0], [0.0, 1.0]])
    pred = np.array([[1.0, 0.0], [0.0, 0.75]])
    assert M.conn(pred, true) == pytest.approx(0.25e-3)


def test_conn_matches_the_loop_reference(monkeypatch):
    rng = np.random.default_rng(RNG_SEED)
    pred, true = smooth_mattes(rng, (4, 12, 15)), smooth_mattes(rng, (4, 12, 15))
    pred[1] = true[1]
    # force several chunks through the batched path
    monkeypatch.setattr(M, "_CONN_CHUNK_ELEMENTS", 10 * 12 * 15 * 3)
    got = M.conn(pred, true)
    for i in range(4):
        p, t = (pred[i] / np.float32(255)).astype(np.float32), (true[i] / np.float32(255)).astype(np.float32)
        assert got[i] == pytest.approx(naive_conn(p, t), rel=1e-5, abs=1e-9)
    assert got[1] == 0.0


# ----------------------------------------------------------------------------- foreground
def test_fgr_hand_values_and_empty_alpha():
    true_pha = np.array([[[0.0, 0.5]], [[0.0, 0.0]]])  # (T=2, H=1, W=2)
    true_fgr = np.zeros((2, 3, 1, 2))
    pred_fgr = np.zeros((2, 3, 1, 2))
    pred_fgr[:, :, 0, 0] = 1.0  # outside the true foreground: ignored
    pred_fgr[:, :, 0, 1] = [0.1, 0.2, 0.3]
    mad, mse = M.fgr_mad(pred_fgr, true_fgr, true_pha), M.fgr_mse(pred_fgr, true_fgr, true_pha)
    assert mad[0] == pytest.approx(200.0)  # (.1 + .2 + .3) / 3 x 1e3
    assert mse[0] == pytest.approx((0.01 + 0.04 + 0.09) / 3 * 1e3)
    assert np.isnan(mad[1]) and np.isnan(mse[1])  # no pixel with true alpha > 0
    # A channel axis of 1 on the alpha is accepted.
    np.testing.assert_array_equal(M.fgr_mad(pred_fgr, true_fgr, true_pha[:, None]), mad)


# ----------------------------------------------------------------------------- properties
def test_zero_for_identical_inputs():
    rng = np.random.default_rng(RNG_SEED)
    a = smooth_mattes(rng, (3, 10, 13))
    fgr = rng.random((3, 3, 10, 13))
    for fn in (M.mad, M.mse, M.grad, M.conn, M.dtssd):
        np.testing.assert_array_equal(fn(a, a), np.zeros(3))
    np.testing.assert_array_equal(M.grad(a, a, normalize=False), np.zeros(3))
    got = M.fgr_mse(fgr, fgr, a)
    np.testing.assert_array_equal(got[~np.isnan(got)], 0.0)


def test_symmetry():
    rng = np.random.default_rng(RNG_SEED + 1)
    p, t = smooth_mattes(rng, (3, 10, 13)), smooth_mattes(rng, (3, 10, 13))
    for fn in (M.mad, M.mse, M.grad, M.conn, M.dtssd):
        values = fn(p, t)
        np.testing.assert_allclose(values, fn(t, p), rtol=1e-12)
        assert np.all((values[1:] if fn is M.dtssd else values) > 0)  # dtSSD's first frame is 0


def test_scale_behaviour():
    rng = np.random.default_rng(RNG_SEED + 2)
    p, t = rng.random((3, 9, 11)), rng.random((3, 9, 11))
    c = 0.25
    np.testing.assert_allclose(M.mad(c * p, c * t), c * M.mad(p, t), rtol=1e-12)
    np.testing.assert_allclose(M.mse(c * p, c * t), c**2 * M.mse(p, t), rtol=1e-12)
    np.testing.assert_allclose(M.dtssd(c * p, c * t), c * M.dtssd(p, t), rtol=1e-12)
    np.testing.assert_allclose(M.grad(c * p, c * t, normalize=False), c**2 * M.grad(p, t, normalize=False), rtol=1e-10)
    # min-max normalisation removes any positive affine map, applied to each input separately
    np.testing.assert_allclose(M.grad(0.5 * p + 0.2, 0.3 * t + 0.1), M.grad(p, t), rtol=1e-9)
    # Grad and Conn are sums: tiling a frame 2x2 multiplies them by ~4 (exactly for Conn
    # when every tile holds one component per level — here a single full-frame matte).
    flat_p, flat_t = np.full((4, 5), 0.9), np.full((4, 5), 0.5)
    assert M.conn(np.tile(flat_p, (2, 2)), np.tile(flat_t, (2, 2))) == pytest.approx(4 * M.conn(flat_p, flat_t))


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    a = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="pred and true must have the same shape"):
        M.mad(a, np.zeros((4, 6), np.float32))
    with pytest.raises(TypeError, match="pred: expected a numpy.ndarray or torch.Tensor"):
        M.mse([[0.0]], a)
    with pytest.raises(TypeError, match="true: expected a float, uint8 or uint16"):
        M.mse(a, np.zeros((4, 5), np.int32))
    with pytest.raises(ValueError, match=r"\(\.\.\., T, H, W\)"):
        M.dtssd(a, a)
    with pytest.raises(ValueError, match="step"):
        M.conn(a, a, step=0)
    with pytest.raises(ValueError, match="true_pha"):
        M.fgr_mad(np.zeros((3, 4, 5)), np.zeros((3, 4, 5)), np.zeros((4, 6)))
    with pytest.raises(ValueError, match="unknown"):
        M.clip_metrics(a[None], a[None], metrics=["pha_sad"])
    with pytest.raises(ValueError, match="pred_fgr/true_fgr"):
        M.clip_metrics(a[None], a[None], metrics=["fgr_mse"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    rng = np.random.default_rng(RNG_SEED)
    p, t = smooth_mattes(rng, (3, 40, 50)), smooth_mattes(rng, (3, 40, 50))
    for fn in (M.mad, M.mse, M.grad, M.conn, M.dtssd):
        on_gpu = fn(torch.from_numpy(p).cuda(), torch.from_numpy(t).cuda())
        assert on_gpu.device.type == "cuda"
        np.testing.assert_allclose(on_gpu.cpu().numpy(), fn(p, t), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- edge cases
def test_dtssd_of_an_empty_sequence_has_no_frames():
    # One value per frame: a sequence of T = 0 frames gives an empty result, not a
    # lone first-frame 0 (RVM's loop appends nothing when there are no frames).
    empty = np.zeros((0, 4, 5), np.float32)
    assert M.dtssd(empty, empty).shape == (0,)
    assert M.dtssd(np.zeros((2, 0, 4, 5)), np.zeros((2, 0, 4, 5))).shape == (2, 0)
    one = np.ones((1, 4, 5), np.float32)
    np.testing.assert_array_equal(M.dtssd(one, 0 * one), [0.0])
