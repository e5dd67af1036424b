"""Test set-up: offline Hugging Face Hub, the path of the reference fixtures (committed in tests/fixtures/), and
the helpers several test files share (one torch thread, an empty zoo weights folder, a hand-built Hub cache)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# huggingface_hub reads these when first imported: set them before anything imports it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_CACHE", tempfile.mkdtemp(prefix="ndeconv-hf-cache-"))
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    # Two cores shared by several jobs: multi-threaded batched eigh/bmm on small matrices then spin-waits
    # (measured 10x slower); one thread is the fast setting here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def empty_weights_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The zoo's weights folder (``WEIGHTS_DIR``, what ``NDECONV_WEIGHTS`` names) pointed at an empty directory,
    which is returned: every zoo tag is then one this install has no weights for, as in a pip install (the wheel
    carries none), and ``pretrained=True`` says how to get them. The shipped file is found when a model is built,
    so nothing in timm's registry needs changing. Hugging Face is kept offline, with an empty cache, so the Hub
    fallback cannot find a copy either.

    Every zoo model ships its weights, so this is the only way the missing-weights path can be tested.
    """
    import ndeconv.zoo._pretrained as pretrained

    # Resolved: prepare_pretrained tells shipped weights from a user's file by the resolved path.
    empty = (tmp_path / "zoo-weights").resolve()
    empty.mkdir()
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", empty)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    return empty


def zoo_model_without_weights(tag: str = "fashion_mnist") -> str:
    """A zoo model with no shipped weights for ``tag``; with ``empty_weights_dir`` that is every one (without it,
    the test is skipped when every model has them)."""
    from ndeconv.zoo import ZOO_MODELS
    from ndeconv.zoo._pretrained import shipped_weights_path

    for name in ZOO_MODELS:
        if not shipped_weights_path(name, tag).exists():
            return name
    pytest.skip(f"every zoo model ships {tag} weights: use the empty_weights_dir fixture to test without them")


def write_hf_cache(root: Path, repo: str, folder: Path,
                   revision: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    """The cache layout huggingface_hub reads offline for ``repo``, under ``root``, holding ``folder``'s
    model.safetensors and config.json: refs/main (no trailing newline) + snapshots/REV/* (no download)."""
    org, name = repo.split("/")
    base = root / f"models--{org}--{name}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(revision)
    snap = base / "snapshots" / revision
    snap.mkdir(parents=True)
    for file in ("model.safetensors", "config.json"):
        shutil.copyfile(folder / file, snap / file)


def default_tag(name: str) -> str:
    """The tag ``timm.create_model(name, pretrained=True)`` loads: the registry's default (the first listed)."""
    import timm

    import ndeconv  # noqa: F401  registers the zoo with timm, which a test that only runs subprocesses has not done

    return timm.models.get_pretrained_cfg(name).tag


def shipped_weight_sets() -> list[str]:
    """Every shipped weight set as ``<model>.<tag>`` (a folder of zoo/weights/ holding model.safetensors)."""
    from ndeconv.zoo._pretrained import WEIGHTS_DIR, WEIGHTS_FILE

    return sorted(p.name for p in WEIGHTS_DIR.glob("*") if (p / WEIGHTS_FILE).is_file()) if WEIGHTS_DIR.is_dir() else []


def shipped_zoo_models(tag: str = "fashion_mnist") -> list[str]:
    """The zoo models whose ``tag`` weights are shipped in zoo/weights/."""
    from ndeconv.zoo import ZOO_MODELS
    from ndeconv.zoo._pretrained import shipped_weights_path

    return [name for name in ZOO_MODELS if shipped_weights_path(name, tag).exists()]
