"""Tiny matting datasets in their public layouts (VideoMatte240K, ImageMatte, backgrounds), for tests."""
import os

import numpy as np

from bimatting_triton.train.data import write_image


def make_matting_tree(root, clips=2, frames=5, size=(24, 24)):
    """VideoMatte240K-style clips in root/vm (fgr/, pha/; alpha frame f of clip c is the constant
    40 f + c), background images in root/bgimg (larger than the clips) and one background clip
    in root/bgvid. Returns root."""
    rng = np.random.default_rng(0)
    h, w = size
    for c in range(clips):
        for sub in ("fgr", "pha"):
            os.makedirs(root / "vm" / sub / f"clip{c}", exist_ok=True)
        for f in range(frames):
            write_image(str(root / "vm" / "fgr" / f"clip{c}" / f"{f:04d}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            write_image(str(root / "vm" / "pha" / f"clip{c}" / f"{f:04d}.png"), np.full((h, w), 40 * f + c, dtype=np.uint8))
    os.makedirs(root / "bgimg")
    for i in range(2):
        write_image(str(root / "bgimg" / f"b{i}.png"), rng.integers(0, 256, (h + 6, w + 10, 3), dtype=np.uint8))
    os.makedirs(root / "bgvid" / "v0")
    for f in range(3):
        write_image(str(root / "bgvid" / "v0" / f"{f}.png"), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return root


def make_imagematte(tmp_path):
    """An ImageMatte folder (fgr/, pha/) holding one 30x30 image."""
    im = tmp_path / "im"
    for sub in ("fgr", "pha"):
        os.makedirs(im / sub)
    write_image(str(im / "fgr" / "a.png"), np.full((30, 30, 3), 200, np.uint8))
    write_image(str(im / "pha" / "a.png"), np.full((30, 30), 255, np.uint8))
    return im
