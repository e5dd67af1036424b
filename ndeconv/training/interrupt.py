"""Ctrl-C and SIGTERM during a run: checkpoint at the next step boundary and stop, instead of losing every step
since the last ``--checkpoint-every`` (by default longer than an epoch of a small run)."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import Interrupted
from .dist import DistContext

__all__ = ["StopRequests"]

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """While entered, SIGINT and SIGTERM only set a flag that the loop reads at step boundaries; a second signal
    stops at once, as without this handler (Python's KeyboardInterrupt for SIGINT, the default action otherwise).

    Handlers can only be set from the main thread: called from another thread, the run keeps the process's."""

    def __init__(self, announce: bool = True):
        self.announce = announce
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            previous = self._previous.get(signum, signal.SIG_DFL)
            self._restore()
            if callable(previous):
                previous(signum, frame)  # Python's default_int_handler raises KeyboardInterrupt
            elif previous in (signal.SIG_DFL, None):  # None: a handler set outside Python; the default then
                os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.announce:
            # os.write, not print: a handler that prints may interrupt a print to the same stream (a reentrant
            # write error); the main thread may be inside a long step.
            message = (f"\n{signal.Signals(signum).name}: stopping with a checkpoint after the current step "
                       "(send it again to stop at once, losing the steps since the last checkpoint)\n")
            try:
                os.write(sys.stderr.fileno(), message.encode())
            except (OSError, ValueError, AttributeError):
                pass

    def requested(self, ctx: DistContext) -> bool:
        """Whether any rank was asked to stop. Under torchrun every rank calls this at the same steps and all of
        them stop together (a rank that stopped alone would leave the others waiting in a collective)."""
        if not ctx.distributed:
            return self.signum is not None
        return ctx.all_reduce_sum([float(self.signum is not None)])[0] > 0

    def error(self, ctx: DistContext, run_dir: Path, step: int) -> Interrupted:
        """The one line that ends a stopped run: what stopped it, and the exact command that continues it."""
        signum = self.signum if self.signum is not None else signal.SIGTERM  # another rank got it
        command = "ndeconv train" if ctx.world == 1 else f"torchrun --nproc_per_node {ctx.world} -m ndeconv.cli train"
        return Interrupted(f"stopped by {signal.Signals(signum).name} at step {step}, checkpoint saved; continue "
                           f"with: {command} --resume {shlex.quote(str(run_dir))}", signum)
