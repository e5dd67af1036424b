"""The shipped hybrid weights (zoo/weights/<model>.fashion_mnist_stem/: a deconvolution stem, BatchNorm elsewhere):
their tag builds the hybrid, through timm, torch.hub and the folder as ``local-dir:``, and they match their card."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import PROJECT_ROOT, shipped_zoo_models

import ndeconv  # noqa: F401
from ndeconv.cli import main
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.layers import FastDeconv
from ndeconv.zoo._pretrained import WEIGHTS_DIR

TAG = "fashion_mnist_stem"
HYBRIDS = shipped_zoo_models(TAG)
# DenseNet-121's 1,000-image check takes about 23 s on 2 cores: the full suite only.
SLOW_EVAL = {"densenet121_deconv"}


def _folder(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}.{TAG}"


def _is_hybrid(model: torch.nn.Module) -> bool:
    stem = model.get_submodule(model.pretrained_cfg["first_conv"])
    deconvs = [m for m in model.modules() if isinstance(m, FastDeconv)]
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    return model.deconv_settings.deconv == "stem" and deconvs == [stem] and has_bn


@pytest.mark.parametrize("name", HYBRIDS)
def test_the_tag_loads_the_hybrid_through_timm_torch_hub_and_local_dir(name: str) -> None:
    model = timm.create_model(f"{name}.{TAG}", pretrained=True).eval()
    assert _is_hybrid(model) and model.pretrained_cfg["tag"] == TAG
    assert model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == model.pretrained_cfg["input_size"][0]
    hub = torch.hub.load(str(PROJECT_ROOT), name, source="local", pretrained=True, tag=TAG).eval()
    local = timm.create_model(f"local-dir:{_folder(name)}", pretrained=True).eval()
    assert _is_hybrid(hub) and _is_hybrid(local)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(hub(x), expected) and torch.equal(local(x), expected)
    # The weights' own gray stem, and the exact adaptation of the default 3-channel one (eval).
    gray = timm.create_model(f"{name}.{TAG}", pretrained=True, in_chans=1).eval()
    g = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(g.expand(-1, 3, -1, -1)), gray(g), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", HYBRIDS)
def test_folder_is_a_hub_repo_with_a_card(name: str) -> None:
    folder = _folder(name)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_args"]["deconv"] == "stem" and config["model_args"]["block_fc"] == 0
    assert config["pretrained_cfg"]["tag"] == TAG and config["train"]["deconv"] == "stem"
    readme = (folder / "README.md").read_text()
    assert "model-index" in readme and f"{config['weights']['test_top1']:.2f}" in readme
    assert f'timm.create_model("{name}.{TAG}", pretrained=True)' in readme and "--deconv stem" in readme
    assert (folder / "metrics.jsonl").is_file() and (folder / "model.safetensors").stat().st_size < 95e6


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_EVAL else n for n in HYBRIDS])
def test_ndeconv_eval_reproduces_the_cards_quick_check(name: str, capsys: pytest.CaptureFixture) -> None:
    # The card's quick check (its first 1,000 test images) through the command it names: the full 10,000-image
    # number's path is the same, and is run in full for the flagship ND weights (tests/test_shipped_weights.py).
    quick = json.loads((_folder(name) / "config.json").read_text())["weights"]["quick_check"]
    assert quick["command"] == f"ndeconv eval {name}.{TAG} --test-subset {quick['images']}"
    assert main(["eval", f"{name}.{TAG}", "--test-subset", str(quick["images"]), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == quick["images"] and result["top1"] == pytest.approx(quick["test_top1"], abs=1e-6)


def test_every_registered_tag_is_shipped_in_a_clone() -> None:
    # A tag is registered once its weights are final and committed: none is a promise without a file.
    from ndeconv.zoo._pretrained import PACKAGE_WEIGHTS_DIR

    for key in timm.list_pretrained("*_deconv*"):
        name, _, tag = key.partition(".")
        assert (PACKAGE_WEIGHTS_DIR / f"{name}.{tag}" / "model.safetensors").is_file(), key
