"""Errors the command line turns into one clear line and an exit status."""

from __future__ import annotations


class NdeconvError(Exception):
    """A failure with a message meant for the user (exit status 1 on the command line)."""

    exit_code = 1


class UsageError(NdeconvError):
    """Bad arguments or input named by the user: unknown model, missing file, existing output (exit status 2)."""

    exit_code = 2
