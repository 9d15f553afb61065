"""Video in, matte out: RVM-compatible :func:`convert_video`, streaming on PyAV.

* :mod:`.readers` — frame sources (video file, image folder, single image);
* :mod:`.writers` — video (H.264, ProRes 4444, VP9 alpha) and PNG writers, atomic;
* :mod:`.audio` — the input's audio carried into video outputs;
* :mod:`.pipeline` — the decode-ahead and encode-behind threads;
* :mod:`.convert` — :func:`convert_video` itself.
"""
from .convert import GREEN, auto_downsample_ratio, convert_video
from .readers import ImageSequenceReader, VideoReader, open_source
from .writers import VIDEO_FORMATS, ImageSequenceWriter, ImageWriter, VideoWriter

__all__ = [
    "convert_video",
    "auto_downsample_ratio",
    "GREEN",
    "VideoReader",
    "ImageSequenceReader",
    "open_source",
    "VideoWriter",
    "ImageSequenceWriter",
    "ImageWriter",
    "VIDEO_FORMATS",
]
