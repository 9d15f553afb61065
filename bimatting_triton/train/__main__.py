"""Command line: ``python -m bimatting_triton.train --config NAME [--FIELD VALUE ...]``.

``NAME`` is one of the named configs (``stage1`` .. ``stage4``, ``demo``, ``tiny``) or a
JSON file of :class:`~bimatting_triton.train.config.TrainConfig` fields; every field can
be overridden, e.g. ``--videomatte-dir data/VideoMatte240K_JPEG_SD/train --batch-size 4``.
For several GPUs: ``torchrun --nproc_per_node=4 -m bimatting_triton.train --config stage1 ...``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from .config import TrainConfig, config_names, get_config


def _converter(annotation: str, name: str):
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
            raise argparse.ArgumentTypeError(f"--{name}: expected true/false, got {text!r}")
        try:
            return {"int": int, "float": float, "str": str}[base](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name}: expected {base}{' or none' if optional else ''}, got {text!r}") from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bimatting_triton.train",
        description="Train BiMatting (straight-through estimators) with the paper's four-stage recipe.",
        epilog="Named configs: " + ", ".join(config_names()) + ". Every TrainConfig field below overrides the config.",
    )
    parser.add_argument("--config", required=True, help="a named config or a .json file of TrainConfig fields")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    group = parser.add_argument_group("config overrides")
    for f in fields(TrainConfig):
        if f.name == "name":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        group.add_argument(flag, dest=f.name, type=_converter(str(f.type), f.name), default=argparse.SUPPRESS,
                           metavar=f.name.upper(), help=f"(default of TrainConfig: {default!r})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    name = args.pop("config")
    print_only = args.pop("print_config")
    try:
        cfg = get_config(name, **args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if print_only:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    from .loop import train

    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
