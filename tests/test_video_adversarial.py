"""convert_video and the ``bimatting`` command against hostile inputs: outputs that collide
with the inputs or with each other, odd paths, wrong types, non-finite numbers, odd input
folders and streams. Each failure is an error naming the argument, raised before the run
(no file written), or a run that succeeds; never a run that fails at the end."""
import os

import numpy as np
import pytest
import torch

from bimatting_triton import cli
from bimatting_triton.video import convert_video

from video_utils import FakeMatting, make_video, read_png, write_png


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(str(tmp_path_factory.mktemp("adv") / "in.mp4"), 3, 32, 24, rate=25)


def test_background_image_is_never_overwritten(tmp_path):
    """The background image is an input too: an output at its path is refused."""
    photo, bg = tmp_path / "photo.png", tmp_path / "bg.png"
    write_png(photo, np.full((6, 8, 3), 100, np.uint8))
    write_png(bg, np.full((6, 8, 3), 7, np.uint8))
    before = bg.read_bytes()
    for out in (str(bg), os.path.join(str(tmp_path), ".", "bg.png")):
        with pytest.raises(ValueError, match="output_composition .* background image"):
            convert_video(FakeMatting(), str(photo), output_type="png_sequence", output_composition=out,
                          background=str(bg), progress=False)
    assert bg.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["bg.png", "photo.png"]


def test_output_inside_another_output_is_refused(clip, tmp_path):
    """A PNG folder inside another output's folder: refused before the run (it used to run to
    the end, write one output and then fail on the other: a partial result)."""
    (tmp_path / "out").mkdir()
    for alpha, com in (("out", "out/com"), ("out/com", "out")):
        m = FakeMatting()
        with pytest.raises(ValueError, match="inside"):
            convert_video(m, clip, output_type="png_sequence", output_alpha=str(tmp_path / alpha),
                          output_composition=str(tmp_path / com), progress=False)
        assert m.calls == []
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == []


def test_png_sequence_into_the_current_folder(clip, tmp_path, monkeypatch):
    """``output_alpha='.'`` (an empty current folder; the command's ``-o .``) used to fail at the
    end (rmdir('.'): Invalid argument) and lose the result."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    assert convert_video(FakeMatting(), clip, output_type="png_sequence", output_alpha=".", progress=False) == 3
    assert sorted(os.listdir(tmp_path / "here")) == ["0000.png", "0001.png", "0002.png"]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="symbolic links")
def test_png_sequence_output_that_is_a_symlink(clip, tmp_path):
    """A symbolic link as a PNG folder output (to an empty folder, or dangling) used to run
    to the end and fail renaming onto it; now refused before the run."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "to_real")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("to_real", "dangling", "to_real/", "to_real/.", "dangling/"):  # (a trailing / names the link too)
        m = FakeMatting()
        with pytest.raises(FileExistsError, match="output_alpha .*symbolic link"):
            convert_video(m, clip, output_type="png_sequence", output_alpha=str(tmp_path / name), progress=False)
        assert m.calls == []
    assert sorted(os.listdir(tmp_path)) == ["dangling", "real", "to_real"]


@pytest.mark.parametrize("output_type,ending", [("video", ".mp4"), ("png_sequence", "")])
def test_long_output_name(clip, tmp_path, output_type, ending):
    """A 250-character name is valid; its temporary name must be too (it used to be 265)."""
    name = "x" * (250 - len(ending)) + ending
    convert_video(FakeMatting(), clip, output_type=output_type, output_alpha=str(tmp_path / name), progress=False)
    assert os.listdir(tmp_path) == [name]


def test_wrong_types_and_non_finite_numbers_name_the_argument(clip, tmp_path):
    out = str(tmp_path / "a.mp4")
    cases = [
        (dict(output_alpha=123), TypeError, "output_alpha must be a path"),
        (dict(output_alpha=b"a.mp4"), TypeError, "output_alpha must be a path"),
        (dict(output_alpha=out, input_resize=5), TypeError, "input_resize must be"),
        (dict(output_alpha=out, downsample_ratio=float("nan")), ValueError, "downsample_ratio"),
        (dict(output_alpha=out, output_video_mbps=float("nan")), ValueError, "output_video_mbps"),
        (dict(output_alpha=out, output_video_mbps=float("inf")), ValueError, "output_video_mbps"),
        (dict(output_alpha=out, dtype="float16"), TypeError, "dtype"),
        (dict(output_alpha=out, dtype=torch.int32), TypeError, "dtype"),
        (dict(output_alpha=out, device="nonsense"), ValueError, "device"),
        (dict(output_alpha=out, device="meta"), ValueError, "device 'meta'"),
        (dict(output_composition=out, background=(0, float("nan"), 0)), ValueError, "background"),
    ]
    for kwargs, error, message in cases:
        m = FakeMatting()
        with pytest.raises(error, match=message):
            convert_video(m, clip, progress=False, **kwargs)
        assert m.calls == []
    assert os.listdir(tmp_path) == []


def test_cli_infinite_mbps_is_a_usage_error(clip, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([clip, "-o", str(tmp_path / "o.mp4"), "--mbps", "inf", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "--mbps: expected a positive number, got 'inf'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_image_folder_with_a_subfolder_named_like_an_image(tmp_path):
    """Only files are frames: a folder ``old.png`` inside is skipped (it used to fail the run
    with "image file ... does not exist")."""
    frames = tmp_path / "frames"
    (frames / "old.png").mkdir(parents=True)
    write_png(frames / "0.png", np.full((6, 8, 3), 50, np.uint8))
    (frames / "notes.txt").write_text("not a frame")
    n = convert_video(FakeMatting(), str(frames), output_type="png_sequence",
                      output_alpha=str(tmp_path / "pha"), progress=False)
    assert n == 1 and os.listdir(tmp_path / "pha") == ["0000.png"]


def test_video_whose_frame_size_changes(tmp_path):
    """A stream that changes size part way (two MPEG-TS clips joined) is scaled to its first
    size, as FFmpeg does; it used to fail ("all input arrays must have the same shape")."""
    a = make_video(str(tmp_path / "a.ts"), 3, 32, 24)
    b = make_video(str(tmp_path / "b.ts"), 3, 16, 12)
    joined = tmp_path / "ab.ts"
    joined.write_bytes(open(a, "rb").read() + open(b, "rb").read())
    for seq_chunk in (1, 4):
        out = tmp_path / f"pha{seq_chunk}"
        n = convert_video(FakeMatting(), str(joined), output_type="png_sequence", output_alpha=str(out),
                          seq_chunk=seq_chunk, progress=False)
        assert n == 6
        assert {read_png(out / f"{i:04d}.png", "gray").shape for i in range(6)} == {(24, 32)}


def test_numpy_numbers_are_taken(clip, tmp_path):
    """Numbers computed with numpy (np.float32 ratios, np.int64 chunk sizes) are numbers too."""
    m = FakeMatting()
    out = str(tmp_path / "a.mp4")
    convert_video(m, clip, output_alpha=out, downsample_ratio=np.float32(0.5), seq_chunk=np.int64(2),
                  num_workers=np.int64(0), output_video_mbps=np.float32(2), progress=False,
                  background=(np.uint8(0), np.float32(255), np.int64(0)))
    assert os.path.exists(out)
    assert [(t, type(ratio)) for t, _, ratio, _ in m.calls] == [(2, float), (1, float)]  # 3 frames, chunks of 2
