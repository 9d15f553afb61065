"""Evaluate video matting predictions on RVM's benchmark layout (VideoMatte 512×288 / HD).

Two modes, as a command (``python -m bimatting_triton.evaluate``) and as functions:

* **Predictions already on disk** — ``--pred DIR --true DIR`` / :func:`evaluate`. Both
  folders follow RVM's layout: clip folders, optionally grouped in dataset folders
  (``videomatte_512x288/videomatte_motion/0000/{pha,fgr}/0000.png``), each holding a
  ``pha/`` folder of alpha frames and a ``fgr/`` folder of foreground frames. The
  clips are those of the ``--true`` folder; frames are matched by file name without
  extension (so ``.png`` predictions can be scored against ``.jpg`` ground truth).
* **End to end** — ``--data DIR --pred OUT [--model-checkpoint PATH]`` /
  :func:`evaluate_model`. Runs a model with RVM's forward contract over the ``com/``
  (composited input) frames of every clip of the dataset folder, clip by clip with
  the recurrent state carried across frames, writes ``pha/`` and ``fgr/`` PNGs under
  ``OUT`` in the same layout, then evaluates them against the dataset's ``pha/`` and
  ``fgr/``.

Protocols (``--protocol``) reproduce RVM's two scripts:

* ``lr`` (``evaluate_lr.py``, 512×288): pha MAD, MSE, Grad (frames min–max normalised
  first), Conn, dtSSD, fgr MAD, MSE.
* ``hr`` (``evaluate_hr.py``, HD): pha MAD, MSE, Grad (not normalised), dtSSD, fgr MSE.

Definitions and units are in :mod:`bimatting_triton.metrics`. Every metric is
computed per frame and averaged over the clip's frames (dtSSD's first frame counts
as 0, fgr frames without true foreground are skipped); the printed table averages
the clip means over the clips of each dataset folder and over all clips. When all
clips have the same number of frames (as in VideoMatte) this equals RVM's
spreadsheet average. Frames are read with PyAV: 8-bit images as value/255, 16-bit
ones as value/65535; colour alpha images are converted to luma.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import tempfile
import threading
import warnings
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import av
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .devices import usable_device
from .metrics import FGR_METRICS, METRICS, clip_metrics, dtssd

__all__ = [
    "PROTOCOLS",
    "EvaluationError",
    "ClipResult",
    "EvaluationResult",
    "evaluate",
    "evaluate_model",
    "predict_dataset",
    "auto_downsample_ratio",
    "load_model",
    "find_clips",
    "read_alpha",
    "read_rgb",
    "write_image",
    "main",
]

# Metrics and Grad normalisation of RVM's two evaluation scripts.
PROTOCOLS = {
    "lr": {"metrics": METRICS, "grad_normalize": True},
    "hr": {"metrics": ("pha_mad", "pha_mse", "pha_grad", "pha_dtssd", "fgr_mse"), "grad_normalize": False},
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


class EvaluationError(ValueError):
    """A dataset or prediction folder that cannot be evaluated (missing folders or frames,
    mismatched frame counts or sizes, unreadable images)."""


# ----------------------------------------------------------------------------- image files
def _decode(path: str) -> av.VideoFrame:
    try:
        with av.open(path) as container:
            return next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, OSError) as e:
        raise EvaluationError(f"cannot read image {path}: {e}") from e


def _high_depth(frame: av.VideoFrame) -> bool:
    return any(c.bits > 8 for c in frame.format.components)


def read_alpha(path: str) -> np.ndarray:
    """An alpha frame as (H, W) float32 in [0, 1].

    Grey images are used directly (8-bit /255, 16-bit /65535); colour images are
    converted to luma (ffmpeg's BT.601 full-range weights) as OpenCV's grayscale read does.
    """
    frame = _decode(path)
    if _high_depth(frame):
        return frame.to_ndarray(format="gray16le").astype(np.float32) / 65535.0
    return frame.to_ndarray(format="gray").astype(np.float32) / 255.0


def read_rgb(path: str) -> np.ndarray:
    """A colour frame as (H, W, 3) float32 RGB in [0, 1] (8-bit /255, 16-bit /65535)."""
    frame = _decode(path)
    if _high_depth(frame):
        return frame.to_ndarray(format="rgb48le").astype(np.float32) / 65535.0
    return frame.to_ndarray(format="rgb24").astype(np.float32) / 255.0


def write_image(path: str, image: np.ndarray) -> None:
    """Write a PNG atomically (a temporary file in the same folder, then ``os.replace``).

    ``image``: uint8, (H, W) grey or (H, W, 3) RGB.
    """
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image: expected uint8 (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
    fmt = "gray" if image.ndim == 2 else "rgb24"
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], fmt
    packets = codec.encode(av.VideoFrame.from_ndarray(image, format=fmt)) + codec.encode(None)
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for packet in packets:
                f.write(bytes(packet))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ----------------------------------------------------------------------------- folder layout
def find_clips(root: str, marker: str = "pha") -> list[str]:
    """Clip folders under ``root``: those holding a ``marker`` sub-folder.

    Looks at ``root`` itself, its sub-folders (clips) and their sub-folders (dataset /
    clip, RVM's layout). Returns relative POSIX paths, sorted ('' for ``root`` itself).
    """
    if not os.path.isdir(root):
        raise EvaluationError(f"folder not found: {root}")
    if os.path.isdir(os.path.join(root, marker)):
        return [""]
    clips = []
    for first in sorted(os.listdir(root)):
        path = os.path.join(root, first)
        if first.startswith(".") or not os.path.isdir(path):
            continue
        if os.path.isdir(os.path.join(path, marker)):
            clips.append(first)
            continue
        for second in sorted(os.listdir(path)):
            if not second.startswith(".") and os.path.isdir(os.path.join(path, second, marker)):
                clips.append(f"{first}/{second}")
    return clips


def _frames(folder: str) -> dict[str, str]:
    """Image files of ``folder`` as {name without extension: file name}, sorted by name."""
    if not os.path.isdir(folder):
        raise EvaluationError(f"folder not found: {folder}")
    frames: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS:
            continue
        if stem in frames:
            raise EvaluationError(f"{folder}: two frames named {stem!r} ({frames[stem]} and {name})")
        frames[stem] = name
    return frames


def _matched_frames(pred_folder: str, true_folder: str) -> list[tuple[str, str]]:
    """(pred file, true file) pairs of two frame folders, in frame order; errors on mismatch."""
    true = _frames(true_folder)
    if not true:
        raise EvaluationError(f"no frames ({'/'.join(IMAGE_EXTENSIONS)}) in {true_folder}")
    pred = _frames(pred_folder)
    missing = [s for s in true if s not in pred]
    extra = [s for s in pred if s not in true]
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing from the predictions: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            detail.append(f"not in the ground truth: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise EvaluationError(
            f"frame count mismatch: {pred_folder} has {len(pred)} frames, {true_folder} has {len(true)}; "
            + "; ".join(detail)
        )
    return [(os.path.join(pred_folder, pred[s]), os.path.join(true_folder, true[s])) for s in true]


def _stems(pairs: list[tuple[str, str]]) -> list[str]:
    return [os.path.splitext(os.path.basename(true))[0] for _, true in pairs]


# ----------------------------------------------------------------------------- results
@dataclass
class ClipResult:
    """Per-frame metric values of one clip. ``per_frame[name]``: (T,) float64."""

    clip: str
    frames: int
    per_frame: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self, metric: str) -> float:
        """Mean over the clip's frames, NaN frames skipped (NaN if all are)."""
        values = self.per_frame[metric]
        finite = values[~np.isnan(values)]
        return float(finite.mean()) if finite.size else math.nan

    @property
    def group(self) -> str:
        """The dataset folder of the clip ('' for a clip directly under the root)."""
        return self.clip.rsplit("/", 1)[0] if "/" in self.clip else ""


@dataclass
class EvaluationResult:
    """Per-clip results of an evaluation, in clip order."""

    metrics: tuple[str, ...]
    clips: list[ClipResult]

    def summary(self) -> dict[str, dict[str, float]]:
        """{row: {metric: mean of the clip means}} for each dataset folder, then 'all'.

        Dataset rows appear only when the clips sit in dataset folders; NaN clip means
        are skipped.
        """
        groups: dict[str, list[ClipResult]] = {}
        for clip in self.clips:
            groups.setdefault(clip.group, []).append(clip)
        rows = {name: members for name, members in groups.items() if name}
        rows["all"] = self.clips
        out = {}
        for name, members in rows.items():
            out[name] = {}
            for metric in self.metrics:
                means = np.array([c.mean(metric) for c in members])
                finite = means[~np.isnan(means)]
                out[name][metric] = float(finite.mean()) if finite.size else math.nan
        return out

    def write_csv(self, path: str) -> None:
        """Write one row per clip (``clip, frames, <metric means>``) atomically."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["clip", "frames", *self.metrics])
        for clip in self.clips:
            writer.writerow([clip.clip or ".", clip.frames, *(f"{clip.mean(m):.10g}" for m in self.metrics)])
        folder, name = os.path.split(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", newline="") as f:
                f.write(buffer.getvalue())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def format_table(self) -> str:
        """The averages as a text table: rows from :meth:`summary`, one column per metric."""
        summary = self.summary()
        counts = {"all": (len(self.clips), sum(c.frames for c in self.clips))}
        for clip in self.clips:
            if clip.group:
                n, f = counts.get(clip.group, (0, 0))
                counts[clip.group] = (n + 1, f + clip.frames)
        head = ["", "clips", "frames", *self.metrics]
        body = [
            [name, str(counts[name][0]), str(counts[name][1]), *(f"{summary[name][m]:.5g}" for m in self.metrics)]
            for name in summary
        ]
        widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
        def line(row: list[str]) -> str:
            return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))

        return "\n".join(line(row) for row in [head, *body])


# ----------------------------------------------------------------------------- evaluation
def _resolve_metrics(metrics, protocol: str) -> tuple[tuple[str, ...], bool]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}: expected one of {sorted(PROTOCOLS)}")
    chosen = tuple(PROTOCOLS[protocol]["metrics"] if metrics is None else metrics)
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise ValueError(f"metrics: unknown or empty {list(chosen)}; expected names from {list(METRICS)}")
    return chosen, PROTOCOLS[protocol]["grad_normalize"]


def _default_device(device) -> torch.device:
    """``device`` as a :class:`torch.device` usable here (None: CUDA when available, else CPU);
    ValueError naming --device otherwise (see :func:`~bimatting_triton.devices.usable_device`)."""
    return usable_device(device, "--device")


def _load_stack(paths: list[str], reader, expected: tuple[int, ...] | None, reference: str) -> np.ndarray:
    """Read frames and stack them; every frame must be ``expected`` (H, W) (or the first's size)."""
    images = []
    for path in paths:
        image = reader(path)
        if expected is None:
            expected = image.shape[:2]
        if image.shape[:2] != expected:
            raise EvaluationError(
                f"size mismatch: {path} is {image.shape[1]}x{image.shape[0]} (WxH), "
                f"expected {expected[1]}x{expected[0]} like {reference}"
            )
        images.append(image)
    return np.stack(images)


class _Cancelled(Exception):
    """Raised in a clip worker after another clip failed."""


class _Job:
    """Evaluation of one clip, in chunks of frames (bounded memory)."""

    def __init__(self, clip, pha_pairs, fgr_pairs, metrics, grad_normalize, device, chunk, stop, advance):
        self.clip, self.pha_pairs, self.fgr_pairs = clip, pha_pairs, fgr_pairs
        self.metrics, self.grad_normalize, self.device = metrics, grad_normalize, device
        self.chunk, self.stop, self.advance = chunk, stop, advance

    def __call__(self) -> ClipResult:
        frame_metrics = [m for m in self.metrics if m != "pha_dtssd"]
        values: dict[str, list[np.ndarray]] = {m: [] for m in self.metrics}
        size = None
        prev = None  # last (pred, true) alpha of the previous chunk, for dtSSD
        for start in range(0, len(self.pha_pairs), self.chunk):
            if self.stop.is_set():
                raise _Cancelled()
            pairs = self.pha_pairs[start : start + self.chunk]
            reference = f"the ground-truth alpha of clip {self.clip or '.'}"
            true_pha = _load_stack([t for _, t in pairs], read_alpha, size, reference)
            size = true_pha.shape[1:3]
            pred_pha = _load_stack([p for p, _ in pairs], read_alpha, size, reference)
            pred_fgr = true_fgr = None
            if self.fgr_pairs is not None:
                fgr = self.fgr_pairs[start : start + self.chunk]
                # (T, H, W, 3) images -> (T, 3, H, W) as the metrics take them
                true_fgr = _load_stack([t for _, t in fgr], read_rgb, size, reference)
                pred_fgr = _load_stack([p for p, _ in fgr], read_rgb, size, reference)
                true_fgr = _to(np.moveaxis(true_fgr, -1, 1), self.device)
                pred_fgr = _to(np.moveaxis(pred_fgr, -1, 1), self.device)
            pred_pha, true_pha = _to(pred_pha, self.device), _to(true_pha, self.device)
            out = clip_metrics(pred_pha, true_pha, pred_fgr, true_fgr, frame_metrics, self.grad_normalize)
            if "pha_dtssd" in self.metrics:
                if prev is None:
                    out["pha_dtssd"] = dtssd(pred_pha, true_pha)
                else:
                    out["pha_dtssd"] = dtssd(torch.cat([prev[0], pred_pha]), torch.cat([prev[1], true_pha]))[1:]
                prev = (pred_pha[-1:], true_pha[-1:])
            for m in self.metrics:
                values[m].append(out[m].cpu().numpy())
            self.advance(len(pairs))
        return ClipResult(self.clip, len(self.pha_pairs), {m: np.concatenate(v) for m, v in values.items()})


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(device)


def evaluate(
    pred_dir: str,
    true_dir: str,
    metrics: list[str] | tuple[str, ...] | None = None,
    protocol: str = "lr",
    device: str | torch.device | None = None,
    num_workers: int | None = None,
    frames_per_chunk: int = 16,
    progress: bool = True,
) -> EvaluationResult:
    """Score the predictions in ``pred_dir`` against the ground truth in ``true_dir``.

    Both folders follow RVM's layout (module docstring); the clips are those of
    ``true_dir``. ``metrics``: names from :data:`bimatting_triton.metrics.METRICS`
    (default: the protocol's). ``protocol``: 'lr' or 'hr' (see :data:`PROTOCOLS`).
    ``device``: where the metrics run (default CUDA when available). Clips are
    evaluated in parallel by ``num_workers`` threads (default: one per CPU core, at
    most one per clip), each reading ``frames_per_chunk`` frames at a time.
    Raises :class:`EvaluationError` for missing folders, frame-count or size mismatches.
    """
    metrics, grad_normalize = _resolve_metrics(metrics, protocol)
    if frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk: expected >= 1, got {frames_per_chunk}")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers: expected >= 1 (or None for one per CPU core), got {num_workers}")
    if not os.path.isdir(pred_dir):
        raise EvaluationError(f"prediction folder not found: {pred_dir}")
    clips = find_clips(true_dir)
    if not clips:
        raise EvaluationError(
            f"no clips in {true_dir}: expected clip folders holding pha/ (optionally inside dataset folders)"
        )
    want_fgr = any(m in FGR_METRICS for m in metrics)

    # Check the whole layout before reading any image.
    plans = []
    for clip in clips:
        pred_clip, true_clip = os.path.join(pred_dir, clip), os.path.join(true_dir, clip)
        if not os.path.isdir(pred_clip):
            raise EvaluationError(f"clip {clip or '.'}: prediction folder not found: {pred_clip}")
        pha = _matched_frames(os.path.join(pred_clip, "pha"), os.path.join(true_clip, "pha"))
        fgr = None
        if want_fgr:
            for side in (pred_clip, true_clip):
                if not os.path.isdir(os.path.join(side, "fgr")):
                    raise EvaluationError(
                        f"folder not found: {os.path.join(side, 'fgr')} (needed for "
                        f"{[m for m in metrics if m in FGR_METRICS]}; pass --metrics without fgr_* to skip them)"
                    )
            fgr = _matched_frames(os.path.join(pred_clip, "fgr"), os.path.join(true_clip, "fgr"))
            if _stems(fgr) != _stems(pha):
                raise EvaluationError(f"clip {clip or '.'}: the fgr/ and pha/ frames of {true_clip} differ")
        plans.append((clip, pha, fgr))

    device = _default_device(device)
    workers = num_workers if num_workers is not None else min(len(plans), os.cpu_count() or 1)
    total = sum(len(pha) for _, pha, _ in plans)
    stop = threading.Event()
    lock = threading.Lock()
    with tqdm(total=total, unit="frame", desc="evaluating", disable=not progress, dynamic_ncols=True) as bar:

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        jobs = [
            _Job(clip, pha, fgr, metrics, grad_normalize, device, frames_per_chunk, stop, advance)
            for clip, pha, fgr in plans
        ]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(job) for job in jobs]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                stop.set()
                for f in futures:
                    f.cancel()
                wait(futures)
                # the first clip's own error, not the _Cancelled of the clips stopped after it
                errors = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
                raise next(e for e in errors if not isinstance(e, _Cancelled))
            results = [f.result() for f in futures]
    return EvaluationResult(metrics, results)


# ----------------------------------------------------------------------------- end to end
def auto_downsample_ratio(height: int, width: int) -> float:
    """RVM's default: make the longer side at most 512 pixels (never upsample)."""
    return min(512 / max(height, width), 1.0)


def _quantize(x: torch.Tensor, mode: str) -> np.ndarray:
    """[0, 1] floats to uint8: 'floor' = ``uint8(x·255)`` (torchvision's ``to_pil_image``,
    which RVM's PNG writer uses), 'round' = nearest."""
    x = x.clamp(0, 1).float() * 255
    if mode == "round":
        x = x.round()
    return x.to(torch.uint8).cpu().numpy()


def _within(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it, symbolic links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def _check_outside(pred_dir: str, data_dir: str, clips: list[str]) -> None:
    """Refuse (EvaluationError naming --pred/--data) prediction folders that would write into ``data_dir``.

    All writes go to ``pred_dir/<clip>/{pha,fgr}``: refused when ``pred_dir`` is ``data_dir`` or
    inside it (it would overwrite the ground truth, or add clips to the dataset), or when an output
    folder resolves into ``data_dir`` (through a symbolic link, or ``data_dir`` nested in ``pred_dir``
    with a matching path). ``data_dir`` merely inside ``pred_dir`` is allowed otherwise.
    """
    if _within(pred_dir, data_dir):
        raise EvaluationError(
            f"--pred {pred_dir} is the --data folder {data_dir} or inside it: the predictions would overwrite "
            "or mix with the ground truth; choose a --pred folder outside --data"
        )
    for clip in clips:
        for sub in ("pha", "fgr"):
            out = os.path.join(pred_dir, clip, sub)
            if _within(out, data_dir):
                raise EvaluationError(
                    f"--pred output folder {out} resolves into the --data folder {data_dir}: writing there would "
                    "overwrite the ground truth; choose a --pred folder outside --data"
                )


def predict_dataset(
    model: nn.Module,
    data_dir: str,
    pred_dir: str,
    downsample_ratio: float | None = None,
    seq_chunk: int = 12,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str = "floor",
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Run ``model`` over every clip's ``com/`` frames and write its ``pha/``, ``fgr/`` PNGs.

    ``model`` follows RVM's contract: ``fgr, pha, *rec = model(src, *rec,
    downsample_ratio=r)`` with ``src`` (1, T, 3, H, W) in [0, 1], ``rec`` starting as
    ``[None] * 4``; each clip is fed in chunks of ``seq_chunk`` frames, carrying
    ``rec``. ``downsample_ratio``: None picks :func:`auto_downsample_ratio` per clip.
    ``quantize``: 'floor' (as RVM's writer) or 'round'. The model is put in eval mode
    and on ``device``/``dtype``. Output files keep the input frame names with a
    ``.png`` extension. Returns the clips written (relative paths). Raises
    :class:`EvaluationError` when ``pred_dir`` would write into ``data_dir`` (even with
    ``overwrite``), ValueError for an unusable ``device``.
    """
    if quantize not in ("floor", "round"):
        raise ValueError(f"quantize={quantize!r}: expected 'floor' or 'round'")
    if seq_chunk < 1:
        raise ValueError(f"seq_chunk: expected >= 1, got {seq_chunk}")
    if downsample_ratio is not None and not 0 < downsample_ratio <= 1:
        raise ValueError(f"downsample_ratio: expected a value in (0, 1], got {downsample_ratio}")
    clips = find_clips(data_dir, marker="com")
    if not clips:
        raise EvaluationError(
            f"no clips in {data_dir}: expected clip folders holding com/ (input frames), pha/ and fgr/"
        )
    _check_outside(pred_dir, data_dir, clips)
    for clip in clips:
        for sub in ("pha", "fgr"):
            out = os.path.join(pred_dir, clip, sub)
            if not overwrite and os.path.isdir(out) and _frames(out):
                raise EvaluationError(f"{out} already holds frames: choose an empty --pred folder or pass --overwrite")
    device = _default_device(device)
    model = model.eval().to(device=device, dtype=dtype)
    frame_lists = {clip: _frames(os.path.join(data_dir, clip, "com")) for clip in clips}
    total = sum(len(f) for f in frame_lists.values())
    with tqdm(total=total, unit="frame", desc="predicting", disable=not progress, dynamic_ncols=True) as bar:
        for clip in clips:
            frames = frame_lists[clip]
            if not frames:
                raise EvaluationError(f"no frames in {os.path.join(data_dir, clip, 'com')}")
            for sub in ("pha", "fgr"):
                os.makedirs(os.path.join(pred_dir, clip, sub), exist_ok=True)
            stems = list(frames)
            rec: list = [None] * 4
            size = None
            for start in range(0, len(stems), seq_chunk):
                chunk = stems[start : start + seq_chunk]
                paths = [os.path.join(data_dir, clip, "com", frames[s]) for s in chunk]
                src_np = _load_stack(paths, read_rgb, size, f"the first input frame of clip {clip or '.'}")
                size = src_np.shape[1:3]
                src = torch.from_numpy(src_np).permute(0, 3, 1, 2).unsqueeze(0).to(device=device, dtype=dtype)
                ratio = downsample_ratio if downsample_ratio is not None else auto_downsample_ratio(*size)
                with torch.inference_mode():
                    fgr, pha, *rec = model(src, *rec, downsample_ratio=ratio)
                t, (h, w) = len(chunk), size
                if tuple(pha.shape) != (1, t, 1, h, w) or tuple(fgr.shape) != (1, t, 3, h, w):
                    raise RuntimeError(
                        f"model returned fgr {tuple(fgr.shape)} and pha {tuple(pha.shape)} for src {tuple(src.shape)}; "
                        f"expected (1, {t}, 3, {h}, {w}) and (1, {t}, 1, {h}, {w})"
                    )
                pha_u8 = _quantize(pha[0, :, 0], quantize)
                fgr_u8 = _quantize(fgr[0].permute(0, 2, 3, 1), quantize)
                for i, stem in enumerate(chunk):
                    write_image(os.path.join(pred_dir, clip, "pha", stem + ".png"), pha_u8[i])
                    write_image(os.path.join(pred_dir, clip, "fgr", stem + ".png"), fgr_u8[i])
                bar.update(len(chunk))
    return clips


def evaluate_model(
    model: nn.Module,
    data_dir: str,
    pred_dir: str,
    *,
    downsample_ratio: float | None = None,
    seq_chunk: int = 12,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    quantize: str = "floor",
    overwrite: bool = False,
    metrics: list[str] | tuple[str, ...] | None = None,
    protocol: str = "lr",
    num_workers: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """:func:`predict_dataset` into ``pred_dir``, then :func:`evaluate` it against ``data_dir``."""
    predict_dataset(
        model, data_dir, pred_dir, downsample_ratio=downsample_ratio, seq_chunk=seq_chunk, device=device,
        dtype=dtype, quantize=quantize, overwrite=overwrite, progress=progress,
    )
    return evaluate(
        pred_dir, data_dir, metrics=metrics, protocol=protocol, device=device, num_workers=num_workers,
        progress=progress,
    )


RANDOM_WEIGHTS_WARNING = (
    "no --model-checkpoint given: the model has RANDOM weights, so these numbers say "
    "nothing about BiMatting's quality"
)


def load_model(checkpoint: str | None = None, refiner: str = "deep_guided_filter", warn: bool = True) -> nn.Module:
    """A :class:`bimatting_triton.BiMatting`, from ``checkpoint`` or randomly initialised
    (then with a ``UserWarning`` unless ``warn`` is False)."""
    try:
        from .model import BiMatting
    except ImportError as e:  # the model package is optional for metric-only use
        raise RuntimeError(f"the end-to-end mode needs bimatting_triton.BiMatting, which failed to import: {e}") from e
    if checkpoint is None:
        if warn:
            warnings.warn(RANDOM_WEIGHTS_WARNING, stacklevel=2)
        return BiMatting(refiner=refiner)
    if not os.path.isfile(checkpoint):
        raise EvaluationError(f"model checkpoint not found: {checkpoint}")
    return BiMatting.from_pretrained(checkpoint, refiner=refiner)


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bimatting_triton.evaluate",
        description="Video matting metrics with RVM's conventions (MAD, MSE, Grad, Conn, dtSSD, fgr MAD/MSE).",
    )
    parser.add_argument(
        "--pred", required=True, metavar="DIR", help="predictions (with --data: where they are written)"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--true", metavar="DIR", help="ground truth: clip folders with pha/ and fgr/")
    source.add_argument(
        "--data", metavar="DIR", help="end to end: dataset with com/, pha/, fgr/ per clip; runs the model first"
    )
    parser.add_argument(
        "--protocol", choices=sorted(PROTOCOLS), default="lr",
        help="RVM's evaluate_lr (default; 512x288) or evaluate_hr (HD) conventions",
    )
    parser.add_argument(
        "--metrics", nargs="+", choices=METRICS, metavar="NAME",
        help="metrics to compute, from " + ", ".join(METRICS) + " (default: the protocol's)",
    )
    parser.add_argument("--device", help="device for the metrics and the model (default: cuda if available)")
    parser.add_argument("--workers", type=int, default=None, help="clips evaluated in parallel (default: CPU cores)")
    parser.add_argument("--csv", metavar="PATH", help="per-clip CSV (default: PRED/metrics.csv)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    e2e = parser.add_argument_group("end-to-end mode (--data)")
    e2e.add_argument(
        "--model-checkpoint", metavar="PATH", help="BiMatting checkpoint (without it the weights are random)"
    )
    e2e.add_argument("--refiner", choices=("deep_guided_filter", "fast_guided_filter"), default="deep_guided_filter")
    e2e.add_argument("--downsample-ratio", type=float, default=None, help="default: min(512 / longer side, 1) per clip")
    e2e.add_argument("--seq-chunk", type=int, default=12, help="frames per forward call")
    e2e.add_argument(
        "--quantize", choices=("floor", "round"), default="floor",
        help="8-bit conversion of the outputs (floor = RVM's writer)",
    )
    e2e.add_argument(
        "--overwrite", action="store_true", help="allow writing into a --pred folder that already holds frames"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 2 on a usage or data error)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.data is None:
        e2e_only = (("--model-checkpoint", args.model_checkpoint), ("--downsample-ratio", args.downsample_ratio))
        used = [flag for flag, value in e2e_only if value is not None]
        if used:
            parser.error(f"{', '.join(used)} only apply with --data (end-to-end mode)")
    progress = not args.no_progress
    try:
        device = _default_device(args.device)  # before loading the model or reading any frame
        if args.data is not None:
            _check_outside(args.pred, args.data, [])  # a refused --pred says so before the weights' warning
            if args.model_checkpoint is None:
                bar = "!" * 78
                print(f"{bar}\nWARNING: {RANDOM_WEIGHTS_WARNING}\n{bar}", file=sys.stderr)
            model = load_model(args.model_checkpoint, args.refiner, warn=False)
            result = evaluate_model(
                model, args.data, args.pred, downsample_ratio=args.downsample_ratio, seq_chunk=args.seq_chunk,
                device=device, quantize=args.quantize, overwrite=args.overwrite, metrics=args.metrics,
                protocol=args.protocol, num_workers=args.workers, progress=progress,
            )
        else:
            result = evaluate(
                args.pred, args.true, metrics=args.metrics, protocol=args.protocol, device=device,
                num_workers=args.workers, progress=progress,
            )
    except (EvaluationError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    csv_path = args.csv or os.path.join(args.pred, "metrics.csv")
    result.write_csv(csv_path)
    print(result.format_table())
    print(f"per-clip results: {csv_path}")
    if args.data is not None and args.model_checkpoint is None:
        print(f"WARNING: {RANDOM_WEIGHTS_WARNING}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
