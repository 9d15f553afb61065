"""Matting datasets with the public training layouts, and their augmentations (in torch).

Layouts (the ones Robust Video Matting and BiMatting train on):

* **VideoMatte240K**: ``<root>/fgr/<clip>/<frame>`` and ``<root>/pha/<clip>/<frame>`` image
  files with the same names (:class:`VideoMatteDataset`);
* **ImageMatte** (AIM / Distinctions-646 merged): ``<root>/fgr/<image>`` and
  ``<root>/pha/<image>`` (:class:`ImageMatteDataset`); motion comes from augmentation;
* **background images**: a folder of images; **background videos**: a folder of
  ``<clip>/<frame>`` frame folders (:class:`Backgrounds`);
* **segmentation** (optional): an image folder and a mask folder whose files share stems
  (:class:`SegmentationDataset`).

Every matting dataset item is ``(fgr, pha, bgr)``: float32 tensors (T, 3, S, S),
(T, 1, S, S), (T, 3, S, S) in [0, 1] for crop side S and clip length T; the training
loop composites ``src = fgr * pha + bgr * (1 - pha)`` (:func:`composite`).

Randomness: each item draws from its own ``torch.Generator`` seeded from
``(seed, epoch, index)``, so a clip is the same whatever the number of workers or
processes, and a resumed run sees the data it would have seen (call ``set_epoch``).
Images are read with PyAV (any format FFmpeg decodes: JPEG, PNG, WebP, TIFF, ...).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "read_image",
    "write_image",
    "list_images",
    "composite",
    "random_batch_crop",
    "item_generator",
    "sample_frame_indices",
    "MattingAugmentation",
    "Backgrounds",
    "VideoMatteDataset",
    "ImageMatteDataset",
    "SegmentationDataset",
    "EpochConcatDataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- files
def read_image(path: str, gray: bool = False) -> np.ndarray:
    """Decode one image file with PyAV: uint8 (H, W, 3) RGB, or (H, W) with ``gray=True``.

    For ``gray=True`` a grayscale file is read as is; a colour file (an alpha matte saved
    as RGB or as full-range YUV JPEG) gives its first RGB channel, which equals the
    stored grey level when R = G = B.
    """
    try:
        with av.open(path) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, OSError) as exc:
        raise ValueError(f"read_image: could not decode {path!r} as an image: {exc}") from exc
    if gray:
        if frame.format.name.startswith("gray"):
            return frame.to_ndarray(format="gray")
        return np.ascontiguousarray(frame.to_ndarray(format="rgb24")[..., 0])
    return frame.to_ndarray(format="rgb24")


def write_image(path: str, array: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) RGB or (H, W) grey array as a PNG file, atomically."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"write_image: expected uint8 (H, W, 3) or (H, W), got {array.dtype} {array.shape}")
    if not path.lower().endswith(".png"):
        raise ValueError(f"write_image: path must end with .png, got {path!r}")
    fmt = "gray" if array.ndim == 2 else "rgb24"
    tmp = os.path.join(os.path.dirname(path) or ".", f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with av.open(tmp, "w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = array.shape[1], array.shape[0], fmt
        for packet in stream.encode(av.VideoFrame.from_ndarray(array, format=fmt)):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def list_images(folder: str) -> list[str]:
    """Sorted file names in ``folder`` with an image extension (case-insensitive)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def read_annotations(path: str, owner: str, keys: Sequence[str], layout: str) -> dict:
    """A COCO-style JSON annotation file as a dict holding ``keys``; errors say ``owner`` (the
    dataset reading it), the file, and which ``layout`` was expected."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{owner}: annotations {path!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{owner}: annotations {path!r} is not a JSON file ({exc})") from None
    missing = [k for k in keys if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{owner}: annotations {path!r} lacks {missing} (a {layout} file has them)")
    return data


def _list_clips(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder {folder!r} does not exist")
    return sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))


def _to_tensor(frames: Sequence[np.ndarray]) -> Tensor:
    # uint8 (H, W, 3) or (H, W) frames -> float32 (T, C, H, W) in [0, 1].
    x = torch.from_numpy(np.stack(frames))
    x = x.unsqueeze(-1) if x.ndim == 3 else x
    return x.permute(0, 3, 1, 2).float().div_(255)


def composite(fgr: Tensor, pha: Tensor, bgr: Tensor) -> Tensor:
    """``fgr * pha + bgr * (1 - pha)``: (.., 3, H, W), (.., 1, H, W), (.., 3, H, W) -> (.., 3, H, W)."""
    return fgr * pha + bgr * (1 - pha)


# ----------------------------------------------------------------------------- randomness
def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by a hash of ``(seed, epoch, index)``."""
    digest = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def random_batch_crop(tensors: Sequence[Tensor], generator: torch.Generator, multiple: int = 16) -> list[Tensor]:
    """RVM's per-batch multi-scale crop, the same for every tensor of a batch.

    ``tensors``: (B, T, C, H, W) of one H x W. A height in [H/2, H) and a width in [W/2, W)
    are drawn (rounded down to ``multiple``, as BiMatting's ``train.py``; at least
    ``multiple``, never more than the side); each frame is resized bilinearly to the square of
    the larger one and centre-cropped to them. Returns the cropped tensors in order.
    """
    h, w = tensors[0].shape[-2:]

    def side(n: int) -> int:
        drawn = int(torch.randint(n // 2, max(n, n // 2 + 1), (), generator=generator)) // multiple * multiple
        return min(n, max(multiple, drawn))

    ch, cw = side(h), side(w)
    square = max(ch, cw)
    top, left = round((square - ch) / 2), round((square - cw) / 2)  # (torchvision's center_crop)
    out = []
    for x in tensors:
        frames = F.interpolate(x.flatten(0, 1), size=(square, square), mode="bilinear", align_corners=False)
        out.append(frames[..., top:top + ch, left:left + cw].unflatten(0, x.shape[:2]))
    return out


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _chance(g: torch.Generator, p: float) -> bool:
    return torch.rand((), generator=g).item() < p


def _randint(g: torch.Generator, n: int) -> int:
    return int(torch.randint(n, (), generator=g).item())


def sample_frame_indices(
    num_frames: int,
    seq_length: int,
    g: torch.Generator,
    start: int | None = None,
    speed: tuple[float, float] = (0.5, 3.0),
    p_reverse: float = 0.5,
    p_pause: float = 0.05,
) -> list[int]:
    """Temporal clip sampling: ``seq_length`` frame indices into a clip of ``num_frames``.

    A random playback speed in ``speed`` (frames per step; < 1 repeats frames), a random
    start (or ``start``), bouncing back and forth at the clip ends (ping-pong) when the
    clip is too short, an occasional pause (one frame held for a few steps,
    probability ``p_pause``) and reversed playback with probability ``p_reverse``.
    """
    if num_frames < 1 or seq_length < 1:
        raise ValueError(f"num_frames and seq_length must be >= 1, got {num_frames} and {seq_length}")
    s = _uniform(g, *speed)
    if start is None:
        start = _randint(g, num_frames)
    positions = [start + s * i for i in range(seq_length)]
    if seq_length > 2 and _chance(g, p_pause):
        at, hold = _randint(g, seq_length - 1), 1 + _randint(g, seq_length // 2)
        positions = [positions[min(i, at) if i <= at else max(at, i - hold)] for i in range(seq_length)]
    period = 2 * (num_frames - 1)
    indices = []
    for p in positions:
        i = int(math.floor(p + 1e-6))
        if period == 0:
            indices.append(0)
            continue
        i %= period
        indices.append(i if i < num_frames else period - i)
    if _chance(g, p_reverse):
        indices.reverse()
    return indices


# ----------------------------------------------------------------------------- augmentation
def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def random_resized_crop(
    tensors: Sequence[Tensor], size: int, g: torch.Generator, scale: tuple[float, float], ratio=(3 / 4, 4 / 3)
) -> list[Tensor]:
    """One random crop box for all ``tensors`` (T, C, H, W) (same H, W), resized to (size, size).

    The box covers a fraction ``scale`` of the image area (clipped to fit) with aspect
    ratio in ``ratio``; its contents are resized with antialiasing.
    """
    h, w = tensors[0].shape[-2:]
    area = h * w * _uniform(g, *scale)
    aspect = math.exp(_uniform(g, math.log(ratio[0]), math.log(ratio[1])))
    ch = min(h, max(1, round(math.sqrt(area / aspect))))
    cw = min(w, max(1, round(math.sqrt(area * aspect))))
    top, left = _randint(g, h - ch + 1), _randint(g, w - cw + 1)
    return [_resize(t[..., top : top + ch, left : left + cw], (size, size)) for t in tensors]


def center_crop(tensors: Sequence[Tensor], size: int) -> list[Tensor]:
    """Resize so the short side is ``size``, then the central (size, size) crop."""
    h, w = tensors[0].shape[-2:]
    k = size / min(h, w)
    nh, nw = max(size, round(h * k)), max(size, round(w * k))
    top, left = (nh - size) // 2, (nw - size) // 2
    return [_resize(t, (nh, nw))[..., top : top + size, left : left + size] for t in tensors]


def motion_matrices(
    t: int,
    g: torch.Generator,
    degrees: float = 10.0,
    translate: float = 0.1,
    scale: tuple[float, float] = (0.85, 1.15),
    shear: float = 5.0,
) -> Tensor:
    """Per-frame affine transforms (T, 2, 3) for ``F.affine_grid`` moving smoothly over time.

    A random start and end transform (rotation within ±``degrees``, translation within
    ±``translate`` of the frame, zoom in ``scale``, shear within ±``shear`` degrees) are
    interpolated with an ease-in-out curve over the T frames; the matrices map output
    to input coordinates in normalised [-1, 1] space (square frames).
    """
    ends = []
    for _ in range(2):
        ends.append(
            torch.tensor(
                [
                    math.radians(_uniform(g, -degrees, degrees)),
                    _uniform(g, -translate, translate) * 2,
                    _uniform(g, -translate, translate) * 2,
                    _uniform(g, *scale),
                    math.radians(_uniform(g, -shear, shear)),
                ],
                dtype=torch.float64,
            )
        )
    u = torch.linspace(0, 1, t, dtype=torch.float64) if t > 1 else torch.zeros(1, dtype=torch.float64)
    u = (1 - torch.cos(u * math.pi)) / 2  # ease in and out
    params = ends[0][None] * (1 - u[:, None]) + ends[1][None] * u[:, None]
    angle, tx, ty, zoom, sh = params.unbind(1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # Forward map A = R(angle) @ Shear(sh) * zoom; affine_grid wants the inverse (output -> input).
    a = torch.stack([torch.stack([cos, -sin + cos * torch.tan(sh)], -1), torch.stack([sin, cos + sin * torch.tan(sh)], -1)], 1)
    a = a * zoom[:, None, None]
    inv = torch.linalg.inv(a)
    shift = -(inv @ torch.stack([tx, ty], 1)[..., None])
    return torch.cat([inv, shift], 2).float()


def apply_motion(x: Tensor, theta: Tensor, padding_mode: str = "zeros") -> Tensor:
    """Warp frames ``x`` (T, C, H, W) by per-frame affine ``theta`` (T, 2, 3) (bilinear)."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def _rgb_to_gray(x: Tensor) -> Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def color_jitter(
    x: Tensor,
    g: torch.Generator,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.3,
    hue: float = 0.05,
    drift: float = 0.3,
) -> Tensor:
    """Random brightness / contrast / saturation / hue of frames (T, 3, H, W) in [0, 1].

    Factors are drawn once per clip and drift by up to ``drift`` times their range over
    the clip (lighting that changes slowly). Hue turns the chroma plane (YIQ) by up to
    ±``hue`` of a full turn.
    """
    t = x.shape[0]
    ramp = torch.linspace(0, 1, t)[:, None, None, None] if t > 1 else torch.zeros(1, 1, 1, 1)

    def factor(r: float) -> Tensor:
        base, change = _uniform(g, -r, r), _uniform(g, -r, r) * drift
        return base + change * ramp

    x = x * (1 + factor(brightness))
    mean = _rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * (1 + factor(contrast)) + mean
    gray = _rgb_to_gray(x)
    x = (x - gray) * (1 + factor(saturation)) + gray
    # Hue: rotate (I, Q) of YIQ by an angle; Y (luma) stays.
    angle = factor(hue) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    yiq = torch.einsum("ij,tjhw->tihw", to_yiq, x)
    c, s = torch.cos(angle), torch.sin(angle)
    i2 = yiq[:, 1:2] * c - yiq[:, 2:3] * s
    q2 = yiq[:, 1:2] * s + yiq[:, 2:3] * c
    x = torch.einsum("ij,tjhw->tihw", torch.linalg.inv(to_yiq), torch.cat([yiq[:, :1], i2, q2], 1))
    return x.clamp(0, 1)


class MattingAugmentation:
    """The augmentations that matter for video matting, on (T, C, H, W) float tensors.

    Foreground (``fgr`` and ``pha`` transformed together): random resized crop (one box
    per clip), affine motion over time (probability ``p_motion``), horizontal flip,
    colour jitter (fgr only), occasional grayscale and noise. Background: its own crop,
    motion (reflection padding, so no black borders), flip, colour jitter and noise.
    ``enabled=False`` gives a plain short-side resize and centre crop.
    """

    def __init__(
        self,
        size: int,
        enabled: bool = True,
        scale: tuple[float, float] = (0.3, 1.0),
        p_motion: float = 0.5,
        p_flip: float = 0.5,
        p_jitter: float = 0.5,
        p_gray: float = 0.03,
        p_noise: float = 0.1,
    ):
        if size < 1:
            raise ValueError(f"size: expected a positive crop side, got {size!r}")
        self.size, self.enabled, self.scale = size, enabled, scale
        self.p_motion, self.p_flip, self.p_jitter, self.p_gray, self.p_noise = p_motion, p_flip, p_jitter, p_gray, p_noise

    def foreground(self, fgr: Tensor, pha: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(T, 3, H, W), (T, 1, H, W) -> the same at (size, size)."""
        if not self.enabled:
            fgr, pha = center_crop([fgr, pha], self.size)
            return fgr, pha
        fgr, pha = random_resized_crop([fgr, pha], self.size, g, self.scale)
        if _chance(g, self.p_motion):
            theta = motion_matrices(fgr.shape[0], g)
            warped = apply_motion(torch.cat([fgr, pha], 1), theta, "zeros")
            fgr, pha = warped[:, :3], warped[:, 3:]
        if _chance(g, self.p_flip):
            fgr, pha = fgr.flip(-1), pha.flip(-1)
        fgr = self._photometric(fgr, g)
        return fgr.contiguous(), pha.clamp(0, 1).contiguous()

    def background(self, bgr: Tensor, g: torch.Generator) -> Tensor:
        """(T, 3, H, W) -> (T, 3, size, size)."""
        if not self.enabled:
            return center_crop([bgr], self.size)[0]
        (bgr,) = random_resized_crop([bgr], self.size, g, (max(self.scale[0], 0.5), 1.0))
        if _chance(g, self.p_motion):
            bgr = apply_motion(bgr, motion_matrices(bgr.shape[0], g, degrees=5, scale=(1.0, 1.2), shear=3), "reflection")
        if _chance(g, self.p_flip):
            bgr = bgr.flip(-1)
        return self._photometric(bgr, g).contiguous()

    def _photometric(self, x: Tensor, g: torch.Generator) -> Tensor:
        if _chance(g, self.p_jitter):
            x = color_jitter(x, g)
        if _chance(g, self.p_gray):
            x = _rgb_to_gray(x).expand_as(x)
        if _chance(g, self.p_noise):
            x = (x + torch.randn(x.shape, generator=g) * _uniform(g, 0.0, 0.03)).clamp(0, 1)
        return x


# ----------------------------------------------------------------------------- datasets
class _EpochDataset(Dataset):
    """Base with ``set_epoch`` and the per-item generator."""

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw different random augmentations in each epoch (call before iterating)."""
        self.epoch = int(epoch)

    def generator(self, index: int) -> torch.Generator:
        return item_generator(self.seed, self.epoch, index)


class EpochConcatDataset(ConcatDataset):
    """``ConcatDataset`` of :class:`_EpochDataset` parts whose ``set_epoch`` reaches every part."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)


class Backgrounds:
    """Background clips from an image folder and/or a folder of frame folders.

    ``sample(g, seq_length)`` returns float32 (T, 3, H, W) in [0, 1] at the source size: a
    still image repeated T times (motion comes from augmentation), or T frames of a
    background video sampled with :func:`sample_frame_indices`; half and half when both
    folders are given.
    """

    def __init__(self, image_dir: str | None = None, video_dir: str | None = None):
        if not image_dir and not video_dir:
            raise ValueError("Backgrounds: give image_dir and/or video_dir")
        self.image_dir, self.video_dir = image_dir, video_dir
        self.images = list_images(image_dir) if image_dir else []
        self.videos: list[tuple[str, list[str]]] = []
        if video_dir:
            for clip in _list_clips(video_dir):
                frames = list_images(os.path.join(video_dir, clip))
                if frames:
                    self.videos.append((clip, frames))
        if not self.images and not self.videos:
            raise ValueError(f"Backgrounds: no images in {image_dir!r} and no frame folders in {video_dir!r}")

    def sample(self, g: torch.Generator, seq_length: int) -> Tensor:
        use_video = bool(self.videos) and (not self.images or _chance(g, 0.5))
        if use_video:
            clip, frames = self.videos[_randint(g, len(self.videos))]
            idx = sample_frame_indices(len(frames), seq_length, g)
            folder = os.path.join(self.video_dir, clip)
            cache: dict[int, np.ndarray] = {}
            for i in idx:
                if i not in cache:
                    cache[i] = read_image(os.path.join(folder, frames[i]))
            return _to_tensor([cache[i] for i in idx])
        image = read_image(os.path.join(self.image_dir, self.images[_randint(g, len(self.images))]))
        return _to_tensor([image]).expand(seq_length, -1, -1, -1)


class VideoMatteDataset(_EpochDataset):
    """VideoMatte240K-style clips composited over random backgrounds.

    ``root`` holds ``fgr/<clip>/<frame>`` and ``pha/<clip>/<frame>`` (same frame names in
    both). One item per window of ``seq_length`` frames of each clip; within it the frames
    are drawn by :func:`sample_frame_indices` (random speed, pauses, reversal). Items are
    ``(fgr, pha, bgr)`` (T, 3|1|3, size, size), see the module docstring.
    """

    def __init__(
        self,
        root: str,
        backgrounds: Backgrounds,
        size: int,
        seq_length: int,
        augment: bool = True,
        seed: int = 0,
    ):
        self.root, self.backgrounds, self.size, self.seq_length, self.seed = root, backgrounds, size, seq_length, seed
        self.augmentation = MattingAugmentation(size, enabled=augment)
        self.clips: list[tuple[str, list[str]]] = []
        for clip in _list_clips(os.path.join(root, "fgr")):
            frames = list_images(os.path.join(root, "fgr", clip))
            pha_dir = os.path.join(root, "pha", clip)
            if not os.path.isdir(pha_dir):
                raise FileNotFoundError(f"VideoMatteDataset: {pha_dir!r} is missing (alpha of fgr/{clip})")
            missing = sorted(set(frames) - set(list_images(pha_dir)))
            if missing:
                raise FileNotFoundError(f"VideoMatteDataset: pha/{clip} lacks frames {missing[:5]} that fgr/{clip} has")
            if frames:
                self.clips.append((clip, frames))
        if not self.clips:
            raise ValueError(f"VideoMatteDataset: no clips with frames under {os.path.join(root, 'fgr')!r}")
        self.index = [(c, s) for c, (_, frames) in enumerate(self.clips) for s in range(0, len(frames), seq_length)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        g = self.generator(index)
        clip_id, start = self.index[index]
        clip, frames = self.clips[clip_id]
        idx = sample_frame_indices(len(frames), self.seq_length, g, start=start)
        fgrs, phas, cache = [], [], {}
        for i in idx:
            if i not in cache:
                cache[i] = (
                    read_image(os.path.join(self.root, "fgr", clip, frames[i])),
                    read_image(os.path.join(self.root, "pha", clip, frames[i]), gray=True),
                )
            fgrs.append(cache[i][0])
            phas.append(cache[i][1])
        fgr, pha = self.augmentation.foreground(_to_tensor(fgrs), _to_tensor(phas), g)
        bgr = self.augmentation.background(self.backgrounds.sample(g, self.seq_length), g)
        return fgr, pha, bgr


class ImageMatteDataset(_EpochDataset):
    """ImageMatte-style stills (``root/fgr/<image>``, ``root/pha/<image>``) made into clips.

    Each item repeats one image ``seq_length`` times; the affine motion of
    :class:`MattingAugmentation` (always on here when ``augment``) makes it move. As in
    RVM, an epoch has ``max(#images, #background images + #background clips)`` items
    (item ``i`` uses image ``i % #images``).
    """

    def __init__(self, root: str, backgrounds: Backgrounds, size: int, seq_length: int, augment: bool = True, seed: int = 0):
        self.root, self.backgrounds, self.size, self.seq_length, self.seed = root, backgrounds, size, seq_length, seed
        self.augmentation = MattingAugmentation(size, enabled=augment, p_motion=1.0)
        self.images = list_images(os.path.join(root, "fgr"))
        missing = sorted(set(self.images) - set(list_images(os.path.join(root, "pha"))))
        if missing:
            raise FileNotFoundError(f"ImageMatteDataset: {os.path.join(root, 'pha')!r} lacks {missing[:5]}")
        if not self.images:
            raise ValueError(f"ImageMatteDataset: no images under {os.path.join(root, 'fgr')!r}")

    def __len__(self) -> int:
        return max(len(self.images), len(self.backgrounds.images) + len(self.backgrounds.videos))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        g = self.generator(index)
        name = self.images[index % len(self.images)]
        fgr = _to_tensor([read_image(os.path.join(self.root, "fgr", name))]).expand(self.seq_length, -1, -1, -1)
        pha = _to_tensor([read_image(os.path.join(self.root, "pha", name), gray=True)]).expand(self.seq_length, -1, -1, -1)
        fgr, pha = self.augmentation.foreground(fgr, pha, g)
        bgr = self.augmentation.background(self.backgrounds.sample(g, self.seq_length), g)
        return fgr, pha, bgr


class SegmentationDataset(_EpochDataset):
    """Images and binary masks for the segmentation passes (e.g. COCO / SPD exported).

    ``image_dir/<stem>.<ext>`` pairs with ``mask_dir/<stem>.<ext'>`` (mask > 127 is the
    person). Items are ``(img, seg)``: (1, 3, size, size) and (1, 1, size, size) float32,
    i.e. clips of T = 1.
    """

    def __init__(self, image_dir: str, mask_dir: str, size: int, augment: bool = True, seed: int = 0):
        self.image_dir, self.mask_dir, self.size, self.seed = image_dir, mask_dir, size, seed
        self.augmentation = MattingAugmentation(size, enabled=augment, p_motion=0.0)
        masks = {os.path.splitext(m)[0]: m for m in list_images(mask_dir)}
        self.pairs = [(f, masks[os.path.splitext(f)[0]]) for f in list_images(image_dir) if os.path.splitext(f)[0] in masks]
        if not self.pairs:
            raise ValueError(f"SegmentationDataset: no image in {image_dir!r} has a mask with the same stem in {mask_dir!r}")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = self.generator(index)
        image, mask = self.pairs[index]
        img = _to_tensor([read_image(os.path.join(self.image_dir, image))])
        seg = _to_tensor([read_image(os.path.join(self.mask_dir, mask), gray=True)])
        img, seg = self.augmentation.foreground(img, seg, g)
        return img, (seg > 0.5).float()
