"""The training loop with the real BiMatting at a tiny size: steps, checkpoints, exact resume."""
import os

import numpy as np
import pytest
import torch
from torch import nn

from bimatting_triton.model import BiMatting
from bimatting_triton.train.config import get_config
from bimatting_triton.train.data import write_image
from bimatting_triton.train.loop import Trainer, evaluate, load_checkpoint, param_groups, train
from bimatting_triton.train.synthetic import SyntheticMatteDataset
from segmentation_data import make_youtubevis

# One thread: on a loaded 2-core machine OpenMP oversubscription makes steps ~10x slower.
QUIET = dict(log_every=1000, threads=1)


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """4 tiny steps in one go, and 2 + 2 with a resume in between."""
    root = tmp_path_factory.mktemp("runs")
    base = dict(max_steps=4, seg_every=2, val_clips=1, **QUIET)
    straight = Trainer(get_config("tiny", out_dir=str(root / "a"), checkpoint_every=2, **base), log=lambda m: None)
    init = _params(straight.model)
    straight.fit()
    first = Trainer(get_config("tiny", out_dir=str(root / "b"), **{**base, "max_steps": 2}), log=lambda m: None)
    first.fit()
    second = Trainer(get_config("tiny", out_dir=str(root / "b"), resume="auto", **base), log=lambda m: None)
    assert second.step == 2
    second.fit()
    return straight, second, init, root


def test_training_changes_every_trained_part(runs):
    straight, _, init, _ = runs
    after = straight.model.state_dict()
    # (The refiner only runs in high-resolution passes: see the test below.)
    for part in ("backbone.", "aspp.", "decoder.", "project_mat.", "project_seg."):
        changed = [k for k in init if k.startswith(part) and not torch.equal(init[k], after[k])]
        assert changed, f"no parameter of {part} changed"


def test_resume_continues_bitwise(runs):
    straight, resumed, _, _ = runs
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])


def test_checkpoint_contents_and_from_pretrained(runs):
    straight, _, _, root = runs
    path = root / "a" / "last.pt"
    state = load_checkpoint(str(path))
    assert {"model", "optimizer", "scaler", "step", "rng", "config"} <= set(state)
    assert state["step"] == 4 and state["config"]["name"] == "tiny"
    assert not [f for f in os.listdir(root / "a") if ".tmp" in f]
    loaded = BiMatting.from_pretrained(str(path))
    ours = straight.model.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ours[k]), k
    # The loaded model infers like the trained one.
    src = torch.rand(1, 2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    straight.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(src)[1], straight.model(src)[1], atol=0, rtol=0)


def test_resume_warns_about_changed_run_settings_only(runs):
    import warnings

    _, _, _, root = runs
    path = str(root / "a" / "last.pt")
    # Bookkeeping may change freely: a longer run, other logging, another output folder.
    extended = Trainer(get_config("tiny", out_dir=str(root / "c"), max_steps=9, val_clips=1, **QUIET), log=lambda m: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extended._resume(path)
    assert extended.step == 4
    # Another crop size and seed: not the saved run continued, and the warning says why.
    other = Trainer(get_config("tiny", out_dir=str(root / "c"), size=48, seed=3, max_steps=4, **QUIET), log=lambda m: None)
    with pytest.warns(UserWarning, match=r"size 32 -> 48; seed 0 -> 3\)"):
        other._resume(path)
    assert other.step == 4


def test_resume_past_max_steps_does_nothing(runs):
    _, _, _, root = runs
    path = str(root / "a" / "last.pt")
    logged = []
    cfg = get_config("tiny", out_dir=str(root / "e"), resume=path, max_steps=2, val_clips=1, **QUIET)
    result = Trainer(cfg, log=logged.append).fit()
    assert result.step == 4 and result.validations == {} and result.checkpoint == path
    assert not os.path.exists(root / "e" / "last.pt") and not os.path.exists(root / "e" / "log.jsonl")
    assert any("nothing to train" in m and "at step 4" in m and "stops at step 2" in m for m in logged), logged
    assert not any("-> 2" in m for m in logged)


def test_resume_auto_without_a_checkpoint_says_so(tmp_path):
    logged = []
    trainer = Trainer(get_config("tiny", out_dir=str(tmp_path), resume="auto", **QUIET), log=logged.append)
    assert trainer.step == 0
    assert any("no checkpoint" in m and str(tmp_path / "last.pt") in m and "from scratch" in m for m in logged), logged


def test_load_checkpoint_errors(tmp_path):
    (tmp_path / "garbage.pt").write_text("hello")
    with pytest.raises(ValueError, match="could not be read"):
        load_checkpoint(str(tmp_path / "garbage.pt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nothere.pt"))


def test_resume_with_amp_from_a_checkpoint_saved_without_it(runs):
    """A CPU (or amp=False) run saves its disabled GradScaler as {}: resuming it with AMP on keeps a fresh scaler."""
    _, _, _, root = runs
    state = load_checkpoint(str(root / "a" / "last.pt"))
    assert state["scaler"] == {}
    trainer = Trainer(get_config("tiny", out_dir=str(root / "d"), max_steps=4, **QUIET), log=lambda m: None)
    trainer.use_amp = True  # as on CUDA (the CPU scaler has the same state-dict logic)
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)
    fresh_scale = trainer.scaler.get_scale()
    trainer._resume(str(root / "a" / "last.pt"))
    assert trainer.step == 4 and trainer.scaler.get_scale() == fresh_scale


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_checkpoint_loads_into_fused_model(runs, backend):
    from bimatting_triton import convert

    _, _, _, root = runs
    # float64: binary layers turn float rounding differences into sign flips, so the
    # packed path is compared with the float-simulated one where rounding cannot matter.
    model = BiMatting.from_pretrained(str(root / "a" / "last.pt")).double().eval()
    fused = convert(model, backend=backend)
    src = torch.rand(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = model(src)
        got = fused(src)
    for e, g in zip(expected[:2], got[:2]):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=0)


def test_training_steps_fit_a_fixed_batch(tmp_path):
    """The STE training actually learns: on one fixed batch the loss falls well below its start
    (3.6 -> ~0.8 over 20 steps at this seed, 0.23-0.35 of the start over seeds 0-7; the bound
    leaves room for other BLAS rounding). The Trainer seeds everything from cfg.seed."""
    cfg = get_config("tiny", out_dir=str(tmp_path), lr_backbone=2e-3, lr_aspp=2e-3, lr_decoder=2e-3,
                     lr_refiner=0.0, seg_every=0, **QUIET)
    trainer = Trainer(cfg, log=lambda m: None)
    ds = SyntheticMatteDataset(2, 32, 2, seed=3)
    batch = [torch.stack(parts) for parts in zip(ds[0], ds[1])]
    losses = [trainer.matting_step(batch, 1.0, "fit")["fit/loss"] for _ in range(20)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_param_groups_freeze_zero_learning_rates():
    model = BiMatting()
    cfg = get_config("tiny", lr_refiner=0.0, lr_aspp=5e-4)
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["backbone", "aspp", "decoder"]
    assert groups[1]["lr"] == 5e-4
    assert all(not p.requires_grad for p in model.refiner.parameters())
    n_grouped = sum(p.numel() for g in groups for p in g["params"])
    assert n_grouped == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="'extra.weight'"):
        param_groups(nn.ModuleDict({"extra": nn.Linear(1, 1)}), cfg)


class _ConstantAlpha(nn.Module):
    """Follows the forward contract; predicts alpha = c and fgr = src everywhere."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, src, *rec, downsample_ratio=1.0, **kwargs):
        return [src, torch.full_like(src[:, :, :1], self.c), None, None, None, None]


def test_evaluate_hand_checkable_mad():
    ds = SyntheticMatteDataset(3, 24, 2, seed=5)
    zero = evaluate(_ConstantAlpha(0.0), ds)
    one = evaluate(_ConstantAlpha(1.0), ds)
    mean_alpha = np.mean([ds[i][1].double().mean().item() for i in range(3)])
    assert zero["pha_mad"] == pytest.approx(1e3 * mean_alpha, rel=1e-5)
    assert one["pha_mad"] == pytest.approx(1e3 * (1 - mean_alpha), rel=1e-5)
    assert zero["pha_dtssd"] > 0 and set(zero) == {"pha_mad", "pha_mse", "pha_grad", "pha_dtssd", "fgr_mad"}


def _segmentation_folders(root, count: int) -> dict:
    """``count`` random 40x40 images and binary masks in root/img, root/mask: the seg_* settings."""
    rng = np.random.default_rng(0)
    for sub in ("img", "mask"):
        os.makedirs(root / sub)
    for i in range(count):
        write_image(str(root / "img" / f"{i}.png"), rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))
        write_image(str(root / "mask" / f"{i}.png"), (rng.random((40, 40)) > 0.5).astype(np.uint8) * 255)
    return dict(seg_image_dir=str(root / "img"), seg_mask_dir=str(root / "mask"))


def test_high_resolution_and_segmentation_folder_steps(tmp_path):
    # Segmentation data from folders; a high-resolution pass through the refiner.
    cfg = get_config(
        "tiny", out_dir=str(tmp_path / "run"), max_steps=1, seg_every=1, train_hr=True, size_hr=64, seq_length_hr=1,
        downsample_ratio_hr=0.5, grad_clip=1.0, val_clips=1, **_segmentation_folders(tmp_path, 2), **QUIET,
    )
    logged = []
    trainer = Trainer(cfg, log=logged.append)
    refiner_before = _params(trainer.model.refiner)
    trainer.fit()
    assert any(not torch.equal(v, trainer.model.refiner.state_dict()[k]) for k, v in refiner_before.items())
    history = [line for line in open(tmp_path / "run" / "log.jsonl")]
    assert any('"hr/loss"' in h and '"seg/seg_bce"' in h and '"lr/grad_norm"' in h for h in history)


def test_train_api_runs_and_reports(tmp_path):
    result = train("tiny", out_dir=str(tmp_path), max_steps=1, val_at_start=True, val_clips=1, **QUIET)
    assert result.step == 1 and result.checkpoint == os.path.join(str(tmp_path), "last.pt")
    assert result.initial["pha_mad"] > 0 and result.final["pha_mad"] > 0
    assert set(result.validations) == {0, 1}


def test_image_segmentation_batches_hold_batch_times_t_frames(tmp_path):
    # RVM's train.py: the image-segmentation loader's batch is batch_size_per_gpu * seq_length_lr
    # single images, the same number of frames as a matting clip batch.
    cfg = get_config(
        "tiny", out_dir=str(tmp_path / "run"), max_steps=1, seq_length=2, batch_size=2, seg_every=1,
        val_clips=1, **_segmentation_folders(tmp_path, 8), **QUIET,
    )
    trainer = Trainer(cfg, log=lambda m: None)
    img, seg = next(trainer.streams["seg"].batches(0))
    assert img.shape == (4, 1, 3, 32, 32) and seg.shape == (4, 1, 1, 32, 32)


def test_video_and_image_segmentation_passes_alternate_and_resume(tmp_path):
    # RVM's and BiMatting's train.py: YouTube-VIS clips on even steps, images on odd steps;
    # a resumed run takes the batches of each kind the uninterrupted run would have taken.
    frames_dir, annotations = make_youtubevis(tmp_path)
    data = dict(seg_video_dir=frames_dir, seg_video_annotations=annotations, **_segmentation_folders(tmp_path, 8))

    def passes(out_dir, max_steps, resume=None):
        cfg = get_config("tiny", out_dir=str(tmp_path / out_dir), max_steps=max_steps, seg_every=1, seq_length=2,
                         val_clips=1, resume=resume, **data, **QUIET)
        trainer = Trainer(cfg, log=lambda m: None)
        seen = []
        step = trainer.segmentation_step

        def recording(img, seg, tag="seg"):
            seen.append((trainer.step, tag, tuple(img.shape), float(img.sum()), float(seg.sum())))
            return step(img, seg, tag)

        trainer.segmentation_step = recording
        trainer.fit()
        return seen

    whole = passes("whole", 5)
    assert [(s, tag) for s, tag, *_ in whole] == [(0, "seg_video"), (1, "seg"), (2, "seg_video"), (3, "seg"), (4, "seg_video")]
    assert whole[0][2] == (1, 2, 3, 32, 32) and whole[1][2] == (2, 1, 3, 32, 32)  # B clips of T; B*T images
    history = open(tmp_path / "whole" / "log.jsonl").read()
    assert '"seg_video/seg_bce"' in history and '"seg/seg_bce"' in history
    passes("split", 3)
    assert passes("split", 5, resume=str(tmp_path / "split" / "last.pt")) == whole[3:]


def test_random_crop_is_drawn_per_step_and_pass_and_repeats_on_resume(tmp_path):
    # cfg.random_crop: every matting and segmentation batch is cropped (random_batch_crop),
    # from a generator of (seed, step, pass): a resumed run crops as the uninterrupted one.
    def crops(out_dir, max_steps, resume=None):
        cfg = get_config("tiny", out_dir=str(tmp_path / out_dir), size=64, max_steps=max_steps, seg_every=1,
                         random_crop=True, resume=resume, **QUIET)
        trainer = Trainer(cfg, log=lambda m: None)
        seen = []
        forward = trainer.ddp.forward

        def recording(src, *args, **kwargs):
            if trainer.model.training:  # (validation is not cropped)
                kind = "seg" if kwargs.get("segmentation_pass") else "matting"
                seen.append((trainer.step, kind, tuple(src.shape[-2:])))
            return forward(src, *args, **kwargs)

        trainer.ddp.forward = recording
        trainer.fit()
        return seen

    whole = crops("whole", 4)
    assert [(step, kind) for step, kind, _ in whole] == [(s, k) for s in range(4) for k in ("matting", "seg")]
    assert all(h in (32, 48) and w in (32, 48) for _, _, (h, w) in whole)  # [64/2, 64), multiples of 16
    assert len({hw for _, _, hw in whole}) > 1
    crops("split", 2)
    resumed = crops("split", 4, resume=str(tmp_path / "split" / "last.pt"))
    assert resumed == whole[4:]


def test_resume_of_a_checkpoint_older_than_random_crop_warns_when_it_is_on(runs, tmp_path):
    # A checkpoint saved before the random_crop field trained without the crop.
    import warnings

    _, _, _, root = runs
    saved = torch.load(str(root / "a" / "last.pt"), weights_only=False)
    del saved["config"]["random_crop"]
    old = str(tmp_path / "old.pt")
    torch.save(saved, old)
    on = Trainer(get_config("tiny", out_dir=str(tmp_path / "on"), random_crop=True, max_steps=9, **QUIET),
                 log=lambda m: None)
    with pytest.warns(UserWarning, match=r"random_crop False -> True"):
        on._resume(old)
    off = Trainer(get_config("tiny", out_dir=str(tmp_path / "off"), max_steps=9, **QUIET), log=lambda m: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        off._resume(old)


def test_resume_of_a_checkpoint_older_than_the_segmentation_data_fields_warns_when_given(runs, tmp_path):
    # A checkpoint saved before the YouTube-VIS / COCO fields trained without those data.
    _, _, _, root = runs
    saved = torch.load(str(root / "a" / "last.pt"), weights_only=False)
    for name in ("seg_video_dir", "seg_video_annotations", "seg_coco_image_dir", "seg_coco_panoptic_dir",
                 "seg_coco_annotations"):
        del saved["config"][name]
    old = str(tmp_path / "old.pt")
    torch.save(saved, old)
    frames_dir, annotations = make_youtubevis(tmp_path)
    cfg = get_config("tiny", out_dir=str(tmp_path / "video"), max_steps=9, seg_video_dir=frames_dir,
                     seg_video_annotations=annotations, **QUIET)
    with pytest.warns(UserWarning, match=r"seg_video_dir None -> '.*JPEGImages'; seg_video_annotations None -> "):
        Trainer(cfg, log=lambda m: None)._resume(old)


def test_a_damaged_training_checkpoint_is_named(runs, tmp_path):
    _, _, _, root = runs
    saved = torch.load(str(root / "a" / "last.pt"), weights_only=False)
    del saved["step"]
    saved["model"] = [1]
    damaged = str(tmp_path / "damaged.pt")
    torch.save(saved, damaged)
    with pytest.raises(ValueError, match=r"is damaged: its entries \['model \(list\)', 'step \(NoneType\)'\]"):
        load_checkpoint(damaged)
    with pytest.raises(ValueError, match="map_location 'meta'"):
        load_checkpoint(str(root / "a" / "last.pt"), map_location="meta")
    load_checkpoint(str(root / "a" / "last.pt"))  # a sound one passes the checks
