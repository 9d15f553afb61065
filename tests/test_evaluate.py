"""Tests of bimatting_triton.evaluate: image I/O, RVM's folder layout, per-clip and
summary averages against direct metric calls, clear errors, the command line, and the
end-to-end mode with a tiny fake model that follows RVM's forward contract."""
from __future__ import annotations

import csv
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from torch import nn

from bimatting_triton import evaluate as ev
from bimatting_triton import metrics as M

H, W = 10, 12


def write_clip(folder, pha, fgr=None, com=None, ext=".png"):
    """Write (T, H, W) uint8 alpha and (T, H, W, 3) uint8 colour frames as RVM's clip layout."""
    for sub, frames in (("pha", pha), ("fgr", fgr), ("com", com)):
        if frames is None:
            continue
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for t, image in enumerate(frames):
            ev.write_image(os.path.join(folder, sub, f"{t:04d}{ext}"), image)


def random_clip(rng, t=5):
    pha = rng.integers(0, 256, (t, H, W), dtype=np.uint8)
    pha[:, :3] = 0  # some background
    pha[:, -2:] = 255
    fgr = rng.integers(0, 256, (t, H, W, 3), dtype=np.uint8)
    return pha, fgr


def perturb(rng, frames, amount=20):
    noisy = frames.astype(np.int32) + rng.integers(-amount, amount + 1, frames.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def expected_means(pred_pha, true_pha, pred_fgr, true_fgr, metrics, grad_normalize=True):
    fgr = (lambda x: None if x is None else np.moveaxis(x, -1, 1))
    values = M.clip_metrics(pred_pha, true_pha, fgr(pred_fgr), fgr(true_fgr), metrics, grad_normalize)
    return {m: float(np.nanmean(v)) for m, v in values.items()}


@pytest.fixture
def dataset(tmp_path):
    """RVM layout: true/ and pred/ with two dataset folders of two clips each (5 frames)."""
    rng = np.random.default_rng(7)
    clips = {}
    for group in ("videomatte_motion", "videomatte_static"):
        for c in range(2):
            name = f"{group}/{c:04d}"
            true_pha, true_fgr = random_clip(rng)
            pred_pha, pred_fgr = perturb(rng, true_pha), perturb(rng, true_fgr)
            write_clip(tmp_path / "true" / name, true_pha, true_fgr)
            write_clip(tmp_path / "pred" / name, pred_pha, pred_fgr)
            clips[name] = (pred_pha, true_pha, pred_fgr, true_fgr)
    return tmp_path, clips


# ----------------------------------------------------------------------------- image files
def test_image_round_trip_and_atomic_write(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (7, 9), dtype=np.uint8)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    ev.write_image(str(tmp_path / "a.png"), gray)
    ev.write_image(str(tmp_path / "c.png"), rgb)
    np.testing.assert_array_equal(ev.read_alpha(str(tmp_path / "a.png")), gray / np.float32(255))
    np.testing.assert_array_equal(ev.read_rgb(str(tmp_path / "c.png")), rgb / np.float32(255))
    assert sorted(os.listdir(tmp_path)) == ["a.png", "c.png"]  # no temporary files left
    # colour alpha images read as luma; equal channels give the grey value back
    ev.write_image(str(tmp_path / "g.png"), np.repeat(gray[..., None], 3, axis=2))
    np.testing.assert_array_equal(ev.read_alpha(str(tmp_path / "g.png")), gray / np.float32(255))
    with pytest.raises(ValueError, match="image: expected uint8"):
        ev.write_image(str(tmp_path / "x.png"), gray.astype(np.float32))


def test_16_bit_alpha_is_divided_by_65535(tmp_path):
    values = np.array([[0, 1000, 65535]], dtype=np.uint16)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = 3, 1, "gray16be"
    packets = codec.encode(av.VideoFrame.from_ndarray(values, format="gray16be")) + codec.encode(None)
    (tmp_path / "a16.png").write_bytes(b"".join(bytes(p) for p in packets))
    np.testing.assert_allclose(ev.read_alpha(str(tmp_path / "a16.png")), values / 65535.0, rtol=1e-6)


def test_unreadable_image_is_a_clear_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ev.EvaluationError, match="cannot read image .*bad.png"):
        ev.read_alpha(str(tmp_path / "bad.png"))


# ----------------------------------------------------------------------------- evaluation
def test_evaluate_matches_direct_metrics(dataset):
    root, clips = dataset
    # 2 frames per chunk: dtSSD must carry the previous frame across chunk boundaries
    result = ev.evaluate(str(root / "pred"), str(root / "true"), device="cpu", frames_per_chunk=2, progress=False)
    assert result.metrics == M.METRICS
    assert [c.clip for c in result.clips] == sorted(clips)
    for clip in result.clips:
        expect = expected_means(*clips[clip.clip], M.METRICS)
        assert clip.frames == 5
        for m in M.METRICS:
            assert clip.per_frame[m].shape == (5,)
            assert clip.mean(m) == pytest.approx(expect[m], rel=1e-9, abs=1e-12), m
    summary = result.summary()
    assert list(summary) == ["videomatte_motion", "videomatte_static", "all"]
    for m in M.METRICS:
        motion = [c.mean(m) for c in result.clips[:2]]
        assert summary["videomatte_motion"][m] == pytest.approx(np.mean(motion))
        assert summary["all"][m] == pytest.approx(np.mean([c.mean(m) for c in result.clips]))


def test_hr_protocol(dataset):
    root, clips = dataset
    result = ev.evaluate(str(root / "pred"), str(root / "true"), protocol="hr", device="cpu", progress=False)
    assert result.metrics == ("pha_mad", "pha_mse", "pha_grad", "pha_dtssd", "fgr_mse")
    clip = result.clips[0]
    expect = expected_means(*clips[clip.clip], result.metrics, grad_normalize=False)
    assert clip.mean("pha_grad") == pytest.approx(expect["pha_grad"], rel=1e-9)


def test_flat_layout_jpg_truth_and_nan_fgr(tmp_path):
    # clips directly under the roots; ground truth as JPG, predictions as PNG
    rng = np.random.default_rng(3)
    true_pha, true_fgr = random_clip(rng, t=3)
    true_pha[1] = 0  # a frame without foreground: no fgr error
    write_clip(tmp_path / "true" / "clip_a", true_pha, true_fgr, ext=".jpg")
    # the predictions are the decoded truth frames (JPEG is lossy)
    read = lambda sub, reader, t: reader(str(tmp_path / "true" / "clip_a" / sub / f"{t:04d}.jpg"))
    dec_pha = np.stack([np.round(read("pha", ev.read_alpha, t) * 255) for t in range(3)]).astype(np.uint8)
    dec_fgr = np.stack([np.round(read("fgr", ev.read_rgb, t) * 255) for t in range(3)]).astype(np.uint8)
    write_clip(tmp_path / "pred" / "clip_a", dec_pha, dec_fgr)
    result = ev.evaluate(str(tmp_path / "pred"), str(tmp_path / "true"), device="cpu", progress=False)
    (clip,) = result.clips
    assert clip.clip == "clip_a" and list(result.summary()) == ["all"]
    for m in M.METRICS:
        values = clip.per_frame[m]
        if m in M.FGR_METRICS:
            assert np.isnan(values[1]) and np.all(values[[0, 2]] == 0)
        else:
            np.testing.assert_array_equal(values, 0.0)
    assert clip.mean("fgr_mse") == 0.0  # NaN frames skipped


def test_csv_and_table(dataset, tmp_path):
    root, clips = dataset
    result = ev.evaluate(
        str(root / "pred"), str(root / "true"), metrics=["pha_mad", "pha_dtssd"], device="cpu", progress=False
    )
    path = tmp_path / "out" / "metrics.csv"
    result.write_csv(str(path))
    rows = list(csv.DictReader(open(path)))
    assert [r["clip"] for r in rows] == sorted(clips)
    assert list(rows[0]) == ["clip", "frames", "pha_mad", "pha_dtssd"]
    for row, clip in zip(rows, result.clips):
        assert float(row["pha_mad"]) == pytest.approx(clip.mean("pha_mad"), rel=1e-9)
        assert int(row["frames"]) == 5
    table = result.format_table().splitlines()
    assert table[0].split() == ["clips", "frames", "pha_mad", "pha_dtssd"]
    assert table[-1].split()[:3] == ["all", "4", "20"]
    assert float(table[-1].split()[3]) == pytest.approx(result.summary()["all"]["pha_mad"], rel=1e-4)


# ----------------------------------------------------------------------------- errors
def test_layout_errors(dataset):
    root, _ = dataset
    pred, true = root / "pred", root / "true"
    run = lambda **kw: ev.evaluate(str(pred), str(true), device="cpu", progress=False, **kw)
    os.remove(pred / "videomatte_motion" / "0001" / "pha" / "0003.png")
    with pytest.raises(ev.EvaluationError, match=r"has 4 frames, .* has 5; missing from the predictions: \['0003'\]"):
        run()
    ev.write_image(str(pred / "videomatte_motion" / "0001" / "pha" / "0003.png"), np.zeros((H, W + 1), np.uint8))
    size_error = rf"size mismatch: .*0003.png is {W + 1}x{H} \(WxH\), expected {W}x{H}"
    with pytest.raises(ev.EvaluationError, match=size_error):
        run()
    ev.write_image(str(pred / "videomatte_motion" / "0001" / "pha" / "0003.png"), np.zeros((H, W), np.uint8))
    run(metrics=["pha_mad"])  # repaired
    for f in os.listdir(pred / "videomatte_static" / "0000" / "fgr"):
        os.remove(pred / "videomatte_static" / "0000" / "fgr" / f)
    os.rmdir(pred / "videomatte_static" / "0000" / "fgr")
    with pytest.raises(ev.EvaluationError, match=r"folder not found: .*0000.fgr .*pass --metrics without fgr_"):
        run()
    run(metrics=["pha_mad", "pha_conn"])  # fgr not needed
    os.rename(pred / "videomatte_static" / "0001", pred / "moved")
    with pytest.raises(ev.EvaluationError, match=r"clip videomatte_static/0001: prediction folder not found"):
        run(metrics=["pha_mad"])
    with pytest.raises(ev.EvaluationError, match="prediction folder not found"):
        ev.evaluate(str(root / "nowhere"), str(true), progress=False)
    (root / "empty").mkdir()
    with pytest.raises(ev.EvaluationError, match="no clips in"):
        ev.evaluate(str(pred), str(root / "empty"), progress=False)
    with pytest.raises(ValueError, match="protocol"):
        ev.evaluate(str(pred), str(true), protocol="4k", progress=False)


# ----------------------------------------------------------------------------- command line
def test_cli_in_process(dataset, capsys):
    root, _ = dataset
    code = ev.main(["--pred", str(root / "pred"), "--true", str(root / "true"), "--no-progress", "--device", "cpu",
                    "--metrics", "pha_mad", "pha_mse"])
    out = capsys.readouterr().out
    assert code == 0
    assert "videomatte_motion" in out and out.splitlines()[0].split() == ["clips", "frames", "pha_mad", "pha_mse"]
    assert (root / "pred" / "metrics.csv").is_file()
    os.remove(root / "pred" / "videomatte_motion" / "0000" / "pha" / "0000.png")
    code = ev.main(["--pred", str(root / "pred"), "--true", str(root / "true"), "--no-progress", "--device", "cpu"])
    assert code == 2 and "error: frame count mismatch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ev.main(["--pred", str(root / "pred"), "--true", str(root / "true"), "--model-checkpoint", "x.pth"])


def test_cli_as_module(dataset, tmp_path):
    root, _ = dataset
    out_csv = tmp_path / "clips.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "bimatting_triton.evaluate", "--pred", str(root / "pred"), "--true", str(root / "true"),
         "--metrics", "pha_mad", "--device", "cpu", "--csv", str(out_csv)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-2].split()[0] == "all"
    assert len(list(csv.DictReader(open(out_csv)))) == 4


# ----------------------------------------------------------------------------- end to end
class FakeMatting(nn.Module):
    """Follows RVM's contract. pha depends on the frame's index within the clip, which
    only the recurrent state r1 knows, so dropping the state between calls shows."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, src, r1=None, r2=None, r3=None, r4=None, downsample_ratio=1):
        b, t = src.shape[:2]
        self.calls.append((t, downsample_ratio, r1 is None, self.training))
        start = torch.zeros(b, 1, 1, 1) if r1 is None else r1
        index = start.view(b, 1, 1, 1, 1) + torch.arange(t, dtype=src.dtype).view(1, t, 1, 1, 1)
        pha = (src.mean(dim=2, keepdim=True) * self.scale + 0.1 * index).clamp(0, 1)
        fgr = 1 - src
        r1 = start + t
        return [fgr, pha, r1, r2, r3, r4]


def expected_fake_outputs(com):
    """pha/fgr a FakeMatting writes for com frames (T, H, W, 3) uint8, with floor quantisation."""
    src = torch.from_numpy(com).float() / 255
    index = torch.arange(len(com), dtype=torch.float32).view(-1, 1, 1)
    pha = (src.mean(dim=-1) * 0.5 + 0.1 * index).clamp(0, 1)
    return (pha * 255).to(torch.uint8).numpy(), ((1 - src) * 255).to(torch.uint8).numpy()


def test_evaluate_model_end_to_end(tmp_path):
    rng = np.random.default_rng(11)
    coms = {}
    for clip in ("a", "b"):
        pha, fgr = random_clip(rng, t=5)
        com = rng.integers(0, 256, (5, H, W, 3), dtype=np.uint8)
        write_clip(tmp_path / "data" / "set" / clip, pha, fgr, com)
        coms[clip] = (com, pha, fgr)
    model = FakeMatting().train()
    result = ev.evaluate_model(
        model, str(tmp_path / "data"), str(tmp_path / "pred"), seq_chunk=2, device="cpu", progress=False
    )
    # chunks of 2, 2, 1 per clip; the state carried within a clip, reset between clips;
    # auto downsample ratio = min(512 / max(H, W), 1) = 1; eval mode
    assert [c[0] for c in model.calls] == [2, 2, 1, 2, 2, 1]
    assert [c[2] for c in model.calls] == [True, False, False, True, False, False]
    assert all(c[1] == 1.0 and not c[3] for c in model.calls)
    for clip, (com, true_pha, true_fgr) in coms.items():
        exp_pha, exp_fgr = expected_fake_outputs(com)
        folder = tmp_path / "pred" / "set" / clip
        got_pha = np.stack([np.round(ev.read_alpha(str(folder / "pha" / f"{t:04d}.png")) * 255) for t in range(5)])
        got_fgr = np.stack([np.round(ev.read_rgb(str(folder / "fgr" / f"{t:04d}.png")) * 255) for t in range(5)])
        np.testing.assert_array_equal(got_pha, exp_pha)
        np.testing.assert_array_equal(got_fgr, exp_fgr)
        clip_result = next(c for c in result.clips if c.clip == f"set/{clip}")
        expect = expected_means(exp_pha, true_pha, exp_fgr, true_fgr, M.METRICS)
        for m in M.METRICS:
            assert clip_result.mean(m) == pytest.approx(expect[m], rel=1e-9, abs=1e-12)

    # explicit ratio and rounding; refuses to overwrite unless asked
    with pytest.raises(ev.EvaluationError, match="already holds frames"):
        ev.predict_dataset(model, str(tmp_path / "data"), str(tmp_path / "pred"), progress=False)
    model.calls.clear()
    ev.predict_dataset(model, str(tmp_path / "data"), str(tmp_path / "pred"), downsample_ratio=0.5, quantize="round",
                       overwrite=True, device="cpu", progress=False)
    assert {c[1] for c in model.calls} == {0.5}
    com = coms["a"][0]
    pha0 = (torch.from_numpy(com[0]).float() / 255).mean(dim=-1) * 0.5
    got = np.round(ev.read_alpha(str(tmp_path / "pred" / "set" / "a" / "pha" / "0000.png")) * 255)
    np.testing.assert_array_equal(got, (pha0 * 255).round().numpy())


def test_end_to_end_errors(tmp_path):
    rng = np.random.default_rng(5)
    pha, fgr = random_clip(rng, t=2)
    write_clip(tmp_path / "data" / "c", pha, fgr)  # no com/
    with pytest.raises(ev.EvaluationError, match="holding com/"):
        ev.predict_dataset(FakeMatting(), str(tmp_path / "data"), str(tmp_path / "pred"), progress=False)
    write_clip(tmp_path / "data" / "c", None, None, fgr)

    class Wrong(FakeMatting):
        def forward(self, src, *rec, downsample_ratio=1):
            fgr, pha, *rec = super().forward(src, *rec, downsample_ratio=downsample_ratio)
            return [fgr, pha[..., :-1, :], *rec]

    with pytest.raises(RuntimeError, match=r"model returned fgr .* expected"):
        ev.predict_dataset(Wrong(), str(tmp_path / "data"), str(tmp_path / "pred"), progress=False)
    with pytest.raises(ValueError, match="quantize"):
        ev.predict_dataset(FakeMatting(), str(tmp_path / "data"), str(tmp_path / "pred"), quantize="nearest")


def test_cli_end_to_end_warns_about_random_weights(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(6)
    pha, fgr = random_clip(rng, t=2)
    write_clip(tmp_path / "data" / "c", pha, fgr, fgr)
    loaded = []

    def fake_load_model(checkpoint, refiner, warn=True):
        loaded.append((checkpoint, refiner))
        return FakeMatting()

    monkeypatch.setattr(ev, "load_model", fake_load_model)
    code = ev.main(["--data", str(tmp_path / "data"), "--pred", str(tmp_path / "pred"), "--no-progress",
                    "--device", "cpu", "--refiner", "fast_guided_filter"])
    captured = capsys.readouterr()
    assert code == 0 and loaded == [(None, "fast_guided_filter")]
    assert captured.err.count("RANDOM weights") == 2  # before and after the run
    assert "all" in captured.out


def test_load_model_without_checkpoint_warns():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        model = ev.load_model(None)
    assert type(model).__name__ == "BiMatting"
    with pytest.raises(ev.EvaluationError, match="checkpoint not found"):
        ev.load_model("/nonexistent/bimatting.pth")


# ----------------------------------------------------------------------------- safety checks
def snapshot(folder):
    """{relative path: bytes} of every file under ``folder``."""
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(folder) for f in files
    }


@pytest.fixture
def e2e_data(tmp_path):
    """A --data folder with one clip (set/a: com/, pha/, fgr/), and its file contents."""
    rng = np.random.default_rng(9)
    pha, fgr = random_clip(rng, t=3)
    write_clip(tmp_path / "data" / "set" / "a", pha, fgr, rng.integers(0, 256, (3, H, W, 3), dtype=np.uint8))
    return tmp_path / "data", snapshot(tmp_path / "data")


def test_predictions_never_written_into_the_data_folder(e2e_data, tmp_path):
    data, before = e2e_data
    (tmp_path / "elsewhere").mkdir()
    os.symlink(data / "set", tmp_path / "elsewhere" / "set")  # pred/set/a/pha resolves to data/set/a/pha
    targets = [data, data / "preds", data / "set" / "a", tmp_path / "elsewhere"]
    for pred in targets:
        model = FakeMatting()
        with pytest.raises(ev.EvaluationError, match=r"--pred .* --data .*choose a --pred folder outside --data"):
            ev.predict_dataset(model, str(data), str(pred), overwrite=True, device="cpu", progress=False)
        with pytest.raises(ev.EvaluationError, match="--data"):
            ev.evaluate_model(model, str(data), str(pred), overwrite=True, device="cpu", progress=False)
        assert model.calls == [], pred
    assert snapshot(data) == before and not (data / "preds").exists()
    # the data folder inside the prediction folder is fine when no output lands in it
    ev.predict_dataset(FakeMatting(), str(data), str(tmp_path), device="cpu", progress=False)
    assert (tmp_path / "set" / "a" / "pha" / "0002.png").is_file() and snapshot(data) == before


def test_cli_refuses_pred_equal_to_data(e2e_data, monkeypatch, capsys):
    data, before = e2e_data
    monkeypatch.setattr(ev, "load_model", lambda checkpoint, refiner, warn=True: FakeMatting())
    code = ev.main(["--data", str(data), "--pred", str(data), "--overwrite", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "error: --pred" in err and "--data" in err
    assert "WARNING" not in err  # refused before the random-weights banner, which said otherwise that it would run
    assert snapshot(data) == before  # ground truth untouched, no metrics.csv written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device_is_a_clear_error(dataset, e2e_data, tmp_path, monkeypatch, capsys):
    root, _ = dataset
    with pytest.raises(ValueError, match=r"--device 'cuda': CUDA is not available"):
        ev.evaluate(str(root / "pred"), str(root / "true"), device="cuda", progress=False)
    loaded = []
    monkeypatch.setattr(ev, "load_model", lambda checkpoint, refiner, warn=True: loaded.append(1) or FakeMatting())
    data, _ = e2e_data
    for mode in (["--true", str(root / "true")], ["--data", str(data)]):
        for device, message in (("cuda", ": CUDA is not available"), ("nonsense", " is not a torch device")):
            code = ev.main(["--pred", str(tmp_path / "out"), *mode, "--device", device, "--no-progress"])
            err = capsys.readouterr().err
            assert code == 2 and f"error: --device {device!r}{message}" in err, err
    assert loaded == [] and not (tmp_path / "out").exists()  # checked before loading the model or writing
