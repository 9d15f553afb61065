"""``convert_video``: run a matting model over a video, streaming, with RVM's call.

Robust Video Matting users call ``convert_video(model, input_source=..., ...)``;
the same call works here with a BiMatting model (plain or fused), or any model
following RVM's contract ``fgr, pha, *rec = model(src, *rec, downsample_ratio=r)``
with ``src`` (B, T, 3, H, W) in [0, 1]. Beyond RVM it keeps the input's exact frame
rate and timestamps, copies its audio, writes transparent video (ProRes 4444
``.mov``, VP9 ``.webm``), composes on a chosen colour or image, checks its
arguments before starting, and never leaves a half-written output behind.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..devices import usable_device
from .pipeline import Interrupts, ReaderThread, WriterThread
from .readers import IMAGE_EXTENSIONS, as_frame_rate, open_source, read_image
from .writers import ImageSequenceWriter, ImageWriter, VideoWriter, check_encoder, video_format

__all__ = ["convert_video", "auto_downsample_ratio", "GREEN"]

#: RVM's green-screen colour, the composition background of opaque outputs by default.
GREEN = (120, 255, 155)

OUTPUT_TYPES = ("video", "png_sequence")


def auto_downsample_ratio(height: int, width: int) -> float:
    """RVM's automatic ratio: bring the longer side to 512 pixels, never upsample."""
    return min(512 / max(height, width), 1.0)


# ----------------------------------------------------------------------------- checks

def _check_number(name: str, value, low: float, high: float | None = None, integer=False,
                  low_inclusive=True) -> None:
    kind = "an integer" if integer else "a number"
    # numbers.Integral / Real: Python's and numpy's numbers alike
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, bool) or not ok_type:
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or (high is not None and value > high):
        bounds = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be {bounds}, got {value!r}")


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies inside ``folder`` (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path != folder and os.path.commonpath([path, folder]) == folder


def _check_output_path(name: str, path: str, input_source: str, folder_output: bool) -> None:
    if _same_file(path, input_source):
        raise ValueError(f"{name} {path!r} is the input file itself; choose another path")
    if folder_output and os.path.islink(os.path.abspath(path)):  # (abspath: "link/" is the link too)
        raise FileExistsError(
            f"{name} {path!r} is a symbolic link; a PNG sequence is written into a new (or empty) "
            f"folder: give that folder's own path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(parent):
        raise FileNotFoundError(f"{name} {path!r}: the folder {parent!r} does not exist")
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{name} {path!r}: {parent!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{name} {path!r}: the folder {parent!r} is not writable")
    if folder_output:
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
            raise FileExistsError(
                f"{name} {path!r} exists and is not an empty folder; a PNG sequence is written "
                f"into a new (or empty) folder, never merged into existing files")
    elif os.path.isdir(path):
        raise IsADirectoryError(f"{name} {path!r} is a folder; expected a file path")


def _parse_background(background, height: int, width: int, device, dtype) -> torch.Tensor | None:
    """``background`` as a (1, 1, 3, H|1, W|1) tensor in [0, 1], or ``None`` for none."""
    if background is None:
        return None
    if isinstance(background, (str, os.PathLike)):
        if not os.path.isfile(background):
            raise FileNotFoundError(f"background image {os.fspath(background)!r} does not exist")
        image = read_image(os.fspath(background))
        bg = torch.from_numpy(image).permute(2, 0, 1).float().div(255)[None]
        # "Cover": scale to fill the frame keeping the aspect ratio, then crop the middle.
        scale = max(height / bg.shape[-2], width / bg.shape[-1])
        size = (max(height, round(bg.shape[-2] * scale)), max(width, round(bg.shape[-1] * scale)))
        bg = F.interpolate(bg, size=size, mode="bilinear", align_corners=False,
                           antialias=scale < 1)
        top, left = (size[0] - height) // 2, (size[1] - width) // 2
        bg = bg[..., top:top + height, left:left + width]
        return bg[None].to(device, dtype)
    if isinstance(background, torch.Tensor) or not isinstance(background, Sequence) \
            or len(background) != 3 or isinstance(background, (bytes, bytearray)):
        raise TypeError(f"background must be None, an (R, G, B) colour with 0-255 values or an "
                        f"image path, got {background!r}")
    for c in background:
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 <= c <= 255:  # (NaN fails too)
            raise ValueError(f"background colour values must be numbers in 0..255, got {background!r}")
    return torch.tensor([float(c) for c in background], device=device, dtype=dtype) \
        .div(255).view(1, 1, 3, 1, 1)


# ----------------------------------------------------------------------------- helpers

def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) float in [0, 1] -> (T, H, W, C) uint8, on the same device.

    The copy to the CPU is left to the writer thread, so that on a GPU the main
    thread can queue the next chunk's inference without waiting for it.
    """
    x = x.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


def _model_device_dtype(model, device, dtype):
    param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    if dtype is None:
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return torch.device(device), dtype


def _unpack_output(out, src: torch.Tensor):
    if not isinstance(out, (list, tuple)) or len(out) < 2:
        raise TypeError("the model must return (fgr, pha, *rec) as RVM's models do, got "
                        f"{type(out).__name__}")
    fgr, pha, *rec = out
    b, t, _, h, w = src.shape
    if tuple(fgr.shape) != (b, t, 3, h, w) or tuple(pha.shape) != (b, t, 1, h, w):
        raise ValueError(f"the model returned fgr {tuple(fgr.shape)} and pha {tuple(pha.shape)} "
                         f"for src {tuple(src.shape)}; expected ({b}, {t}, 3, {h}, {w}) and "
                         f"({b}, {t}, 1, {h}, {w})")
    return fgr, pha, rec


def _chunks(frames, size: int):
    """Group the ``(image, pts)`` stream into lists of ``size`` (the last may be shorter)."""
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ----------------------------------------------------------------------------- main

def convert_video(model, input_source: str, input_resize: tuple[int, int] | None = None,
                  downsample_ratio: float | None = None, output_type: str = "video",
                  output_composition: str | None = None, output_alpha: str | None = None,
                  output_foreground: str | None = None, output_video_mbps: float | None = None,
                  seq_chunk: int = 1, num_workers: int = 0, progress: bool = True,
                  device=None, dtype=None, *, background=None, audio: bool = True,
                  frame_rate: numbers.Real | None = None) -> int:
    """Matte a video, an image folder or an image with ``model``; write the results.

    Arguments as Robust Video Matting's ``convert_video``:
      model: callable as ``fgr, pha, *rec = model(src, *rec, downsample_ratio=r)``,
          ``src`` (1, T, 3, H, W) in [0, 1]; returns fgr (1, T, 3, H, W), pha
          (1, T, 1, H, W) and the recurrent state, carried from chunk to chunk.
          Put in eval mode; it is not moved (place it on ``device`` yourself).
      input_source: a video file, a folder of images (natural name order) or one image.
      input_resize: optional ``(width, height)`` to resize the input frames to.
      downsample_ratio: in (0, 1]; ``None`` picks ``min(512 / max(H, W), 1)``.
      output_type: ``'video'`` (outputs are video files; format from the ending:
          .mp4/.m4v/.mkv H.264, .mov ProRes 4444, .webm VP9) or ``'png_sequence'``
          (outputs are folders of ``0000.png``...; for a single-image input an output
          path ending in .png is written as that one file).
      output_composition: the foreground composed on the background. With no
          ``background`` it is transparent (RGBA) where the format allows it (PNG,
          .mov, .webm) and on RVM's green (120, 255, 155) otherwise.
      output_alpha: the alpha matte, as grey pixels.
      output_foreground: the predicted foreground colours (RGB, no alpha).
      output_video_mbps: video bitrate in Mbit/s (a float; default 1 as RVM;
          ProRes ignores it).
      seq_chunk: frames per model call (T); more is faster on GPUs and uses more memory.
      num_workers: FFmpeg decoding threads (0: FFmpeg's choice); decoding always
          runs on its own thread.
      progress: show a tqdm bar with frames/s.
      device, dtype: where and in which float type the frames are given to the
          model; by default those of the model's first parameter (CPU float32 if none).
    Beyond RVM (keyword only):
      background: ``None``, an ``(R, G, B)`` colour with 0-255 values, or an image
          path (scaled to cover the frame); makes the composition opaque.
      audio: copy the input's audio into video outputs (re-encoded only when the
          container cannot hold its codec: AAC into WebM becomes Opus, Opus or
          FLAC into .mov and PCM into .mp4 become AAC).
      frame_rate: frame rate of image inputs, an int, float or ``Fraction`` (default
          30; a float near an NTSC rate means it: 29.97 is 30000/1001; a video keeps
          its own rate and every frame's timestamp, exactly).

    Returns the number of frames written. Raises ``FileNotFoundError``, ``ValueError``,
    ``TypeError`` or ``PermissionError`` naming the argument before anything is
    written when the arguments are wrong (``MissingEncoderError`` when this FFmpeg
    build lacks an output's encoder), ``ValueError`` during the run for a corrupt
    or truncated input; outputs are written under temporary names and renamed only
    on success, so an error or Ctrl-C leaves no partial file.
    """
    # ---- arguments, all before touching any file
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    outputs = {}
    for name, path in (("output_composition", output_composition), ("output_alpha", output_alpha),
                       ("output_foreground", output_foreground)):
        if path is not None:
            if not isinstance(path, (str, os.PathLike)) or not isinstance(os.fspath(path), str):
                raise TypeError(f"{name} must be a path (str or os.PathLike), got {path!r}")
            outputs[name] = os.fspath(path)
    if not outputs:
        raise ValueError("give at least one of output_composition, output_alpha, output_foreground")
    if downsample_ratio is not None:
        _check_number("downsample_ratio", downsample_ratio, 0, 1, low_inclusive=False)
        downsample_ratio = float(downsample_ratio)
    _check_number("seq_chunk", seq_chunk, 1, integer=True)
    _check_number("num_workers", num_workers, 0, integer=True)
    seq_chunk, num_workers = int(seq_chunk), int(num_workers)
    if output_video_mbps is not None:
        _check_number("output_video_mbps", output_video_mbps, 0, low_inclusive=False)
        output_video_mbps = float(output_video_mbps)
    if frame_rate is not None:
        frame_rate = as_frame_rate(frame_rate, "frame_rate")
    if input_resize is not None:
        if not isinstance(input_resize, Sequence) or isinstance(input_resize, (str, bytes)):
            raise TypeError(f"input_resize must be (width, height), got {input_resize!r}")
        if len(input_resize) != 2:
            raise ValueError(f"input_resize must be (width, height), got {input_resize!r}")
        for v in input_resize:
            _check_number("input_resize", v, 1, integer=True)
        input_resize = (int(input_resize[0]), int(input_resize[1]))
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating point torch.dtype (torch.float32, torch.float16, "
                        f"torch.bfloat16) or None, got {dtype!r}")
    if device is not None:  # the library's one device check (not a device, CUDA absent, meta ...)
        device = usable_device(device, "device")
    if not isinstance(input_source, (str, os.PathLike)):
        raise TypeError(f"input_source must be a path, got {type(input_source).__name__}")
    input_source = os.fspath(input_source)
    if not os.path.exists(input_source):
        raise FileNotFoundError(f"input_source {input_source!r} does not exist")
    single_image = os.path.isfile(input_source) and input_source.lower().endswith(IMAGE_EXTENSIONS)
    paths = list(outputs.values())
    for i, (name, path) in enumerate(outputs.items()):
        if any(_same_file(path, other) for other in paths[:i]):
            raise ValueError(f"{name} {path!r} is also given for another output")
        for other_name, other in outputs.items():
            if _inside(path, other):
                raise ValueError(f"{name} {path!r} is inside {other_name} {other!r}; outputs are "
                                 f"written apart, none inside another")
        if isinstance(background, (str, os.PathLike)) and _same_file(path, os.fspath(background)):
            raise ValueError(f"{name} {path!r} is the background image file; choose another path")
        if output_type == "video":
            fmt = video_format(path, name)
            check_encoder(fmt.codec, fmt.pix_fmt)
        elif path.lower().endswith(".png") and not single_image:
            raise ValueError(f"{name} {path!r}: png_sequence outputs are folders (a .png file "
                             f"is only accepted for a single-image input)")
        folder = output_type == "png_sequence" and not path.lower().endswith(".png")
        _check_output_path(name, path, input_source, folder)

    # ---- input (opened and checked), model, background
    with Interrupts() as interrupts:  # Ctrl-C raised at safe points only (see pipeline)
        return _run(model, input_source, source_args=(input_resize, num_workers, frame_rate), outputs=outputs,
                    output_type=output_type, downsample_ratio=downsample_ratio, output_video_mbps=output_video_mbps,
                    seq_chunk=seq_chunk, progress=progress, device=device, dtype=dtype, background=background,
                    audio=audio, interrupts=interrupts)


def _run(model, input_source: str, *, source_args, outputs: dict[str, str], output_type: str, downsample_ratio,
         output_video_mbps, seq_chunk: int, progress: bool, device, dtype, background, audio: bool,
         interrupts: Interrupts) -> int:
    """The streaming part of :func:`convert_video`, arguments already checked."""
    source = open_source(input_source, *source_args)
    writers: dict[str, object] = {}
    reader = None
    sinks: dict[str, WriterThread] = {}
    count = 0
    try:
        height, width = source.height, source.width
        ratio = downsample_ratio if downsample_ratio is not None else auto_downsample_ratio(height, width)
        device, dtype = _model_device_dtype(model, device, dtype)
        if hasattr(model, "eval"):
            model = model.eval()
        kinds = {"output_alpha": "gray", "output_foreground": "rgb"}
        bgr = None
        if "output_composition" in outputs:
            bgr = _parse_background(background, height, width, device, dtype)
            path = outputs["output_composition"]
            transparent = bgr is None and (output_type == "png_sequence"
                                           or video_format(path).alpha_pix_fmt is not None)
            kinds["output_composition"] = "rgba" if transparent else "rgb"
            if bgr is None and not transparent:
                bgr = _parse_background(GREEN, height, width, device, dtype)
        mbps = 1.0 if output_video_mbps is None else float(output_video_mbps)
        copy_audio = audio and output_type == "video" and source.has_audio

        # ---- outputs, under temporary names
        for name, path in outputs.items():
            if output_type == "video":
                writers[name] = VideoWriter(
                    path, kinds[name], width, height, source.frame_rate, source.time_base,
                    bit_rate=int(mbps * 1e6), audio_from=input_source if copy_audio else None)
            elif path.lower().endswith(".png"):
                writers[name] = ImageWriter(path, kinds[name])
            else:
                writers[name] = ImageSequenceWriter(path, kinds[name])

        def encoder(writer):
            def write(item):
                array, pts = item
                writer.write(array.cpu().numpy(), pts)  # waits for the device here, not in the loop
            return write

        # ---- stream: decode (thread) -> model (here) -> encode (a thread per output)
        reader = ReaderThread(source, maxsize=2 * seq_chunk + 2, interrupts=interrupts)
        sinks = {name: WriterThread(encoder(writer), maxsize=2, interrupts=interrupts)
                 for name, writer in writers.items()}
        total = source.estimated_frames
        bar = tqdm(total=total, unit="frame", disable=not progress, dynamic_ncols=True,
                   desc=os.path.basename(input_source.rstrip(os.sep)) or input_source)
        rec = [None] * 4
        with bar, torch.inference_mode():
            for chunk in _chunks(reader, seq_chunk):
                images = torch.from_numpy(np.stack([image for image, _ in chunk]))
                src = images.to(device, non_blocking=True).permute(0, 3, 1, 2)
                src = src.to(dtype).div_(255).unsqueeze(0)            # (1, T, 3, H, W)
                fgr, pha, rec = _unpack_output(model(src, *rec, downsample_ratio=ratio), src)
                arrays = {}
                if "output_foreground" in outputs:
                    arrays["output_foreground"] = _to_uint8(fgr[0])
                if "output_alpha" in outputs:
                    arrays["output_alpha"] = _to_uint8(pha[0])
                if "output_composition" in outputs:
                    if kinds["output_composition"] == "rgba":
                        com = torch.cat([fgr * (pha > 0), pha], dim=-3)  # straight alpha, as RVM
                    else:
                        com = fgr * pha + bgr * (1 - pha)
                    arrays["output_composition"] = _to_uint8(com[0])
                pts = [ts for _, ts in chunk]
                for name, array in arrays.items():
                    sinks[name].put((array, pts))
                count += len(chunk)
                bar.update(len(chunk))
        for sink in sinks.values():
            sink.finish()
        if count == 0:
            raise ValueError(f"input_source {input_source!r} has no frames")
        interrupts.check()  # last chance: nothing is renamed after a Ctrl-C
        for writer in writers.values():
            writer.close()
        return count
    except BaseException:
        # Delete the temporary outputs first: even a second Ctrl-C during the
        # clean-up below cannot then leave a file behind.
        for writer in writers.values():
            writer.discard()
        try:
            for sink in sinks.values():
                sink.abort()
            if reader is not None:
                reader.close()
            else:
                source.close()
        finally:
            for writer in writers.values():
                writer.abort()
        raise
