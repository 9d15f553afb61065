"""Argument parsing shared by the bench scripts (run as ``python bench/<script>.py``, so this
folder is on ``sys.path``)."""
from __future__ import annotations

import argparse


def parse_frame_size(text: str) -> tuple[int, int, float]:
    """'WIDTHxHEIGHT[@RATIO]' (or ':RATIO') -> (width, height, downsample ratio, default 1).

    Raises ``argparse.ArgumentTypeError`` (argparse prefixes the flag) for anything else.
    """
    item = text.strip().replace(":", "@")
    try:
        dims, _, ratio = item.partition("@")
        w, h = (int(v) for v in dims.lower().split("x"))
        r = float(ratio) if ratio else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT[@RATIO] such as 1920x1080@0.25, got {text!r}"
        ) from None
    if w <= 0 or h <= 0 or not 0 < r <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} needs positive sizes and a ratio in (0, 1]")
    return w, h, r
