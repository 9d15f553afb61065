"""The recipe's stages through the command line, on every public data layout at a tiny size.

Stage 1 on VideoMatte240K clips over background images and videos, with all three kinds of
segmentation data (YouTube-VIS clips, COCO panoptic and a mask folder); then stage 4 on
ImageMatte with its high-resolution pass, starting from stage 1's checkpoint. The data is
read in a loader worker process (forked here; the datasets' pickling is tested beside them).
"""
import json

import torch
from matting_data import make_imagematte, make_matting_tree
from segmentation_data import make_coco, make_youtubevis

from bimatting_triton.train.__main__ import main


def _logged(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


def test_stage1_then_stage4_on_every_public_layout(tmp_path):
    root = make_matting_tree(tmp_path)
    imagematte = make_imagematte(tmp_path)
    frames_dir, annotations = make_youtubevis(tmp_path)
    (tmp_path / "coco").mkdir()
    coco_images, coco_pngs, coco_json = make_coco(tmp_path / "coco")
    common = [
        "--background-image-dir", str(root / "bgimg"), "--background-video-dir", str(root / "bgvid"),
        "--seg-video-dir", frames_dir, "--seg-video-annotations", annotations,
        "--seg-coco-image-dir", coco_images, "--seg-coco-panoptic-dir", coco_pngs, "--seg-coco-annotations", coco_json,
        "--seg-image-dir", str(imagematte / "fgr"), "--seg-mask-dir", str(imagematte / "pha"),
        "--size", "64", "--seq-length", "2", "--max-steps", "2", "--num-workers", "1", "--threads", "1",
        "--val-clips", "1", "--log-every", "1", "--device", "cpu",
    ]
    stage1 = tmp_path / "stage1"
    assert main(["--config", "stage1", "--videomatte-dir", str(root / "vm"), "--out-dir", str(stage1), *common]) == 0
    lines = _logged(stage1 / "log.jsonl")
    # Step 0's segmentation pass takes a YouTube-VIS clip, step 1's COCO / folder images.
    assert any("seg_video/seg_bce" in line for line in lines) and any("seg/seg_bce" in line for line in lines)
    stage4 = tmp_path / "stage4"
    assert main([
        "--config", "stage4", "--imagematte-dir", str(imagematte), "--init", str(stage1 / "last.pt"),
        "--out-dir", str(stage4), "--size-hr", "64", "--seq-length-hr", "1", "--downsample-ratio-hr", "0.5", *common,
    ]) == 0
    assert any("hr/loss" in line for line in _logged(stage4 / "log.jsonl"))
    saved = torch.load(str(stage4 / "last.pt"), weights_only=True)
    assert saved["step"] == 2 and saved["config"]["name"] == "stage4"
    assert saved["config"]["init"] == str(stage1 / "last.pt")
