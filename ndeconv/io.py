"""Safe file handling shared by every command: atomic writes, no overwrites by accident, no pickles."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from .errors import ChecksumError, NdeconvError, UsageError, error_summary
from .file_lock import refuse_existing_output

__all__ = [
    "CHECKSUMS_FILE",
    "atomic_write",
    "check_config_beside",
    "check_loadable_weights",
    "check_output_path",
    "file_sha256",
    "finite_json",
    "folder_not_file",
    "load_safetensors",
    "load_torch_file",
    "parse_json",
    "read_json",
    "read_verified",
    "save_json_atomic",
    "save_safetensors_atomic",
    "verify_checksums_beside",
]

CHECKSUMS_FILE = "SHA256SUMS"


def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to overwrite an existing file unless ``force``; make sure the folder exists and is writable. (The
    commands also claim the path: ``ndeconv.file_lock.claim_output``.)"""
    path = refuse_existing_output(path, force)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create the output folder {parent}: {err.strerror}") from err
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}: permission denied; choose a writable output path")
    return path


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` whose every failure on bad input is a ValueError: a document nested too deeply for
    Python's recursion limit (a crafted config.json) raises RecursionError from the parser, which callers that
    handle "not readable JSON" would otherwise let through as a traceback."""
    try:
        return json.loads(text)
    except RecursionError as err:
        raise ValueError("nested too deeply to be a config") from err


def read_json(path: str | os.PathLike) -> Any:
    """The JSON document in the file at ``path`` (UTF-8). Bad content is a ValueError (``parse_json``), a file
    that cannot be read an OSError, so callers catch ``(OSError, ValueError)`` for every kind of bad file."""
    return parse_json(Path(path).read_bytes())


def check_config_beside(
    path: str | os.PathLike, force: bool, is_ours: Callable[[dict[str, Any]], bool], writer: str
) -> Path:
    """``check_output_path`` for a config.json written beside a weights file: ``force`` replaces only a config
    the same writer made, never a run directory's or a Hub folder's, which other files depend on."""
    path = check_output_path(path, force)
    if path.exists():
        try:
            existing = read_json(path)
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


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, Infinity) replaced by None: Python's json writes those as bare
    ``NaN``/``Infinity``, which is not JSON and which strict parsers (JavaScript, jq, Go, serde) reject."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def save_json_atomic(obj: Any, path: str | os.PathLike, *, finite: bool = False) -> Path:
    """Write JSON (indented, trailing newline) atomically. ``finite``: strict JSON, non-finite numbers written
    as null (see ``finite_json``)."""
    if finite:
        text = json.dumps(finite_json(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    else:
        text = json.dumps(obj, indent=2, sort_keys=False) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


# -- checksums -------------------------------------------------------------------------------------------------

# sha256 of each file hashed in this process, keyed by what any rewrite changes (ctime cannot be set back by a
# user, unlike mtime): a 95 MB shipped file loaded by several commands of one process is hashed once.
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file (symlinks followed), cached per (path, size, mtime, ctime, inode) in this process."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    digest = _DIGESTS.get(key)
    if digest is None:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        digest = _DIGESTS[key] = sha.hexdigest()
    return digest


# What a ``SHA256SUMS`` line holds (sha256sum's format): the hex digest, a space, a mode character (' ' text,
# '*' binary) and the file name, which may hold spaces.
_SUMS_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *]?(.+)")
# A Hugging Face cache blob of a file stored with Git LFS (every weights file) is named by its own sha256
# (``models--ORG--NAME/blobs/<sha256>``): the cache itself records what the file must hash to.
_HF_LFS_BLOB = re.compile(r"[0-9a-f]{64}")


def _recorded_sha256(sums: Path, name: str) -> str | None:
    """The sha256 ``sums`` records for ``name`` (the last line that names it), or None when it has no line for it.
    A SHA256SUMS that cannot be read as text is one ChecksumError naming it."""
    try:
        text = sums.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ChecksumError(f"{sums}: not a sha256sum file (not UTF-8 text), so the weights beside it cannot be "
                            f"verified; re-create it (sha256sum FILE > {sums.name})") from err
    except OSError as err:
        raise ChecksumError(f"{sums}: cannot read it ({err.strerror or err}), so the weights beside it cannot be "
                            "verified; make it readable") from err
    expected = None
    for line in text.splitlines():
        found = _SUMS_LINE.fullmatch(line.strip())
        if found and found.group(2).rstrip().removeprefix("./") == name:
            expected = found.group(1).lower()
    return expected


def _hf_cache_repo(resolved: Path) -> tuple[Path, str] | None:
    """The repo folder and ``ORG/NAME`` of a Hugging Face cache blob stored with Git LFS, or None for any other
    file."""
    repo_dir = resolved.parent.parent
    if resolved.parent.name != "blobs" or not _HF_LFS_BLOB.fullmatch(resolved.name):
        return None
    kind, _, repo = repo_dir.name.partition("--")
    if kind not in ("models", "datasets", "spaces") or "--" not in repo:
        return None
    return repo_dir, repo.replace("--", "/", 1)


def _checksum_records(path: Path, required: bool) -> list[tuple[str, str]]:
    """Every record of the sha256 the file at ``path`` must have, as ``(where it is recorded, sha256)``.

    The records are those of the path the bytes are read from: a ``SHA256SUMS`` beside the file a symlink points
    to (a shipped folder), one beside the link itself (a user's folder, a Hugging Face snapshot, whose files link
    to blobs), and the name of a Hugging Face cache blob (its LFS sha256). A folder that carries a SHA256SUMS
    loads only the files it lists: one that does not list the file is a ChecksumError, as is ``required`` (a
    shipped file) with no record at all."""
    resolved = path.resolve()
    records: list[tuple[str, str]] = []
    seen: set[tuple[Path, str]] = set()
    for sums, name in ((resolved.parent / CHECKSUMS_FILE, resolved.name), (path.parent / CHECKSUMS_FILE, path.name)):
        if not sums.is_file() or (sums.resolve(), name) in seen:
            continue
        seen.add((sums.resolve(), name))
        expected = _recorded_sha256(sums, name)
        if expected is None:
            raise ChecksumError(
                f"{path}: not listed in {sums}, and a folder with a {CHECKSUMS_FILE} loads only the files it "
                f"lists and that match; load a file it lists, or add this file's line to it (cd {sums.parent} && "
                f"sha256sum {name} >> {sums.name}) if you trust the file")
        records.append((str(sums), expected))
    blob = _hf_cache_repo(resolved)
    if blob is not None:
        records.append((f"its Hugging Face cache blob name ({resolved})", resolved.name))
    if required and not records:
        raise ChecksumError(f"{path}: no {CHECKSUMS_FILE} beside it, so the file cannot be verified; "
                            "re-create the folder with zoo._pretrained.ship_weights")
    return records


def _check_sha256(path: Path, actual: str, records: list[tuple[str, str]]) -> None:
    for where, expected in records:
        if actual == expected:
            continue
        blob = _hf_cache_repo(path.resolve())
        if blob is not None:
            fix = (f"the cached copy is corrupt or was replaced: delete {blob[0]} and download it again "
                   f"(`hf download {blob[1]}`)")
        else:
            fix = "the file is corrupt or was replaced: restore it (e.g. git checkout) or re-download it"
        raise ChecksumError(f"{path}: sha256 {actual} does not match {expected} recorded in {where}; {fix}")


def verify_checksums_beside(path: str | os.PathLike, required: bool = False) -> bool:
    """Check the file at ``path`` against every record of its sha256 (see ``_checksum_records``: a SHA256SUMS
    beside it or beside the file a symlink points to, a Hugging Face blob's name) without loading it.

    Returns whether a checksum was checked. A mismatch raises NdeconvError naming the file and both hashes; so
    do a SHA256SUMS that does not list the file and ``required`` (a shipped file) with no record of it. A loader
    uses ``read_verified`` instead, which checks the very bytes it returns.
    """
    path = Path(path)
    records = _checksum_records(path, required)
    if records:
        _check_sha256(path, file_sha256(path), records)
    return bool(records)


def read_verified(path: str | os.PathLike, required: bool = False) -> bytes:
    """The bytes of the weights file at ``path``, read once and checked against every record of their sha256
    (``verify_checksums_beside``'s): the bytes hashed are the bytes returned, so a file swapped or rewritten
    between the check and the load cannot get through. Every weights loader reads through this function.

    Raises UsageError for a folder or a missing file and NdeconvError for a mismatch, a SHA256SUMS beside it that
    does not list it, or ``required`` (a shipped file) without a record."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(folder_not_file(path))
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError as err:
        raise UsageError(f"{path}: no such file") from err
    except OSError as err:
        raise NdeconvError(f"{path}: cannot read it ({err.strerror or err}); check the file and its "
                           "permissions") from err
    records = _checksum_records(path, required)
    if records:
        _check_sha256(path, hashlib.sha256(data).hexdigest(), records)
    return data


# -- reading weights -------------------------------------------------------------------------------------------


def check_loadable_weights(state_dict: dict[str, Any], expected: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Refuse weights that load but cannot be right, naming the first such tensor: a non-floating tensor where the
    model holds a floating one (an all-integer file casts to zeros and rounded values) and NaN or Inf values
    (a diverged run's weights). Integer buffers of the model (BatchNorm's num_batches_tracked) stay integers.

    ``expected``: the model's state_dict; ``prefix``: the model's own prefix in ``state_dict`` (a submodule's).
    """
    for key, target in expected.items():
        value = state_dict.get(prefix + key)
        if not isinstance(value, torch.Tensor) or not isinstance(target, torch.Tensor):
            continue
        if not (target.is_floating_point() or target.is_complex()):
            continue
        if not (value.is_floating_point() or value.is_complex()):
            raise NdeconvError(f"weights {prefix + key}: {str(value.dtype).removeprefix('torch.')} values where the "
                               f"model holds {str(target.dtype).removeprefix('torch.')}; the file is damaged or was "
                               "saved with the wrong dtype (integers cast to floats are not these weights): "
                               "re-create it from the trained model")
        if value.device.type != "meta" and value.numel() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise NdeconvError(f"weights {prefix + key}: {bad} of its {value.numel()} values are NaN or Inf; the "
                               "weights are corrupt (a diverged run saves such): use an earlier checkpoint or "
                               "retrain")


def load_safetensors(path: str | os.PathLike, device: str = "cpu", required: bool = False) -> dict[str, torch.Tensor]:
    """Load a safetensors state_dict, turning a missing, truncated or foreign file into one clear error.

    The file is read once (``read_verified``: checked against a ``SHA256SUMS`` beside it, a Hugging Face blob's
    name) and those bytes are deserialized; ``required``: a shipped file, whose SHA256SUMS must list it."""
    data = read_verified(path, required)
    try:
        state = load_safetensors_bytes(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise NdeconvError(
            f"{path}: not a readable safetensors file ({err}); it may be truncated or in another format"
        ) from err
    finally:
        del data  # the tensors hold copies: free the file's bytes before anything moves them
    return state if device == "cpu" else {k: v.to(device) for k, v in state.items()}


_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pth.tar", ".pt", ".bin")


def folder_not_file(path: Path) -> str:
    """The error for a folder given where a weights file is wanted, naming the weights it holds, if any."""
    try:
        found = sorted(p.name for p in path.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    except OSError:  # an unreadable folder: say what it is all the same
        found = []
    if found:
        return f"{path} is a folder, not a weights file; name the file in it, e.g. {path / found[0]}"
    return f"{path} is a folder with no weights file in it (*.safetensors, *.pth); give the weights file itself"


# What a torch checkpoint may pickle besides tensors and plain containers: timm's train.py saves its argparse
# arguments (``args``) in every checkpoint. A Namespace unpickles to an object with attributes and runs no code,
# so it is allowed; any other global is still refused.
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]


def load_torch_file(path: str | os.PathLike, required: bool = False) -> Any:
    """The one weights-only reader of torch files: ``torch.load(weights_only=True)`` (tensors, numbers, strings,
    containers and argparse Namespaces; never code) of the bytes ``read_verified`` read and checked against a
    SHA256SUMS beside the file, if any (``required``: a shipped file, whose SHA256SUMS must list it).

    A pickle that needs anything else, a damaged file or one in another format is one NdeconvError naming the
    file and the fix, never torch's advice to retry with ``weights_only=False`` (that would run the file's code).
    """
    path = Path(path)
    data = read_verified(path, required)
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle at all (or a damaged one)
            raise NdeconvError(f"{path}: not a readable PyTorch checkpoint; it is damaged or another format") from err
        raise NdeconvError(
            f"{path}: refusing to unpickle it: the checkpoint holds more than tensors and plain containers "
            f"(it needs {found.group(1)}), and loading that would run code from the file; re-save only the weights "
            "where the code is trusted: torch.save({'state_dict': model.state_dict(), 'arch': ...})"
        ) from err
    except Exception as err:  # noqa: BLE001 - garbage makes the unpickler fail in any way (KeyError, IndexError, ...)
        first = error_summary(err).split(". ")[0].rstrip(".")
        raise NdeconvError(f"{path}: not a readable PyTorch checkpoint ({first}); it may be truncated") from err
