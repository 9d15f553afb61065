"""The training loop: Adam, AMP, DDP, checkpoint/resume, validation and logging.

One *step* takes one low-resolution matting batch (``downsample_ratio=1``, plus the
coarse-output loss); with ``train_hr`` also one high-resolution batch through the refiner
(``downsample_ratio_hr``); and every ``seg_every`` steps one segmentation batch (BCE on
the ``segmentation_pass`` logits: YouTube-VIS clips and images in turn when both are
given, else the one given, else the matting clip thresholded at alpha 0.5). Each of these
passes is its own forward, backward and optimizer step, as in Robust Video Matting's trainer.

Data order is a pure function of ``(seed, epoch, position)``, so a resumed run continues
with exactly the batches it would have seen (the sampler skips the consumed ones).
Checkpoints hold ``{'model', 'optimizer', 'scaler', 'step', 'rng', 'config'}`` and load
into ``BiMatting.from_pretrained`` directly (it reads the ``'model'`` entry).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..atomic import check_output_file, torch_save_atomically
from ..devices import usable_device
from . import distributed
from .config import TrainConfig, get_config
from .coco_panoptic import CocoPanopticDataset
from .data import (
    Backgrounds,
    EpochConcatDataset,
    ImageMatteDataset,
    SegmentationDataset,
    VideoMatteDataset,
    composite,
    item_generator,
    random_batch_crop,
)
from .losses import coarse_matting_loss, matting_loss, segmentation_loss
from .synthetic import SyntheticMatteDataset
from .youtubevis import YouTubeVISDataset

__all__ = [
    "TrainResult",
    "Trainer",
    "train",
    "evaluate",
    "save_checkpoint",
    "load_checkpoint",
    "build_datasets",
    "param_groups",
    "VAL_METRICS",
]

VAL_METRICS = ("pha_mad", "pha_mse", "pha_grad", "pha_dtssd", "fgr_mad")
CHECKPOINT_FORMAT = "bimatting_triton.train/1"
# Held-out synthetic clips come from another seed than the training clips.
_VAL_SEED_OFFSET = 1_000_003


# ----------------------------------------------------------------------------- checkpoints
def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str, model: nn.Module, optimizer=None, scaler=None, step: int = 0, config: TrainConfig | None = None) -> None:
    """Write a training checkpoint atomically (temp file in the same folder, then ``os.replace``).

    Contents: ``model`` (the plain module's state_dict, no DDP prefix), ``optimizer``,
    ``scaler``, ``step``, ``rng`` (torch / CUDA / NumPy / Python states as tensors and
    numbers) and ``config``; all loadable with ``torch.load(weights_only=True)``.
    """
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": distributed.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "rng": _rng_state(),
        "config": config.to_dict() if config is not None else None,
    }
    path = check_output_file(path, "checkpoint path")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch_save_atomically(state, path)


# What a training checkpoint holds: key -> the types its value may have.
_CHECKPOINT_ENTRIES = {
    "model": (dict,), "optimizer": (dict, type(None)), "scaler": (dict, type(None)), "step": (int,),
    "rng": (dict,), "config": (dict, type(None)),
}


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``)."""
    if isinstance(map_location, (str, torch.device)):
        usable_device(map_location, "map_location")
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a folder, expected a checkpoint file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:  # (a file that cannot be read says so itself, naming it)
        raise
    except Exception as exc:  # not a torch file, truncated, a pickle with code in it ...
        reason = f"{type(exc).__name__}: {exc}"
        raise ValueError(f"checkpoint {path!r} could not be read as a weights-only torch file ({reason})") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a training checkpoint of this package (format {CHECKPOINT_FORMAT!r})")
    bad = [f"{key} ({type(state.get(key)).__name__})" for key, kinds in _CHECKPOINT_ENTRIES.items()
           if not isinstance(state.get(key), kinds) or isinstance(state.get(key), bool)]
    if bad:
        raise ValueError(f"checkpoint {path!r} is damaged: its entries {bad} are missing or of the wrong type "
                         f"(expected {', '.join(f'{k}: ' + '/'.join(t.__name__ for t in v) for k, v in _CHECKPOINT_ENTRIES.items())})")
    return state


# ----------------------------------------------------------------------------- data
def build_datasets(cfg: TrainConfig) -> dict[str, Dataset]:
    """The datasets a config trains and validates on.

    Returns ``{'train': ..., 'val': ...}`` plus ``'train_hr'`` when ``cfg.train_hr``,
    ``'seg'`` when image segmentation data is given (COCO panoptic and / or an image and mask
    folder, concatenated as RVM's loader) and ``'seg_video'`` when YouTube-VIS is. Validation uses ``val_videomatte_dir``
    when given, otherwise held-out synthetic clips (another seed, no augmentation).
    """
    out: dict[str, Dataset] = {}
    backgrounds = None
    if cfg.dataset != "synthetic" or cfg.val_videomatte_dir:
        backgrounds = Backgrounds(cfg.background_image_dir, cfg.background_video_dir)

    def matting(size: int, seq_length: int) -> Dataset:
        if cfg.dataset == "synthetic":
            return SyntheticMatteDataset(cfg.synthetic_length, size, seq_length, seed=cfg.seed, augment=cfg.augment)
        if cfg.dataset == "videomatte":
            return VideoMatteDataset(cfg.videomatte_dir, backgrounds, size, seq_length, augment=cfg.augment, seed=cfg.seed)
        return ImageMatteDataset(cfg.imagematte_dir, backgrounds, size, seq_length, augment=cfg.augment, seed=cfg.seed)

    out["train"] = matting(cfg.size, cfg.seq_length)
    if cfg.train_hr:
        out["train_hr"] = matting(cfg.size_hr, cfg.seq_length_hr)
    images: list[Dataset] = []
    if cfg.seg_coco_image_dir:
        images.append(CocoPanopticDataset(
            cfg.seg_coco_image_dir, cfg.seg_coco_panoptic_dir, cfg.seg_coco_annotations, cfg.size, augment=cfg.augment,
            seed=cfg.seed + 1,  # (not the folder's seed: item i of each part draws other augmentations)
        ))
    if cfg.seg_image_dir:
        images.append(SegmentationDataset(cfg.seg_image_dir, cfg.seg_mask_dir, cfg.size, augment=cfg.augment, seed=cfg.seed))
    if images:
        out["seg"] = images[0] if len(images) == 1 else EpochConcatDataset(images)
    if cfg.seg_video_dir:
        out["seg_video"] = YouTubeVISDataset(
            cfg.seg_video_dir, cfg.seg_video_annotations, cfg.size, cfg.seq_length, augment=cfg.augment, seed=cfg.seed
        )
    val_size, val_t = cfg.val_size or cfg.size, cfg.val_seq_length or cfg.seq_length
    if cfg.val_videomatte_dir:
        out["val"] = VideoMatteDataset(cfg.val_videomatte_dir, backgrounds, val_size, val_t, augment=False, seed=cfg.seed)
    else:
        out["val"] = SyntheticMatteDataset(cfg.val_clips, val_size, val_t, seed=cfg.seed + _VAL_SEED_OFFSET)
    return out


# Settings that decide which batches a run sees and what a step does to the weights: a resume
# that changes one of them does not continue the saved run (bookkeeping such as max_steps,
# epochs, logging, validation or the output folder may change freely).
_RUN_DEFINING = (
    "dataset", "videomatte_dir", "imagematte_dir", "background_image_dir", "background_video_dir",
    "seg_image_dir", "seg_mask_dir", "seg_coco_image_dir", "seg_coco_panoptic_dir",
    "seg_coco_annotations", "seg_video_dir", "seg_video_annotations", "size", "seq_length", "batch_size", "train_hr", "size_hr",
    "seq_length_hr", "batch_size_hr", "downsample_ratio_hr", "synthetic_length", "augment", "random_crop", "refiner",
    "lr_backbone", "lr_aspp", "lr_decoder", "lr_refiner", "lr_schedule", "grad_clip", "seg_every",
    "coarse_weight", "seed",
)


# What a run-defining field added later amounts to in a checkpoint saved before it existed.
_BEFORE_FIELDS = {
    "random_crop": False,
    **dict.fromkeys(("seg_video_dir", "seg_video_annotations", "seg_coco_image_dir", "seg_coco_panoptic_dir",
                     "seg_coco_annotations")),
}


def _warn_on_changed_settings(saved: dict | None, cfg: TrainConfig, path: str) -> None:
    """Warn (once, naming each field) when a resume changes a setting that defines the run."""
    if not saved:
        return
    ours = cfg.to_dict()
    saved = {**_BEFORE_FIELDS, **saved}  # a checkpoint older than a field ran without it
    changed = [f"{k} {saved[k]!r} -> {ours[k]!r}" for k in _RUN_DEFINING if k in saved and saved[k] != ours[k]]
    if changed:
        warnings.warn(
            f"resume {path!r}: this run's settings differ from the checkpoint's ({'; '.join(changed)}); "
            "training goes on from its weights, but it is not the saved run continued",
            stacklevel=3,
        )


class _Stream:
    """Endless batches of one dataset, this process's shard, startable at any batch count.

    Epoch ``e`` is a ``DistributedSampler`` permutation seeded by ``(seed, e)``; batch
    number ``n`` is batch ``n % per_epoch`` of epoch ``n // per_epoch``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, info: distributed.DistInfo, seed: int, num_workers: int, name: str):
        self.dataset, self.batch_size, self.num_workers = dataset, batch_size, num_workers
        self.pin = info.device.type == "cuda"
        self.sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise ValueError(
                f"{name}: {len(dataset)} items cannot fill one batch of {batch_size} per process on {info.world_size} process(es)"
            )

    def batches(self, start: int) -> Iterator:
        count = start
        while True:
            epoch, offset = divmod(count, self.per_epoch)
            self.sampler.set_epoch(epoch)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            indices = list(self.sampler)[offset * self.batch_size : self.per_epoch * self.batch_size]
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, sampler=indices, num_workers=self.num_workers,
                pin_memory=self.pin, drop_last=True,
            )
            for batch in loader:
                yield batch
                count += 1


# ----------------------------------------------------------------------------- optimisation
_GROUPS = (("backbone", ("backbone.",)), ("aspp", ("aspp.",)), ("decoder", ("decoder.", "project_mat.", "project_seg.")), ("refiner", ("refiner.",)))


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Adam parameter groups with the config's learning rates per network part.

    Parts: backbone, aspp, decoder (with the ``project_mat`` / ``project_seg`` heads) and
    refiner. Parameters of a part whose learning rate is 0 are frozen
    (``requires_grad=False``) and left out; a parameter outside every part is an error.
    """
    lrs = {"backbone": cfg.lr_backbone, "aspp": cfg.lr_aspp, "decoder": cfg.lr_decoder, "refiner": cfg.lr_refiner}
    grouped: dict[str, list[nn.Parameter]] = {name: [] for name, _ in _GROUPS}
    for pname, p in model.named_parameters():
        part = next((name for name, prefixes in _GROUPS if pname.startswith(prefixes)), None)
        if part is None:
            raise ValueError(f"param_groups: parameter {pname!r} belongs to no part {[n for n, _ in _GROUPS]}")
        if lrs[part] > 0:
            grouped[part].append(p)
        else:
            p.requires_grad_(False)
    groups = [{"name": name, "params": ps, "lr": lrs[name]} for name, ps in grouped.items() if ps]
    if not groups:
        raise ValueError("param_groups: every learning rate is 0, nothing to train")
    return groups


# ----------------------------------------------------------------------------- validation
def _sync_buffers(model: nn.Module, info: distributed.DistInfo) -> None:
    # Without SyncBatchNorm each process keeps its own running statistics: use rank 0's.
    if info.distributed:
        for b in model.buffers():
            dist.broadcast(b, src=0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    downsample_ratio: float = 1.0,
    metrics: tuple[str, ...] = VAL_METRICS,
    info: distributed.DistInfo | None = None,
) -> dict[str, float]:
    """Held-out metrics of ``model`` (eval mode, recurrent over each whole clip).

    ``dataset`` items are ``(fgr, pha, bgr)`` clips; each is composited, run through the
    model in one call and scored with :func:`bimatting_triton.metrics.clip_metrics`
    (per-frame values averaged over the clip, then over clips: pha MAD/MSE x1e3, Grad,
    dtSSD x100, fgr MAD x1e3 where alpha > 0). Under DDP each process scores a share of
    the clips and the means are combined. The model is left in eval mode.
    """
    from ..metrics import clip_metrics

    info = info or distributed.DistInfo(device=torch.device(device))
    model.eval()
    sums = torch.zeros(len(metrics), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for i in range(info.rank, len(dataset), info.world_size):
        fgr, pha, bgr = dataset[i]
        src = composite(fgr, pha, bgr)[None].to(device)
        pred_fgr, pred_pha, *_ = model(src, downsample_ratio=downsample_ratio)
        values = clip_metrics(pred_pha[0, :, 0].float().cpu(), pha[:, 0], pred_fgr[0].float().cpu(), fgr, metrics=metrics)
        # Frames without foreground have no fgr error (NaN): average the others.
        sums += torch.stack([torch.nanmean(values[m]).nan_to_num(0.0) for m in metrics])
        count += 1
    if info.distributed:
        packed = torch.cat([sums, count[None]]).to(info.device if info.device.type == "cuda" else "cpu")
        dist.all_reduce(packed)
        sums, count = packed[:-1].cpu(), packed[-1].cpu()
    return {m: float(s / count.clamp_min(1)) for m, s in zip(metrics, sums)}


# ----------------------------------------------------------------------------- trainer
@dataclass
class TrainResult:
    """What a run did: final ``step``, the validation results by step, the checkpoint path."""

    step: int
    validations: dict[int, dict[str, float]] = field(default_factory=dict)
    checkpoint: str | None = None
    initial: dict[str, float] | None = None  # validation before the first step (val_at_start)
    final: dict[str, float] | None = None


class Trainer:
    """Trains a BiMatting (or any model with its forward contract) from a :class:`TrainConfig`.

    ``model``: defaults to ``BiMatting(refiner=cfg.refiner)``; weights from ``cfg.init``.
    Under torchrun the process group is joined here. Call :meth:`fit`.
    """

    def __init__(self, cfg: TrainConfig, model: nn.Module | None = None, log=print):
        missing = cfg.missing_data()  # a config built with require_data=False (to show it) cannot train
        if missing:
            raise ValueError(missing[0])
        self.cfg = cfg
        self.info = distributed.setup(cfg.device)
        self.device = self.info.device
        self._print = log
        if cfg.threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        # Same seed everywhere: identical initial weights on every process.
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % (1 << 32))
        random.seed(cfg.seed)
        if model is None:
            from ..model import BiMatting

            model = BiMatting(refiner=cfg.refiner)
        if cfg.init:
            self._load_init(model, cfg.init)
        self.model = model.to(self.device)
        # Freeze (lr 0) before DDP registers its gradient hooks; SyncBatchNorm conversion
        # keeps the same Parameter objects, so the groups stay valid.
        groups = param_groups(self.model, cfg)
        self.ddp = distributed.wrap_model(self.model, self.info)
        self.optimizer = torch.optim.Adam(groups, foreach=True)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.use_amp = bool(cfg.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.datasets = build_datasets(cfg)
        self.streams = {
            "train": _Stream(self.datasets["train"], cfg.batch_size, self.info, cfg.seed, cfg.num_workers, "train"),
        }
        if "train_hr" in self.datasets:
            self.streams["train_hr"] = _Stream(self.datasets["train_hr"], cfg.batch_size_hr, self.info, cfg.seed + 1, cfg.num_workers, "train_hr")
        if "seg" in self.datasets:
            # Image segmentation batches hold batch_size * seq_length single frames (RVM's loader).
            self.streams["seg"] = _Stream(
                self.datasets["seg"], cfg.batch_size * cfg.seq_length, self.info, cfg.seed + 2, cfg.num_workers, "seg"
            )
        if "seg_video" in self.datasets:
            # Video segmentation batches are clips like the matting batches (seed + 3 draws the crops).
            self.streams["seg_video"] = _Stream(
                self.datasets["seg_video"], cfg.batch_size, self.info, cfg.seed + 4, cfg.num_workers, "seg_video"
            )
        per_epoch = self.streams["train"].per_epoch
        self.total_steps = cfg.epochs * per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * per_epoch)
        self.step = 0
        self.result = TrainResult(step=0)
        self.checkpoint_path = os.path.join(cfg.out_dir, "last.pt")
        self.resumed_from: str | None = None
        resume = cfg.resume
        if resume == "auto":
            resume = self.checkpoint_path if os.path.isfile(self.checkpoint_path) else None
            if resume is None:
                self.log(f"resume auto: no checkpoint {self.checkpoint_path} yet, training starts from scratch")
        if resume:
            self._resume(resume)
        self.writer = self._tensorboard() if self.info.is_main else None

    # ---- setup helpers
    def _load_init(self, model: nn.Module, path: str) -> None:
        if hasattr(model, "load_checkpoint"):
            model.load_checkpoint(path)
        else:
            from ..checkpoint import load_into, read_state_dict

            load_into(model, read_state_dict(path), source=f"checkpoint {path!r}")
        self.log(f"initialised weights from {path}")

    def _resume(self, path: str) -> None:
        state = load_checkpoint(path, map_location="cpu")
        from ..checkpoint import load_into

        load_into(self.model, state["model"], source=f"checkpoint {path!r}")
        if state.get("optimizer") is not None:
            saved_groups = [g.get("name") for g in state["optimizer"]["param_groups"]]
            ours = [g.get("name") for g in self.optimizer.param_groups]
            if saved_groups != ours:
                raise ValueError(f"resume {path!r}: optimizer groups {saved_groups} differ from this config's {ours}")
            self.optimizer.load_state_dict(state["optimizer"])
        # A run saved without AMP (on a CPU, or amp=False) stores its disabled scaler as {},
        # which an enabled GradScaler refuses: keep this run's fresh scaler then.
        if state.get("scaler") and self.use_amp:
            self.scaler.load_state_dict(state["scaler"])
        _warn_on_changed_settings(state.get("config"), self.cfg, path)
        self.step = int(state["step"])
        _set_rng_state(state["rng"])
        self.resumed_from = path
        self.log(f"resumed from {path} at step {self.step}")

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(log_dir=os.path.join(self.cfg.out_dir, "tensorboard"))

    def log(self, message: str) -> None:
        """Print on the main process only."""
        if self.info.is_main:
            self._print(message)

    def _record(self, values: dict[str, float]) -> None:
        if not self.info.is_main:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, self.step)
        os.makedirs(self.cfg.out_dir, exist_ok=True)
        with open(os.path.join(self.cfg.out_dir, "log.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")

    # ---- steps
    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.float16, enabled=self.use_amp)

    def lr_factor(self, step: int) -> float:
        """Learning-rate multiplier at ``step``: 1, or a cosine from 1 down to 0 over the run."""
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(step, self.total_steps) / max(self.total_steps, 1)))
        return 1.0

    def _optimize(self, loss: Tensor) -> float | None:
        if not torch.isfinite(loss) and not self.use_amp:
            raise FloatingPointError(f"step {self.step}: the loss is {loss.item()} (try a lower learning rate or grad_clip)")
        factor = self.lr_factor(self.step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        norm = None
        if self.cfg.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        self.scaler.step(self.optimizer)  # skipped by the scaler if AMP found inf/NaN gradients
        self.scaler.update()
        return norm

    _CROP_STREAMS = {"lr": 0, "hr": 1, "seg": 2, "seg_video": 4}

    def _crop(self, tensors, tag: str) -> list[Tensor]:
        """``random_batch_crop`` when ``cfg.random_crop``, drawn from (seed, step, pass): a resumed
        run crops its batches as the uninterrupted run would have."""
        tensors = list(tensors)
        if not self.cfg.random_crop:
            return tensors
        g = item_generator(self.cfg.seed + 3, self.step, self._CROP_STREAMS.get(tag, 3))
        return random_batch_crop(tensors, g)

    def matting_step(self, batch, downsample_ratio: float, tag: str) -> dict[str, float]:
        """One forward/backward/update on a ``(fgr, pha, bgr)`` batch (B, T, C, S, S)."""
        fgr, pha, bgr = self._crop((x.to(self.device, non_blocking=True) for x in batch), tag)
        src = composite(fgr, pha, bgr)
        with self._autocast():
            pred_fgr, pred_pha, *_rec, fgr_s, pha_s = self.ddp(src, downsample_ratio=downsample_ratio, return_coarse=True)
        terms = matting_loss(pred_fgr.float(), pred_pha.float(), fgr, pha)
        loss = terms.pop("total")
        if self.cfg.coarse_weight > 0:
            coarse = coarse_matting_loss(fgr_s.float(), pha_s.float(), fgr, pha, weight=self.cfg.coarse_weight)
            loss = loss + coarse.pop("coarse_total")
            terms.update(coarse)
        norm = self._optimize(loss)
        out = {f"{tag}/{k}": float(v) for k, v in terms.items()}
        out[f"{tag}/loss"] = float(loss.detach())
        if norm is not None:
            out[f"{tag}/grad_norm"] = norm
        return out

    def _segmentation_streams(self) -> list[str]:
        return [k for k in ("seg_video", "seg") if k in self.streams]

    def segmentation_kind(self, n: int) -> str | None:
        """The stream of segmentation pass ``n`` (0, 1, ...): with both kinds of data, video clips
        (``'seg_video'``) for even ``n`` and images (``'seg'``) for odd ``n``, as RVM's and
        BiMatting's ``train.py``; the one kind given otherwise; None without segmentation data."""
        kinds = self._segmentation_streams()
        return kinds[n % len(kinds)] if kinds else None

    def segmentation_passes_before(self, step: int) -> dict[str, int]:
        """Batches each segmentation stream has given before ``step`` (passes at steps 0, k, 2k, ...)."""
        passes = -(-step // self.cfg.seg_every) if self.cfg.seg_every else 0
        kinds = self._segmentation_streams()
        return {kind: (passes - i + len(kinds) - 1) // len(kinds) for i, kind in enumerate(kinds)}

    def segmentation_step(self, img: Tensor, seg: Tensor, tag: str = "seg") -> dict[str, float]:
        """One forward/backward/update of a segmentation pass: ``img`` (B, T, 3, S, S), ``seg`` (B, T, 1, S, S)."""
        img, seg = self._crop((img.to(self.device, non_blocking=True), seg.to(self.device, non_blocking=True)), tag)
        with self._autocast():
            pred_seg, *_rec = self.ddp(img, segmentation_pass=True)
        terms = segmentation_loss(pred_seg.float(), seg)
        loss = terms.pop("total")
        self._optimize(loss)
        return {f"{tag}/{k}": float(v) for k, v in terms.items()}

    def validate(self) -> dict[str, float]:
        """Held-out metrics now (see :func:`evaluate`); the model returns to train mode."""
        _sync_buffers(self.model, self.info)
        values = evaluate(self.model, self.datasets["val"], self.device, info=self.info)
        self.model.train()
        self.result.validations[self.step] = values
        self._record({f"val/{k}": v for k, v in values.items()})
        self.log(f"step {self.step}: validation " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
        return values

    def save(self) -> str:
        """Checkpoint to ``out_dir/last.pt`` (main process only); returns the path."""
        if self.info.is_main:
            save_checkpoint(self.checkpoint_path, self.model, self.optimizer, self.scaler, self.step, self.cfg)
        distributed.barrier(self.info)
        self.result.checkpoint = self.checkpoint_path
        return self.checkpoint_path

    # ---- the loop
    def fit(self) -> TrainResult:
        """Train until ``total_steps``; validate and checkpoint periodically and at the end.

        A resumed checkpoint already at (or past) ``total_steps`` is left as it is: nothing
        is trained, validated or saved, and the result points at that checkpoint.
        """
        cfg = self.cfg
        if self.resumed_from is not None and self.step >= self.total_steps:
            self.log(
                f"nothing to train: checkpoint {self.resumed_from} is at step {self.step}, and this run stops at "
                f"step {self.total_steps} (max_steps {cfg.max_steps}, epochs {cfg.epochs}); no validation or "
                "checkpoint is written; raise --max-steps or --epochs to train on"
            )
            self.result.step, self.result.checkpoint = self.step, self.resumed_from
            if self.writer is not None:
                self.writer.close()
            return self.result
        self.model.train()
        self.log(
            f"training {type(self.model).__name__} with config {cfg.name!r} on {self.device} x{self.info.world_size} "
            f"({'AMP' if self.use_amp else 'fp32'}): steps {self.step} -> {self.total_steps}, "
            f"{cfg.batch_size} x T={cfg.seq_length} x {cfg.size}px per process"
        )
        if cfg.val_at_start and self.step == 0:
            self.result.initial = self.validate()
        # Batches already consumed: one per step, and one per segmentation pass of its kind.
        done = {"train": self.step, "train_hr": self.step, **self.segmentation_passes_before(self.step)}
        streams = {name: s.batches(done[name]) for name, s in self.streams.items()}
        running: dict[str, list[float]] = {}  # name -> [sum, count] since the last log line
        n_running, t0 = 0, time.perf_counter()
        while self.step < self.total_steps:
            batch = next(streams["train"])
            values = self.matting_step(batch, 1.0, "lr")
            if "train_hr" in streams:
                values.update(self.matting_step(next(streams["train_hr"]), cfg.downsample_ratio_hr, "hr"))
            if cfg.seg_every and self.step % cfg.seg_every == 0:
                kind = self.segmentation_kind(self.step // cfg.seg_every)
                if kind is not None:
                    img, seg = next(streams[kind])
                else:  # no segmentation data: the matting clip, target alpha >= 0.5
                    fgr, pha, bgr = batch
                    img, seg = composite(fgr, pha, bgr), (pha >= 0.5).float()
                values.update(self.segmentation_step(img, seg, kind or "seg"))
            self.step += 1
            for k, v in values.items():
                acc = running.setdefault(k, [0.0, 0])
                acc[0] += v
                acc[1] += 1
            n_running += 1
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                means = {k: total / count for k, (total, count) in running.items()}
                rate = n_running / max(time.perf_counter() - t0, 1e-9)
                self._record(means)
                shown = ", ".join(f"{k} {v:.4f}" for k, v in means.items() if k.endswith(("loss", "seg_bce", "pha_l1")))
                self.log(f"step {self.step}/{self.total_steps} | {shown} | {rate:.2f} steps/s")
                running, n_running, t0 = {}, 0, time.perf_counter()
            if cfg.val_every and self.step % cfg.val_every == 0 and self.step < self.total_steps:
                self.validate()
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                self.save()
        self.result.final = self.validate()
        self.save()
        self.result.step = self.step
        if self.result.initial is not None:
            before, after = self.result.initial["pha_mad"], self.result.final["pha_mad"]
            start = "initial" if cfg.init else "untrained"
            self.log(f"held-out alpha MAD (x1e3): {start} {before:.1f} -> trained {after:.1f} after {self.step} steps")
        if self.writer is not None:
            self.writer.close()
        return self.result


def train(config: TrainConfig | str, model: nn.Module | None = None, **overrides) -> TrainResult:
    """Run one training stage: ``train('demo')``, ``train('stage1', videomatte_dir=..., ...)``
    or ``train(TrainConfig(...))``. Returns the :class:`TrainResult`; the checkpoint is
    ``<out_dir>/last.pt``.
    """
    cfg = get_config(config, **overrides) if isinstance(config, str) else (config.replace(**overrides) if overrides else config)
    try:
        return Trainer(cfg, model=model).fit()
    finally:
        distributed.cleanup()  # also when the setup fails after joining the process group
