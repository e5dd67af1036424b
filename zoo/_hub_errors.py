"""Failures while loading pretrained weights (deep in timm, safetensors or huggingface_hub) as one clear line
naming the model, the tag, the source and the fix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from safetensors import SafetensorError
from timm.models import resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source

from ndeconv.errors import UNPICKLE_ERRORS, NdeconvError, UsageError, error_summary

from ._pretrained import _label, _shipped_source, missing_weights_line, verified_source

__all__ = ["hub_lookup_failure", "pretrained_errors"]

def _describe_source(cfg: Any) -> str:
    verified = verified_source(cfg.to_dict())
    if verified is not None:  # the file read and verified before timm was given its tensors
        return verified
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "state_dict":
        return "an in-memory state_dict"
    if not load_from:
        return "nowhere (the pretrained_cfg names no file, url or hf_hub_id)"
    return f"{load_from} {loc}"


@contextlib.contextmanager
def pretrained_errors(variant: str, kwargs: dict[str, Any]) -> Iterator[None]:
    """Turn a failure while loading weights (deep in timm, safetensors or huggingface_hub) into one clear line."""
    try:
        yield
    except NdeconvError:
        raise
    except (RuntimeError, OSError, SafetensorError, ValueError, AssertionError, *UNPICKLE_ERRORS) as err:
        try:
            cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
            label, source = _label(variant, cfg), _describe_source(cfg)
        except Exception:  # noqa: BLE001 - describing the source must never hide the real error
            label, source = variant, "its pretrained_cfg"
        missing = hub_lookup_failure(err)
        shipped_file = _shipped_source(cfg) if "cfg" in locals() else None
        folder = shipped_file.parent if shipped_file is not None else None
        if missing and folder is not None and not folder.is_dir():
            # A shipped tag this install has no folder for, and the Hub did not have it either.
            raise UsageError(missing_weights_line(label, folder, cfg.hf_hub_id)) from err
        reason = missing or error_summary(err)
        # The Hub has no such repo or file, or cannot be reached: the name is the problem (exit status 2).
        error = UsageError if missing else NdeconvError
        raise error(f"{label}: cannot load pretrained weights from {source}: {reason}") from err


def hub_lookup_failure(err: BaseException) -> str | None:
    """Why a Hub repo or file cannot be found (not on the Hub, or not cached while offline), in one line, or None
    for any other error."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        return None
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return (f"not in the local Hugging Face cache and {why}; download it where there is a connection "
                "(`hf download ORG/NAME`), or load a folder with local-dir:FOLDER")
    if isinstance(err, RepositoryNotFoundError):
        return "no such Hugging Face Hub repo (or it is private or gated: log in with `hf auth login`)"
    if isinstance(err, RevisionNotFoundError):
        return "the Hub repo has no such revision"
    if isinstance(err, EntryNotFoundError):
        return f"the Hub repo has no such file ({error_summary(err)})"
    if isinstance(err, HFValidationError):
        return f"not a Hugging Face Hub repo name ({error_summary(err)}); write hf-hub:ORG/NAME"
    return None
