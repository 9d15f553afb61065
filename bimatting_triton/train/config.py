"""Training configurations: one dataclass, and the named stages of the paper's recipe.

The four stages follow BiMatting's recipe (SPEC §6), which is Robust Video Matting's:

=========  ================  =====================================  ===========================
stage      data              clips                                  learning rates (bb/aspp/dec/ref)
=========  ================  =====================================  ===========================
stage1     VideoMatte240K    512 px, T = 15, downsample 1           1e-4 / 2e-4 / 2e-4 / 0
stage2     VideoMatte240K    512 px, T = 40 (longer clips)          5e-5 / 1e-4 / 1e-4 / 0
stage3     VideoMatte240K    + 2048 px, T = 6, downsample 0.25      1e-5 / 1e-5 / 1e-5 / 2e-4
stage4     ImageMatte        + 2048 px, T = 6, downsample 0.25      1e-5 / 1e-5 / 5e-5 / 2e-4
=========  ================  =====================================  ===========================

Every stage uses Adam, mixed precision on CUDA, DDP + SyncBatchNorm when launched with
``torchrun`` on GPUs, and a segmentation pass (BCE) after every matting step, as RVM's and
BiMatting's ``train.py``: on YouTube-VIS clips (``seg_video_*``) and on single images
(COCO panoptic ``seg_coco_*`` and / or an image and mask folder such as Supervisely Person,
``seg_image_dir`` / ``seg_mask_dir``) in turn when both kinds are given. Each stage starts
from the previous stage's checkpoint (``init``). ``demo`` and ``tiny`` train on the
procedural :class:`~bimatting_triton.train.synthetic.SyntheticMatteDataset` (no download):
``demo`` shows learning in a few minutes on two CPU cores, ``tiny`` is for tests.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
from dataclasses import InitVar, dataclass, fields
from typing import Any

import torch

from ..model.bimatting import REFINERS

__all__ = ["TrainConfig", "CONFIGS", "get_config", "config_names", "field_comments"]

DATASETS = ("videomatte", "imagematte", "synthetic")


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(cfg: "TrainConfig", name: str, minimum: int) -> None:
    value = getattr(cfg, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}: expected {kind}, got {value!r}")


# What a field of each annotated kind must hold (int fields: ``_check_int``).
_KINDS = {
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "float": (_is_real, "a number"),
}


def _check_kinds(cfg: "TrainConfig") -> None:
    """Check each bool, str and float field against its annotation (``X | None`` also allows None).

    JSON files are not typed: ``"train_hr": "false"`` is a truthy string, ``"out_dir": 5`` no path.
    """
    for f in fields(cfg):
        kind, _, rest = str(f.type).partition(" | ")
        value = getattr(cfg, f.name)
        if kind not in _KINDS or (value is None and rest == "None"):
            continue
        accepts, expected = _KINDS[kind]
        if not accepts(value):
            raise ValueError(f"{f.name}: expected {expected}{' or null' if rest == 'None' else ''}, got {value!r}")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    try:
        ok = torch.device(device).type in ("cpu", "cuda")
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"device: expected null, 'cpu', 'cuda' or 'cuda:N', got {device!r}")


@dataclass
class TrainConfig:
    """Everything one training run needs; every field can be overridden from the command line.

    Paths are ``None`` unless the dataset needs them. Sizes are in pixels (square crops);
    ``seq_length`` is the clip length T. ``batch_size`` is per process (per GPU under DDP).
    """

    name: str = "custom"
    # ---- data
    dataset: str = "synthetic"  # 'videomatte' | 'imagematte' | 'synthetic'
    videomatte_dir: str | None = None  # holds fgr/<clip>/<frame> and pha/<clip>/<frame>
    imagematte_dir: str | None = None  # holds fgr/<image> and pha/<image>
    background_image_dir: str | None = None  # folder of background images
    background_video_dir: str | None = None  # folder of <clip>/<frame> background frame folders
    seg_image_dir: str | None = None  # image segmentation (e.g. Supervisely Person): images, with seg_mask_dir
    seg_mask_dir: str | None = None  # their masks, same file stems (mask > 127 is the person)
    seg_coco_image_dir: str | None = None  # image segmentation, COCO panoptic: images (train2017/), with the next two
    seg_coco_panoptic_dir: str | None = None  # COCO panoptic PNGs (annotations/panoptic_train2017/)
    seg_coco_annotations: str | None = None  # COCO panoptic JSON (annotations/panoptic_train2017.json)
    seg_video_dir: str | None = None  # video segmentation, YouTube-VIS: frames (JPEGImages/), with seg_video_annotations
    seg_video_annotations: str | None = None  # YouTube-VIS instances.json (its person instances are the targets)
    val_videomatte_dir: str | None = None  # held-out clips (same layout); synthetic otherwise
    size: int = 512  # low-resolution crop side
    seq_length: int = 15  # low-resolution clip length T
    batch_size: int = 1  # per process
    train_hr: bool = False  # also take a high-resolution step through the refiner
    size_hr: int = 2048  # high-resolution crop side
    seq_length_hr: int = 6  # high-resolution clip length
    batch_size_hr: int = 1  # high-resolution clips per process
    downsample_ratio_hr: float = 0.25  # downsample_ratio of the high-resolution pass
    synthetic_length: int = 2000  # clips per epoch of the synthetic dataset
    num_workers: int = 2  # data loader worker processes (0: load in the training process)
    augment: bool = True  # motion / colour / crop augmentation (real datasets; optional on synthetic)
    random_crop: bool = True  # RVM's per-batch crop: sides drawn in [S/2, S), multiples of 16 (data.random_batch_crop)
    # ---- model and optimisation
    refiner: str = "deep_guided_filter"  # 'deep_guided_filter' | 'fast_guided_filter'
    lr_backbone: float = 1e-4  # Adam learning rate of the backbone (0 freezes it)
    lr_aspp: float = 2e-4  # ... of the ASPP (0 freezes it)
    lr_decoder: float = 2e-4  # ... of the decoder and the two heads (0 freezes them)
    lr_refiner: float = 0.0  # ... of the refiner (0 freezes it; it only trains in high-resolution passes)
    lr_schedule: str = "constant"  # 'constant' (the recipe) or 'cosine' (decay to 0 over the run)
    grad_clip: float | None = None  # max global grad norm; None disables clipping
    amp: bool = True  # float16 autocast + GradScaler on CUDA (ignored on CPU)
    seg_every: int = 1  # a segmentation pass every N steps (1: every step, the recipe; 0 = never)
    coarse_weight: float = 0.25  # weight of the matting loss on the coarse outputs
    epochs: int = 20  # passes over the matting dataset
    max_steps: int | None = None  # stop after this many steps (over all epochs)
    # ---- bookkeeping
    out_dir: str = "runs/train"  # checkpoints (last.pt), log.jsonl and TensorBoard events
    init: str | None = None  # weights to start from (the previous stage's checkpoint)
    resume: str | None = None  # checkpoint to resume (or 'auto': out_dir/last.pt if present)
    log_every: int = 20  # steps between log lines
    val_every: int = 500  # steps between validations (0 = only at the end)
    val_clips: int = 8  # held-out synthetic clips (without val_videomatte_dir)
    val_size: int | None = None  # validation crop side (default: size)
    val_seq_length: int | None = None  # default: seq_length
    val_at_start: bool = False  # measure the untrained (or initial) model first
    checkpoint_every: int = 500  # steps between checkpoints (also written at the end)
    seed: int = 0  # data order, augmentation and initial weights
    device: str | None = None  # default: cuda if available, else cpu
    threads: int | None = None  # torch.set_num_threads on CPU
    # Not a field: False accepts a real-data config whose data folders are still missing (to
    # show a stage's settings, ``--print-config``); see :meth:`missing_data`. Training needs them.
    require_data: InitVar[bool] = True

    def __post_init__(self, require_data: bool = True):
        _check_kinds(self)
        _check_device(self.device)
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: expected one of {DATASETS}, got {self.dataset!r}")
        # Counts: a zero or negative value would fail steps into the run (``step % log_every``)
        # or silently change it (a negative ``seg_every`` skips batches on resume).
        for name in (
            "size", "seq_length", "batch_size", "size_hr", "seq_length_hr", "batch_size_hr", "epochs",
            "synthetic_length", "log_every", "val_clips",
        ):
            _check_int(self, name, minimum=1)
        for name in ("num_workers", "seg_every", "val_every", "checkpoint_every", "seed"):
            _check_int(self, name, minimum=0)
        for name in ("max_steps", "val_size", "val_seq_length", "threads"):
            if getattr(self, name) is not None:
                _check_int(self, name, minimum=0 if name == "max_steps" else 1)
        if not 0 < self.downsample_ratio_hr <= 1:  # also False for NaN
            raise ValueError(f"downsample_ratio_hr: expected a number in (0, 1], got {self.downsample_ratio_hr!r}")
        # Weights: NaN passes "< 0" and would freeze a group ("lr > 0" is False) or poison the model.
        for name in ("lr_backbone", "lr_aspp", "lr_decoder", "lr_refiner", "coarse_weight"):
            value = getattr(self, name)
            if not _is_real(value) or not 0 <= value < math.inf:
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.grad_clip is not None and (not _is_real(self.grad_clip) or not 0 < self.grad_clip < math.inf):
            raise ValueError(f"grad_clip: expected None or a finite number > 0, got {self.grad_clip!r}")
        if self.refiner not in REFINERS:
            raise ValueError(f"refiner: expected one of {sorted(REFINERS)}, got {self.refiner!r}")
        if bool(self.seg_image_dir) != bool(self.seg_mask_dir):
            raise ValueError("seg_image_dir / seg_mask_dir: give both folders or neither")
        coco = ("seg_coco_image_dir", "seg_coco_panoptic_dir", "seg_coco_annotations")
        if len({bool(getattr(self, name)) for name in coco}) > 1:
            raise ValueError(f"{' / '.join(coco)}: give all three (COCO panoptic images, PNGs and JSON) or none")
        if bool(self.seg_video_dir) != bool(self.seg_video_annotations):
            raise ValueError("seg_video_dir / seg_video_annotations: give the frames folder and the annotations file, or neither")
        missing = self.missing_data()
        if require_data and missing:
            raise ValueError(missing[0])

    def missing_data(self) -> list[str]:
        """What the dataset needs but is not given (one message per missing folder; [] when complete)."""
        missing = []
        if self.dataset == "videomatte" and not self.videomatte_dir:
            missing.append("videomatte_dir: dataset='videomatte' needs the folder holding fgr/ and pha/")
        if self.dataset == "imagematte" and not self.imagematte_dir:
            missing.append("imagematte_dir: dataset='imagematte' needs the folder holding fgr/ and pha/")
        if self.dataset != "synthetic" and not (self.background_image_dir or self.background_video_dir):
            missing.append(
                f"background_image_dir / background_video_dir: dataset={self.dataset!r} composites "
                "foregrounds over backgrounds; give at least one background folder"
            )
        return missing

    # ---- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON- and ``torch.load(weights_only=True)``-safe)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], require_data: bool = True) -> "TrainConfig":
        """Build from a dict; unknown keys are an error that names them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values, require_data=require_data)

    def replace(self, **changes: Any) -> "TrainConfig":
        """A copy with some fields changed (validated again; a config shown without its data
        folders, ``require_data=False``, stays allowed to lack them)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes}, require_data=not self.missing_data())


# The recipe's learning rates and clip lengths; stage 2's T follows SPEC §6 ("T≈20-40").
_STAGES: dict[str, dict[str, Any]] = {
    "stage1": dict(
        dataset="videomatte", size=512, seq_length=15, lr_backbone=1e-4, lr_aspp=2e-4, lr_decoder=2e-4,
        lr_refiner=0.0, epochs=20, out_dir="runs/stage1",
    ),
    "stage2": dict(
        dataset="videomatte", size=512, seq_length=40, lr_backbone=5e-5, lr_aspp=1e-4, lr_decoder=1e-4,
        lr_refiner=0.0, epochs=2, init="runs/stage1/last.pt", out_dir="runs/stage2",
    ),
    "stage3": dict(
        dataset="videomatte", size=512, seq_length=40, train_hr=True, size_hr=2048, seq_length_hr=6,
        downsample_ratio_hr=0.25, lr_backbone=1e-5, lr_aspp=1e-5, lr_decoder=1e-5, lr_refiner=2e-4,
        grad_clip=1.0, epochs=1, init="runs/stage2/last.pt", out_dir="runs/stage3",
    ),
    "stage4": dict(
        dataset="imagematte", size=512, seq_length=40, train_hr=True, size_hr=2048, seq_length_hr=6,
        downsample_ratio_hr=0.25, lr_backbone=1e-5, lr_aspp=1e-5, lr_decoder=5e-5, lr_refiner=2e-4,
        grad_clip=1.0, epochs=5, init="runs/stage3/last.pt", out_dir="runs/stage4",
    ),
}

# The two-core CPU demonstration (README): small clips, 500 steps. One thread: on a busy
# 2-core machine OpenMP oversubscription slows steps ~10x; --threads 2 helps when idle.
_DEMO = dict(
    dataset="synthetic", size=64, seq_length=4, batch_size=2, synthetic_length=100_000, augment=False,
    random_crop=False, lr_backbone=2e-3, lr_aspp=2e-3, lr_decoder=2e-3, lr_refiner=0.0, lr_schedule="cosine", seg_every=0,
    epochs=1, max_steps=500, num_workers=0, log_every=50, val_every=0, val_clips=16, val_at_start=True,
    checkpoint_every=250, out_dir="runs/demo", threads=1,
)

# Seconds-long runs for tests and smoke checks.
_TINY = dict(
    dataset="synthetic", size=32, seq_length=2, batch_size=1, synthetic_length=64, augment=False,
    random_crop=False, lr_backbone=1e-3, lr_aspp=1e-3, lr_decoder=1e-3, lr_refiner=1e-3, seg_every=2, epochs=1, max_steps=3,
    num_workers=0, log_every=1, val_every=0, val_clips=2, checkpoint_every=1000, out_dir="runs/tiny",
)

CONFIGS: dict[str, dict[str, Any]] = {**_STAGES, "demo": _DEMO, "tiny": _TINY}


def field_comments() -> dict[str, str]:
    """Each :class:`TrainConfig` field's comment in this file (the command line's help texts);
    {} where the source cannot be read."""
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^    (\w+): [^=\n]+= [^#\n]*#\s*(.+)$", source, flags=re.MULTILINE))


def config_names() -> list[str]:
    """Names accepted by :func:`get_config` (besides paths to JSON files)."""
    return list(CONFIGS)


def get_config(name_or_path: str, *, require_data: bool = True, **overrides: Any) -> TrainConfig:
    """A named config (``stage1`` .. ``stage4``, ``demo``, ``tiny``) or a JSON file's, with overrides.

    A named real-data stage needs its data folders as overrides, e.g.
    ``get_config('stage1', videomatte_dir=..., background_image_dir=...)``; with
    ``require_data=False`` it is returned without them (see :meth:`TrainConfig.missing_data`).
    """
    if name_or_path in CONFIGS:
        values = {"name": name_or_path, **CONFIGS[name_or_path]}
    elif name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        with open(name_or_path, encoding="utf-8") as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError(f"config: {name_or_path!r} must hold a JSON object of TrainConfig fields")
        values.setdefault("name", os.path.splitext(os.path.basename(name_or_path))[0])
    else:
        raise ValueError(f"config: expected one of {config_names()} or a path to a .json file, got {name_or_path!r}")
    values.update(overrides)
    return TrainConfig.from_dict(values, require_data=require_data)
