"""Person masks from COCO panoptic segmentation: the recipe's image segmentation data.

Robust Video Matting and BiMatting train their image segmentation passes on COCO panoptic
(with Supervisely Person, which :class:`~bimatting_triton.train.data.SegmentationDataset`
reads as an image folder and a mask folder). This module reads COCO panoptic as
distributed, without exporting masks first:

* ``image_dir``: the images (``train2017/``);
* ``panoptic_dir``: the panoptic PNGs (``annotations/panoptic_train2017/``), whose pixels
  hold segment ids as ``R + 256 * G + 256**2 * B``;
* ``annotations``: the JSON file (``annotations/panoptic_train2017.json``): ``images``
  (``id``, ``file_name``), ``annotations`` (``image_id``, ``file_name`` of the PNG,
  ``segments_info``: ``id`` and ``category_id`` of each segment) and ``categories``.

As RVM's loader: the images with a ``person`` segment, and as target the union of the
segments of ``person``, ``backpack`` and ``tie`` (what a person carries or wears).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .data import MattingAugmentation, _EpochDataset, _to_tensor, read_annotations, read_image

__all__ = ["panoptic_segment_ids", "CocoPanopticDataset"]


def panoptic_segment_ids(rgb: np.ndarray) -> np.ndarray:
    """The segment id of each pixel of a panoptic PNG: uint8 (H, W, 3) -> int64 (H, W)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb: expected a (H, W, 3) panoptic image, got shape {tuple(rgb.shape)}")
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


class CocoPanopticDataset(_EpochDataset):
    """COCO panoptic images with a person, and the mask of ``categories`` in them.

    Items are ``(img, seg)``: float32 (1, 3, size, size) in [0, 1] and (1, 1, size, size) in
    {0, 1} (clips of T = 1, as :class:`~bimatting_triton.train.data.SegmentationDataset`,
    with the same augmentation).
    """

    def __init__(
        self,
        image_dir: str,
        panoptic_dir: str,
        annotations: str,
        size: int,
        augment: bool = True,
        seed: int = 0,
        required: str = "person",
        categories: Sequence[str] = ("person", "backpack", "tie"),
    ):
        self.image_dir, self.panoptic_dir, self.size, self.seed = image_dir, panoptic_dir, size, seed
        self.augmentation = MattingAugmentation(size, enabled=augment, p_motion=0.0)
        for name, folder in (("image_dir", image_dir), ("panoptic_dir", panoptic_dir)):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"CocoPanopticDataset: {name} {folder!r} is not a folder")
        data = read_annotations(annotations, "CocoPanopticDataset", ("images", "annotations", "categories"), "COCO panoptic")
        ids = {str(c.get("name", "")).lower(): c["id"] for c in data["categories"]}
        absent = [name for name in (required, *categories) if name.lower() not in ids]
        if absent:
            raise ValueError(f"CocoPanopticDataset: no category named {absent} in {annotations!r}")
        required_id = ids[required.lower()]
        wanted = {ids[name.lower()] for name in categories}
        images = {image["id"]: image["file_name"] for image in data["images"]}
        # (image file, panoptic PNG file, ids of the wanted segments) per image with a person.
        self.items: list[tuple[str, str, list[int]]] = []
        for ann in data["annotations"]:
            segments = ann.get("segments_info", [])
            if not any(s.get("category_id") == required_id for s in segments):
                continue
            image = images.get(ann.get("image_id"))
            if image is None:
                raise ValueError(f"CocoPanopticDataset: annotation {ann.get('file_name')!r} names image_id "
                                 f"{ann.get('image_id')!r}, which {annotations!r} does not list")
            self.items.append((image, ann["file_name"], [s["id"] for s in segments if s.get("category_id") in wanted]))
        if not self.items:
            raise ValueError(f"CocoPanopticDataset: no image in {annotations!r} has a {required!r} segment")
        absent = [
            path for image, png, _ in self.items
            for path in (os.path.join(image_dir, image), os.path.join(panoptic_dir, png)) if not os.path.isfile(path)
        ]
        if absent:
            raise FileNotFoundError(f"CocoPanopticDataset: {len(absent)} file(s) named in {annotations!r} do not exist, e.g. {absent[:3]}")

    def __len__(self) -> int:
        return len(self.items)

    def mask(self, index: int) -> np.ndarray:
        """uint8 (H, W): 255 where a pixel belongs to a wanted segment of item ``index``, else 0."""
        _, png, segment_ids = self.items[index]
        segments = panoptic_segment_ids(read_image(os.path.join(self.panoptic_dir, png)))
        return np.isin(segments, segment_ids).astype(np.uint8) * 255

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        g = self.generator(index)
        image, png, _ = self.items[index]
        rgb, mask = read_image(os.path.join(self.image_dir, image)), self.mask(index)
        if rgb.shape[:2] != mask.shape:
            raise ValueError(f"CocoPanopticDataset: {png!r} is {mask.shape[::-1]} (W, H), its image {image!r} {rgb.shape[1::-1]}")
        img, seg = self.augmentation.foreground(_to_tensor([rgb]), _to_tensor([mask]), g)
        return img, (seg > 0.5).float()
