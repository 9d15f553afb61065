"""Frame sinks for :func:`convert_video`: video files, PNG sequences, single PNG images.

Every writer takes frames as ``uint8`` arrays of shape (T, H, W, C), C = 3 for
``kind='rgb'``, 4 for ``'rgba'`` (straight, not premultiplied, alpha) and 1 for
``'gray'``, plus one ``int`` timestamp per frame. Output is atomic: a writer works
on a hidden temporary name in the destination folder and moves it into place in
:meth:`close`; :meth:`abort` (after an error or Ctrl-C) deletes it, so a failed
run never leaves a file that looks complete.

Video formats, chosen by the file name's ending (see :data:`VIDEO_FORMATS`):

* ``.mp4``, ``.m4v``, ``.mkv``: H.264 (libx264), yuv420p; no alpha.
* ``.mov``: ProRes 4444 (prores_ks), yuv444p10le, or yuva444p10le when transparent;
  ProRes has no bitrate setting.
* ``.webm``: VP9 (libvpx-vp9), yuv420p, or yuva420p when transparent.

H.264 4:2:0 needs even frame sizes: an odd width or height is padded by
repeating the last column or row (the output is then one pixel larger).
Colours are converted with the BT.709 matrix in limited range and tagged so.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

import av
import numpy as np

from .audio import AudioPassthrough

__all__ = [
    "VideoFormat",
    "VIDEO_FORMATS",
    "video_format",
    "VideoWriter",
    "ImageSequenceWriter",
    "ImageWriter",
    "check_encoder",
    "MissingEncoderError",
]

KINDS = {"rgb": ("rgb24", 3), "rgba": ("rgba", 4), "gray": ("gray", 1)}

# BT.709 tags (values of FFmpeg's AVColorPrimaries / AVColorTransferCharacteristic /
# AVColorSpace) and limited ("MPEG", 16-235) range.
_BT709 = 1
_RANGE_MPEG = 1


@dataclass(frozen=True)
class VideoFormat:
    """How one file ending is encoded: container ``muxer``, ``codec``, pixel formats
    for opaque and (if the format has one) transparent frames, whether frame sizes
    must be even, whether the bitrate setting applies, and codec options."""

    muxer: str
    codec: str
    pix_fmt: str
    alpha_pix_fmt: str | None
    even_size: bool
    uses_bit_rate: bool
    options: dict = field(default_factory=dict)


VIDEO_FORMATS: dict[str, VideoFormat] = {
    ".mp4": VideoFormat("mp4", "libx264", "yuv420p", None, True, True),
    ".m4v": VideoFormat("mp4", "libx264", "yuv420p", None, True, True),
    ".mkv": VideoFormat("matroska", "libx264", "yuv420p", None, True, True),
    ".mov": VideoFormat("mov", "prores_ks", "yuv444p10le", "yuva444p10le", False, False,
                        {"profile": "4444", "vendor": "apl0"}),
    ".webm": VideoFormat("webm", "libvpx-vp9", "yuv420p", "yuva420p", False, True,
                         {"deadline": "good", "cpu-used": "4", "row-mt": "1"}),
}


def video_format(path: str, argument: str = "output") -> VideoFormat:
    """The :class:`VideoFormat` for ``path``'s ending; ``ValueError`` naming ``argument`` if unknown."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_FORMATS:
        raise ValueError(
            f"{argument} {path!r}: unknown video file ending {ext or '(none)'!r}; expected one of "
            f"{', '.join(VIDEO_FORMATS)} (or output_type='png_sequence' for a folder of PNGs)")
    return VIDEO_FORMATS[ext]


class MissingEncoderError(RuntimeError):
    """This PyAV/FFmpeg build lacks an encoder (or a pixel format of it) that an output needs."""


def check_encoder(codec: str, pix_fmt: str | None = None) -> None:
    """Raise :class:`MissingEncoderError` naming ``codec`` if this FFmpeg build cannot
    encode with it (or not in ``pix_fmt``)."""
    try:
        c = av.codec.Codec(codec, "w")
    except Exception as e:  # UnknownCodecError is not exported under one name in every PyAV
        raise MissingEncoderError(
            f"the encoder {codec!r} is not in this PyAV/FFmpeg build; install a PyAV wheel "
            f"built with it (pip install av) or choose another output format") from e
    if pix_fmt is not None and c.video_formats is not None and \
            pix_fmt not in {f.name for f in c.video_formats}:
        raise MissingEncoderError(f"the encoder {codec!r} of this FFmpeg build cannot write {pix_fmt!r} frames")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_prefix(name: str) -> str:
    """The start of a temporary name for ``name``: hidden, and short enough that the whole
    name stays within the 255-byte limit of file names however long ``name`` is."""
    return f".{os.fsdecode(os.fsencode(name)[:100])}."  # bytes: a character may take 4


def _temp_path(path: str) -> str:
    """Create an empty hidden file beside ``path`` (same folder, so the final rename is atomic).

    ``mkstemp`` makes it private (0600); it gets the permissions a plainly created
    file would have, since it becomes the output.
    """
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(name), suffix=".part", dir=folder)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _as_frames(images: np.ndarray, kind: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != KINDS[kind][1]:
        raise ValueError(f"expected uint8 frames of shape (T, H, W, {KINDS[kind][1]}) for "
                         f"kind={kind!r}, got {images.dtype} {tuple(images.shape)}")
    return images


def _to_video_frame(image: np.ndarray, kind: str) -> av.VideoFrame:
    array = image[..., 0] if kind == "gray" else image
    return av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format=KINDS[kind][0])


class VideoWriter:
    """Encode frames into a video file; the format follows ``path``'s ending.

    ``kind``: ``'rgb'``, ``'rgba'`` (only for formats with alpha: .mov, .webm) or
    ``'gray'`` (an alpha matte, stored as grey pixels). ``width``, ``height``: the
    frame size. ``frame_rate``: the stream's nominal rate (``Fraction``, kept exact).
    ``time_base``: unit of the timestamps given to :meth:`write`, which are kept
    as they are (variable frame rates survive). ``bit_rate``: bits/s, ignored by
    ProRes. ``audio_from``: a video path whose first audio stream is copied in.
    """

    def __init__(self, path: str, kind: str, width: int, height: int,
                 frame_rate: Fraction, time_base: Fraction, bit_rate: int | None = None,
                 audio_from: str | None = None):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        self.path = path
        self.kind = kind
        self.format = fmt = video_format(path)
        if kind == "rgba" and fmt.alpha_pix_fmt is None:
            raise ValueError(f"{path!r}: {os.path.splitext(path)[1]} files cannot hold transparency;"
                             f" use .mov (ProRes 4444) or .webm (VP9) or a PNG sequence")
        pix_fmt = fmt.alpha_pix_fmt if kind == "rgba" else fmt.pix_fmt
        check_encoder(fmt.codec, pix_fmt)
        self.width, self.height = width, height
        self._pad = (height % 2, width % 2) if fmt.even_size else (0, 0)
        self._pix_fmt = pix_fmt
        self.time_base = Fraction(time_base)
        self._tmp = _temp_path(path)
        self._audio = None
        self._container = None
        try:
            self._container = av.open(self._tmp, "w", format=fmt.muxer)
            stream = self._container.add_stream(fmt.codec, rate=Fraction(frame_rate))
            stream.width, stream.height = width + self._pad[1], height + self._pad[0]
            stream.pix_fmt = pix_fmt
            stream.codec_context.time_base = self.time_base
            stream.time_base = self.time_base
            if bit_rate is not None and fmt.uses_bit_rate:
                stream.bit_rate = int(bit_rate)
            stream.options = dict(fmt.options)
            cc = stream.codec_context
            cc.color_primaries = cc.color_trc = cc.colorspace = _BT709
            cc.color_range = _RANGE_MPEG
            self._stream = stream
            if audio_from is not None:
                self._audio = AudioPassthrough(audio_from, self._container)
        except BaseException:
            self.abort()
            raise

    def write(self, images: np.ndarray, pts: Sequence[int]) -> None:
        """Encode frames ``images`` (T, H, W, C) uint8 with timestamps ``pts`` (T ints, increasing)."""
        images = _as_frames(images, self.kind)
        if images.shape[1:3] != (self.height, self.width):
            raise ValueError(f"{self.path!r}: frames are {images.shape[2]}x{images.shape[1]}, "
                             f"the writer was opened for {self.width}x{self.height}")
        for image, ts in zip(images, pts):
            if self._audio is not None:
                self._audio.write_until(float(ts * self.time_base))
            if self._pad != (0, 0):
                image = np.pad(image, ((0, self._pad[0]), (0, self._pad[1]), (0, 0)), mode="edge")
            frame = _to_video_frame(image, self.kind).reformat(
                format=self._pix_fmt, dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts = int(ts)
            frame.time_base = self.time_base
            for packet in self._stream.encode(frame):
                self._container.mux(packet)

    def close(self) -> None:
        """Flush the encoder, finish the audio, and move the file to ``path``."""
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        if self._audio is not None:
            self._audio.finish()
        self._container.close()
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        """Delete the temporary file (safe while another thread still encodes into it)."""
        _unlink(self._tmp)

    def abort(self) -> None:
        """Delete the temporary file and release the encoder, muxer and audio input."""
        self.discard()
        for thing in (self._audio, self._container):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # closing a broken or header-less output may fail: nothing to keep
                    pass


def _png_bytes(image: np.ndarray, kind: str) -> bytes:
    frame = _to_video_frame(image, kind)
    ctx = av.CodecContext.create("png", "w")
    ctx.width, ctx.height, ctx.pix_fmt = frame.width, frame.height, KINDS[kind][0]
    ctx.time_base = Fraction(1, 1)
    return b"".join(bytes(p) for p in ctx.encode(frame)) + b"".join(bytes(p) for p in ctx.encode(None))


class ImageSequenceWriter:
    """Write frames as numbered PNG files (``0000.png``, ``0001.png``, ... as RVM) in ``folder``.

    The files go to a hidden temporary folder beside ``folder``, renamed to
    ``folder`` by :meth:`close`. ``folder`` must not exist yet or be empty (it is
    never merged into or overwritten). ``kind``: ``'rgb'``, ``'rgba'`` or ``'gray'``.
    """

    def __init__(self, folder: str, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        self.path = folder
        self.kind = kind
        self._target = os.path.abspath(folder)  # "." cannot be removed or renamed onto; its full path can
        parent, name = os.path.split(self._target)
        self._tmp = tempfile.mkdtemp(prefix=_temp_prefix(name), suffix=".part", dir=parent)
        os.chmod(self._tmp, 0o777 & ~_umask())
        self._count = 0

    def write(self, images: np.ndarray, pts: Sequence[int] = ()) -> None:
        """Write frames ``images`` (T, H, W, C) uint8 as the next numbered PNGs (``pts`` unused)."""
        for image in _as_frames(images, self.kind):
            with open(os.path.join(self._tmp, f"{self._count:04d}.png"), "wb") as f:
                f.write(_png_bytes(image, self.kind))
            self._count += 1

    def close(self) -> None:
        if os.path.isdir(self._target):
            os.rmdir(self._target)  # empty (checked before the run); fails loudly if not
        os.replace(self._tmp, self._target)

    def discard(self) -> None:
        """Delete the temporary folder and the PNGs in it."""
        shutil.rmtree(self._tmp, ignore_errors=True)

    abort = discard


class ImageWriter:
    """Write the one frame of a single-image input to the PNG file ``path`` (atomically)."""

    def __init__(self, path: str, kind: str):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        self.path = path
        self.kind = kind
        self._tmp = _temp_path(path)
        self._written = False

    def write(self, images: np.ndarray, pts: Sequence[int] = ()) -> None:
        images = _as_frames(images, self.kind)
        if self._written or len(images) != 1:
            raise ValueError(f"{self.path!r} is a single image: it takes exactly one frame")
        with open(self._tmp, "wb") as f:
            f.write(_png_bytes(images[0], self.kind))
        self._written = True

    def close(self) -> None:
        if not self._written:
            raise ValueError(f"{self.path!r}: no frame was written")
        os.replace(self._tmp, self.path)

    def discard(self) -> None:
        """Delete the temporary file."""
        _unlink(self._tmp)

    abort = discard
