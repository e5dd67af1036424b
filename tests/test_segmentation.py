"""The authors' segmentation models (Segmentation/train.py): layouts against theirs, the BatchNorm forms against
torchvision's builders, the output dict and torch.hub.

``tests/fixtures/reference_extra/reference_segmentation_models.json`` was written from the authors' own code by
``scripts/reference_layouts.py``. Layouts are built on the meta device; the forward check is one ResNet-50 FCN at
48x48.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from conftest import PROJECT_ROOT
from test_zoo_imagenet import assert_layout

from ndeconv import FastDeconv
from ndeconv.errors import UsageError
from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "reference_extra" / "reference_segmentation_models.json"
# The authors' --model name -> ours (torchvision's BatchNorm builder is ours without "_deconv").
NAMES = {
    "fcn_resnet50d": "fcn_resnet50_deconv", "fcn_resnet101d": "fcn_resnet101_deconv",
    "deeplabv3_resnet50d": "deeplabv3_resnet50_deconv", "deeplabv3_resnet101d": "deeplabv3_resnet101_deconv",
}
CASES = [f"{arch}/{form}" for arch in NAMES for form in ("nd", "nd_aux", "bn", "bn_aux")]


@pytest.fixture(scope="module")
def reference_models() -> dict:
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: scripts/reference_layouts.py writes it"
    return json.loads(FIXTURE.read_text())["models"]


def test_the_fixture_records_the_scripts_defaults() -> None:
    flags = json.loads(FIXTURE.read_text())["flags"]
    assert flags == dict(block=64, deconv_iter=5, eps=1e-5, bias=True, stride=3, aux_loss=False)


def test_every_segmentation_model_is_covered() -> None:
    assert set(SEGMENTATION_MODELS) == set(NAMES.values())


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_reference(case: str, reference_models: dict) -> None:
    arch, form = case.split("/")
    # The defaults (num_classes=21, aux_loss=None: no auxiliary head) unless the case asks for --aux-loss.
    kwargs = dict(aux_loss=True) if form.endswith("_aux") else {}
    with torch.device("meta"):
        model = SEGMENTATION_MODELS[NAMES[arch]](deconv=form.startswith("nd"), **kwargs)
    assert_layout(model, reference_models[case])
    assert (model.aux_classifier is not None) == form.endswith("_aux")


@pytest.mark.parametrize("name", list(NAMES.values()))
def test_batchnorm_form_is_torchvisions(name: str) -> None:
    builder = getattr(torchvision.models.segmentation, name.removesuffix("_deconv"))
    with torch.device("meta"):
        ours = SEGMENTATION_MODELS[name](deconv=False, aux_loss=True)
        theirs = builder(weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_forward_returns_out_and_aux_at_input_size() -> None:
    torch.manual_seed(0)
    model = SEGMENTATION_MODELS["fcn_resnet50_deconv"](num_classes=5, aux_loss=True)
    # Dilated: layer3 and layer4 keep layer2's resolution (output stride 8), as torchvision's.
    assert [m.dilation for m in (model.backbone.layer4[0].conv2, model.backbone.layer3[1].conv2)] == [(2, 2), (2, 2)]
    x = torch.randn(2, 3, 48, 40)
    out = model.train()(x)
    assert list(out) == ["out", "aux"]
    assert out["out"].shape == out["aux"].shape == (2, 5, 48, 40)
    with torch.no_grad():
        assert model.eval()(x)["out"].shape == (2, 5, 48, 40)
    assert isinstance(model.classifier[0], FastDeconv) and model.classifier[3].block == 512


def test_pretrained_is_refused_in_one_line() -> None:
    with pytest.raises(UsageError, match=r"^deeplabv3_resnet50_deconv: no pretrained weights exist"):
        SEGMENTATION_MODELS["deeplabv3_resnet50_deconv"](pretrained=True)


def test_torch_hub_load_local() -> None:
    with torch.device("meta"):
        model = torch.hub.load(str(PROJECT_ROOT), "deeplabv3_resnet50_deconv", source="local", num_classes=19,
                               aux_loss=True, deconv=False)
    assert model.classifier[-1].out_channels == 19 and model.aux_classifier[-1].out_channels == 19
    assert type(model).__name__ == "DeepLabV3" and not model.deconv_settings.deconv
