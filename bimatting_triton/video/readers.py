"""Frame sources for :func:`convert_video`: a video file, a folder of images, one image.

Every source is opened (and checked) in the constructor and yields
``(image, pts)`` pairs when iterated: ``image`` a (H, W, 3) ``uint8`` RGB array,
``pts`` an ``int`` timestamp in units of the source's ``time_base``. Iteration may
run on another thread than the constructor (``convert_video`` decodes on a reader
thread), but never on two threads at once. Everything is decoded with PyAV; no
other image library is needed.
"""
from __future__ import annotations

import math
import numbers
import os
import re
from fractions import Fraction
from typing import Iterator, NamedTuple

import av
import av.sidedata.sidedata
import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "VideoReader",
    "ImageSequenceReader",
    "open_source",
    "read_image",
    "as_frame_rate",
]

#: File name endings read as still images (a single image input, or the frames of a folder).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Frame rate given to image-sequence sources unless told otherwise (RVM's choice).
DEFAULT_IMAGE_FRAME_RATE = Fraction(30)

#: The NTSC rates (n x 1000/1001) that a decimal such as 29.97 or 23.976 stands for.
NTSC_RATES = tuple(Fraction(n * 1000, 1001) for n in (24, 30, 48, 60, 120, 240))

Frame = tuple[np.ndarray, int]


class Orientation(NamedTuple):
    """How to turn a decoded frame upright, as players show it: transpose (swap rows and
    columns) first, then flip rows (upside down) and columns (mirror)."""

    transpose: bool = False
    flip_rows: bool = False
    flip_columns: bool = False

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, C) -> the upright (H', W', C), contiguous."""
        if self.transpose:
            image = image.transpose(1, 0, 2)
        if self.flip_rows:
            image = image[::-1]
        if self.flip_columns:
            image = image[:, ::-1]
        return np.ascontiguousarray(image) if self != UPRIGHT else image


UPRIGHT = Orientation()

# np.rot90(image, k) for k = 0..3 quarter turns counterclockwise
_QUARTER_TURNS = (UPRIGHT, Orientation(True, True, False), Orientation(False, True, True),
                  Orientation(True, False, True))

# The EXIF Orientation tag's values 1-8 (the JPEG/TIFF standard's table)
EXIF_ORIENTATIONS = {
    1: UPRIGHT,
    2: Orientation(False, False, True),  # mirrored
    3: Orientation(False, True, True),  # turned 180 degrees
    4: Orientation(False, True, False),  # upside down
    5: Orientation(True, False, False),  # transposed
    6: Orientation(True, False, True),  # shown turned 90 degrees clockwise
    7: Orientation(True, True, True),  # transverse
    8: Orientation(True, True, False),  # shown turned 90 degrees counterclockwise
}


def orientation(frame: av.VideoFrame, path: str | None = None) -> Orientation:
    """A frame's display matrix (phone videos filmed upright are coded landscape and shown
    turned by 90 or 270 degrees; mirrors too) as an :class:`Orientation`, to the nearest
    quarter turn; :data:`UPRIGHT` without one.

    The matrix, nine int32 ``a b u c d v x y w`` (a-d in 16.16 fixed point), shows pixel
    ``(p, q)`` (column, row from the centre, rows counted downwards) at
    ``(a p + c q, b p + d q)``. With ``a = d = 0`` columns become rows: a transpose, then
    a flip of the new rows where ``b < 0`` and of the new columns where ``c < 0``; else a flip
    of the columns where ``a < 0`` and of the rows where ``d < 0``. (A 90-degree
    counterclockwise turn is ``a, b, c, d = 0, -1, 1, 0``: ``np.rot90``.)

    A PyAV older than the frame's side data (FFmpeg 8 attaches a JPEG's EXIF block, a type
    PyAV 18 cannot list) cannot read the matrix: then the EXIF Orientation tag of the
    JPEG file at ``path`` if there is one, else the matrix's rotation alone (no mirrors).
    """
    try:
        data = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    except AttributeError:  # a PyAV without frame side data
        return UPRIGHT
    except ValueError:  # a side-data type this PyAV does not know
        exif = jpeg_exif_orientation(path) if path is not None else None
        return exif or _QUARTER_TURNS[round((getattr(frame, "rotation", 0) or 0) / 90) % 4]
    if data is None:
        return UPRIGHT
    a, b, _, c, d = np.frombuffer(bytes(data), dtype=np.int32)[:5].tolist()
    if abs(b) > abs(a):
        return Orientation(True, b < 0, c < 0)
    return Orientation(False, d < 0, a < 0)


def jpeg_exif_orientation(path: str) -> Orientation | None:
    """The EXIF Orientation tag (0x0112 in IFD0) of the JPEG file at ``path``, or None (not a
    JPEG, no EXIF block or no tag; never raises for a malformed one)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)  # EXIF comes first, in an APP1 segment of at most 64 KiB
    except OSError:
        return None
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(head) and head[i] == 0xFF and head[i + 1] != 0xDA:  # segments up to the scan
        length = int.from_bytes(head[i + 2:i + 4], "big")
        if head[i + 1] == 0xE1 and head[i + 4:i + 10] == b"Exif\0\0":
            tiff = head[i + 10:i + 2 + length]
            order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
            if order is None:
                return None
            ifd = int.from_bytes(tiff[4:8], order)
            for entry in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
                e = ifd + 2 + 12 * entry  # 12-byte entries: tag, type, count, value
                if len(tiff) < e + 10:
                    return None
                if int.from_bytes(tiff[e:e + 2], order) == 0x0112:
                    return EXIF_ORIENTATIONS.get(int.from_bytes(tiff[e + 8:e + 10], order))
            return None
        i += 2 + max(length, 2)
    return None


def _rgb(frame: av.VideoFrame, size: tuple[int, int] | None, path: str | None = None) -> np.ndarray:
    """A decoded frame as shown, upright (its display matrix applied, as players and the
    ``ffmpeg`` command do), as a (H, W, 3) uint8 RGB array, resized to ``size = (w, h)``
    (upright) if given. ``path``: the file, for :func:`orientation`'s EXIF fallback."""
    turn = orientation(frame, path)
    if size is not None:
        width, height = (size[1], size[0]) if turn.transpose else size  # the coded frame's sides
        frame = frame.reformat(width=width, height=height, interpolation="BILINEAR")
    return turn.apply(frame.to_ndarray(format="rgb24"))


def read_image(path: str, size: tuple[int, int] | None = None) -> np.ndarray:
    """Decode one still image file into a (H, W, 3) uint8 RGB array (alpha dropped).

    ``size``: optional ``(width, height)`` to resize to. Raises ``FileNotFoundError``
    when the file is missing and ``ValueError`` when FFmpeg cannot decode it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file {path!r} does not exist")
    try:
        with av.open(path) as container:
            for frame in container.decode(video=0):
                return _rgb(frame, size, path)
    except (av.FFmpegError, IndexError) as e:
        raise ValueError(f"{path!r} is not a readable image: {e}") from e
    raise ValueError(f"{path!r} is not a readable image: it holds no picture")


def as_frame_rate(value, name: str = "frame_rate") -> Fraction:
    """``value`` (a positive real number) as an exact ``Fraction`` frame rate.

    Ints and ``Fraction`` s are kept exactly (``Fraction(2997, 100)`` stays so). A float
    is read as the decimal it was written as (12.5 is 25/2), except that one within 0.005
    of an NTSC rate means that rate, as in video usage: 29.97 is 30000/1001, 23.976 is
    24000/1001, 59.94 is 60000/1001. Raises ``TypeError`` (not a number, or a bool) or ``ValueError`` (NaN,
    infinite, zero or negative) naming ``name``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (int, float or Fraction), got {value!r}")
    if isinstance(value, numbers.Rational):
        rate = Fraction(value.numerator, value.denominator)
    elif math.isfinite(value):
        value = float(value)
        ntsc = min(NTSC_RATES, key=lambda r: abs(r - value))
        # else the simplest fraction of the float's binary value (29.969999...) -> 2997/100,
        # with a denominator FFmpeg's 32-bit time bases can hold
        rate = ntsc if abs(ntsc - value) < 0.005 else Fraction(value).limit_denominator(1_000_000)
    else:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if rate <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return rate


def _seconds(value, time_base) -> float | None:
    return None if value is None or time_base is None else float(value * time_base)


def _tag_seconds(tag: str | None) -> float | None:
    """Parse a Matroska ``DURATION`` tag (``HH:MM:SS.fffffffff``) into seconds."""
    if not tag:
        return None
    m = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", tag.strip())
    if not m:
        return None
    return int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


class VideoReader:
    """Decode a video file's first video stream, frame by frame, with PyAV.

    Attributes, known once constructed:
      ``path``; ``width``, ``height`` (after ``size``); ``frame_rate`` (``Fraction``,
      the stream's average rate, exact: 30000/1001 stays 30000/1001); ``time_base``
      (``Fraction``, the unit of the yielded ``pts``); ``num_frames`` (``int`` or
      ``None`` when the container does not say); ``estimated_frames`` (``num_frames``,
      or else duration x frame rate, or ``None``: for progress bars); ``has_audio``.

    ``size``: optional ``(width, height)`` to resize every frame to (swscale bilinear);
    without it, frames of a stream that changes size part way are scaled to its first size.
    ``threads``: FFmpeg decoding threads, 0 for FFmpeg's choice.

    Iterating yields ``(image, pts)`` with ``image`` (H, W, 3) uint8 RGB, upright: a stream
    shown turned or mirrored (a display matrix, as phones record upright video) is turned as
    players show it (:func:`orientation`), so ``width`` x ``height`` is the upright size. Timestamps
    are the decoder's (missing ones are filled in at the frame period) and strictly
    increasing. A file that fails to decode part way, or stops well before the
    duration its header announces, raises ``ValueError`` ("corrupt or truncated").
    The container is closed when iteration ends or by :meth:`close`.
    """

    def __init__(self, path: str, size: tuple[int, int] | None = None, threads: int = 0):
        self.path = path
        if not os.path.exists(path):
            raise FileNotFoundError(f"input_source {path!r} does not exist")
        if os.path.isdir(path):
            raise ValueError(f"input_source {path!r} is a folder, not a video file")
        try:
            self._container = av.open(path)
        except av.FFmpegError as e:
            raise ValueError(
                f"input_source {path!r} is not a readable video (corrupt, truncated or not a "
                f"video): {e}") from e
        try:
            if not self._container.streams.video:
                raise ValueError(f"input_source {path!r} has no video stream")
            stream = self._container.streams.video[0]
            if not stream.width or not stream.height:
                raise ValueError(f"input_source {path!r}: its video stream has no frame size")
            stream.thread_type = "AUTO"
            if threads:
                stream.thread_count = threads
            self._stream = stream
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate or rate <= 0:
                rate = Fraction(30)
            self.frame_rate = Fraction(rate)
            self.time_base = Fraction(stream.time_base) if stream.time_base else 1 / self.frame_rate
            self.size = size
            # The first frame, decoded now: its display rotation sets the upright size
            # (yielded first by __iter__).
            self._frames = self._container.decode(stream)
            self._first = self._decode_first()
            self._coded = (stream.width, stream.height)
            turned = self._first is not None and orientation(self._first).transpose
            upright = self._coded[::-1] if turned else self._coded
            self.width, self.height = size if size is not None else upright
            self.num_frames = stream.frames or None
            self.has_audio = bool(self._container.streams.audio)
            self._expected_seconds = self._announced_seconds()
            self.estimated_frames = self.num_frames or (
                round(self._expected_seconds * self.frame_rate) if self._expected_seconds else None)
        except BaseException:
            self._container.close()
            raise

    def _decode_first(self) -> av.VideoFrame | None:
        try:
            return next(self._frames, None)
        except av.FFmpegError as e:
            raise ValueError(f"input_source {self.path!r} is corrupt or truncated: its first frame does not "
                             f"decode: {e}") from e

    def _decoded(self) -> Iterator[av.VideoFrame]:
        if self._first is None:  # no frames (PyAV's decoder must not be resumed once it has ended)
            return
        first, self._first = self._first, None
        yield first
        yield from self._frames

    def _announced_seconds(self) -> float | None:
        """How long the header says the video stream lasts, or ``None`` if it does not say."""
        stream = self._stream
        seconds = _seconds(stream.duration, stream.time_base)
        if seconds is None:
            seconds = _tag_seconds(stream.metadata.get("DURATION"))
        if seconds is None and len(self._container.streams) == 1 and self._container.duration:
            seconds = self._container.duration / 1e6
        return seconds

    def __len__(self) -> int:
        if self.num_frames is None:
            raise TypeError("this video's frame count is unknown")
        return self.num_frames

    def __iter__(self) -> Iterator[Frame]:
        period = max(1, round(1 / (self.frame_rate * self.time_base)))  # one frame, in time_base units
        first = last = None
        last_duration = period  # how long the last frame is shown, in time_base units
        count = 0
        try:
            try:
                for frame in self._decoded():
                    pts = frame.pts
                    if pts is None:
                        pts = 0 if last is None else last + period
                    elif last is not None and pts <= last:
                        pts = last + 1  # keep timestamps strictly increasing for the muxer
                    first = pts if first is None else first
                    last = pts
                    # the container's duration of the frame (a held last frame of a variable
                    # rate video lasts seconds); the average frame period when it has none
                    last_duration = frame.duration or period
                    count += 1
                    size = self.size
                    if size is None and (frame.width, frame.height) != self._coded:
                        size = (self.width, self.height)  # the stream changed size: back to its first, as FFmpeg
                    yield _rgb(frame, size), pts
            except av.FFmpegError as e:
                raise ValueError(
                    f"input_source {self.path!r} is corrupt or truncated: decoding failed after "
                    f"{count} frames: {e}") from e
            self._check_complete(count, first, None if last is None else last + last_duration, period)
        finally:
            self.close()

    def _check_complete(self, count, first, end, period) -> None:
        """Raise ``ValueError`` if the ``count`` frames from ``first`` (pts) to ``end`` (the
        last one's pts + duration) stop well before the duration the header announces."""
        if count == 0:
            raise ValueError(f"input_source {self.path!r} has no frames")
        if self._expected_seconds is None:
            return
        start = _seconds(self._stream.start_time, self.time_base) or 0.0
        start = min(start, float(first * self.time_base))
        decoded = float(end * self.time_base) - start
        # Allow two frame periods of slack (rounding of durations, a last frame without
        # a duration shown longer): a truncated file falls short by far more.
        slack = 2 / float(self.frame_rate) + 0.05
        if decoded < self._expected_seconds - slack:
            raise ValueError(
                f"input_source {self.path!r} is truncated or corrupt: its frames end at "
                f"{decoded:.3f} s but its header announces {self._expected_seconds:.3f} s")

    def close(self) -> None:
        self._container.close()


def _natural_key(name: str):
    """Sort key that orders ``frame2.png`` before ``frame10.png``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


class ImageSequenceReader:
    """Still images read as frames: every image file of a folder (natural name order), or one image.

    Attributes as :class:`VideoReader`: ``width``, ``height``, ``frame_rate``
    (``frame_rate`` argument, default 30 as RVM), ``time_base = 1 / frame_rate``,
    ``num_frames``, ``has_audio = False``. ``pts`` is the frame index. All images must
    have the size of the first one (unless ``size = (width, height)`` resizes them).
    """

    def __init__(self, path: str, size: tuple[int, int] | None = None,
                 frame_rate: numbers.Real | None = None):
        self.path = path
        if not os.path.exists(path):
            raise FileNotFoundError(f"input_source {path!r} does not exist")
        if os.path.isdir(path):
            names = sorted((n for n in os.listdir(path) if n.lower().endswith(IMAGE_EXTENSIONS)
                            and not n.startswith(".") and os.path.isfile(os.path.join(path, n))),
                           key=_natural_key)
            if not names:
                raise ValueError(f"input_source {path!r} is a folder without image files "
                                 f"({', '.join(IMAGE_EXTENSIONS)}): no frames")
            self.files = [os.path.join(path, n) for n in names]
        else:
            self.files = [path]
        self.frame_rate = DEFAULT_IMAGE_FRAME_RATE if frame_rate is None else as_frame_rate(frame_rate)
        self.time_base = 1 / self.frame_rate
        self.size = size
        first = read_image(self.files[0], size)
        self.height, self.width = first.shape[:2]
        self.num_frames = self.estimated_frames = len(self.files)
        self.has_audio = False

    def __len__(self) -> int:
        return self.num_frames

    def __iter__(self) -> Iterator[Frame]:
        for index, file in enumerate(self.files):
            image = read_image(file, self.size)
            if image.shape[:2] != (self.height, self.width):
                raise ValueError(
                    f"input_source {self.path!r}: image {file!r} is {image.shape[1]}x{image.shape[0]}"
                    f" but the first image is {self.width}x{self.height}; pass input_resize to "
                    f"resize them all")
            yield image, index

    def close(self) -> None:
        pass


def open_source(path: str, size: tuple[int, int] | None = None, threads: int = 0,
                frame_rate: numbers.Real | None = None):
    """Open ``path`` as a frame source: a folder or an image file becomes an
    :class:`ImageSequenceReader`, anything else a :class:`VideoReader`.

    ``frame_rate`` applies to image inputs only (a video keeps its own rate).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"input_source must be a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"input_source {path!r} does not exist")
    if os.path.isdir(path) or path.lower().endswith(IMAGE_EXTENSIONS):
        return ImageSequenceReader(path, size, frame_rate)
    return VideoReader(path, size, threads)
