"""YouTube-VIS video segmentation clips: run-length masks, the dataset, and its errors."""
import json
import os
import pickle

import numpy as np
import pytest

from bimatting_triton.train.youtubevis import YouTubeVISDataset, decode_rle
from segmentation_data import SIDE, frame_mask, make_youtubevis, rle, runs_of, write_json


def test_decode_rle_hand_examples():
    # 2x3 mask, column-major: column 0 = (0, 1), column 1 = (1, 1), column 2 = (0, 0).
    expected = np.array([[0, 1, 0], [1, 1, 0]], dtype=np.uint8)
    assert np.array_equal(decode_rle({"size": [2, 3], "counts": [1, 3, 2]}), expected)
    # "0:2I": counts 0, 10, 2 and then 'I' = -7 relative to the count two before (10): 3.
    mask = decode_rle({"size": [3, 5], "counts": "0:2I"})
    assert runs_of(mask) == [0, 10, 2, 3] and mask.dtype == np.uint8
    assert np.array_equal(decode_rle({"size": [3, 5], "counts": b"0:2I"}), mask)
    # Strings written by pycocotools' encoder (not this project's): the differences start at
    # the fourth count, '4' in '254O' is a count and 'O' (-1) the difference to 5.
    assert runs_of(decode_rle({"size": [3, 5], "counts": "254O"})) == [2, 5, 4, 4]
    assert runs_of(decode_rle({"size": [4, 19], "counts": "3X11jNm0"})) == [3, 40, 1, 2, 30]


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (33, 64), (120, 90)])
@pytest.mark.parametrize("compressed", [False, True])
def test_decode_rle_round_trips_random_and_extreme_masks(shape, compressed):
    rng = np.random.default_rng(sum(shape))
    masks = [
        np.zeros(shape, np.uint8),
        np.ones(shape, np.uint8),
        (rng.random(shape) > 0.5).astype(np.uint8),
        (rng.random(shape) > 0.97).astype(np.uint8),  # long runs: counts of several 5-bit groups
    ]
    for mask in masks:
        assert np.array_equal(decode_rle(rle(mask, compressed)), mask)


def test_decode_rle_errors():
    with pytest.raises(ValueError, match="do not cover the 2x2 mask"):
        decode_rle({"size": [2, 2], "counts": [1, 2]})
    with pytest.raises(ValueError, match="non-negative"):
        decode_rle({"size": [2, 2], "counts": [5, -1]})
    with pytest.raises(ValueError, match="a list of polygons"):
        decode_rle([[0, 0, 1, 0, 1, 1]])
    with pytest.raises(ValueError, match="end inside a number"):
        decode_rle({"size": [2, 2], "counts": "0" + chr(48 + 0x21)})
    with pytest.raises(ValueError, match=r"'size' must be \[H, W\], got \[2\]"):
        decode_rle({"size": [2], "counts": [2]})
    for counts in ([1.5, 2.5], [2**70], "o" * 20 + "0", [[1, 3]]):  # floats, too large, garbled, nested
        with pytest.raises(ValueError, match="'counts' must be a list of integers or a compressed string"):
            decode_rle({"size": [2, 2], "counts": counts})
    with pytest.raises(ValueError, match=r"\(sum 0\) do not cover the 2x2 mask"):
        decode_rle({"size": [2, 2], "counts": []})
    assert decode_rle({"size": [0, 5], "counts": []}).shape == (0, 5)


def expected_target(video: int, frame: int) -> np.ndarray:
    if video == 0:
        return frame_mask(0, frame, 0)
    masks = [frame_mask(1, frame, i) for i in (0, 1) if frame != 2]
    return np.bitwise_or.reduce(masks) if masks else np.zeros((SIDE, SIDE), np.uint8)


def test_items_are_consecutive_frames_with_the_union_of_person_masks(tmp_path):
    frames_dir, annotations = make_youtubevis(tmp_path)
    ds = YouTubeVISDataset(frames_dir, annotations, size=SIDE, seq_length=5, augment=False)
    assert len(ds) == 6 + 4  # one item per annotated frame of the videos with a person (not the dog's)
    for index in range(len(ds)):
        img, seg = ds[index]
        assert img.shape == (5, 3, SIDE, SIDE) and seg.shape == (5, 1, SIDE, SIDE)
        levels = [round(float(x.mean()) * 255 / 10) for x in img]  # 10 * video + frame
        video, start = ds.index[index]
        assert 10 * video + start in (levels[0], levels[-1])  # the item's frame starts it (or ends it, reversed)
        picked = [level - 10 * video for level in levels]
        assert all(abs(a - b) <= 1 for a, b in zip(picked, picked[1:]))  # speed 1 (pauses, bounces)
        for t, f in enumerate(picked):
            assert np.array_equal(seg[t, 0].numpy().astype(np.uint8), expected_target(video, f)), (index, t, f)
    again = ds[3]
    assert all(np.array_equal(a, b) for a, b in zip(again, ds[3]))


def test_masks_are_held_compactly_and_the_dataset_pickles(tmp_path):
    # Uncompressed counts become int32 arrays (memory; forked workers' copy-on-write); the
    # dataset goes to spawned loader workers by pickle.
    frames_dir, annotations = make_youtubevis(tmp_path)
    ds = YouTubeVISDataset(frames_dir, annotations, size=SIDE, seq_length=3, augment=False)
    stored = [rle["counts"] for frames in ds.masks.values() for masks in frames for rle in masks]
    assert {type(c) for c in stored} == {np.ndarray, str} and all(c.dtype == np.int32 for c in stored if type(c) is np.ndarray)
    again = pickle.loads(pickle.dumps(ds))
    assert all(np.array_equal(a, b) for a, b in zip(ds[4], again[4]))


def test_augmented_items_keep_image_and_mask_together(tmp_path):
    frames_dir, annotations = make_youtubevis(tmp_path)
    ds = YouTubeVISDataset(frames_dir, annotations, size=12, seq_length=3, augment=True, seed=5)
    img, seg = ds[0]
    assert img.shape == (3, 3, 12, 12) and seg.shape == (3, 1, 12, 12)
    assert set(np.unique(seg.numpy())) <= {0.0, 1.0} and 0 <= float(img.min()) and float(img.max()) <= 1
    ds.set_epoch(1)
    assert not all(np.array_equal(a, b) for a, b in zip(img, ds[0][0]))


def test_category_is_found_by_name(tmp_path):
    # Category ids differ between releases: the person category is looked up by its name.
    frames_dir, annotations = make_youtubevis(tmp_path, person_id=1)
    assert len(YouTubeVISDataset(frames_dir, annotations, size=SIDE, seq_length=2)) == 10
    assert len(YouTubeVISDataset(frames_dir, annotations, size=SIDE, seq_length=2, category="Dog")) == 3


def test_errors_name_the_problem(tmp_path):
    frames_dir, annotations = make_youtubevis(tmp_path)
    data = json.loads(open(annotations).read())

    def write(changed) -> str:
        return write_json(tmp_path / "changed.json", changed)

    with pytest.raises(FileNotFoundError, match="frames_dir .* is not a folder"):
        YouTubeVISDataset(str(tmp_path / "nope"), annotations, 8, 2)
    with pytest.raises(FileNotFoundError, match="annotations .* does not exist"):
        YouTubeVISDataset(frames_dir, str(tmp_path / "nope.json"), 8, 2)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a JSON file"):
        YouTubeVISDataset(frames_dir, str(tmp_path / "bad.json"), 8, 2)
    with pytest.raises(ValueError, match=r"lacks \['categories'\]"):
        YouTubeVISDataset(frames_dir, write({k: v for k, v in data.items() if k != "categories"}), 8, 2)
    with pytest.raises(ValueError, match="no category named 'cat'"):
        YouTubeVISDataset(frames_dir, annotations, 8, 2, category="cat")
    short = json.loads(json.dumps(data))
    short["annotations"][0]["segmentations"].pop()
    with pytest.raises(ValueError, match="video 100 has 6 file names but an annotation with 5 segmentations"):
        YouTubeVISDataset(frames_dir, write(short), 8, 2)
    no_person = {**data, "annotations": [a for a in data["annotations"] if a["category_id"] != 26]}
    with pytest.raises(ValueError, match="no video .* has a 'person' instance"):
        YouTubeVISDataset(frames_dir, write(no_person), 8, 2)
    os.remove(os.path.join(frames_dir, "vid1", "00010.png"))
    with pytest.raises(FileNotFoundError, match=r"1 frame\(s\) .* e.g. \['vid1/00010.png'\]"):
        YouTubeVISDataset(frames_dir, annotations, 8, 2)


def test_a_mask_of_another_size_than_its_frame_is_an_error(tmp_path):
    frames_dir, annotations = make_youtubevis(tmp_path)
    data = json.loads(open(annotations).read())
    data["annotations"][0]["segmentations"][0] = rle(np.zeros((SIDE, SIDE + 1), np.uint8))
    (tmp_path / "instances.json").write_text(json.dumps(data))
    ds = YouTubeVISDataset(frames_dir, annotations, SIDE, 1, augment=False)
    with pytest.raises(ValueError, match=r"a mask of .*00000.png' is \(17, 16\) \(W, H\), the frame \(16, 16\)"):
        ds[0]
