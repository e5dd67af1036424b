"""The twenty zoo layouts (ten architectures x deconvolution/BatchNorm form) against the authors' models.

``reference_cifar_models.json`` was written from the authors' own model files; each of ours must have the same
parameter count, the same state_dict keys and shapes, the same layer types under the same names, and every
FastDeconv the same block, kernel, stride, groups, n_iter, freeze and sampling_stride.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models._registry import _model_to_module
from torch import nn

import ndeconv.zoo
from ndeconv import ChannelDeconv, Delinear, FastDeconv
from ndeconv.layers._conv import Conv2d

# Reference arch name -> (zoo model name, zoo file that defines it: one file per family, as timm's).
ZOO = {
    "vgg16": ("vgg16_deconv", "deconv_vgg"),
    "resnet18": ("resnet18_deconv", "deconv_resnet"),
    "preact_resnet18": ("preact_resnet18_deconv", "deconv_resnet"),
    "densenet121": ("densenet121_deconv", "deconv_densenet"),
    "resnext29_32x4d": ("resnext29_32x4d_deconv", "deconv_resnet"),
    "mobilenetv2": ("mobilenetv2_deconv", "deconv_mobilenetv2"),
    "dpn92": ("dpn92_deconv", "deconv_dpn"),
    "pnasnet_a": ("pnasnet_a_deconv", "deconv_pnasnet"),
    "senet18": ("senet18_deconv", "deconv_resnet"),
    "efficientnet_b0": ("efficientnet_b0_deconv", "deconv_efficientnet"),
}
CASES = [f"{arch}/{form}" for arch in ZOO for form in ("nd", "bn")]
# ndeconv's Conv2d (strided depthwise convs of the BatchNorm form) is an nn.Conv2d by name and layout.
LISTED_TYPES = (FastDeconv, Delinear, ChannelDeconv, nn.Conv2d, Conv2d, nn.Linear, nn.BatchNorm2d)


@pytest.fixture(scope="module")
def reference_models(reference_dir):
    return json.loads((reference_dir / "reference_cifar_models.json").read_text())["models"]


def _build(case: str) -> nn.Module:
    arch, form = case.split("/")
    name, module = ZOO[arch]
    # A missing zoo file or model fails here (it is never skipped): all ten models are part of the zoo.
    assert name in timm.list_models("*_deconv"), f"{name} is not registered (zoo/{module}.py should register it)"
    assert _model_to_module[name] == module, f"{name} is registered by {_model_to_module[name]}, not {module}"
    # The meta device builds even DPN-92 (34M parameters) without allocating or initialising anything.
    with torch.device("meta"):
        return timm.create_model(name, deconv=form == "nd", num_classes=10, in_chans=3)


def _settings(layer: FastDeconv) -> dict:
    return dict(
        block=layer.block, kernel_size=list(layer.kernel_size), stride=list(layer.stride), groups=layer.groups,
        n_iter=layer.n_iter, freeze=layer.freeze, sampling_stride=layer.sampling_stride,
    )


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_reference(case, reference_models):
    ref = reference_models[case]
    model = _build(case)

    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert params == ref["params"]

    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(shapes) - set(ref["state_dict"])) == [], "keys the reference does not have"
    assert sorted(set(ref["state_dict"]) - set(shapes)) == [], "reference keys we lack"
    assert {k: v for k, v in shapes.items() if v != ref["state_dict"][k]} == {}

    types = {n: type(m).__name__ for n, m in model.named_modules() if type(m) in LISTED_TYPES}
    assert types == ref["modules"]

    settings = {n: _settings(m) for n, m in model.named_modules() if isinstance(m, FastDeconv)}
    assert settings == ref["deconv_settings"]
    assert model.deconv_settings.deconv is (case.endswith("/nd"))


def test_every_zoo_name_is_covered():
    """The CIFAR zoo is exactly the ten: a missing one fails (as in _build), and a model of a new family file this
    test does not know about, which would escape the layout check, fails until it is added to ZOO."""
    known = {name for name, _ in ZOO.values()}
    assert set(ndeconv.zoo.ZOO_MODELS) == known
    assert known <= set(timm.list_models("*_deconv"))
