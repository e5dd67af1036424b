"""The ``ndeconv`` command. Each subcommand lives in ``ndeconv/commands/<name>.py`` as a thin
shell over a library function: it defines ``register(subparsers)``, which adds its parser and
sets ``func`` to a callable taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .errors import Interrupted, NdeconvError

# Subcommand modules under ndeconv.commands, in the order --help lists them.
COMMANDS: tuple[str, ...] = (
    "list", "convert_reference", "convert_bn", "train", "train_seg", "eval", "fold", "export", "viz",
)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="ndeconv",
        description="Network deconvolution: model zoo, training, weight folding and ONNX export.",
    )
    parser.add_argument("--version", action="version", version=f"ndeconv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"ndeconv.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except Interrupted as err:  # asked for, not a failure: no "error:"
        print(f"ndeconv {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except NdeconvError as err:
        print(f"ndeconv {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"ndeconv {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
