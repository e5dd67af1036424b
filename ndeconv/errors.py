"""Errors the command line turns into one clear line and an exit status."""

from __future__ import annotations

import errno
import pickle
import re


class NdeconvError(Exception):
    """A failure with a message meant for the user (exit status 1 on the command line)."""

    exit_code = 1


class UsageError(NdeconvError):
    """Bad arguments or input named by the user: unknown model, missing file, existing output (exit status 2)."""

    exit_code = 2


class ChecksumError(NdeconvError):
    """A weights file that its recorded sha256 does not vouch for: a mismatch, or a file that the SHA256SUMS of
    its folder does not list (exit status 1). Never retried or explained as a format problem."""


class Interrupted(NdeconvError):
    """A run stopped on request (SIGINT/SIGTERM) after saving what it needs to continue; the shell's exit status
    convention for the signal, 128 + its number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# What torch.load(weights_only=True) raises on bytes that are not a checkpoint, beside OSError/RuntimeError:
# the unpickler fails in any way (b"hi\n" -> KeyError, b"abc" -> IndexError).
UNPICKLE_ERRORS: tuple[type[Exception], ...] = (KeyError, IndexError, EOFError, pickle.UnpicklingError)


# The globals a weights-only unpickler refused, as torch ("GLOBAL posix.system") and timm ("Unsupported globals:
# posix.system.") name them.
_REFUSED_GLOBAL = re.compile(r"(?:\bGLOBAL|Unsupported globals?:)\s+(?:GLOBAL\s+)?([\w.]+?)\.?(?:\s|,|$)")


def weights_only_refusal(err: BaseException) -> str | None:
    """One line for a pickle that ``torch.load(weights_only=True)`` refused (directly or through timm), or None.

    torch's and timm's messages advise re-running with ``weights_only=False``: for a file from anywhere, that is
    the advice to run its code, so it is never passed on; the line says what the file needs instead.
    """
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    text = "\n".join(str(e) for e in chain)
    if "weights_only" not in text and not any(isinstance(e, pickle.UnpicklingError) for e in chain):
        return None
    found = _REFUSED_GLOBAL.search(text)
    if found:
        return (f"refusing to unpickle it: it holds more than tensors and plain containers (it needs "
                f"{found.group(1)}), and loading that would run code from the file")
    reasons = [line.strip() for line in text.splitlines() if line.strip() and "weights_only" not in line
               and "Weights only load failed" not in line and "documentation" not in line.lower()]
    return "the weights-only unpickler refused it" + (f" ({reasons[0]})" if reasons else "")


def error_summary(err: BaseException) -> str:
    """One line for an exception from a library: its first line, or, where that line only introduces a list
    (torch's "Error(s) in loading state_dict for X:"), that line and the first item, which names the cause.
    A refused pickle is described without the libraries' advice to load it unsafely (``weights_only_refusal``)."""
    refusal = weights_only_refusal(err)
    if refusal is not None:
        return refusal
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if isinstance(err, (KeyError, IndexError, EOFError)):  # their text alone ("105", "pop from empty list") is no cause
        return f"{type(err).__name__}: {lines[0]}"
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]


# What to do when the file system refuses an operation, by errno: the second half of a one-line error.
_OS_ERROR_FIXES = {
    errno.ENAMETOOLONG: "choose a shorter name (the file system allows 255 bytes per name)",
    errno.ENOSPC: "free some space or write to another disk",
    errno.EDQUOT: "free some space within your quota or write elsewhere",
    errno.EFBIG: "the file-size limit (ulimit -f) is below the file's size: raise it or write elsewhere",
    errno.EACCES: "check the permissions of the path, or choose another",
    errno.EPERM: "check the permissions of the path, or choose another",
    errno.EROFS: "the file system is read-only: write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "the path is a folder: name a file",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def os_error_fix(code: int | None) -> str:
    """What to do about a refusal of the file system with errno ``code``."""
    return _OS_ERROR_FIXES.get(code, "check the path and the disk")


def os_error_line(err: OSError) -> str:
    """An OSError the file system raised for a path the user gave, as one line: the path (shortened when very
    long), what the system said, and what to do."""
    path = err.filename if isinstance(err.filename, str) else None
    if path is not None and len(path) > 100:
        path = f"{path[:40]}...{path[-40:]} ({len(path)} characters)"
    what = err.strerror or str(err)
    fix = os_error_fix(err.errno)
    return f"{path}: {what}; {fix}" if path else f"{what}; {fix}"
