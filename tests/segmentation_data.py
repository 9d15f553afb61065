"""Tiny segmentation datasets in their public layouts, for tests: YouTube-VIS (frames,
instances.json, COCO run-length encoders) and COCO panoptic (images, PNGs, JSON)."""
import json
import os

import numpy as np

from bimatting_triton.train.data import write_image


def write_json(path, data) -> str:
    """``data`` as JSON at ``path``; returns the path as a str."""
    path.write_text(json.dumps(data))
    return str(path)


def runs_of(mask: np.ndarray) -> list[int]:
    """Column-major run lengths of a 0/1 mask, starting with a (possibly empty) run of 0s."""
    flat = mask.T.reshape(-1).astype(np.int64)
    edges = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], edges, [flat.size]])
    lengths = np.diff(bounds).tolist()
    return ([0] + lengths) if flat.size and flat[0] == 1 else lengths


def compress(counts: list[int]) -> str:
    """COCO's string form of run lengths (5-bit groups, differences after the second count)."""
    out = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            group = x & 0x1F
            x >>= 5
            more = x != -1 if group & 0x10 else x != 0
            out.append(chr(48 + (group | (0x20 if more else 0))))
    return "".join(out)


def rle(mask: np.ndarray, compressed: bool = False) -> dict:
    counts = runs_of(mask)
    return {"size": list(mask.shape), "counts": compress(counts) if compressed else counts}


SIDE = 16


def frame_mask(video: int, frame: int, instance: int) -> np.ndarray:
    """A distinct mask per (video, frame, instance): a band whose place encodes them."""
    mask = np.zeros((SIDE, SIDE), np.uint8)
    mask[frame % SIDE, :] = 1 if instance == 0 else 0
    mask[:, (3 * frame + 5 * video) % SIDE] = 1 if instance == 1 else 0
    return mask


def make_youtubevis(root, frames=(6, 4, 3), person_id=26) -> tuple[str, str]:
    """Videos 0 and 1 with persons (video 1: two instances, compressed RLE, a frame without a
    mask), video 2 with only a dog. Each frame is a flat grey whose level encodes (video, frame)."""
    images = root / "JPEGImages"
    videos, annotations = [], []
    for v, count in enumerate(frames):
        names = []
        for f in range(count):
            name = f"vid{v}/{f * 5:05d}.png"
            os.makedirs(images / f"vid{v}", exist_ok=True)
            write_image(str(images / name), np.full((SIDE, SIDE, 3), 10 * (v * 10 + f), np.uint8))
            names.append(name)
        videos.append({"id": 100 + v, "file_names": names, "height": SIDE, "width": SIDE, "length": count})
    annotations.append({"video_id": 100, "category_id": person_id,
                        "segmentations": [rle(frame_mask(0, f, 0)) for f in range(frames[0])]})
    for instance in (0, 1):
        segs = [rle(frame_mask(1, f, instance), compressed=True) for f in range(frames[1])]
        segs[2] = None  # this instance is not annotated in frame 2
        annotations.append({"video_id": 101, "category_id": person_id, "segmentations": segs})
    annotations.append({"video_id": 102, "category_id": 7, "segmentations": [rle(frame_mask(2, f, 0)) for f in range(frames[2])]})
    data = {
        "videos": videos,
        "annotations": annotations,
        "categories": [{"id": person_id, "name": "person"}, {"id": 7, "name": "dog"}],
    }
    return str(images), write_json(root / "instances.json", data)


# ---------------------------------------------------------------- COCO panoptic
COCO_SIDE = 12
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 27, "name": "backpack"}, {"id": 32, "name": "tie"},
              {"id": 18, "name": "dog"}, {"id": 184, "name": "tree-merged"}]


def colour(segment_id: int) -> tuple[int, int, int]:
    return segment_id % 256, segment_id // 256 % 256, segment_id // 65536


def make_coco(root) -> tuple[str, str, str]:
    """Three images: 0 with a person, a backpack and a tree; 1 with only a dog; 2 with a person
    whose id needs all three colour channels and a tie. Image pixels encode their image number."""
    images, pngs = root / "train2017", root / "panoptic"
    os.makedirs(images)
    os.makedirs(pngs)
    layouts = {  # image -> [(segment id, category id, rows)]
        0: [(5, 1, slice(0, 4)), (6, 27, slice(4, 6)), (7, 184, slice(6, COCO_SIDE))],
        1: [(9, 18, slice(0, COCO_SIDE))],
        2: [(2 + 256 * 3 + 65536 * 2, 1, slice(2, 5)), (40, 32, slice(5, 6)), (41, 18, slice(6, 9))],
    }
    data = {"images": [], "annotations": [], "categories": CATEGORIES}
    for n, segments in layouts.items():
        write_image(str(images / f"{n:012d}.png"), np.full((COCO_SIDE, COCO_SIDE, 3), 40 * n + 10, np.uint8))
        panoptic = np.zeros((COCO_SIDE, COCO_SIDE, 3), np.uint8)  # id 0: unlabelled
        for segment_id, _, rows in segments:
            panoptic[rows] = colour(segment_id)
        write_image(str(pngs / f"{n:012d}.png"), panoptic)
        data["images"].append({"id": 100 + n, "file_name": f"{n:012d}.png"})
        data["annotations"].append({"image_id": 100 + n, "file_name": f"{n:012d}.png",
                                    "segments_info": [{"id": s, "category_id": c} for s, c, _ in segments]})
    return str(images), str(pngs), write_json(root / "panoptic.json", data)


def rows_mask(*row_slices) -> np.ndarray:
    mask = np.zeros((COCO_SIDE, COCO_SIDE), np.uint8)
    for rows in row_slices:
        mask[rows] = 255
    return mask
