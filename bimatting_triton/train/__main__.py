"""Command line: ``python -m bimatting_triton.train --config NAME [--FIELD VALUE ...]``.

``NAME`` is one of the named configs (``stage1`` .. ``stage4``, ``demo``, ``tiny``) or a
JSON file of :class:`~bimatting_triton.train.config.TrainConfig` fields; every field can
be overridden, e.g. ``--videomatte-dir data/VideoMatte240K_JPEG_SD/train --batch-size 4``.
For several GPUs: ``torchrun --nproc_per_node=4 -m bimatting_triton.train --config stage1 ...``.

``--print-config`` shows the resolved settings as JSON and exits: without ``--config``
the defaults of ``TrainConfig``; a named stage even before its data folders are given
(a note on stderr lists what training still needs). Mistakes in the command line, the
config or the files it names (a missing ``--resume`` checkpoint, ``--device cuda``
without CUDA) print ``error: ...`` and exit with status 2; anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from ..devices import usable_device
from .config import TrainConfig, config_names, field_comments, get_config

USAGE_ERROR = 2  # exit status of every reported mistake, as argparse's own


def _converter(annotation: str):
    optional = "None" in annotation
    base = annotation.replace("| None", "").replace("None |", "").strip()

    def convert(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        if base == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")  # argparse names the flag
        try:
            return {"int": int, "float": float, "str": str}[base](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {base}{' or none' if optional else ''}, got {text!r}") from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bimatting_triton.train",
        description="Train BiMatting (straight-through estimators) with the paper's four-stage recipe.",
        epilog="Named configs: " + ", ".join(config_names()) + ". Every TrainConfig field below overrides the config. "
        f"Mistakes in the arguments, the config or the files it names exit with status {USAGE_ERROR}.",
    )
    parser.add_argument("--config", help="a named config or a .json file of TrainConfig fields (required to train)")
    parser.add_argument(
        "--print-config", action="store_true",
        help="print the resolved config as JSON and exit; without --config the defaults; a stage's settings "
        "even before its data folders are given (stderr notes what training still needs)",
    )
    group = parser.add_argument_group("config overrides")
    comments = field_comments()
    for f in fields(TrainConfig):
        if f.name == "name":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        group.add_argument(flag, dest=f.name, type=_converter(str(f.type)), default=argparse.SUPPRESS,
                           metavar=f.name.upper(),
                           help=f"{comments.get(f.name, '')} (default of TrainConfig: {default!r})".lstrip())
    return parser


def _error(message: object) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    name = args.pop("config")
    print_only = args.pop("print_config")
    if name is None and not print_only:
        parser.error(f"--config is required to train (one of {', '.join(config_names())}, or a .json file)")
    try:
        if name is None:
            cfg = TrainConfig.from_dict(args, require_data=False)
        else:
            cfg = get_config(name, require_data=not print_only, **args)
    except ValueError as exc:
        return _error(exc)
    if print_only:
        print(json.dumps(cfg.to_dict(), indent=2))
        if name is None:
            print(f"note: TrainConfig's defaults; named configs: {', '.join(config_names())}", file=sys.stderr)
        for message in cfg.missing_data():
            print(f"note: needed before training: {message}", file=sys.stderr)
        return 0
    try:
        usable_device(cfg.device, "--device")  # before joining a process group or reading data
    except ValueError as exc:
        return _error(exc)
    from . import distributed
    from .loop import Trainer

    # Only the setup's errors are the user's (checkpoints, data folders); one during the
    # steps is unexpected and keeps its traceback.
    try:
        trainer = Trainer(cfg)
    except (FileNotFoundError, ValueError) as exc:
        distributed.cleanup()
        return _error(exc)
    try:
        trainer.fit()
    finally:
        distributed.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
