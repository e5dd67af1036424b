"""One training at a time in a run directory: an exclusive ``flock`` on ``RUN_DIR/.lock`` for the life of the run.

Two runs into the same folder would otherwise both pass the new-directory check before either writes, and the
second would silently overwrite the first's config and checkpoints. ``flock`` is released by the kernel whenever
its holder exits, however it exits (SIGKILL, out of memory), so the lock of a dead run never blocks a new one:
there is no stale lock to detect or break by hand. The holder writes its pid into the file so that a refused run
can name it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError
from ..file_lock import LockBusy, release_lock, take_lock

__all__ = ["LOCK_FILE", "RunDirLock"]

LOCK_FILE = ".lock"


class RunDirLock:
    """``acquire()`` takes the lock (creating the folder if needed) or raises a one-line UsageError naming the
    process that holds it; ``release()`` gives it back and removes what ``acquire`` created, so a run refused
    later (bad data, bad settings) leaves no trace."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        if not self.run_dir.is_dir():
            try:
                self.run_dir.mkdir(parents=True)
                self._created_dir = True
            except FileExistsError:
                if not self.run_dir.is_dir():
                    raise UsageError(f"{self.run_dir} is a file; choose a folder path") from None
            except OSError as err:
                raise UsageError(f"cannot create the run directory {self.run_dir}: {err.strerror}") from err
        try:
            fd = take_lock(self.path)
        except LockBusy as busy:
            self._undo_dir()
            raise UsageError(f"{self.run_dir} is in use by another training ({busy.holder}); wait for it to end or "
                             "stop it, or choose another --out") from None
        except OSError as err:
            self._undo_dir()
            raise UsageError(f"cannot write to {self.run_dir}: {err.strerror}; choose another --out") from err
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        release_lock(self.path, self._fd)
        self._fd = None
        self._undo_dir()

    def _undo_dir(self) -> None:
        if self._created_dir:
            try:
                self.run_dir.rmdir()  # only when nothing was written into it
            except OSError:
                pass
            self._created_dir = False

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
