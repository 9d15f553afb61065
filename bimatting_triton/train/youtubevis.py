"""Video segmentation clips from YouTube-VIS: the video half of the recipe's segmentation passes.

Robust Video Matting and BiMatting alternate the segmentation pass between video clips
(YouTube-VIS, person instances) and single images (COCO / Supervisely Person). This module
reads the YouTube-VIS layout as distributed:

* ``frames_dir``: the ``JPEGImages`` folder, one folder of frames per video;
* ``annotations``: the ``instances.json`` file (COCO-style): ``videos`` (``id``,
  ``file_names`` relative to ``frames_dir``), ``annotations`` (``video_id``,
  ``category_id``, ``segmentations``: one run-length encoded mask or ``null`` per file
  name) and ``categories`` (``id``, ``name``).

The target of a frame is the union of all person instances in it (empty where no person is
annotated). Masks are COCO run-length encodings, uncompressed (``counts`` a list of ints, as
the 2019 release) or compressed (``counts`` a string, as ``pycocotools`` writes them): see
:func:`decode_rle`.
"""
from __future__ import annotations

import os

import numpy as np
from torch import Tensor

from .data import MattingAugmentation, _EpochDataset, _to_tensor, read_annotations, read_image, sample_frame_indices

__all__ = ["decode_rle", "YouTubeVISDataset"]


def _counts_from_string(text: str) -> list[int]:
    """COCO's compressed run lengths: each count is a little-endian series of 5-bit groups,
    one character each (``chr(48 + group)``, bit 0x20 set while more groups follow, the
    last group's bit 0x10 the sign); counts after the second are stored as the difference
    to the count two places before (the previous run of the same value)."""
    counts: list[int] = []
    pos = 0
    while pos < len(text):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(text):
                raise ValueError(f"compressed RLE counts end inside a number: {text[:40]!r}")
            group = ord(text[pos]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"compressed RLE counts hold {text[pos]!r}, not a run-length character")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos, shift = pos + 1, shift + 5
            if not more and group & 0x10:
                value -= 1 << shift  # sign-extend
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO run-length encoded mask as a uint8 (H, W) array of 0 and 1.

    ``rle`` is ``{'size': [H, W], 'counts': ...}``; the runs alternate background and
    foreground, starting with background, over the pixels in column-major order (down the
    first column, then the next). ``counts`` is a list of ints (uncompressed) or a str /
    bytes (compressed, see :func:`_counts_from_string`).
    """
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        kind = "a list of polygons" if isinstance(rle, list) else type(rle).__name__
        raise ValueError(f"rle: expected a run-length encoded mask {{'size': [H, W], 'counts': ...}}, got {kind}")
    size, counts = rle["size"], rle["counts"]
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"rle: 'size' must be [H, W], got {size!r}") from None
    if isinstance(counts, (bytes, bytearray)):
        counts = counts.decode("ascii", errors="replace")
    if isinstance(counts, str):
        counts = _counts_from_string(counts)
    runs = np.asarray(counts)
    if runs.size == 0:
        runs = runs.astype(np.int64)
    # (Integers past int64, e.g. from a garbled compressed string, give an object array.)
    if runs.ndim != 1 or runs.dtype.kind not in "iu":
        raise ValueError(f"rle: 'counts' must be a list of integers or a compressed string, got {str(counts)[:40]!r}")
    runs = runs.astype(np.int64)
    if (runs < 0).any() or runs.sum() != height * width:
        raise ValueError(
            f"rle: the counts (sum {int(runs.sum())}) do not cover the {height}x{width} mask "
            f"({height * width} pixels) with non-negative runs"
        )
    values = (np.arange(len(runs)) % 2).astype(np.uint8)
    return np.repeat(values, runs).reshape(width, height).T


def _compact(rle):
    """The mask with its uncompressed counts as an int32 array: ~7x less memory than a list of
    Python ints (the 2019 training set holds tens of millions of counts), and no per-int
    reference counts for forked loader workers to touch (and so copy). Other forms are kept
    as they are (:func:`decode_rle` checks them when it reads them)."""
    if isinstance(rle, dict) and isinstance(rle.get("counts"), list):
        counts = np.asarray(rle["counts"])
        if counts.ndim == 1 and counts.dtype.kind in "iu" and (counts.size == 0 or 0 <= counts.min() <= counts.max() < 2**31):
            return {"size": rle["size"], "counts": counts.astype(np.int32)}
    return rle


class YouTubeVISDataset(_EpochDataset):
    """Clips of YouTube-VIS videos with a person, and their person masks.

    As in RVM's loader, there is one item per annotated frame of each video that has a
    ``category`` instance; an item is the ``seq_length`` frames that follow it, at speed 1
    (consecutive annotated frames; bouncing back at the clip's end, an occasional pause, and
    reversed half the time: :func:`~bimatting_triton.train.data.sample_frame_indices`).
    Augmentation: one random crop of 80-100 % of the area per clip, horizontal flip, colour
    jitter, grayscale and noise on the frames (``augment=False``: short-side resize and centre
    crop). Items are ``(img, seg)``: float32 (T, 3, size, size) in [0, 1] and (T, 1, size,
    size) in {0, 1}.
    """

    def __init__(
        self,
        frames_dir: str,
        annotations: str,
        size: int,
        seq_length: int,
        augment: bool = True,
        seed: int = 0,
        category: str = "person",
    ):
        self.frames_dir, self.size, self.seq_length, self.seed = frames_dir, size, seq_length, seed
        self.augmentation = MattingAugmentation(size, enabled=augment, scale=(0.8, 1.0), p_motion=0.0)
        if not os.path.isdir(frames_dir):
            raise FileNotFoundError(f"YouTubeVISDataset: frames_dir {frames_dir!r} is not a folder")
        data = read_annotations(annotations, "YouTubeVISDataset", ("videos", "annotations", "categories"), "YouTube-VIS instances")
        wanted = {c["id"] for c in data["categories"] if str(c.get("name", "")).lower() == category.lower()}
        if not wanted:
            names = sorted(str(c.get("name")) for c in data["categories"])
            raise ValueError(f"YouTubeVISDataset: no category named {category!r} in {annotations!r} (it has {names[:10]}...)")
        videos = {v["id"]: v for v in data["videos"]}
        # video id -> per annotated frame, the RLE masks of the wanted instances in it.
        self.masks: dict[int, list[list[dict]]] = {}
        for ann in data["annotations"]:
            if ann.get("category_id") not in wanted:
                continue
            video_id = ann.get("video_id")
            if video_id not in videos:
                raise ValueError(f"YouTubeVISDataset: an annotation names video_id {video_id!r}, which {annotations!r} does not list")
            frames = videos[video_id]["file_names"]
            segmentations = ann.get("segmentations") or []
            if len(segmentations) != len(frames):
                raise ValueError(
                    f"YouTubeVISDataset: video {video_id!r} has {len(frames)} file names but an annotation with "
                    f"{len(segmentations)} segmentations (one per frame expected)"
                )
            per_frame = self.masks.setdefault(video_id, [[] for _ in frames])
            for masks, rle in zip(per_frame, segmentations):
                if rle is not None:
                    masks.append(_compact(rle))
        self.videos = [(video_id, list(videos[video_id]["file_names"])) for video_id in sorted(self.masks)]
        if not self.videos:
            raise ValueError(f"YouTubeVISDataset: no video in {annotations!r} has a {category!r} instance")
        absent = [name for _, names in self.videos for name in names if not os.path.isfile(os.path.join(frames_dir, name))]
        if absent:
            raise FileNotFoundError(
                f"YouTubeVISDataset: {len(absent)} frame(s) listed in {annotations!r} are not in frames_dir "
                f"{frames_dir!r}, e.g. {absent[:3]}"
            )
        self.index = [(v, frame) for v, (_, names) in enumerate(self.videos) for frame in range(len(names))]

    def __len__(self) -> int:
        return len(self.index)

    def _frame(self, video: int, frame: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (H, W, 3) image and (H, W) 0/255 union of the frame's masks."""
        video_id, names = self.videos[video]
        path = os.path.join(self.frames_dir, names[frame])
        image = read_image(path)
        seg = np.zeros(image.shape[:2], dtype=np.uint8)
        for rle in self.masks[video_id][frame]:
            mask = decode_rle(rle)
            if mask.shape != seg.shape:
                raise ValueError(f"YouTubeVISDataset: a mask of {path!r} is {mask.shape[::-1]} (W, H), the frame {seg.shape[::-1]}")
            seg |= mask
        return image, seg * 255

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = self.generator(index)
        video, start = self.index[index]
        count = len(self.videos[video][1])
        picked = sample_frame_indices(count, self.seq_length, g, start=start, speed=(1.0, 1.0))
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for i in picked:
            if i not in cache:
                cache[i] = self._frame(video, i)
        img = _to_tensor([cache[i][0] for i in picked])
        seg = _to_tensor([cache[i][1] for i in picked])
        img, seg = self.augmentation.foreground(img, seg, g)
        return img, (seg > 0.5).float()

