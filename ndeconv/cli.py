"""The ``ndeconv`` command. Each subcommand lives in ``ndeconv/commands/<name>.py`` as a thin
shell over a library function: it defines ``register(subparsers)``, which adds its parser and
sets ``func`` to a callable taking the parsed arguments and returning an exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from .errors import Interrupted, NdeconvError, os_error_line

# Subcommand modules under ndeconv.commands, in the order --help lists them.
COMMANDS: tuple[str, ...] = (
    "list", "convert_reference", "convert_bn", "train", "train_seg", "eval", "fold", "export", "viz",
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``ndeconv`` parser. ``only``: the command line's subcommand (e.g. ``fold``), the one whose full parser
    is built; the others get their help line only, so printing usage imports what that one command's options
    need and nothing else (torch, timm and the zoo load when a command runs). ``""``: help lines only; None:
    every subcommand in full."""
    from ._version import __version__

    parser = argparse.ArgumentParser(
        prog="ndeconv",
        description="Network deconvolution: model zoo, training, weight folding and ONNX export.",
    )
    parser.add_argument("--version", action="version", version=f"ndeconv {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"ndeconv.commands.{name}")  # each module's top imports nothing heavy
        if only is None or only == _command_name(name):
            module.register(subparsers)
        else:
            subparsers.add_parser(_command_name(name), help=module.HELP)
    return parser


def _command_name(module: str) -> str:
    return module.replace("_", "-")


def _subcommand(argv: Sequence[str]) -> str:
    """The subcommand ``argv`` names, "" for none: the first word that is not an option (the top-level parser has
    no option that takes a value)."""
    for arg in argv:
        if arg == "--":
            break
        if not arg.startswith("-"):
            return arg
    return ""


def _output_claimed(args: argparse.Namespace) -> contextlib.AbstractContextManager:
    """The claim on the file a writing command names (its ``claims`` default: the attribute holding the path),
    taken before any work: a second command writing the same path at once is refused in one line."""
    if not getattr(args, "claims", None):
        return contextlib.nullcontext()
    from .file_lock import claim_output

    return claim_output(getattr(args, args.claims), getattr(args, "force", False))


class Terminated(BaseException):
    """SIGTERM, raised where the process is: like KeyboardInterrupt a BaseException, so no ``except Exception``
    that turns a library's failure into one line takes it for a failure."""


# How long a signal that arrived during an import waits before it is delivered again.
_SIGNAL_RETRY_S = 0.05


def _inside_import(frame: FrameType | None) -> bool:
    """Whether the interrupted code runs inside an import: a module's body, or Python that an extension module's
    initialiser calls."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def _signals_interrupt(command: str) -> Iterator[None]:
    """SIGTERM treated as Ctrl-C: the command's cleanup runs (temporary files, claims, folders it made) and it
    ends with one line and status 143 (130 for Ctrl-C). Training handles both signals itself (a checkpoint first).

    Neither signal raises inside an import: an exception raised in Python code that an extension's initialiser
    runs cannot unwind through it (onnx's nanobind modules, imported lazily by torch.onnx.export, abort the
    process or crash). There the signal is sent again a moment later, once the import has ended."""
    if command in ("train", "train-seg") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def deliver(signum: int, frame: FrameType | None) -> None:
        if _inside_import(frame):
            retry = threading.Timer(_SIGNAL_RETRY_S, os.kill, (os.getpid(), signum))
            retry.daemon = True
            retry.start()
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, deliver)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not where SIGINT is ignored (nohup, &)
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, deliver)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_subcommand(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with _output_claimed(args), _signals_interrupt(args.command):
            return int(args.func(args) or 0)
    except Interrupted as err:  # asked for, not a failure: no "error:"
        print(f"ndeconv {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except NdeconvError as err:
        print(f"ndeconv {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        # The file system refused a path the user gave (a name too long, a full disk, a file-size limit, no
        # permission): every command's one line, wherever in it the path was first touched.
        print(f"ndeconv {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ndeconv {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"ndeconv {args.command}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM


if __name__ == "__main__":
    sys.exit(main())
