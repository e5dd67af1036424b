"""Exclusive ``flock`` locks on small lock files, and the output claim every writing command takes.

``flock`` is released by the kernel whenever its holder exits, however it exits (SIGKILL, out of memory), so the
lock of a dead process never blocks a new one: there is no stale lock to detect or break by hand. The holder
writes its pid into the file so that a refused process can name it. ``ndeconv train`` locks its run directory with
it (``ndeconv.training.lock``); ``claim_output`` locks the file a command is about to write, so that two commands
writing the same path at once do not both report success with one's output silently replaced by the other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UsageError

__all__ = ["LockBusy", "claim_output", "refuse_existing_output", "release_lock", "take_lock"]


class LockBusy(Exception):
    """Another process holds the lock; ``holder`` names it ("pid N")."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


def take_lock(path: Path) -> int:
    """An open descriptor holding an exclusive flock on ``path`` (created if missing), with this process's pid in
    it; LockBusy when another process holds it. OSError when the file cannot be created."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockBusy(holder) from None
        # The previous holder removes the file as it releases: if it did so between our open and our flock, we
        # hold a lock on a file no one else will open. Take the one now at the path instead.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    return fd


def release_lock(path: Path, fd: int) -> None:
    # Removed while still held, so no one can take a lock on a file about to disappear (see take_lock).
    path.unlink(missing_ok=True)
    os.close(fd)


def _holder(fd: int) -> str:
    """'pid N' (and the host when it is another machine's) from a lock file held by someone else."""
    text = ""
    for _ in range(20):  # the holder writes its pid just after taking the lock: give it a moment
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 256).decode(errors="replace").strip()
        if text:
            break
        time.sleep(0.025)
    pid, _, host = text.partition(" ")
    if not pid:
        return "pid unknown"
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


# Claims this process holds (lock file -> depth): a command claims its output, then the library function it calls
# claims the same path again, which must not be refused by the command's own lock.
_HELD: dict[Path, int] = {}


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, outermost first."""
    missing, existing = [], folder
    while not existing.exists():
        missing.append(existing)
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UsageError(f"cannot create the output folder {folder}: {existing} is a file; choose another path")
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            _remove_empty(created)
            raise UsageError(f"cannot create the output folder {path}: {err.strerror}") from err
        created.append(path)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when nothing was written into it


def refuse_existing_output(path: str | os.PathLike, force: bool) -> Path:
    """``path`` as a Path, unless it is a folder, or a file that exists and ``force`` does not replace."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; name the output file (e.g. {path / 'model.safetensors'})")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it or choose another output path")
    return path


def refuse_existing_folder(path: str | os.PathLike) -> Path:
    """``path`` as a Path, unless it is a file, or a folder with something in it (an empty one is taken)."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not path.is_dir():  # a file, or a link to nothing
        raise UsageError(f"{path} is a file; name a folder for the output")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"{path} already exists and is not empty; choose another folder or remove it first")
    return path


@contextlib.contextmanager
def claim_output(path: str | os.PathLike, force: bool = False, *, folder: bool = False) -> Iterator[Path]:
    """Claim the file ``path`` (``folder``: the folder) for writing until the block ends: refuse a folder (a file),
    an existing file without ``force`` (a folder with something in it), an unwritable parent folder, or a path
    another process is writing now (one line naming it); create the missing parent folders, and remove them again
    if the block fails with nothing written into them. The existing-output check runs again once the claim is
    held: a writer that finished in between is not overwritten. Re-entrant within a process."""
    def refuse(target: str | os.PathLike) -> Path:
        return refuse_existing_folder(target) if folder else refuse_existing_output(target, force)

    path = refuse(path)
    parent = path.parent if str(path.parent) else Path(".")
    created = _make_parents(parent)
    lock = parent / f".{path.name}.lock"
    key = lock.resolve()
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield path
        finally:
            _HELD[key] -= 1
        return
    try:
        if not os.access(parent, os.W_OK):
            raise UsageError(f"cannot write to {parent}: permission denied; choose a writable output path")
        try:
            fd = take_lock(lock)
        except LockBusy as busy:
            raise UsageError(f"{path} is being written by another ndeconv command ({busy.holder}); wait for it to "
                             "finish, or choose another output path") from None
        try:
            refuse(path)
        except BaseException:
            release_lock(lock, fd)
            raise
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[key] = 1
    done = False
    try:
        yield path
        done = True
    finally:
        del _HELD[key]
        release_lock(lock, fd)
        if not done:
            _remove_empty(created)
