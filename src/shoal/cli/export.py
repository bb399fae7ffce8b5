"""``shoal export``: a checkpoint's model as a plain safetensors file."""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_export"]


def add_export(commands) -> None:
    parser = commands.add_parser("export", help="write a checkpoint's model as safetensors",
                                 description="Write the model of a checkpoint (or of the newest "
                                 "good checkpoint in a --checkpoint-dir) as one safetensors file.")
    parser.add_argument("checkpoint", metavar="DIR", help="a --checkpoint-dir, or one checkpoint in it")
    parser.add_argument("--out", required=True, metavar="PATH", help="the .safetensors file to write")
    parser.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from shoal.checkpoint import Checkpoint, CheckpointError
    from shoal.checkpoint.export import export_model
    from shoal.config import ConfigError, check_writable_file

    if not os.path.isdir(args.checkpoint):
        raise ConfigError("DIR", f"{args.checkpoint!r} is not a directory")
    check_writable_file("--out", args.out)
    if Checkpoint.is_checkpoint(os.path.dirname(os.path.abspath(args.out))):  # it could overwrite what it reads
        raise ConfigError("--out", f"{args.out!r} is inside a checkpoint: write the export elsewhere")
    try:
        checkpoint = export_model(args.checkpoint, args.out,
                                  warn=lambda line: print(f"shoal export: warning: {line}", file=sys.stderr))
    except CheckpointError as error:  # nothing usable in DIR: the input is wrong
        raise ConfigError("DIR", str(error)) from None
    print(f"shoal export: {checkpoint.path} (step {checkpoint.step}) -> {args.out}", file=sys.stderr)
    return 0
