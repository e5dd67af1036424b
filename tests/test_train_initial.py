"""``ndeconv train --initial-checkpoint``: a run that starts from given weights (timm's train.py flag), in
particular from a BatchNorm network converted by ``ndeconv convert-bn`` (its FastDeconv layout is rebuilt from
the file's config.json): the fine-tuning half of the transfer-learning measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ndeconv import FastDeconv
from ndeconv.cli import main
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.loading import load_model

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                       reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh installs it)"),
]
TINY = ["--arch", "pnasnet_a", "--train-subset", "16", "--test-subset", "8", "--batch-size", "4", "--epochs", "1",
        "--deconv-iter", "2", "--log-every", "1", "--curve-rows", "1"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch BatchNorm PNASNet-A run, converted into deconvolution by ndeconv convert-bn."""
    root = tmp_path_factory.mktemp("initial")
    assert main(["train", *TINY, "--deconv", "false", "--out", str(root / "bn")]) == 0
    out = root / "converted" / "model.safetensors"
    assert main(["convert-bn", str(root / "bn"), "--calibrate-data", "fashion_mnist", "--calibrate-images", "32",
                 "--batch-size", "16", "--check-images", "8", "--n-iter", "2", "-o", str(out)]) == 0
    return out


def test_a_converted_network_fine_tunes_from_its_weights(converted: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # lr ~0: after a step the weights are the converted ones, so the run did start from them.
    assert main(["train", *TINY, "--deconv", "false", "--initial-checkpoint", str(converted), "--lr", "1e-30",
                 "--wd", "0", "--momentum", "0", "--max-steps", "1", "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    recipe = json.loads((converted.parent / "config.json").read_text())["deconvolve"]
    assert config["train"]["deconvolve"] == recipe and config["train"]["initial_checkpoint"] == str(converted)
    start, trained = load_file(str(converted)), load_file(str(run / "model.safetensors"))
    assert trained.keys() == start.keys()
    weights = [k for k in start if k.endswith(".weight")]
    assert weights and all(torch.equal(trained[k], start[k]) for k in weights)
    # The run directory rebuilds the converted layout (FastDeconv where the BatchNorm network had convs).
    model = load_model(str(run)).model
    assert any(isinstance(m, FastDeconv) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_an_initial_checkpoint_of_another_model_is_refused(converted: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["train", *TINY[2:], "--arch", "resnet18", "--initial-checkpoint", str(converted),
                 "--out", str(tmp_path / "a")]) == 2
    assert "holds a pnasnet_a_deconv but --arch is resnet18_deconv; pass --arch pnasnet_a" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # The right architecture in another form: the one it was built (and converted) from is named.
    assert main(["train", *TINY, "--deconv", "true", "--initial-checkpoint", str(converted),
                 "--out", str(tmp_path / "b")]) == 2
    assert "but this run has --deconv true; pass --deconv false" in capsys.readouterr().err
    # Same form, other settings: the layouts differ, and the error says which flags to match.
    assert main(["train", *TINY, "--deconv", "false", "--block-fc", "16", "--initial-checkpoint", str(converted),
                 "--out", str(tmp_path / "c")]) == 2
    assert "does not fit the model these settings build" in capsys.readouterr().err
