"""The ``bimatting`` command: matte a video (or images) from the shell.

    bimatting input.mp4 -o out.mp4 --alpha alpha.mp4 --checkpoint bimatting.pth

Installed as the console script ``bimatting`` and runnable as
``python -m bimatting_triton``. It wraps :func:`bimatting_triton.video.convert_video`;
``main(argv)`` returns the exit status (0 success, 1 failed run, 2 bad arguments,
130 interrupted) instead of exiting, so it can be called from Python.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from fractions import Fraction

__all__ = ["main", "build_parser", "load_model"]

DTYPES = ("float32", "float16", "bfloat16")

RANDOM_WEIGHTS_WARNING = (
    "WARNING: no --checkpoint given, so the model has RANDOM weights: the mattes it "
    "writes will be meaningless (useful only to try the pipeline). Pass --checkpoint "
    "PATH with a BiMatting checkpoint for real results.")

_DESCRIPTION = """\
Cut people out of a video with BiMatting (binarized Robust Video Matting).

Reads a video file, a folder of images or a single image, and writes any of: the
composition (-o), the alpha matte (--alpha), the foreground colours (--foreground).
The format follows each output's ending:
  .mp4 .m4v .mkv   H.264 (opaque: composed on green unless --background-* is given)
  .mov             ProRes 4444 with transparency
  .webm            VP9 with transparency
  a folder / .png  PNG sequence (RGBA), or one .png file for a single-image input
Frame rate, timestamps and audio of the input are kept. Outputs are written under
a temporary name and appear only when complete."""

_EPILOG = """\
examples:
  bimatting talk.mp4 -o talk_green.mp4 --alpha talk_alpha.mp4 --checkpoint bimatting.pth
  bimatting talk.mp4 -o talk.mov --checkpoint bimatting.pth          (transparent ProRes 4444)
  bimatting talk.mp4 -o talk.webm --background-color 0,0,255 --checkpoint bimatting.pth
  bimatting frames/ -o cutout/ --checkpoint bimatting.pth             (PNG sequence in, out)
  bimatting photo.jpg -o photo_cutout.png --checkpoint bimatting.pth
"""


def _colour(text: str) -> tuple[int, int, int]:
    """``R,G,B`` (0-255 each) or ``#RRGGBB``."""
    text = text.strip()
    m = re.fullmatch(r"#?([0-9a-fA-F]{6})", text)
    if m and (text.startswith("#") or "," not in text):
        h = m.group(1)
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    parts = text.split(",")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 <= v <= 255 for v in values):
        raise argparse.ArgumentTypeError(f"expected R,G,B with values 0-255 or #RRGGBB, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _ratio(text: str) -> float | None:
    if text.strip().lower() == "auto":  # the default, spelled out
        return None
    value = _positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a ratio in (0, 1], got {text!r}")
    return value


def _int_at_least(text: str, low: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = low - 1
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1 (the error names what was expected and what was given)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _frame_rate(text: str) -> Fraction:
    """``25``, ``29.97`` (a decimal near an NTSC rate means it: 30000/1001) or ``30000/1001`` (exact)."""
    from .video.readers import as_frame_rate

    text = text.strip()
    try:
        # a decimal is read as a float, as convert_video's frame_rate=29.97 (see as_frame_rate)
        return as_frame_rate(Fraction(text) if "/" in text else float(text), "--frame-rate")
    except (ValueError, ZeroDivisionError, TypeError):
        raise argparse.ArgumentTypeError(
            f"expected a frame rate such as 25, 29.97 or 30000/1001, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bimatting", description=_DESCRIPTION, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="video file, folder of images, or one image")
    out = p.add_argument_group("outputs (at least one)")
    out.add_argument("-o", "--composition", metavar="PATH",
                     help="foreground composed on the background (transparent in .mov/.webm/PNG)")
    out.add_argument("--alpha", metavar="PATH", help="alpha matte (grey)")
    out.add_argument("--foreground", metavar="PATH", help="predicted foreground colours")
    out.add_argument("--output-type", choices=("video", "png_sequence"), default=None,
                     help="default: png_sequence when every output is a folder or a .png, "
                          "else video")
    bg = out.add_mutually_exclusive_group()
    bg.add_argument("--background-color", type=_colour, metavar="R,G,B",
                    help="compose on this colour (0-255 each, or #RRGGBB); default: transparent "
                         "where the format allows it, else green 120,255,155")
    bg.add_argument("--background-image", metavar="PATH",
                    help="compose on this image (scaled to cover the frame)")
    out.add_argument("--mbps", type=_positive_float, default=None, metavar="MBPS",
                     help="video bitrate in Mbit/s, e.g. 4.5 (default 1; ProRes ignores it)")
    out.add_argument("--no-audio", action="store_true", help="do not copy the input's audio")

    model = p.add_argument_group("model")
    model.add_argument("--checkpoint", metavar="CKPT",
                       help="BiMatting checkpoint (.pth), or a packed inference checkpoint "
                            "(bimatting_triton.packed.save_packed: runs fused, as with --fused); without "
                            "it the weights are random")
    model.add_argument("--refiner", choices=("deep_guided_filter", "fast_guided_filter"), default=None,
                       help="high-resolution refiner (default: deep_guided_filter; a packed checkpoint's "
                            "own)")
    model.add_argument("--fused", action="store_true",
                       help="run the packed binary model (bimatting_triton.convert): Triton kernels on "
                            "CUDA, their plain-PyTorch references elsewhere (implied by a packed "
                            "--checkpoint)")
    model.add_argument("--cuda-graph", action="store_true",
                       help="replay each model call as a CUDA graph (CUDA devices; cuts the launch "
                            "overhead of one frame per call; bimatting_triton.CudaGraphStep)")
    model.add_argument("--device", default=None,
                       help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    model.add_argument("--dtype", choices=DTYPES, default=None,
                       help="compute dtype (default: float32; a packed checkpoint's own)")

    run = p.add_argument_group("processing")
    run.add_argument("--downsample-ratio", type=_ratio, default=None, metavar="R",
                     help="ratio in (0, 1] for the low-resolution pass, or auto (the default: "
                          "min(512/max(H, W), 1))")
    run.add_argument("--input-resize", type=positive_int, nargs=2, metavar=("W", "H"),
                     help="resize input frames to W x H first")
    run.add_argument("--seq-chunk", type=positive_int, default=1, metavar="N",
                     help="frames per model call; more is faster on GPUs and uses more memory "
                          "(default: %(default)s)")
    run.add_argument("--frame-rate", type=_frame_rate, default=None, metavar="FPS",
                     help="frame rate of image inputs, e.g. 25, 29.97 (= 30000/1001) or 30000/1001 "
                          "(default 30; videos keep theirs)")
    run.add_argument("--threads", type=non_negative_int, default=0, metavar="N",
                     help="FFmpeg decoding threads (0: automatic)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def _infer_output_type(paths: list[str]) -> str:
    def folder_or_png(path: str) -> bool:
        ext = os.path.splitext(path.rstrip("/" + os.sep))[1].lower()
        return ext in ("", ".png") or path.endswith(("/", os.sep))
    return "png_sequence" if all(folder_or_png(p) for p in paths) else "video"


def load_model(checkpoint: str | None, refiner: str | None, device, dtype, fused: bool):
    """The BiMatting model the CLI runs: loaded from ``checkpoint`` (random weights if
    ``None``), moved to ``device``/``dtype``, in eval mode, fused if asked.

    A packed inference checkpoint (:func:`bimatting_triton.packed.save_packed`) holds the
    fused model: it is run as it is, ``fused`` or not, with its own refiner (``refiner``,
    if given, must be that one). ``refiner`` None: ``deep_guided_filter`` otherwise.
    """
    import torch

    import bimatting_triton
    from bimatting_triton import BiMatting

    from .checkpoint import CheckpointError, is_packed_file

    convert = getattr(bimatting_triton, "convert", None)
    if fused and convert is None:
        raise _UsageError("--fused needs bimatting_triton.convert (the fused kernel path), which "
                          "this installation does not have; run without --fused")
    if checkpoint is None:
        model = BiMatting(refiner=refiner or "deep_guided_filter")
    elif os.path.isdir(checkpoint):
        raise IsADirectoryError(f"--checkpoint {checkpoint!r} is a folder, expected a checkpoint file")
    elif not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"--checkpoint {checkpoint!r} does not exist")
    else:
        try:
            if is_packed_file(checkpoint):
                return _load_packed(checkpoint, refiner, device, dtype)
            model = BiMatting.from_pretrained(checkpoint, refiner=refiner or "deep_guided_filter",
                                              map_location="cpu")
        except CheckpointError as e:
            raise CheckpointError(f"--checkpoint: {e}") from e
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    if fused:
        converted = convert(model)
        model = converted if converted is not None else model
    return model


def _load_packed(checkpoint: str, refiner: str | None, device, dtype):
    """A packed inference checkpoint's fused model, as :func:`load_model` returns it."""
    from .packed import load_packed

    model = load_packed(checkpoint)
    if refiner not in (None, model.refiner_name):
        raise _UsageError(f"--refiner {refiner}: the packed --checkpoint {checkpoint!r} holds the "
                          f"{model.refiner_name} refiner; leave --refiner out")
    print(f"bimatting: --checkpoint {checkpoint!r} is a packed inference checkpoint: running its fused "
          "model", file=sys.stderr)
    return model.to(device=device, dtype=dtype).eval()  # dtype None: the file's own


def _model_dtype(model):
    """The float dtype a (BiMatting, plain or fused) model computes in: its heads' weights'."""
    import torch

    head = getattr(getattr(model, "project_mat", None), "conv", None)
    return head.weight.dtype if isinstance(getattr(head, "weight", None), torch.Tensor) else torch.float32


class _UsageError(Exception):
    pass


#: convert_video's argument names, as the flags that set them, for its error messages.
_FLAGS = {
    "input_source": "input", "output_composition": "-o/--composition", "output_alpha": "--alpha",
    "output_foreground": "--foreground", "output_type": "--output-type",
    "output_video_mbps": "--mbps", "downsample_ratio": "--downsample-ratio",
    "input_resize": "--input-resize", "seq_chunk": "--seq-chunk", "frame_rate": "--frame-rate",
    "num_workers": "--threads", "background image": "--background-image",
}
# An argument name outside quotes, with the value it is set to (``output_type='png_sequence'``)
# if any: paths in the messages are quoted (repr), and left alone.
_NAMES = re.compile(r"""('[^']*'|"[^"]*")|\b(%s)\b(?:=('[^']*'|[\w.+-]+))?""" % "|".join(map(re.escape, _FLAGS)))


def _with_flags(message: str) -> str:
    """``message`` (from convert_video) with its argument names replaced by the CLI's flags:
    ``output_type='png_sequence'`` reads ``--output-type png_sequence``."""
    def flag(m: re.Match) -> str:
        if m.group(1):
            return m.group(1)
        value = (m.group(3) or "").strip("'")
        return f"{_FLAGS[m.group(2)]} {value}" if value else _FLAGS[m.group(2)]
    return _NAMES.sub(flag, message)


def _interrupt(signum, frame):
    # Handled as a Ctrl-C, so that convert_video stops at a safe point (see video.pipeline),
    # also where SIGINT itself is ignored (a background job): not by re-raising SIGINT.
    from .video.pipeline import request_interrupt

    request_interrupt()


def main(argv: list[str] | None = None) -> int:
    """Run the ``bimatting`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not (args.composition or args.alpha or args.foreground):
        parser.error("give at least one output: -o/--composition, --alpha or --foreground")

    import torch

    from .devices import usable_device
    from .video import convert_video
    from .video.writers import MissingEncoderError

    outputs = [p for p in (args.composition, args.alpha, args.foreground) if p]
    output_type = args.output_type or _infer_output_type(outputs)
    background = args.background_color or args.background_image
    previous_sigterm = None
    if threading.current_thread() is threading.main_thread():
        # ``kill`` (SIGTERM) cleans up like Ctrl-C: no temporary output is left behind.
        previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            torch_device = usable_device(args.device, "--device")
        except ValueError as e:
            raise _UsageError(str(e)) from None
        if args.cuda_graph and torch_device.type != "cuda":
            got = (f"got --device {args.device!r}" if args.device is not None else
                   "and none is available (no --device given, so the model runs on the CPU)")
            raise _UsageError(f"--cuda-graph needs a CUDA device, {got}")
        if args.checkpoint is None:
            print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        model = load_model(args.checkpoint, args.refiner, torch_device, dtype, args.fused)
        dtype = dtype or _model_dtype(model)  # what the frames are cast to
        if args.cuda_graph:
            from .cuda_graph import CudaGraphStep

            model = CudaGraphStep(model)
        frames = convert_video(
            model, args.input,
            input_resize=tuple(args.input_resize) if args.input_resize else None,
            downsample_ratio=args.downsample_ratio, output_type=output_type,
            output_composition=args.composition, output_alpha=args.alpha,
            output_foreground=args.foreground, output_video_mbps=args.mbps,
            seq_chunk=args.seq_chunk, num_workers=args.threads, progress=not args.no_progress,
            device=torch_device, dtype=dtype, background=background,
            audio=not args.no_audio, frame_rate=args.frame_rate)
    except KeyboardInterrupt:
        print("bimatting: interrupted; no output was written", file=sys.stderr)
        return 130
    except _UsageError as e:
        print(f"bimatting: error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, MissingEncoderError) as e:
        print(f"bimatting: error: {_with_flags(str(e))}", file=sys.stderr)
        return 1
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    print(f"bimatting: wrote {frames} frames to {', '.join(outputs)}", file=sys.stderr)
    return 0
