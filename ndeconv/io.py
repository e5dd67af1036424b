"""Safe file handling shared by every command: atomic writes, no overwrites by accident, no pickles."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import NdeconvError, UsageError

__all__ = [
    "atomic_write",
    "check_config_beside",
    "check_output_path",
    "load_safetensors",
    "save_json_atomic",
    "save_safetensors_atomic",
]


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to overwrite an existing file unless ``force``; make sure the folder exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder; name the output file (e.g. {path / 'model.safetensors'})")
    if path.exists() and not force:
        raise UsageError(f"{path} already exists; pass --force to overwrite it or choose another output path")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder {parent}: {err.strerror}") from err
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}: permission denied; choose a writable output path")
    return path


def check_config_beside(
    path: str | os.PathLike, force: bool, is_ours: Callable[[dict[str, Any]], bool], writer: str
) -> Path:
    """``check_output_path`` for a config.json written beside a weights file: ``force`` replaces only a config
    the same writer made, never a run directory's or a Hub folder's, which other files depend on."""
    path = check_output_path(path, force)
    if path.exists():
        try:
            existing = json.loads(path.read_text())
        except (OSError, ValueError):
            existing = None
        if not (isinstance(existing, dict) and is_ours(existing)):
            raise UsageError(f"{path} exists and was not written by {writer} (it may describe a run or other "
                             "weights), so --force does not replace it; write the output into another folder")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it over ``path``.

    A crash or kill at any moment leaves either the old file or the new one, never half a file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        # mkstemp (and some writers) create the file owner-only (0600); give it the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file atomically (tensors made contiguous and unshared first)."""
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_json_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """Write JSON (indented, trailing newline) atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors state_dict, turning a missing, truncated or foreign file into one clear error."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as err:
        raise NdeconvError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated or in another format"
        ) from err
