"""Training BiMatting with straight-through estimators: datasets, losses, the four-stage recipe.

>>> from bimatting_triton.train import train
>>> result = train("demo")                 # procedural data, a few minutes on a CPU
>>> result = train("stage1", videomatte_dir="VideoMatte240K_JPEG_SD/train",
...                background_image_dir="Backgrounds/train")

or ``python -m bimatting_triton.train --config demo`` (``torchrun --nproc_per_node=N -m
bimatting_triton.train ...`` for DDP). Checkpoints (``<out_dir>/last.pt``) load with
``BiMatting.from_pretrained``.
"""
from .coco_panoptic import CocoPanopticDataset
from .config import CONFIGS, TrainConfig, config_names, get_config
from .data import (
    Backgrounds,
    ImageMatteDataset,
    MattingAugmentation,
    SegmentationDataset,
    VideoMatteDataset,
    composite,
    sample_frame_indices,
)
from .losses import coarse_matting_loss, laplacian_loss, matting_loss, segmentation_loss, temporal_coherence_loss
from .loop import Trainer, TrainResult, evaluate, load_checkpoint, save_checkpoint, train
from .synthetic import SyntheticMatteDataset, render_clip
from .youtubevis import YouTubeVISDataset, decode_rle

__all__ = [
    "CONFIGS",
    "TrainConfig",
    "config_names",
    "get_config",
    "Backgrounds",
    "ImageMatteDataset",
    "MattingAugmentation",
    "SegmentationDataset",
    "VideoMatteDataset",
    "SyntheticMatteDataset",
    "YouTubeVISDataset",
    "CocoPanopticDataset",
    "decode_rle",
    "composite",
    "render_clip",
    "sample_frame_indices",
    "coarse_matting_loss",
    "laplacian_loss",
    "matting_loss",
    "segmentation_loss",
    "temporal_coherence_loss",
    "Trainer",
    "TrainResult",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "train",
]
