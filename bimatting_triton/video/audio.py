"""Audio carried from the input video into an output video, stream-copied when possible.

:class:`AudioPassthrough` reads the input's first audio stream on its own demuxer
and feeds it to the output container in step with the video (``write_until``), so
that memory stays constant however long the file. The packets are copied as they
are when the output container accepts the codec; otherwise (e.g. AAC into WebM,
Opus or FLAC into MOV, PCM into MP4) they are decoded and re-encoded to the
container's usual audio codec.
"""
from __future__ import annotations

import fnmatch
import math

import av

__all__ = ["AudioPassthrough"]

# Codec used when the input's audio codec cannot be stored in the output container.
_TRANSCODE_CODEC = {"webm": "libopus", "matroska": "libopus"}
_DEFAULT_TRANSCODE_CODEC = "aac"


# Codecs that FFmpeg's mov and mp4 muxers take as they are (fnmatch patterns). Their
# ``supported_codecs`` are not enough: mov lists Opus and FLAC, mp4 lists PCM, and both
# then refuse them while writing (FFmpeg 8: "Invalid argument"). Other muxers: their list.
_COPYABLE = {
    "mov": ("aac", "mp3", "mp2", "ac3", "eac3", "alac", "pcm_*"),
    "mp4": ("aac", "mp3", "mp2", "ac3", "eac3", "alac", "flac", "opus"),
}


def _can_copy(codec: str, container: av.container.OutputContainer) -> bool:
    """Whether ``container`` can hold ``codec`` (a canonical name: ``mp3``, not ``mp3float``) packets as they are."""
    if codec not in container.supported_codecs:
        return False
    patterns = _COPYABLE.get(container.format.name)
    return patterns is None or any(fnmatch.fnmatchcase(codec, p) for p in patterns)


def _sample_rate(codec: str, rate: int) -> int:
    """``rate`` if the encoder ``codec`` takes it, else its nearest supported rate
    (Opus: 48000 for 44100; AAC: at most 96000)."""
    rates = av.Codec(codec, "w").audio_rates
    return rate if not rates or rate in rates else min(rates, key=lambda r: abs(r - rate))


def _layout(layout: av.AudioLayout) -> av.AudioLayout:
    """``layout``, or the usual layout of its channel count when its channels are unnamed
    ("2 channels", as PCM read from Matroska): encoders such as AAC refuse those."""
    if any(channel.name == "NONE" for channel in layout.channels):
        return av.AudioLayout(f"{layout.nb_channels}c")   # FFmpeg's default: 2c is stereo
    return layout


class AudioPassthrough:
    """Copy the first audio stream of ``input_path`` into ``container`` (an output opened by PyAV).

    Construct it before anything is muxed (it adds a stream). If the input has no
    audio it does nothing. ``write_until(t)`` muxes the audio that starts before
    ``t`` seconds; ``finish()`` muxes the rest and flushes; ``close()`` releases
    the input (``finish`` calls it).
    """

    def __init__(self, input_path: str, container: av.container.OutputContainer):
        self._container = container
        self._input = av.open(input_path)
        self._closed = False
        if not self._input.streams.audio:
            self.close()
            self.stream = None
            return
        src = self._input.streams.audio[0]
        self._src = src
        self._packets = self._input.demux(src)
        self._pending = None
        if _can_copy(src.codec_context.codec.canonical_name, container):
            self.transcoding = False
            self.stream = container.add_stream_from_template(src)
        else:
            self.transcoding = True
            codec = _TRANSCODE_CODEC.get(container.format.name, _DEFAULT_TRANSCODE_CODEC)
            rate = _sample_rate(codec, src.codec_context.sample_rate)
            self.stream = container.add_stream(codec, rate=rate, layout=_layout(src.codec_context.layout))

    def _next_packet(self):
        for packet in self._packets:
            if packet.dts is not None and packet.size:  # skip demuxer flush packets
                return packet
        return None

    def _mux(self, packet) -> None:
        if self.transcoding:
            for frame in packet.decode():
                frame.pts = None  # the encoder numbers the re-chunked frames itself
                for out in self.stream.encode(frame):
                    self._container.mux(out)
        else:
            packet.stream = self.stream
            self._container.mux(packet)

    def write_until(self, seconds: float) -> None:
        """Mux the input audio packets whose start time is before ``seconds``."""
        if self.stream is None or self._closed:
            return
        while True:
            if self._pending is None:
                self._pending = self._next_packet()
                if self._pending is None:
                    return
            packet = self._pending
            ts = packet.pts if packet.pts is not None else packet.dts
            if float(ts * packet.time_base) >= seconds:
                return
            self._pending = None
            self._mux(packet)

    def finish(self) -> None:
        """Mux all the remaining audio, flush the encoder (if transcoding) and close the input."""
        if self.stream is None or self._closed:
            return
        self.write_until(math.inf)
        if self.transcoding:
            for out in self.stream.encode(None):
                self._container.mux(out)
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._input.close()
