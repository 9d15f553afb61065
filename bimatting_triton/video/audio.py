"""Audio carried from the input video into an output video, stream-copied when possible.

:class:`AudioPassthrough` reads the input's first audio stream on its own demuxer
and feeds it to the output container in step with the video (``write_until``), so
that memory stays constant however long the file. The packets are copied as they
are when the output container accepts the codec; otherwise (e.g. AAC into WebM)
they are decoded and re-encoded to the container's usual audio codec.
"""
from __future__ import annotations

import math

import av

__all__ = ["AudioPassthrough"]

# Codec used when the input's audio codec cannot be stored in the output container.
_TRANSCODE_CODEC = {"webm": "libopus", "matroska": "libopus"}
_DEFAULT_TRANSCODE_CODEC = "aac"


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
        if src.codec_context.name in container.supported_codecs:
            self.transcoding = False
            self.stream = container.add_stream_from_template(src)
        else:
            self.transcoding = True
            codec = _TRANSCODE_CODEC.get(container.format.name, _DEFAULT_TRANSCODE_CODEC)
            rate = 48000 if codec == "libopus" else src.codec_context.sample_rate
            self.stream = container.add_stream(codec, rate=rate, layout=src.codec_context.layout)

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
