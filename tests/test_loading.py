"""The one model loader (``ndeconv.loading.load_model``): every source a user can name, through one function,
and timm's own training checkpoints (``model_best.pth.tar``, which pickle an argparse Namespace) weights-only."""

from __future__ import annotations

import argparse
import fractions
import json
import pickle
import subprocess
import sys

import pytest
import timm
import torch

import ndeconv  # noqa: F401 - registers the zoo
from ndeconv.errors import NdeconvError, UsageError
from ndeconv.io import load_torch_file
from ndeconv.loading import load_model

ARCH = "resnet18_deconv"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A gray ResNet-18 after one SGD step (so its running statistics are not the initial ones) and the
    checkpoints timm's train.py writes for it (timm's own CheckpointSaver)."""
    from timm.utils import CheckpointSaver

    torch.manual_seed(0)
    model = timm.create_model(ARCH, in_chans=1, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss = model(torch.randn(4, 1, 32, 32)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    folder = tmp_path_factory.mktemp("timm_train")
    args = argparse.Namespace(model=ARCH, num_classes=10, in_chans=1, lr=0.01, epochs=1)
    saver = CheckpointSaver(model, opt, args=args, checkpoint_dir=str(folder), recovery_dir=str(folder))
    saver.save_checkpoint(epoch=0, metric=12.5)
    return model.eval(), folder


def test_timm_train_checkpoint_loads_weights_only(trained):
    model, folder = trained
    best = folder / "model_best.pth.tar"
    assert best.is_file(), "timm's CheckpointSaver did not write model_best.pth.tar"
    # The plain weights-only reader refuses it: the file pickles argparse.Namespace (timm's `args`).
    with pytest.raises(pickle.UnpicklingError):
        torch.load(best, weights_only=True)
    loaded = load_model(best)  # architecture from the checkpoint's own `arch`, shape from its state_dict
    assert loaded.kind == "weights" and loaded.description["architecture"] == ARCH
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_other_pickled_globals_are_still_refused(tmp_path):
    # Allowing argparse.Namespace must not open the reader to anything else.
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": fractions.Fraction(1, 3)}, path)
    with pytest.raises(NdeconvError, match="refusing to unpickle it.*fractions.Fraction"):
        load_torch_file(path)


@pytest.mark.slow  # an ndeconv eval subprocess: about 8 s
def test_cli_evaluates_a_timm_checkpoint(trained, tmp_path):
    _, folder = trained
    out = tmp_path / "onnx"
    run = subprocess.run(
        [sys.executable, "-m", "ndeconv.cli", "fold", "--checkpoint", str(folder / "model_best.pth.tar"),
         "-o", str(out / "folded.safetensors")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert (out / "folded.safetensors").is_file()


@pytest.mark.parametrize("source", ["run", "weights", "folded", "name"])
def test_every_source_goes_through_load_model(source, trained, tmp_path):
    from safetensors.torch import save_file

    from ndeconv.convert import fold, save_folded

    model, _ = trained
    x = torch.randn(2, 1, 32, 32)
    if source == "name":
        loaded = load_model("resnet18_deconv.fashion_mnist")
        assert loaded.kind == "pretrained" and loaded.dataset == "fashion_mnist"
        assert loaded.label_names and loaded.label_names[0] == "t-shirt/top"
        return
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    config = {"architecture": ARCH, "num_classes": 10, "model_args": {"in_chans": 1},
              "train": {"dataset": "fashion_mnist"}, "label_names": list("abcdefghij")}
    (tmp_path / "config.json").write_text(json.dumps(config))
    if source == "run":
        loaded = load_model(tmp_path)
        assert loaded.kind == "run" and loaded.dataset == "fashion_mnist" and loaded.label_names == list("abcdefghij")
    elif source == "weights":
        loaded = load_model(weights)
        assert loaded.kind == "weights" and loaded.dataset == "fashion_mnist"
    else:
        path = tmp_path / "folded" / "folded.safetensors"
        save_folded(fold(model), path)
        loaded = load_model(path)
        assert loaded.folded
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_loader_errors_name_the_fix(tmp_path):
    with pytest.raises(UsageError, match="no such run directory"):
        load_model(tmp_path / "missing" / "run")
    (tmp_path / "w.safetensors").write_bytes(b"not safetensors")
    with pytest.raises((UsageError, NdeconvError)):
        load_model(tmp_path / "w.safetensors")
    with pytest.raises(UsageError, match="drop it"):
        load_model("resnet18_deconv", arch="vgg16_deconv")


def test_eval_of_a_timm_checkpoint_says_which_flags_give_its_data(trained, capsys):
    """A timm train.py checkpoint records no dataset: the one line says what to pass for it (an image folder)."""
    from ndeconv.cli import main

    _, folder = trained
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(folder / "model_best.pth.tar")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "for a timm train.py checkpoint --dataset imagefolder --data-dir DIR" in err
