"""Loading weights reliably (issue #20): the sha256 check on every load path, weights that load but cannot be
right, one-line errors for every bad name, no advice to unpickle untrusted files, and clear words for a folder
given as a checkpoint and an opset out of range.

Shipped weights are never touched: tamper tests work on a copy of the smallest shipped folder in tmp_path."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import ndeconv.zoo._pretrained as pretrained_mod
from ndeconv.cli import main
from ndeconv.errors import NdeconvError

ARCH = "efficientnet_b0_deconv"  # the smallest shipped folder (6 MB)
SHIPPED = pretrained_mod.WEIGHTS_DIR / f"{ARCH}.fashion_mnist"


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_shipped(root: Path) -> Path:
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} is not shipped")
    folder = root / SHIPPED.name
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "SHA256SUMS"):
        shutil.copyfile(SHIPPED / name, folder / name)
    return folder


def _tamper(path: Path) -> None:
    """Change one byte of the tensor data (the last one): the file still loads, with one weight changed."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def tampered(tmp_path: Path) -> tuple[Path, str, str]:
    """A copy of a shipped folder whose model.safetensors no longer matches its SHA256SUMS."""
    folder = _copy_shipped(tmp_path / "copy")
    expected = _sha256(folder / "model.safetensors")
    _tamper(folder / "model.safetensors")
    return folder, expected, _sha256(folder / "model.safetensors")


# -- 1: the sha256 check on every load path --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["local-dir", "checkpoint", "folder", "fold"])
def test_tampered_shipped_copy_is_refused_on_every_path(tampered, capsys, tmp_path, how):
    folder, expected, actual = tampered
    weights = folder / "model.safetensors"
    argv = {
        "local-dir": ["eval", f"local-dir:{folder}", "--dataset", "fashion_mnist", "--test-subset", "8"],
        "checkpoint": ["eval", "--checkpoint", str(weights), "--dataset", "fashion_mnist", "--test-subset", "8"],
        "folder": ["eval", str(folder), "--dataset", "fashion_mnist", "--test-subset", "8"],
        "fold": ["fold", "--checkpoint", str(weights), "-o", str(tmp_path / "folded.safetensors")],
    }[how]
    code, err = run(capsys, *argv)
    assert code == 1, err
    assert len(err.splitlines()) == 1, err
    assert str(weights) in err and "does not match" in err and expected in err and actual in err, err
    assert not (tmp_path / "folded.safetensors").exists()


def test_tampered_copy_is_refused_through_timm(tampered, tmp_path):
    folder, expected, actual = tampered
    with pytest.raises(NdeconvError, match=f"sha256 {actual} does not match {expected}"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    # A link to it, named as a user's file: the SHA256SUMS beside the file it points to is checked.
    link = tmp_path / "elsewhere" / "weights.safetensors"
    link.parent.mkdir()
    link.symlink_to(folder / "model.safetensors")
    with pytest.raises(NdeconvError, match="does not match"):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(link)))


def test_symlink_to_an_intact_shipped_file_loads(tmp_path):
    """A symlink to a shipped file used to be refused: "no SHA256SUMS beside it" (looked beside the link)."""
    if not (SHIPPED / "model.safetensors").is_file():
        pytest.skip(f"{SHIPPED} is not shipped")
    link = tmp_path / "model.safetensors"
    link.symlink_to(SHIPPED / "model.safetensors")
    model = timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(link)))
    direct = timm.create_model(f"{ARCH}.fashion_mnist", pretrained=True)
    for (name, a), b in zip(model.state_dict().items(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_a_file_changed_after_it_was_verified_is_checked_again(tmp_path, capsys):
    """Verification is cached per file within a process, and a rewrite (same size) invalidates the cache."""
    folder = _copy_shipped(tmp_path)
    out = tmp_path / "folded.safetensors"
    assert run(capsys, "fold", "--checkpoint", str(folder / "model.safetensors"), "-o", str(out), "--no-check")[0] == 0
    _tamper(folder / "model.safetensors")
    code, err = run(capsys, "fold", "--checkpoint", str(folder / "model.safetensors"), "-o", str(out), "--force")
    assert code == 1 and "does not match" in err, err


# -- 5: weights that load but cannot be right ------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(ARCH, in_chans=1).state_dict()


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    (path.parent / "config.json").write_text(json.dumps({"architecture": ARCH}))
    return path


def test_integer_weights_are_refused_on_every_path(small_state, tmp_path, capsys):
    ints = {k: (v * 1000).to(torch.int32) if v.is_floating_point() else v for k, v in small_state.items()}
    path = _write(ints, tmp_path / "ints" / "model.safetensors")
    code, err = run(capsys, "eval", "--checkpoint", str(path), "--dataset", "fashion_mnist", "--test-subset", "8")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert re.search(r"weights \S+: int32 values where the model holds float32", err), err
    with pytest.raises(NdeconvError, match="int32 values where the model holds float32"):
        timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # convert-reference wrote an all-zero model from such a checkpoint.
    ckpt = tmp_path / "ints.pth"
    torch.save({"state_dict": ints, "arch": "efficient"}, ckpt)
    out = tmp_path / "converted.safetensors"
    code, err = run(capsys, "convert-reference", str(ckpt), "-o", str(out))
    assert code == 1 and "int32 values where the model holds float32" in err and not out.exists(), err


def test_non_finite_weights_are_refused(small_state, tmp_path, capsys):
    key = next(k for k, v in small_state.items() if v.is_floating_point() and v.dim() == 4)
    for bad in (float("nan"), float("inf")):
        state = {k: v.clone() for k, v in small_state.items()}
        state[key].view(-1)[3] = bad
        path = _write(state, tmp_path / str(bad) / "model.safetensors")
        code, err = run(capsys, "eval", "--checkpoint", str(path), "--dataset", "fashion_mnist", "--test-subset", "8")
        assert code == 1 and len(err.splitlines()) == 1, err
        assert f"weights {key}: 1 of its" in err and "NaN or Inf" in err, err


def test_integer_buffers_of_the_model_stay_legitimate(tmp_path):
    """BatchNorm's num_batches_tracked is an integer in the model: only floating counterparts must be floating."""
    model = timm.create_model(ARCH, in_chans=1, deconv=False)
    state = model.state_dict()
    assert any(not v.is_floating_point() for v in state.values())
    fresh = timm.create_model(ARCH, in_chans=1, deconv=False)
    fresh.load_state_dict(state)
    with pytest.raises(NdeconvError, match="float16 values|int64 values"):
        fresh.load_state_dict({k: v.long() if v.is_floating_point() else v for k, v in state.items()})


# -- 6: every bad name is one line, exit status 2 --------------------------------------------------------------

BAD_NAMES = [
    f"{ARCH}.../../etc",
    "hf-hub:../../etc",
    "local-dir:{tmp}",  # a folder with no config.json
    "local-dir:{tmp}/missing",
    "hf-hub:ORG/NAME",  # offline (conftest sets HF_HUB_OFFLINE=1) and not cached
    "../../x",
]


@pytest.mark.parametrize("command", ["eval", "fold", "export", "viz"])
@pytest.mark.parametrize("name", BAD_NAMES)
def test_every_bad_name_is_one_line_and_status_2(tmp_path, capsys, command, name):
    name = name.format(tmp=tmp_path)
    out = {"eval": [], "fold": ["-o", str(tmp_path / "o.safetensors")], "export": ["-o", str(tmp_path / "o.onnx")],
           "viz": ["-o", str(tmp_path / "o.png")]}[command]
    code, err = run(capsys, command, name, *out)
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith(f"ndeconv {command}: error: "), err
    assert "unknown model ''" not in err


def test_convert_reference_bad_names_are_one_line(tmp_path, capsys):
    ckpt = tmp_path / "c.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}}, ckpt)
    for argv, words in (([str(ckpt), "--arch", "../../etc"], "unknown architecture '../../etc'"),
                        ([str(tmp_path)], "is a folder"), ([str(tmp_path / "missing.pth")], "no such file")):
        code, err = run(capsys, "convert-reference", *argv, "-o", str(tmp_path / "o.safetensors"))
        assert code == 2 and len(err.splitlines()) == 1 and words in err, err


# -- 9: a malicious pickle is refused, and the advice to unpickle it is not passed on -------------------------


class _RunsCode:
    """Unpickling this creates a marker file: it must never run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["eval", "fold", "export", "local-dir"])
def test_malicious_pickle_is_refused_without_unsafe_advice(tmp_path, capsys, how):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": _RunsCode(marker)}, evil)
    if how == "local-dir":
        hub = tmp_path / "hub"
        hub.mkdir()
        (hub / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": 10}))
        shutil.copyfile(evil, hub / "pytorch_model.bin")
        argv = ["eval", f"local-dir:{hub}", "--dataset", "fashion_mnist", "--test-subset", "8"]
    else:
        argv = [how, "--checkpoint", str(evil), "--arch", ARCH]
        argv += {"eval": ["--dataset", "fashion_mnist", "--test-subset", "8"],
                 "fold": ["-o", str(tmp_path / "o.safetensors")], "export": ["-o", str(tmp_path / "o.onnx")]}[how]
    code, err = run(capsys, *argv)
    assert code != 0 and len(err.splitlines()) == 1, err
    assert not marker.exists()
    assert "refusing to unpickle" in err and "open" in err, err
    assert not re.search(r"weights_only\W{0,3}(=|set to)\W{0,3}False", err), err


# -- 10: a folder as a checkpoint, a path as a name, an opset out of range ------------------------------------


def test_folder_given_as_checkpoint_is_named_as_a_folder(tmp_path, capsys, small_state):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run(capsys, "eval", "--checkpoint", str(empty), "--arch", ARCH, "--dataset", "fashion_mnist",
                    "--test-subset", "8")
    assert code == 2 and "is a folder" in err and "no such file" not in err, err
    holding = _write(small_state, tmp_path / "run" / "model.safetensors").parent
    code, err = run(capsys, "fold", "--checkpoint", str(holding), "-o", str(tmp_path / "o.safetensors"))
    assert code == 2 and f"name the file in it, e.g. {holding / 'model.safetensors'}" in err, err


def test_a_path_is_not_called_an_unknown_model(capsys):
    code, err = run(capsys, "eval", "../../x")
    assert code == 2 and "../../x" in err and "no such run directory" in err, err


def test_opset_out_of_range_names_both_bounds(tmp_path, capsys):
    from ndeconv.convert.export import MAX_OPSET, MIN_OPSET, export_onnx

    assert MIN_OPSET < MAX_OPSET < 99
    code, err = run(capsys, "export", ARCH, "--random-init", "-o", str(tmp_path / "m.onnx"), "--opset", "99")
    assert code == 2 and f"from {MIN_OPSET} to {MAX_OPSET}" in err, err
    # The library too: 99 used to pass its check (and the exporter silently wrote opset 18).
    with pytest.raises(NdeconvError, match=f"opset 99: .*{MIN_OPSET} to {MAX_OPSET}"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "l.onnx", opset=99)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "l.onnx").exists()
