"""A tiny YouTube-VIS tree (frames and instances.json) and COCO run-length encoders, for tests."""
import json
import os

import numpy as np

from bimatting_triton.train.data import write_image


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
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return str(images), str(path)
