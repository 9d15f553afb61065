"""Helpers for the video and CLI tests: tiny generated clips, a fake model, decoding back.

The clips are made with PyAV here, so the tests need no media files. Frame ``i``
of :func:`make_video` is a known pattern (:func:`pattern`), so decoded values can
be checked against it within the codec's loss.
"""
from __future__ import annotations

import os
from fractions import Fraction

import av
import numpy as np
import torch


def pattern(i: int, height: int, width: int) -> np.ndarray:
    """Frame ``i`` of the test clips: (H, W, 3) uint8, smooth gradients (codec friendly)
    that move with ``i``, so every frame differs from the others."""
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    r = 40 + 170 * x + 0 * y
    g = 40 + 170 * y + 0 * x
    b = np.full_like(r, 30 + (7 * i) % 200)
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def make_video(path: str, n: int, width: int = 32, height: int = 24,
               rate: Fraction | int = 25, codec: str | None = None, audio: bool | str = False,
               options: dict | None = None, pix_fmt: str | None = None) -> str:
    """Write an ``n``-frame clip of :func:`pattern` frames (and optionally a 440 Hz mono
    tone as long as the video: AAC for ``audio=True``, else ``audio`` names the encoder,
    e.g. ``'libopus'``, ``'flac'``) to ``path``; returns ``path``. H.264 by default, in
    yuv444p when a size is odd (4:2:0 needs even sizes)."""
    ext = os.path.splitext(path)[1]
    codec = codec or {".webm": "libvpx-vp9", ".mov": "prores_ks"}.get(ext, "libx264")
    if pix_fmt is None:
        pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    with av.open(path, "w", options=options or {}) as c:
        v = c.add_stream(codec, rate=Fraction(rate))
        v.width, v.height, v.pix_fmt = width, height, pix_fmt
        a = None
        sample_rate = 48000 if audio == "libopus" else 44100   # Opus has no 44.1 kHz
        if audio:
            a = c.add_stream("aac" if audio is True else audio, rate=sample_rate, layout="mono")
        samples = 0
        seconds_per_frame = 1 / Fraction(rate)
        for i in range(n):
            for p in v.encode(av.VideoFrame.from_ndarray(pattern(i, height, width), format="rgb24")):
                c.mux(p)
            while a is not None and samples < (i + 1) * seconds_per_frame * sample_rate:
                t = (np.arange(1024) + samples) / sample_rate
                tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None]
                frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = samples
                frame.time_base = Fraction(1, sample_rate)
                for p in a.encode(frame):
                    c.mux(p)
                samples += 1024
        for p in v.encode():
            c.mux(p)
        if a is not None:
            for p in a.encode():
                c.mux(p)
    return path


def decode(path: str, fmt: str = "rgb24", codec: str | None = None):
    """Decode every video frame of ``path``: returns (frames (N, H, W, C) uint8 array,
    stream info dict with frame_rate, time_base, pts (list), audio codec or None).
    ``codec`` forces a decoder (``'libvpx-vp9'`` reads VP9's alpha)."""
    with av.open(path) as c:
        s = c.streams.video[0]
        info = {"frame_rate": s.average_rate, "time_base": s.time_base,
                "width": s.width, "height": s.height, "codec": s.codec_context.name,
                "audio": c.streams.audio[0].codec_context.name if c.streams.audio else None,
                "audio_seconds": None}
        if c.streams.audio:
            a = c.streams.audio[0]
            info["audio_seconds"] = float(a.duration * a.time_base) if a.duration else \
                c.duration / 1e6
        frames, pts = [], []
        if codec is None:
            decoded = c.decode(s)
        else:
            ctx = av.CodecContext.create(codec, "r")
            decoded = (f for packet in c.demux(s) for f in ctx.decode(packet))
        for f in decoded:
            frames.append(f.to_ndarray(format=fmt))
            pts.append(f.pts)
        info["pts"] = pts
    return np.stack(frames), info


def write_png(path, image: np.ndarray) -> None:
    """Write a (H, W, 3) uint8 RGB image as a PNG file."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = image.shape[1], image.shape[0], "rgb24"
        for p in s.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


def read_png(path: str, fmt: str) -> np.ndarray:
    with av.open(path) as c:
        return next(c.decode(video=0)).to_ndarray(format=fmt)


class FakeMatting(torch.nn.Module):
    """A model with RVM's contract whose outputs are easy to predict.

    ``pha`` = mean of the RGB channels, ``fgr`` = ``1 - src``. The recurrent state
    ``r1`` counts the frames seen so far, so a test can check that the state is
    carried from chunk to chunk: every call is recorded in ``calls`` as
    ``(T, frames seen before, downsample_ratio, dtype)``. One parameter, so that
    ``convert_video`` finds a device and dtype. ``fail_at``: raise
    ``fail_with`` on that call (0-based), to test clean-up.
    """

    def __init__(self, fail_at: int | None = None, fail_with: type = KeyboardInterrupt):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple] = []
        self.fail_at, self.fail_with = fail_at, fail_with

    def forward(self, src, r1=None, r2=None, r3=None, r4=None, downsample_ratio=1.0):
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise self.fail_with("stopped by the test")
        seen = 0 if r1 is None else int(r1.item())
        self.calls.append((src.shape[1], seen, downsample_ratio, src.dtype))
        pha = src.mean(-3, keepdim=True) * self.scale
        fgr = 1 - src
        r1 = torch.tensor(float(seen + src.shape[1]))
        return fgr, pha, r1, r2, r3, r4


def expected_uint8(x: np.ndarray) -> np.ndarray:
    """float values in [0, 1] -> uint8 as convert_video rounds them."""
    return np.clip(np.round(x.astype(np.float64) * 255), 0, 255).astype(np.uint8)
