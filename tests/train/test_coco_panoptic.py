"""COCO panoptic person masks: segment ids from PNG colours, the dataset, and its errors."""
import json
import os
import pickle

import numpy as np
import pytest

from bimatting_triton.train.coco_panoptic import CocoPanopticDataset, panoptic_segment_ids
from bimatting_triton.train.config import get_config
from bimatting_triton.train.data import EpochConcatDataset, SegmentationDataset, write_image
from bimatting_triton.train.loop import build_datasets
from segmentation_data import CATEGORIES, colour, make_coco, rows_mask, write_json
from segmentation_data import COCO_SIDE as SIDE


def test_panoptic_segment_ids_read_all_three_channels():
    rgb = np.array([[colour(0), colour(255), colour(256), colour(2 + 256 * 3 + 65536 * 2)]], np.uint8)
    assert panoptic_segment_ids(rgb).tolist() == [[0, 255, 256, 2 + 256 * 3 + 65536 * 2]]
    with pytest.raises(ValueError, match=r"rgb: expected a \(H, W, 3\) panoptic image"):
        panoptic_segment_ids(np.zeros((4, 4), np.uint8))


def test_images_with_a_person_and_their_person_backpack_tie_masks(tmp_path):
    ds = CocoPanopticDataset(*make_coco(tmp_path), size=SIDE, augment=False)
    assert [image for image, _, _ in ds.items] == ["000000000000.png", "000000000002.png"]  # not the dog's image
    assert np.array_equal(ds.mask(0), rows_mask(slice(0, 4), slice(4, 6)))  # person + backpack, not the tree
    assert np.array_equal(ds.mask(1), rows_mask(slice(2, 5), slice(5, 6)))  # person + tie, not the dog
    img, seg = ds[1]
    assert img.shape == (1, 3, SIDE, SIDE) and seg.shape == (1, 1, SIDE, SIDE)
    assert round(float(img.mean()) * 255) == 90  # image 2's pixels
    assert np.array_equal(seg[0, 0].numpy() * 255, rows_mask(slice(2, 5), slice(5, 6)))
    again = pickle.loads(pickle.dumps(ds))  # (spawned loader workers receive it pickled)
    assert all(np.array_equal(a, b) for a, b in zip(ds[1], again[1]))


def test_augmented_items_and_concatenation_with_a_mask_folder(tmp_path):
    ds = CocoPanopticDataset(*make_coco(tmp_path), size=8, augment=True, seed=3)
    img, seg = ds[0]
    assert img.shape == (1, 3, 8, 8) and set(np.unique(seg.numpy())) <= {0.0, 1.0}
    for sub in ("img", "mask"):
        os.makedirs(tmp_path / sub)
    write_image(str(tmp_path / "img" / "a.png"), np.zeros((SIDE, SIDE, 3), np.uint8))
    write_image(str(tmp_path / "mask" / "a.png"), rows_mask(slice(0, 3)))
    both = EpochConcatDataset([ds, SegmentationDataset(str(tmp_path / "img"), str(tmp_path / "mask"), 8)])
    assert len(both) == 3
    both.set_epoch(4)
    assert all(part.epoch == 4 for part in both.datasets)


def test_training_concatenates_coco_and_a_mask_folder(tmp_path):
    images, pngs, annotations = make_coco(tmp_path)
    for sub in ("img", "mask"):
        os.makedirs(tmp_path / sub)
    for name in ("a", "b", "c"):
        write_image(str(tmp_path / "img" / f"{name}.png"), np.zeros((SIDE, SIDE, 3), np.uint8))
        write_image(str(tmp_path / "mask" / f"{name}.png"), rows_mask(slice(0, 3)))
    coco = dict(seg_coco_image_dir=images, seg_coco_panoptic_dir=pngs, seg_coco_annotations=annotations)
    folder = dict(seg_image_dir=str(tmp_path / "img"), seg_mask_dir=str(tmp_path / "mask"))
    seg = build_datasets(get_config("tiny", **coco, **folder))["seg"]
    assert isinstance(seg, EpochConcatDataset) and len(seg) == 2 + 3
    assert isinstance(build_datasets(get_config("tiny", **coco))["seg"], CocoPanopticDataset)


def test_errors_name_the_problem(tmp_path):
    images, pngs, annotations = make_coco(tmp_path)
    data = json.loads(open(annotations).read())

    def write(changed) -> str:
        return write_json(tmp_path / "changed.json", changed)

    with pytest.raises(FileNotFoundError, match="panoptic_dir .* is not a folder"):
        CocoPanopticDataset(images, str(tmp_path / "nope"), annotations, 8)
    with pytest.raises(FileNotFoundError, match="annotations .* does not exist"):
        CocoPanopticDataset(images, pngs, str(tmp_path / "nope.json"), 8)
    with pytest.raises(ValueError, match=r"lacks \['images'\]"):
        CocoPanopticDataset(images, pngs, write({k: v for k, v in data.items() if k != "images"}), 8)
    with pytest.raises(ValueError, match=r"no category named \['tie'\]"):
        CocoPanopticDataset(images, pngs, write({**data, "categories": [c for c in CATEGORIES if c["name"] != "tie"]}), 8)
    with pytest.raises(ValueError, match="no image .* has a 'person' segment"):
        CocoPanopticDataset(images, pngs, write({**data, "annotations": data["annotations"][1:2]}), 8)
    with pytest.raises(ValueError, match="names image_id 102"):
        CocoPanopticDataset(images, pngs, write({**data, "images": data["images"][:2]}), 8)
    write_image(os.path.join(pngs, "000000000000.png"), np.zeros((SIDE, SIDE + 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"'000000000000.png' is \(14, 12\) \(W, H\), its image .* \(12, 12\)"):
        CocoPanopticDataset(images, pngs, annotations, 8)[0]
    os.remove(os.path.join(pngs, "000000000002.png"))
    with pytest.raises(FileNotFoundError, match=r"1 file\(s\) .* e.g. \[.*panoptic/000000000002.png'\]"):
        CocoPanopticDataset(images, pngs, annotations, 8)
