"""Test set-up: offline Hugging Face Hub, and the path of the reference fixtures (committed in tests/fixtures/)."""

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
# The authors' outputs: a byte-identical copy of ../shared/fixtures/reference (sha256 in reference.sha256 beside
# it, checked by tests/test_ecosystem.py), committed so that a fresh clone anywhere checks parity.
REFERENCE = PROJECT_ROOT / "tests" / "fixtures" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """``tests/fixtures/reference``: the authors' outputs. Skips (with the reason) only when absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference fixtures not found at {REFERENCE}; restore tests/fixtures/ from the repository")
    return REFERENCE


def zoo_model_without_weights(tag: str = "fashion_mnist") -> str:
    """A zoo model with no shipped weights for ``tag`` (skips the test when every model has them)."""
    from ndeconv.zoo import ZOO_MODELS
    from ndeconv.zoo._pretrained import shipped_weights_path

    for name in ZOO_MODELS:
        if not shipped_weights_path(name, tag).exists():
            return name
    pytest.skip(f"every zoo model ships {tag} weights: nothing left to test the missing-weights error on")


def shipped_zoo_models(tag: str = "fashion_mnist") -> list[str]:
    """The zoo models whose ``tag`` weights are shipped in zoo/weights/."""
    from ndeconv.zoo import ZOO_MODELS
    from ndeconv.zoo._pretrained import shipped_weights_path

    return [name for name in ZOO_MODELS if shipped_weights_path(name, tag).exists()]
