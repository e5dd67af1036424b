"""Integrity of loaded weights (issue #32, items 1 and 2): the sha256 is checked on the very file, and the very
bytes, that are loaded, on every route (a registered tag, ``pretrained_cfg_overlay=dict(file=...)``, ``hf-hub:``,
``local-dir:``, ``NDECONV_WEIGHTS``, ``--checkpoint``, ``torch.hub.load``); a folder that carries a SHA256SUMS
loads only the files it lists and that match.

The Hugging Face caches here are built as huggingface_hub writes them (``models--ORG--NAME/blobs/`` named by
hash, ``refs/main``, ``snapshots/<commit>/`` of relative links to the blobs) under a temporary ``HF_HOME``, offline.
Shipped weights are never touched: tamper tests work on copies in tmp_path."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from conftest import PROJECT_ROOT

import ndeconv.io as io_mod
import ndeconv.zoo._pretrained as pretrained_mod
from ndeconv.cli import main
from ndeconv.errors import NdeconvError
from ndeconv.loading import load_model

ARCH = "efficientnet_b0_deconv"  # the smallest shipped weights (6 MB)
TAG = "fashion_mnist"
NAME = f"{ARCH}.{TAG}"
HUB_ID = f"ndeconv/{NAME}"  # the shipped tag's own Hub repo: the case that used to verify the shipped copy instead
SHIPPED = pretrained_mod.WEIGHTS_DIR / NAME
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def _shipped() -> None:
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} is not shipped")


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face home (its cache is ``HF_HOME/hub``), returned."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)  # conftest names one; HF_HOME is the one tried here
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub read the environment when it was imported: give it the same answers.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def write_hf_cache(cache: Path, repo: str, files: dict[str, bytes]) -> Path:
    """``files`` as huggingface_hub caches them for ``repo`` under ``cache``: each in ``blobs/`` under its etag
    (a weights file, stored with Git LFS, under its sha256; any other under a git blob hash), linked from
    ``snapshots/REVISION/`` by a relative link, with ``refs/main`` naming REVISION. Returns the snapshot."""
    org, name = repo.split("/")
    base = cache / f"models--{org}--{name}"
    (base / "blobs").mkdir(parents=True)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(REVISION)
    snapshot = base / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for file, data in files.items():
        lfs = file.endswith((".safetensors", ".bin"))
        etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (base / "blobs" / etag).write_bytes(data)
        (snapshot / file).symlink_to(Path("..") / ".." / "blobs" / etag)
    return snapshot


def shipped_files(*names: str) -> dict[str, bytes]:
    return {name: (SHIPPED / name).read_bytes() for name in names}


def tamper(path: Path) -> None:
    """Change one byte of the tensor data (the last one): the file still loads, with one weight changed. A link
    is followed: a Hub snapshot's blob is what changes."""
    path = path.resolve()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    ref = reference.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key


# -- 1: the file verified is the file read ---------------------------------------------------------------------


def test_hf_hub_snapshot_is_verified_not_the_shipped_copy(hf_home: Path) -> None:
    """A Hub snapshot of the shipped tag's own repo used to be checked by the shipped copy's checksum while timm
    read the cache blob: a tampered blob loaded, exit 0."""
    snapshot = write_hf_cache(hf_home / "hub", HUB_ID, shipped_files("model.safetensors", "config.json", "SHA256SUMS"))
    intact = timm.create_model(f"hf-hub:{HUB_ID}", pretrained=True)
    assert intact.pretrained_cfg["source"] == "hf-hub" and intact.pretrained_cfg.get("state_dict") is None
    assert_same_weights(intact, timm.create_model(NAME, pretrained=True))

    tamper(snapshot / "model.safetensors")
    with pytest.raises(NdeconvError) as caught:
        timm.create_model(f"hf-hub:{HUB_ID}", pretrained=True)
    message = str(caught.value)
    assert "\n" not in message
    assert str(snapshot / "model.safetensors") in message and "does not match" in message, message
    assert f"hf download {HUB_ID}" in message, message  # the fix


def test_hf_hub_blob_is_verified_by_its_own_name_on_the_command_line(hf_home: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """A snapshot fetched file by file has no SHA256SUMS: the blob's name (its LFS sha256) is the record."""
    snapshot = write_hf_cache(hf_home / "hub", HUB_ID, shipped_files("model.safetensors", "config.json"))
    tamper(snapshot / "model.safetensors")
    out = tmp_path / "folded.safetensors"
    code, err = run(capsys, "fold", f"hf-hub:{HUB_ID}", "-o", str(out))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert str(snapshot / "model.safetensors") in err and "Hugging Face cache blob" in err, err
    assert f"hf download {HUB_ID}" in err, err
    assert not out.exists()


def test_hub_copy_of_a_registered_tag_is_verified_through_torch_hub(empty_weights_dir: Path) -> None:
    """A pip install (no shipped folder) reads the tag's Hub copy from the cache: torch.hub.load checks it."""
    from huggingface_hub import constants

    snapshot = write_hf_cache(Path(constants.HF_HUB_CACHE), HUB_ID, shipped_files("model.safetensors",
                                                                                   "config.json"))
    tamper(snapshot / "model.safetensors")
    with pytest.raises(NdeconvError, match=r"Hugging Face cache blob name .*hf download"):
        # NAME's tag named: the default tag is another folder once the architecture's 20-epoch weights ship.
        torch.hub.load(str(PROJECT_ROOT), ARCH, source="local", pretrained=True, tag=TAG)


@pytest.mark.parametrize("route", ["checkpoint", "ndeconv_weights", "local-dir"])
def test_the_bytes_verified_are_the_bytes_loaded(route: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is swapped for a tampered one right after its checksum is computed: the verified bytes load (the
    check used to read the file, and the loader read it again)."""
    root = tmp_path / "weights"
    folder = root / NAME
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "SHA256SUMS"):
        shutil.copyfile(SHIPPED / name, folder / name)
    weights = folder / "model.safetensors"

    swapped: list[str] = []

    class SwapAfterHashing:
        """hashlib as ndeconv.io sees it: the first digest taken is followed by the file being tampered."""

        @staticmethod
        def sha256(*args: bytes):
            digest = hashlib.sha256(*args)
            hexdigest = digest.hexdigest

            class Swapping:
                update = digest.update

                @staticmethod
                def hexdigest() -> str:
                    value = hexdigest()
                    if not swapped:
                        tamper(weights)
                        swapped.append(value)
                    return value

            return Swapping()

    load = {
        "checkpoint": lambda: load_model(str(weights), weights_file=True).model,
        "ndeconv_weights": lambda: timm.create_model(NAME, pretrained=True, in_chans=1),
        "local-dir": lambda: timm.create_model(f"local-dir:{folder}", pretrained=True, in_chans=1),
    }[route]
    reference = {
        "checkpoint": lambda: load_model(str(SHIPPED / "model.safetensors"), weights_file=True).model,
        "ndeconv_weights": lambda: timm.create_model(NAME, pretrained=True, in_chans=1),
        "local-dir": lambda: timm.create_model(f"local-dir:{SHIPPED}", pretrained=True, in_chans=1),
    }[route]()
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", root.resolve())  # what NDECONV_WEIGHTS names
    monkeypatch.setattr(io_mod, "hashlib", SwapAfterHashing)
    model = load()
    assert swapped, "the checksum was not taken"
    assert_same_weights(model, reference)


# -- 2: a folder with a SHA256SUMS loads only the files it lists -----------------------------------------------


@pytest.fixture
def unlisted_bin(tmp_path: Path) -> Path:
    """A copy of a shipped folder whose model.safetensors was replaced by a pytorch_model.bin its SHA256SUMS
    does not list (the same weights, saved by torch: loadable weights-only)."""
    folder = tmp_path / "copy" / NAME
    folder.mkdir(parents=True)
    for name in ("config.json", "SHA256SUMS"):
        shutil.copyfile(SHIPPED / name, folder / name)
    from safetensors.torch import load_file

    torch.save(load_file(str(SHIPPED / "model.safetensors")), folder / "pytorch_model.bin")
    return folder


def test_unlisted_file_in_a_checked_folder_is_refused_through_timm(unlisted_bin: Path) -> None:
    with pytest.raises(NdeconvError) as caught:
        timm.create_model(f"local-dir:{unlisted_bin}", pretrained=True)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{unlisted_bin / 'pytorch_model.bin'}: not listed in {unlisted_bin / 'SHA256SUMS'}" in message, message
    # Another safetensors file beside a SHA256SUMS that lists only model.safetensors, named as a user's file.
    other = unlisted_bin / "other.safetensors"
    shutil.copyfile(SHIPPED / "model.safetensors", other)
    with pytest.raises(NdeconvError, match="other.safetensors: not listed in"):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(other)))


def test_unlisted_file_in_a_checked_folder_is_refused_on_the_command_line(unlisted_bin: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "folded.safetensors"
    for argv in (["fold", "--checkpoint", str(unlisted_bin / "pytorch_model.bin"), "-o", str(out)],
                 ["fold", f"local-dir:{unlisted_bin}", "-o", str(out)]):
        code, err = run(capsys, *argv)
        assert code == 1 and len(err.splitlines()) == 1, err
        assert "pytorch_model.bin: not listed in" in err and "sha256sum" in err, err
        assert not out.exists()


def test_unlisted_file_in_a_hub_snapshot_is_refused(hf_home: Path, unlisted_bin: Path) -> None:
    files = {name: (unlisted_bin / name).read_bytes() for name in ("pytorch_model.bin", "config.json", "SHA256SUMS")}
    snapshot = write_hf_cache(hf_home / "hub", "someorg/weights", files)
    with pytest.raises(NdeconvError, match=f"{snapshot / 'pytorch_model.bin'}: not listed in"):
        timm.create_model("hf-hub:someorg/weights", pretrained=True)


def test_sha256sums_that_is_not_text_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / NAME
    folder.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copyfile(SHIPPED / name, folder / name)
    (folder / "SHA256SUMS").write_bytes(b"\xff\xfe\x00garbage")
    out = tmp_path / "folded.safetensors"
    code, err = run(capsys, "fold", "--checkpoint", str(folder / "model.safetensors"), "-o", str(out))
    assert code == 1 and len(err.splitlines()) == 1, err
    assert f"{folder / 'SHA256SUMS'}: not a sha256sum file" in err, err


@pytest.mark.slow  # a fresh interpreter importing torch and timm: about 10 s
def test_hf_home_of_a_fresh_process_is_verified(tmp_path: Path) -> None:
    """The issue's reproduction as a user runs it: HF_HOME set, offline, a tampered blob: exit 1, one line."""
    home = tmp_path / "hf-home"
    snapshot = write_hf_cache(home / "hub", HUB_ID, shipped_files("model.safetensors", "config.json", "SHA256SUMS"))
    tamper(snapshot / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_CACHE"}
    # The shipped copy of the same tag is there too (the case that checked it instead of the blob read).
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", NDECONV_WEIGHTS=str(pretrained_mod.WEIGHTS_DIR))
    done = subprocess.run([sys.executable, "-m", "ndeconv", "fold", f"hf-hub:{HUB_ID}", "-o",
                           str(tmp_path / "o.safetensors")], capture_output=True, text=True, env=env, timeout=300,
                          cwd=PROJECT_ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    err = done.stderr.strip()
    assert len(err.splitlines()) == 1 and "does not match" in err and str(snapshot / "model.safetensors") in err, err
