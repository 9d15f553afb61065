"""convert_video: RVM's call, exact values through PNG, video formats, timing, audio,
alpha round trips, bad inputs, clean-up after errors and Ctrl-C, constant memory.

Every clip is generated here with PyAV (see video_utils). Most tests use
:class:`FakeMatting`, whose outputs are computed again in the test from the decoded
input; one test runs the real BiMatting network.
"""
import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pytest
import torch

from bimatting_triton.video import (GREEN, VIDEO_FORMATS, auto_downsample_ratio,
                                    convert_video)
from bimatting_triton.video.pipeline import Interrupts, request_interrupt
from bimatting_triton.video.readers import read_image
from bimatting_triton.video.writers import check_encoder

from video_utils import FakeMatting, decode, make_video, read_png, write_png

NTSC = Fraction(30000, 1001)


def expected(frames: np.ndarray):
    """FakeMatting's fgr, pha for decoded RGB frames (N, H, W, 3) uint8, computed the way
    convert_video feeds the model (float32, /255): float tensors (N, C, H, W)."""
    src = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)
    return 1 - src, src.mean(1, keepdim=True)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return x.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def list_pngs(folder):
    return sorted(os.listdir(folder))


def leftovers(folder, keep):
    """Files in ``folder`` other than ``keep`` (temporary files included: they start with '.')."""
    return sorted(set(os.listdir(folder)) - set(keep))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """7 frames, 32x24, 25 fps, H.264, no audio."""
    return make_video(str(tmp_path_factory.mktemp("clip") / "in.mp4"), 7, 32, 24, rate=25)


@pytest.fixture(scope="module")
def ntsc_audio_clip(tmp_path_factory):
    """12 frames, 32x24, 29.97 fps, H.264 with an AAC tone."""
    return make_video(str(tmp_path_factory.mktemp("ntsc") / "in.mp4"), 12, 32, 24, rate=NTSC, audio=True)


# ----------------------------------------------------------------------------- values

def test_png_sequence_values_exact_and_state_carried(clip, tmp_path):
    model = FakeMatting()
    n = convert_video(model, clip, output_type="png_sequence", seq_chunk=3, progress=False,
                      output_composition=str(tmp_path / "com"), output_alpha=str(tmp_path / "pha"),
                      output_foreground=str(tmp_path / "fgr"))
    frames, _ = decode(clip)
    fgr, pha = expected(frames)
    assert n == 7
    # chunks of 3, 3, 1; the recurrent state (frames seen) flows from call to call
    assert [(t, seen) for t, seen, _, _ in model.calls] == [(3, 0), (3, 3), (1, 6)]
    assert {r for _, _, r, _ in model.calls} == {1.0}  # auto ratio: min(512 / 32, 1)
    for name in ("com", "pha", "fgr"):
        assert list_pngs(tmp_path / name) == [f"{i:04d}.png" for i in range(7)]
    com = torch.cat([fgr * (pha > 0), pha], 1)  # RGBA, straight alpha, as RVM
    for i in range(7):
        np.testing.assert_array_equal(read_png(tmp_path / "pha" / f"{i:04d}.png", "gray"),
                                      to_uint8(pha)[i, ..., 0])
        np.testing.assert_array_equal(read_png(tmp_path / "fgr" / f"{i:04d}.png", "rgb24"),
                                      to_uint8(fgr)[i])
        np.testing.assert_array_equal(read_png(tmp_path / "com" / f"{i:04d}.png", "rgba"),
                                      to_uint8(com)[i])


def test_background_colour_and_image(clip, tmp_path):
    frames, _ = decode(clip)
    fgr, pha = expected(frames)
    convert_video(FakeMatting(), clip, output_type="png_sequence", progress=False,
                  output_composition=str(tmp_path / "colour"), background=(10, 20, 250))
    bg = torch.tensor([10, 20, 250]).float().div(255).view(1, 3, 1, 1)
    want = to_uint8(fgr * pha + bg * (1 - pha))
    for i in (0, 6):
        np.testing.assert_array_equal(read_png(tmp_path / "colour" / f"{i:04d}.png", "rgb24"), want[i])

    # An image of the frame's size is used as it is, pixel for pixel.
    picture = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    with av.open(str(tmp_path / "bg.png"), "w") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 32, 24, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
            c.mux(p)
    convert_video(FakeMatting(), clip, output_type="png_sequence", progress=False,
                  output_composition=str(tmp_path / "image"), background=str(tmp_path / "bg.png"))
    bg = torch.from_numpy(picture).permute(2, 0, 1)[None].float().div(255)
    want = to_uint8(fgr * pha + bg * (1 - pha))
    got = read_png(tmp_path / "image" / "0003.png", "rgb24")
    np.testing.assert_allclose(got.astype(int), want[3].astype(int), atol=1)


def test_background_image_other_aspect_covers_frame(clip, tmp_path):
    # A flat grey image of another size and aspect: scaled to cover, it stays flat grey.
    with av.open(str(tmp_path / "grey.png"), "w") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 9, 40, "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(np.full((40, 9, 3), 77, np.uint8), format="rgb24")):
            c.mux(p)
    convert_video(FakeMatting(), clip, output_type="png_sequence", progress=False,
                  output_composition=str(tmp_path / "com"), background=str(tmp_path / "grey.png"))
    frames, _ = decode(clip)
    fgr, pha = expected(frames)
    want = to_uint8(fgr * pha + 77 / 255 * (1 - pha))
    np.testing.assert_allclose(read_png(tmp_path / "com" / "0000.png", "rgb24").astype(int),
                               want[0].astype(int), atol=1)


def test_auto_downsample_ratio():
    assert auto_downsample_ratio(1080, 1920) == 512 / 1920
    assert auto_downsample_ratio(2160, 1440) == 512 / 2160
    assert auto_downsample_ratio(288, 512) == 1.0
    assert auto_downsample_ratio(100, 60) == 1.0


def test_explicit_ratio_resize_dtype(clip, tmp_path):
    model = FakeMatting()
    convert_video(model, clip, input_resize=(16, 10), downsample_ratio=0.25, dtype=torch.float64,
                  output_type="png_sequence", output_alpha=str(tmp_path / "pha"), progress=False)
    assert {(r, d) for _, _, r, d in model.calls} == {(0.25, torch.float64)}
    assert read_png(tmp_path / "pha" / "0000.png", "gray").shape == (10, 16)


# ----------------------------------------------------------------------------- video formats

def test_h264_keeps_ntsc_rate_timestamps_and_audio(ntsc_audio_clip, tmp_path):
    out, pha = str(tmp_path / "com.mp4"), str(tmp_path / "pha.mp4")
    convert_video(FakeMatting(), ntsc_audio_clip, output_composition=out, output_alpha=pha,
                  output_video_mbps=2.5, seq_chunk=4, progress=False)
    src, src_info = decode(ntsc_audio_clip)
    com, info = decode(out)
    assert len(com) == 12
    assert info["frame_rate"] == NTSC                     # exact, not rounded to 30
    assert float(info["time_base"]) > 0
    in_seconds = [float(p * src_info["time_base"]) for p in src_info["pts"]]
    out_seconds = [float(p * info["time_base"]) for p in info["pts"]]
    np.testing.assert_allclose(out_seconds, in_seconds, atol=1e-6)
    assert info["audio"] == "aac"                         # copied from the input
    assert info["audio_seconds"] == pytest.approx(src_info["audio_seconds"], abs=0.05)
    # opaque composition on RVM's green, within H.264's loss
    fgr, a = expected(src)
    green = torch.tensor(GREEN).float().div(255).view(1, 3, 1, 1)
    want = to_uint8(fgr * a + green * (1 - a)).astype(float)
    assert np.abs(com.astype(float) - want).mean() < 4
    matte, _ = decode(pha, "gray")
    assert np.abs(matte.astype(float) - to_uint8(a)[..., 0]).mean() < 3


def test_variable_frame_rate_timestamps_kept(tmp_path):
    stamps_ms = [0, 40, 100, 120, 200, 260, 400]
    path = str(tmp_path / "vfr.mkv")
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, ms in enumerate(stamps_ms):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 9 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    for ext in (".mp4", ".mov"):
        out = str(tmp_path / f"a{ext}")
        convert_video(FakeMatting(), path, output_alpha=out, seq_chunk=3, progress=False)
        _, info = decode(out)
        seconds = [float(p * info["time_base"]) for p in info["pts"]]
        np.testing.assert_allclose(seconds, np.array(stamps_ms) / 1000, atol=1e-9)


@pytest.mark.parametrize("ext", [".mkv", ".mp4"])
def test_variable_frame_rate_last_frame_held(tmp_path, ext):
    """Frames at 0/40/80/120 ms, the last one shown for 3 s (a slide held at the end): a
    valid file whose frames end at 3.12 s, not a truncated one (the check used the
    average frame period for the last frame, and said "frames end at 0.160 s")."""
    stamps_ms, held_ms = [0, 40, 80, 120], 3000
    durations = dict(zip(stamps_ms, [40, 40, 40, held_ms]))
    path = str(tmp_path / f"held{ext}")
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)

        def mux(packets):
            for p in packets:
                p.duration = durations[p.pts]   # in the encoder's time base, ms
                c.mux(p)
        for i, ms in enumerate(stamps_ms):
            frame = av.VideoFrame.from_ndarray(np.full((24, 32, 3), 9 * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = ms, Fraction(1, 1000)
            mux(s.encode(frame))
        mux(s.encode())
    with av.open(path) as c:   # the header announces the held frame's time
        assert c.duration / 1e6 == pytest.approx(3.12, abs=0.01)
    out = str(tmp_path / "a.mp4")
    assert convert_video(FakeMatting(), path, output_alpha=out, progress=False) == 4
    _, info = decode(out)
    np.testing.assert_allclose([float(p * info["time_base"]) for p in info["pts"]],
                               np.array(stamps_ms) / 1000, atol=1e-9)


def test_audio_can_be_left_out(ntsc_audio_clip, tmp_path):
    out = str(tmp_path / "com.mkv")
    convert_video(FakeMatting(), ntsc_audio_clip, output_composition=out, audio=False, progress=False)
    frames, info = decode(out)
    assert len(frames) == 12 and info["audio"] is None and info["frame_rate"] == NTSC


def test_prores_4444_alpha_round_trip(clip, tmp_path):
    out = str(tmp_path / "com.mov")
    convert_video(FakeMatting(), clip, output_composition=out, progress=False)
    src, src_info = decode(clip)
    rgba, info = decode(out, "rgba")
    assert info["codec"] == "prores" and info["frame_rate"] == 25 and info["audio"] is None
    assert len(rgba) == 7 and rgba.shape[1:] == (24, 32, 4)
    fgr, pha = expected(src)
    # ProRes keeps alpha losslessly at 8-bit precision (stored in 16 bits)
    np.testing.assert_allclose(rgba[..., 3].astype(int), to_uint8(pha)[..., 0].astype(int), atol=1)
    colour = rgba[..., :3].astype(float) - to_uint8(fgr * (pha > 0)).astype(float)
    assert np.abs(colour).mean() < 3


def test_vp9_alpha_webm_and_audio_transcoded(ntsc_audio_clip, tmp_path):
    out = str(tmp_path / "com.webm")
    convert_video(FakeMatting(), ntsc_audio_clip, output_composition=out, output_video_mbps=4.0,
                  progress=False)
    src, _ = decode(ntsc_audio_clip)
    rgba, info = decode(out, "rgba", codec="libvpx-vp9")   # FFmpeg's own vp9 decoder drops alpha
    assert info["codec"] == "vp9" and info["frame_rate"] == NTSC
    assert info["audio"] == "opus"                          # AAC cannot go in WebM: re-encoded
    assert len(rgba) == 12
    _, pha = expected(src)
    assert np.abs(rgba[..., 3].astype(float) - to_uint8(pha)[..., 0]).mean() < 4


@pytest.mark.parametrize("audio,ext,want", [
    ("libopus", ".mov", "aac"),       # mov lists Opus and FLAC but refuses them: re-encoded
    ("flac", ".mov", "aac"),
    ("pcm_s16le", ".mp4", "aac"),     # mp4 lists PCM but refuses it
    ("pcm_s16le", ".mov", "pcm_s16le"),   # what the container takes is still copied as it is
    ("libopus", ".mp4", "opus"),
])
def test_audio_the_container_refuses_is_re_encoded(tmp_path, audio, ext, want):
    clip = make_video(str(tmp_path / "in.mkv"), 10, 32, 24, rate=25, audio=audio)
    out = str(tmp_path / f"com{ext}")
    convert_video(FakeMatting(), clip, output_composition=out, progress=False)
    frames, info = decode(out)
    assert len(frames) == 10 and info["audio"] == want
    assert info["audio_seconds"] == pytest.approx(decode(clip)[1]["audio_seconds"], abs=0.05)
    assert leftovers(tmp_path, ["in.mkv", f"com{ext}"]) == []


@pytest.mark.parametrize("ext", [".mp4", ".mov", ".webm"])
def test_odd_sizes(tmp_path, ext):
    clip = make_video(str(tmp_path / "odd.mp4"), 3, 33, 17, rate=25)
    out = str(tmp_path / f"pha{ext}")
    convert_video(FakeMatting(), clip, output_alpha=out, progress=False)
    matte, info = decode(out, "gray")
    src, _ = decode(clip)
    _, pha = expected(src)
    if VIDEO_FORMATS[ext].even_size:          # H.264 4:2:0: padded by repeating the edge
        assert (info["width"], info["height"]) == (34, 18)
        np.testing.assert_array_equal(matte[:, :, 33], matte[:, :, 32])
        matte = matte[:, :17, :33]
    else:
        assert (info["width"], info["height"]) == (33, 17)
    assert np.abs(matte.astype(float) - to_uint8(pha)[..., 0]).mean() < 4


ORIENTATIONS = [(90, False, False), (-90, False, False), (180, False, False), (0, True, False),
                (0, False, True), (90, True, False), (-90, True, False)]


@pytest.mark.skipif(not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
                    reason="this PyAV cannot write a display matrix")
@pytest.mark.parametrize("degrees, hflip, vflip", ORIENTATIONS)
def test_display_rotation_is_applied(tmp_path, degrees, hflip, vflip):
    """A stream shown turned or mirrored (phone videos) is read upright, as players show it:
    PyAV's display rotation is counterclockwise, its flips mirror after it."""
    coded = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = str(tmp_path / "turned.mov")
    with av.open(path, "w") as c:  # PNG in MOV: lossless, so the frames compare exactly
        s = c.add_stream("png", rate=25)
        s.width, s.height, s.pix_fmt = 10, 6, "rgb24"
        s.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for _ in range(2):
            for packet in s.encode(av.VideoFrame.from_ndarray(coded, format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    upright = np.rot90(coded, degrees // 90)
    upright = upright[:, ::-1] if hflip else upright
    upright = upright[::-1] if vflip else upright
    out = str(tmp_path / "pha")
    convert_video(FakeMatting(), path, output_type="png_sequence", output_foreground=out, progress=False)
    frames = [read_png(os.path.join(out, n), "rgb24") for n in sorted(os.listdir(out))]
    assert len(frames) == 2
    for frame in frames:  # the fake model's foreground is 1 - src
        np.testing.assert_array_equal(frame, 255 - upright)
    # input_resize is the upright size
    out2 = str(tmp_path / "resized")
    convert_video(FakeMatting(), path, output_type="png_sequence", output_alpha=out2, progress=False,
                  input_resize=(upright.shape[1] * 2, upright.shape[0] * 2))
    resized = read_png(os.path.join(out2, sorted(os.listdir(out2))[0]), "gray")
    assert resized.shape[:2] == (upright.shape[0] * 2, upright.shape[1] * 2)


def _jpeg_with_exif_orientation(plain: bytes, value: int, order: str) -> bytes:
    """``plain`` (a JPEG file's bytes) with an APP1 EXIF block holding only Orientation = value."""
    mark = b"II" if order == "little" else b"MM"

    def n(v, size):
        return v.to_bytes(size, order)
    tiff = mark + n(42, 2) + n(8, 4) + n(1, 2) + n(0x0112, 2) + n(3, 2) + n(1, 4) + n(value, 2) + n(0, 2) + n(0, 4)
    app1 = b"Exif\0\0" + tiff
    return plain[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + plain[2:]


@pytest.mark.parametrize("value, order", [(6, "big"), (8, "little"), (2, "big"), (3, "little"), (5, "big")])
def test_jpeg_exif_orientation_is_applied(tmp_path, value, order):
    """Photos are read upright: the EXIF Orientation tag's standard meanings."""
    coded = np.random.default_rng(2).integers(0, 256, (16, 32, 3), dtype=np.uint8)
    plain = tmp_path / "plain.jpg"
    with av.open(str(plain), "w", format="image2") as c:
        s = c.add_stream("mjpeg", rate=1)
        s.width, s.height, s.pix_fmt = 32, 16, "yuvj444p"
        for packet in s.encode(av.VideoFrame.from_ndarray(coded, format="rgb24").reformat(format="yuvj444p")):
            c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    turned = tmp_path / "turned.jpg"
    turned.write_bytes(_jpeg_with_exif_orientation(plain.read_bytes(), value, order))
    decoded = read_image(str(plain))  # the same compressed pixels, without the tag
    expected = {6: np.rot90(decoded, -1),  # "rotate 90 CW to display"
                8: np.rot90(decoded, 1),
                2: decoded[:, ::-1],  # mirrored
                3: decoded[::-1, ::-1],
                5: decoded.transpose(1, 0, 2)}[value]
    np.testing.assert_array_equal(read_image(str(turned)), expected)
    assert read_image(str(turned), size=(8, 20)).shape == (20, 8, 3)  # size is (width, height) upright


def test_encoders_present():
    # The formats promised in the docs need these encoders; a build without one gets a clear error.
    for fmt in VIDEO_FORMATS.values():
        check_encoder(fmt.codec, fmt.pix_fmt)
        if fmt.alpha_pix_fmt:
            check_encoder(fmt.codec, fmt.alpha_pix_fmt)
    with pytest.raises(RuntimeError, match="'no-such-encoder'"):
        check_encoder("no-such-encoder")


# ----------------------------------------------------------------------------- image inputs

def test_image_folder_natural_order_and_frame_rate(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    images = {i: np.full((6, 10, 3), 20 * i, np.uint8) for i in (1, 2, 10)}
    for i, image in images.items():
        write_png(folder / f"f{i}.png", image)
    (folder / "notes.txt").write_text("not an image")
    out = str(tmp_path / "pha.mov")
    convert_video(FakeMatting(), str(folder), output_alpha=out, frame_rate=24, progress=False)
    matte, info = decode(out, "gray")
    assert info["frame_rate"] == 24 and len(matte) == 3
    # natural order f1, f2, f10: the mean grey of each frame (pha = mean of RGB)
    np.testing.assert_allclose(matte[:, 0, 0], [20, 40, 200], atol=1)
    convert_video(FakeMatting(), str(folder), output_alpha=str(tmp_path / "rvm.mp4"), progress=False)
    assert decode(str(tmp_path / "rvm.mp4"))[1]["frame_rate"] == 30   # RVM's default


@pytest.mark.parametrize("frame_rate,want", [
    (NTSC, NTSC), (Fraction(2997, 100), Fraction(2997, 100)),   # Fractions: exact
    (29.97, NTSC), (23.976, Fraction(24000, 1001)),              # floats near NTSC rates: NTSC
    (12.5, Fraction(25, 2)), (np.float32(24), Fraction(24)),
])
def test_image_frame_rate_types(tmp_path, frame_rate, want):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2):
        write_png(folder / f"{i}.png", np.full((6, 10, 3), 20 * i, np.uint8))
    out = str(tmp_path / "pha.mp4")
    convert_video(FakeMatting(), str(folder), output_alpha=out, frame_rate=frame_rate, progress=False)
    _, info = decode(out)
    assert info["frame_rate"] == want
    assert [p * info["time_base"] for p in info["pts"]] == [0, 1 / want]


@pytest.mark.parametrize("frame_rate,error", [
    (True, TypeError), ("30", TypeError), (float("nan"), ValueError), (float("inf"), ValueError),
    (0, ValueError), (Fraction(-25), ValueError), (-29.97, ValueError),
])
def test_bad_frame_rate(clip, tmp_path, frame_rate, error):
    with pytest.raises(error, match="frame_rate"):
        convert_video(FakeMatting(), clip, output_alpha=str(tmp_path / "a.mp4"), frame_rate=frame_rate,
                      progress=False)
    assert os.listdir(tmp_path) == []


def test_single_image_to_png_file(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    write_png(tmp_path / "photo.png", image)
    out = tmp_path / "cutout.png"
    convert_video(FakeMatting(), str(tmp_path / "photo.png"), output_type="png_sequence",
                  output_composition=str(out), progress=False)
    fgr, pha = expected(image[None])
    np.testing.assert_array_equal(read_png(out, "rgba"), to_uint8(torch.cat([fgr * (pha > 0), pha], 1))[0])
    assert leftovers(tmp_path, ["photo.png", "cutout.png"]) == []


def test_image_folder_mixed_sizes_is_an_error(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    write_png(folder / "0.png", np.zeros((6, 10, 3), np.uint8))
    write_png(folder / "1.png", np.zeros((8, 10, 3), np.uint8))
    with pytest.raises(ValueError, match="1.png.*input_resize"):
        convert_video(FakeMatting(), str(folder), output_alpha=str(tmp_path / "a.mp4"), progress=False)
    assert leftovers(tmp_path, ["frames"]) == []


# ----------------------------------------------------------------------------- errors

def test_argument_errors_before_any_file(clip, tmp_path):
    m = FakeMatting()
    out = str(tmp_path / "o.mp4")
    cases = [
        (dict(input_source=str(tmp_path / "missing.mp4"), output_alpha=out), FileNotFoundError, "missing.mp4"),
        (dict(input_source=clip, output_alpha=out, output_type="gif"), ValueError, "output_type"),
        (dict(input_source=clip), ValueError, "output_composition"),
        (dict(input_source=clip, output_alpha=str(tmp_path / "o.avi")), ValueError, "'.avi'"),
        (dict(input_source=clip, output_alpha=clip), ValueError, "input file itself"),
        (dict(input_source=clip, output_alpha=out, output_foreground=out), ValueError, "another output"),
        (dict(input_source=clip, output_alpha=str(tmp_path / "no" / "o.mp4")), FileNotFoundError, "does not exist"),
        (dict(input_source=clip, output_alpha=os.path.join(clip, "o.mp4")), NotADirectoryError, "not a folder"),
        (dict(input_source=clip, output_alpha=str(tmp_path)), ValueError, "unknown video file ending"),
        (dict(input_source=clip, output_alpha=out, downsample_ratio=0), ValueError, "downsample_ratio"),
        (dict(input_source=clip, output_alpha=out, downsample_ratio=1.5), ValueError, "downsample_ratio"),
        (dict(input_source=clip, output_alpha=out, seq_chunk=0), ValueError, "seq_chunk"),
        (dict(input_source=clip, output_alpha=out, output_video_mbps=-1), ValueError, "output_video_mbps"),
        (dict(input_source=clip, output_alpha=out, input_resize=(16,)), ValueError, "input_resize"),
        (dict(input_source=clip, output_composition=out, background=(1, 2)), TypeError, "background"),
        (dict(input_source=clip, output_composition=out, background=(0, 0, 300)), ValueError, "0..255"),
        (dict(input_source=clip, output_composition=out, background=str(tmp_path / "bg.png")),
         FileNotFoundError, "background image"),
        (dict(input_source=clip, output_type="png_sequence", output_alpha=str(tmp_path / "a.png")),
         ValueError, "folders"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            convert_video(m, progress=False, **kwargs)
    assert m.calls == []
    assert os.listdir(tmp_path) == []


def test_png_sequence_never_merges_into_existing_files(clip, tmp_path):
    (tmp_path / "pha").mkdir()
    (tmp_path / "pha" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_video(FakeMatting(), clip, output_type="png_sequence",
                      output_alpha=str(tmp_path / "pha"), progress=False)
    assert os.listdir(tmp_path / "pha") == ["mine.txt"]
    (tmp_path / "empty").mkdir()   # an empty folder is fine
    convert_video(FakeMatting(), clip, output_type="png_sequence",
                  output_alpha=str(tmp_path / "empty"), progress=False)
    assert len(os.listdir(tmp_path / "empty")) == 7


def test_unwritable_folder(clip, tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
    elif os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        folder = "/proc/sys"      # root may write anywhere, except where the kernel says no
    else:
        pytest.skip("no folder this user cannot write to")
    try:
        with pytest.raises(PermissionError, match="not writable"):
            convert_video(FakeMatting(), clip, output_alpha=os.path.join(folder, "a.mp4"), progress=False)
    finally:
        if folder != "/proc/sys":
            folder.chmod(0o700)


def test_not_a_video(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is text, not a video\n" * 50)
    with pytest.raises(ValueError, match="not a readable video"):
        convert_video(FakeMatting(), str(bad), output_alpha=str(tmp_path / "a.mp4"), progress=False)
    assert leftovers(tmp_path, ["notes.mp4"]) == []


def truncate(path, fraction=0.5):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * fraction)])
    return path


def noisy_video(path, n=30, **options):
    """A clip of noise (large frames of similar size, so truncating it cuts frames off)."""
    with av.open(path, "w", options=options) as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(rng.integers(0, 256, (32, 32, 3), np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.mark.parametrize("name,options,when", [
    ("end_index.mp4", {}, "open"),                         # index at the end: cut off
    ("faststart.mp4", {"movflags": "faststart"}, "run"),   # index first: frames missing
    ("cut.mkv", {}, "run"),                                # header announces a longer duration
])
def test_truncated_video(tmp_path, name, options, when):
    path = truncate(noisy_video(str(tmp_path / name), **options))
    model = FakeMatting()
    with pytest.raises(ValueError, match="truncated") as info:
        convert_video(model, path, output_alpha=str(tmp_path / "a.mp4"),
                      output_composition=str(tmp_path / "c.mov"), progress=False)
    assert str(path) in str(info.value)
    assert (model.calls == []) == (when == "open")
    assert leftovers(tmp_path, [name]) == []               # no output, no temporary file


def test_zero_frames(tmp_path):
    # A video stream without frames (the file holds some audio, so that it opens).
    path = str(tmp_path / "empty.mkv")
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
        a = c.add_stream("aac", rate=44100, layout="mono")
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 44100, i * 1024, Fraction(1, 44100)
            for p in a.encode(frame):
                c.mux(p)
        for p in a.encode():
            c.mux(p)
    folder = tmp_path / "nothing"
    folder.mkdir()
    for source in (path, str(folder)):
        with pytest.raises(ValueError, match="no frames"):
            convert_video(FakeMatting(), source, output_alpha=str(tmp_path / "a.mp4"), progress=False)
    assert leftovers(tmp_path, ["empty.mkv", "nothing"]) == []


def test_model_with_wrong_outputs(clip, tmp_path):
    def bad_model(src, *rec, downsample_ratio=1):
        return src[:, :, :1], src[:, :, :1], *rec   # fgr with one channel
    with pytest.raises(ValueError, match="fgr"):
        convert_video(bad_model, clip, output_alpha=str(tmp_path / "a.mp4"), progress=False)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("output_type", ["video", "png_sequence"])
def test_interrupt_leaves_no_file(clip, tmp_path, error, output_type):
    model = FakeMatting(fail_at=2, fail_with=error)
    names = {"video": ("c.mp4", "a.mov", "f.webm"), "png_sequence": ("c", "a", "f")}[output_type]
    with pytest.raises(error, match="stopped by the test"):
        convert_video(model, clip, output_type=output_type, seq_chunk=2, progress=False,
                      output_composition=str(tmp_path / names[0]),
                      output_alpha=str(tmp_path / names[1]), output_foreground=str(tmp_path / names[2]))
    assert len(model.calls) == 2          # it did get going before the interrupt
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_request_interrupt_sets_the_active_flag(monkeypatch, sigint):
    """request_interrupt (the CLI's SIGTERM handler) stops a run like a first Ctrl-C (a flag,
    raised at the next check; a second request raises at once), also where SIGINT is
    ignored (then Interrupts leaves SIGINT alone but is still reachable); with no run
    active it raises KeyboardInterrupt."""
    if sigint == "ignored":
        monkeypatch.setattr(signal, "getsignal", lambda s: signal.SIG_IGN)
        installed = []
        monkeypatch.setattr(signal, "signal", lambda *a: installed.append(a))
    with pytest.raises(KeyboardInterrupt):
        request_interrupt()
    with Interrupts() as outer:
        with Interrupts() as inner:
            inner.check()                       # nothing asked yet
            request_interrupt()                 # the flag only: no exception here
            with pytest.raises(KeyboardInterrupt):
                inner.check()
            outer.check()                       # the innermost one got it
            with pytest.raises(KeyboardInterrupt):
                request_interrupt()             # a second request: at once
    with pytest.raises(KeyboardInterrupt):
        request_interrupt()                     # both exited: none active again
    if sigint == "ignored":
        assert installed == []                  # an ignored SIGINT stays ignored


def test_existing_output_replaced_only_on_success(clip, tmp_path):
    out = tmp_path / "a.mp4"
    out.write_bytes(b"previous result")
    with pytest.raises(KeyboardInterrupt):
        convert_video(FakeMatting(fail_at=1), clip, output_alpha=str(out), seq_chunk=2, progress=False)
    assert out.read_bytes() == b"previous result"
    convert_video(FakeMatting(), clip, output_alpha=str(out), progress=False)
    assert len(decode(str(out))[0]) == 7
    assert leftovers(tmp_path, ["a.mp4"]) == []


# ----------------------------------------------------------------------------- the real network

def test_real_bimatting_matches_direct_calls(tmp_path):
    from bimatting_triton import BiMatting
    clip = make_video(str(tmp_path / "in.mp4"), 3, 40, 24, rate=25)
    model = BiMatting().eval()
    convert_video(model, clip, downsample_ratio=0.5, seq_chunk=2, output_type="png_sequence",
                  output_alpha=str(tmp_path / "pha"), output_foreground=str(tmp_path / "fgr"),
                  progress=False)
    frames, _ = decode(clip)
    src = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div(255)[None]
    with torch.inference_mode():      # the same chunks, by hand, carrying the state
        fgr1, pha1, *rec = model(src[:, :2], *[None] * 4, downsample_ratio=0.5)
        fgr2, pha2, *rec = model(src[:, 2:], *rec, downsample_ratio=0.5)
    pha, fgr = torch.cat([pha1, pha2], 1)[0], torch.cat([fgr1, fgr2], 1)[0]
    for i in range(3):
        np.testing.assert_array_equal(read_png(tmp_path / "pha" / f"{i:04d}.png", "gray"),
                                      to_uint8(pha)[i, ..., 0])
        np.testing.assert_array_equal(read_png(tmp_path / "fgr" / f"{i:04d}.png", "rgb24"),
                                      to_uint8(fgr)[i])


# ----------------------------------------------------------------------------- memory

_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[3])
    from video_utils import FakeMatting
    from bimatting_triton.video import convert_video
    n = convert_video(FakeMatting(), sys.argv[1], output_alpha=sys.argv[2], seq_chunk=8, progress=False)
    print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units and behaviour are Linux's")
def test_memory_does_not_grow_with_length(tmp_path):
    """Peak RSS converting 10,000 frames stays within 10 MiB of converting 500.

    At 32x32, holding every decoded frame would cost 30 MiB (uint8) or 120 MiB (float),
    so a pipeline that accumulates frames fails this test.
    """
    short = make_video(str(tmp_path / "short.mp4"), 500, 32, 32, codec="mpeg4")
    long = make_video(str(tmp_path / "long.mp4"), 10_000, 32, 32, codec="mpeg4")
    peaks = {}
    for name, clip in (("short", short), ("long", long)):
        run = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, clip, str(tmp_path / f"{name}_a.mp4"),
                              os.path.dirname(__file__)], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        frames, peak_kib = map(int, run.stdout.split()[-2:])
        assert frames == {"short": 500, "long": 10_000}[name]
        peaks[name] = peak_kib / 1024
    assert peaks["long"] - peaks["short"] < 10, peaks
