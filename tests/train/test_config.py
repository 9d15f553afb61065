"""Named configs (the four-stage recipe) and the command line's parsing."""
import json

import pytest

from bimatting_triton.train.__main__ import main
from bimatting_triton.train.config import CONFIGS, TrainConfig, get_config

DATA = dict(videomatte_dir="vm", imagematte_dir="im", background_image_dir="bg")


def test_four_stages_follow_the_recipe():
    s1, s2, s3, s4 = (get_config(f"stage{i}", **DATA) for i in range(1, 5))
    assert (s1.dataset, s1.size, s1.seq_length, s1.train_hr) == ("videomatte", 512, 15, False)
    assert s2.dataset == "videomatte" and 20 <= s2.seq_length <= 40 and s2.init == "runs/stage1/last.pt"
    assert s3.train_hr and s3.size_hr == 2048 and s3.downsample_ratio_hr == 0.25 and s3.lr_refiner > 0
    assert s4.dataset == "imagematte" and s4.train_hr and s4.init == "runs/stage3/last.pt"
    for s in (s1, s2, s3, s4):
        assert s.amp and s.seg_every > 0 and s.coarse_weight == 0.25
    # The refiner only trains once high-resolution passes use it.
    assert s1.lr_refiner == 0 and s2.lr_refiner == 0
    assert get_config("demo").dataset == "synthetic" and get_config("tiny").dataset == "synthetic"
    assert set(CONFIGS) == {"stage1", "stage2", "stage3", "stage4", "demo", "tiny"}


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="videomatte_dir"):
        get_config("stage1", background_image_dir="bg")
    with pytest.raises(ValueError, match="background_image_dir"):
        get_config("stage1", videomatte_dir="vm")
    with pytest.raises(ValueError, match="config"):
        get_config("stage9")
    with pytest.raises(ValueError, match="unknown keys.*'bogus'"):
        get_config("tiny", bogus=1)
    with pytest.raises(ValueError, match="seq_length"):
        TrainConfig(seq_length=0)
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=-1.0)
    with pytest.raises(ValueError, match="seg_image_dir / seg_mask_dir"):
        TrainConfig(seg_image_dir="img")
    with pytest.raises(ValueError, match="seg_coco_image_dir / seg_coco_panoptic_dir / seg_coco_annotations: give all"):
        TrainConfig(seg_coco_image_dir="train2017", seg_coco_annotations="panoptic.json")
    with pytest.raises(ValueError, match="seg_video_dir / seg_video_annotations"):
        TrainConfig(seg_video_annotations="instances.json")


@pytest.mark.parametrize(
    "field, value",
    [
        # Each of these was accepted and failed steps later (log_every=0: modulo by zero), or
        # trained something else than asked (NaN learning rate: "nan > 0" froze the group).
        ("log_every", 0), ("val_clips", 0), ("synthetic_length", 0), ("seg_every", -2),
        ("num_workers", -1), ("val_every", -1), ("checkpoint_every", -1), ("threads", 0), ("val_size", 0),
        ("lr_backbone", float("nan")), ("lr_decoder", float("inf")), ("lr_aspp", -1e-4),
        ("coarse_weight", -1.0), ("coarse_weight", float("nan")),
        ("grad_clip", float("nan")), ("grad_clip", float("inf")), ("grad_clip", 0.0),
        ("downsample_ratio_hr", float("nan")), ("refiner", "nope"), ("batch_size", True), ("size", 64.0),
        ("seed", "3"), ("seed", 1.5), ("seed", -1),
    ],
)
def test_bad_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        get_config("tiny", **{field: value})


def test_boundary_values_are_accepted():
    cfg = get_config(
        "tiny", seg_every=0, val_every=0, checkpoint_every=0, num_workers=0, max_steps=0, lr_refiner=0.0,
        coarse_weight=0.0, grad_clip=0.5, refiner="fast_guided_filter", threads=None, val_size=None,
    )
    assert cfg.max_steps == 0 and cfg.refiner == "fast_guided_filter"


def test_json_config_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"dataset": "synthetic", "size": 48, "lr_decoder": 3e-4}))
    cfg = get_config(str(path), seq_length=5)
    assert (cfg.name, cfg.size, cfg.lr_decoder, cfg.seq_length) == ("mine", 48, 3e-4, 5)


def test_command_line_overrides(capsys):
    assert main(["--config", "tiny", "--size", "48", "--grad-clip", "0.5", "--init", "none", "--amp", "false", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["name"] == "tiny" and cfg["size"] == 48 and cfg["grad_clip"] == 0.5 and cfg["init"] is None and cfg["amp"] is False
    for flag, value, expected in (("--size", "big", "expected int"), ("--amp", "maybe", "expected true/false"),
                                  ("--grad-clip", "x", "expected float or none")):
        with pytest.raises(SystemExit):
            main(["--config", "tiny", flag, value])
        # the flag as typed, once (the field's name used to follow it)
        assert f"argument {flag}: {expected}, got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value",
    # JSON is untyped: "false" is a truthy string (HR training turned on), 5 is no folder.
    [("train_hr", "false"), ("amp", "false"), ("augment", 0), ("out_dir", 5), ("device", 3), ("init", 1.0),
     ("grad_clip", "1"), ("downsample_ratio_hr", "0.5"), ("lr_decoder", "1e-4"), ("name", None), ("device", "gpu")],
)
def test_json_values_of_the_wrong_type_are_rejected(tmp_path, field, value):
    path = tmp_path / "typed.json"
    path.write_text(json.dumps({"dataset": "synthetic", field: value}))
    with pytest.raises(ValueError, match=rf"^{field}: expected"):
        get_config(str(path))


def test_matching_types_are_accepted():
    cfg = get_config("tiny", lr_backbone=1, grad_clip=2, device="cuda:1", init=None, train_hr=True)
    assert cfg.lr_backbone == 1 and cfg.device == "cuda:1"
    assert get_config("tiny", device="cpu").device == "cpu"


def test_print_config_without_config_or_data_folders(capsys):
    assert main(["--print-config"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == TrainConfig().to_dict() and "stage1" in out.err
    # A stage's settings before its data folders are given; a note says what training needs.
    assert main(["--config", "stage1", "--print-config"]) == 0
    out = capsys.readouterr()
    cfg = json.loads(out.out)
    assert cfg["name"] == "stage1" and cfg["dataset"] == "videomatte" and cfg["videomatte_dir"] is None
    assert "note: needed before training: videomatte_dir" in out.err and "background_image_dir" in out.err
    assert main(["--config", "stage1", "--print-config", "--videomatte-dir", "vm", "--background-image-dir", "bg"]) == 0
    assert "note" not in capsys.readouterr().err
    # Training still needs them, and --config.
    assert main(["--config", "stage1"]) == 2
    assert capsys.readouterr().err.startswith("error: videomatte_dir")
    with pytest.raises(SystemExit) as exit_info:
        main(["--size", "48"])
    assert exit_info.value.code == 2 and "--config is required" in capsys.readouterr().err


def _cli(tmp_path, *flags):
    return main(["--config", "tiny", "--out-dir", str(tmp_path / "run"), "--threads", "1", *flags])


def test_command_line_reports_user_errors_without_traceback(tmp_path, capsys, monkeypatch):
    import torch

    assert _cli(tmp_path, "--resume", str(tmp_path / "nothere.pt")) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    (tmp_path / "garbage.pt").write_text("hello")
    for name in ("other.pt", "garbage.pt"):
        assert _cli(tmp_path, "--resume", str(tmp_path / name)) == 2
        assert capsys.readouterr().err.startswith(f"error: checkpoint {str(tmp_path / name)!r}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cli(tmp_path, "--device", "cuda") == 2
    assert capsys.readouterr().err.startswith("error: --device 'cuda': CUDA is not available")
    assert _cli(tmp_path, "--device", "gpu") == 2
    assert "device: expected" in capsys.readouterr().err


def test_command_line_keeps_tracebacks_of_unexpected_errors(tmp_path, monkeypatch):
    from bimatting_triton.train import loop

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(loop.Trainer, "fit", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        _cli(tmp_path)


def test_replace_keeps_a_shown_config_shown():
    """A stage shown before its data folders are given (require_data=False) can be changed and
    shown again; a complete config stays complete (removing its data is an error)."""
    shown = get_config("stage1", require_data=False).replace(size=256)
    assert shown.size == 256 and shown.missing_data()
    full = get_config("stage1", videomatte_dir="vm", background_image_dir="bg")
    assert full.replace(size=256).size == 256
    with pytest.raises(ValueError, match="videomatte_dir"):
        full.replace(videomatte_dir=None)


def test_stages_run_a_segmentation_pass_every_step():
    # RVM's / BiMatting's train.py: after every matting step one segmentation pass
    # (video segmentation on even steps, image segmentation on odd ones).
    for i in range(1, 5):
        assert get_config(f"stage{i}", **DATA).seg_every == 1
    assert TrainConfig().seg_every == 1


def test_help_shows_each_fields_comment(capsys):
    from dataclasses import fields

    from bimatting_triton.train.config import field_comments

    comments = field_comments()
    assert set(comments) == {f.name for f in fields(TrainConfig)} - {"name"}  # every field says what it is
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--seg-video-annotations SEG_VIDEO_ANNOTATIONS YouTube-VIS instances.json" in text
    assert "--lr-refiner LR_REFINER ... of the refiner (0 freezes it;" in text
