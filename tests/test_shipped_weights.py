"""The shipped zoo weights (zoo/weights/<model>.<tag>/): they load offline through timm and torch.hub with no
other argument (the default tag: the 20-epoch weights where shipped, else the one-epoch ones), every tag loads its
own folder's weights, they match their model card, and adapt exactly to RGB input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import PROJECT_ROOT, default_tag, shipped_weight_sets, shipped_zoo_models
from safetensors.torch import load_file

import ndeconv  # noqa: F401
from ndeconv.cli import main
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.zoo._pretrained import WEIGHTS_DIR, WEIGHTS_FILE

SHIPPED = shipped_zoo_models()
WEIGHT_SETS = shipped_weight_sets()  # every <model>.<tag> folder, the hybrids' and the 20-epoch ones included
CONVERGED_TAG = "fashion_mnist_e20"
# One full 10,000-image evaluation keeps the suite short: the README's flagship if shipped, else the first.
EVALUATED = ["resnet18_deconv"] if "resnet18_deconv" in SHIPPED else SHIPPED[:1]
needs_weights = pytest.mark.skipif(not SHIPPED, reason="no zoo weights are shipped yet")
needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                   reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)")


def _card(weight_set: str) -> dict:
    return json.loads((WEIGHTS_DIR / weight_set / "config.json").read_text())


@needs_weights
@pytest.mark.parametrize("name", SHIPPED)
def test_loads_with_no_other_argument(name):
    model = timm.create_model(name, pretrained=True)
    # The default is the 20-epoch tag once its weights ship (registered first), the one-epoch tag until then.
    assert model.pretrained_cfg["tag"] == default_tag(name) in ("fashion_mnist", CONVERGED_TAG)
    assert Path(model.pretrained_cfg["file"]) == WEIGHTS_DIR / f"{name}.{default_tag(name)}" / WEIGHTS_FILE
    # timm's default: 3 channels, the gray stem adapted exactly (the cfg says 3 too: tests/test_ecosystem.py).
    assert model.num_classes == 10 and model.get_submodule(model.pretrained_cfg["first_conv"]).in_channels == 3
    hub = torch.hub.load(str(PROJECT_ROOT), name, source="local", pretrained=True)
    for (key, a), b in zip(model.state_dict().items(), hub.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@needs_weights
@pytest.mark.parametrize("name", SHIPPED)
def test_rgb_copy_of_gray_image_gets_the_gray_prediction(name):
    gray = timm.create_model(name, pretrained=True, in_chans=1).eval()
    rgb = timm.create_model(name, pretrained=True).eval()
    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        expected, got = gray(x), rgb(x.expand(-1, 3, -1, -1))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.argmax(1), expected.argmax(1))


@needs_weights
@pytest.mark.parametrize("weight_set", WEIGHT_SETS)
def test_every_tag_loads_its_own_folder(weight_set):
    # timm never changes what a tag means: code pinned to `resnet18_deconv.fashion_mnist` keeps the one-epoch
    # weights when a 20-epoch tag becomes the default.
    model = timm.create_model(weight_set, pretrained=True, in_chans=1)
    shipped = load_file(str(WEIGHTS_DIR / weight_set / WEIGHTS_FILE))
    state = model.state_dict()
    assert state.keys() == shipped.keys()
    for key, value in shipped.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


@needs_weights
@pytest.mark.parametrize("weight_set", WEIGHT_SETS)
def test_folder_is_a_hub_repo_with_a_card(weight_set):
    folder = WEIGHTS_DIR / weight_set
    card = _card(weight_set)
    assert {"architecture", "num_classes", "label_names", "pretrained_cfg", "model_args"} <= set(card)
    assert len(card["label_names"]) == 10
    readme = (folder / "README.md").read_text()
    assert "model-index" in readme and f"{card['weights']['test_top1']:.2f}" in readme
    assert (folder / "metrics.jsonl").is_file() and (folder / "curves.png").is_file()
    assert (folder / "model.safetensors").stat().st_size < 95e6


def test_all_shipped_weights_fit_the_budget():
    sizes = {p.parent.name: p.stat().st_size for p in WEIGHTS_DIR.glob(f"*/{WEIGHTS_FILE}")}
    converged = sum(size for name, size in sizes.items() if name.endswith(f".{CONVERGED_TAG}"))
    assert sum(sizes.values()) - converged < 400e6  # the one-epoch and hybrid weights
    assert converged <= 250e6  # the 20-epoch weights add at most 250 MB


@pytest.mark.slow  # a full 10,000-image ResNet-18 evaluation: about 70 s on 2 cores
@needs_weights
@needs_fashion
@pytest.mark.parametrize("name", EVALUATED)
def test_ndeconv_eval_reproduces_the_card(name, capsys):
    weight_set = f"{name}.{default_tag(name)}"  # the card a user meets first
    assert main(["eval", weight_set, "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["count"] == 10000
    assert result["top1"] == pytest.approx(_card(weight_set)["weights"]["test_top1"], abs=1e-6)
