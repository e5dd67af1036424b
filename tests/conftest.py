"""Test set-up: offline Hugging Face Hub, and the path of the shared reference fixtures."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# huggingface_hub reads these when first imported: set them before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_CACHE", tempfile.mkdtemp(prefix="ndeconv-hf-cache-"))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared"
REFERENCE = SHARED / "fixtures" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``../shared/fixtures/reference``: the authors' outputs. Skips (with the reason) only when absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE} (the read-only ../shared beside the project)")
    return REFERENCE
