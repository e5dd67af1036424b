"""The authors' other main.py CIFAR models (``--arch vgg11 vgg13 vgg19 resnet34 resnet50 pnasnetB``): layouts in
both forms against the authors' own models, their names, their timm interface and torch.hub.

``tests/fixtures/reference_extra/reference_cifar_extra_models.json`` was written from the authors' code by
``scripts/reference_layouts_cifar_extra.py`` (see the fixture folder's README): each of ours must have the same
parameter count, state_dict keys and shapes, layer types under the same names, and every FastDeconv the same
settings. Layouts are built on the meta device; only the small forwards run.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from conftest import PROJECT_ROOT
from timm.models._registry import _model_to_module
from torch import nn

import ndeconv.zoo
from ndeconv import ChannelDeconv, Delinear, FastDeconv
from ndeconv.errors import NdeconvError
from ndeconv.layers._conv import Conv2d

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "reference_extra" / "reference_cifar_extra_models.json"
# main.py --arch -> (zoo model name, the family file that registers it).
ZOO = {
    "vgg11": ("vgg11_deconv", "deconv_vgg"),
    "vgg13": ("vgg13_deconv", "deconv_vgg"),
    "vgg19": ("vgg19_deconv", "deconv_vgg"),
    "resnet34": ("resnet34_deconv", "deconv_resnet"),
    "resnet50": ("resnet50_deconv", "deconv_resnet"),
    "pnasnetB": ("pnasnet_b_deconv", "deconv_pnasnet"),
}
CASES = [f"{arch}/{form}" for arch in ZOO for form in ("nd", "bn")]
# ndeconv's Conv2d (strided depthwise convs of the BatchNorm form) is an nn.Conv2d by name and layout.
LISTED_TYPES = (FastDeconv, Delinear, ChannelDeconv, nn.Conv2d, Conv2d, nn.Linear, nn.BatchNorm2d)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


def _settings(layer: FastDeconv) -> dict:
    return dict(
        block=layer.block, kernel_size=list(layer.kernel_size), stride=list(layer.stride), groups=layer.groups,
        n_iter=layer.n_iter, freeze=layer.freeze, sampling_stride=layer.sampling_stride,
    )


def test_the_fixture_records_main_py_flags(reference: dict) -> None:
    """The cases are main.py's own flags: the paper's deconvolution setting and the --deconv False baseline."""
    nd, bn = reference["flags"]["nd"], reference["flags"]["bn"]
    assert nd["deconv"] and nd["block"] == 64 and nd["block_fc"] == 512 and nd["delinear"]
    assert not bn["deconv"] and bn["block_fc"] == 0
    assert set(reference["models"]) == set(CASES)


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_reference(case: str, reference: dict) -> None:
    ref = reference["models"][case]
    arch, form = case.split("/")
    name, module = ZOO[arch]
    assert _model_to_module[name] == module
    with torch.device("meta"):
        # The command-line spelling (resolved as ``ndeconv train --arch`` resolves it) builds the same model.
        model = timm.create_model(ndeconv.zoo.resolve_model_name(arch), deconv=form == "nd", num_classes=10)

    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["params"]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(shapes) - set(ref["state_dict"])) == [], "keys the reference does not have"
    assert sorted(set(ref["state_dict"]) - set(shapes)) == [], "reference keys we lack"
    assert {k: v for k, v in shapes.items() if v != ref["state_dict"][k]} == {}
    assert {n: type(m).__name__ for n, m in model.named_modules() if type(m) in LISTED_TYPES} == ref["modules"]
    settings = {n: _settings(m) for n, m in model.named_modules() if isinstance(m, FastDeconv)}
    assert settings == ref["deconv_settings"]
    assert model.deconv_settings.deconv is (form == "nd")


def test_listed_apart_from_the_ten_and_shadowing_nothing() -> None:
    extra = {name for name, _ in ZOO.values()}
    # ... and main.py's MNIST models (tests/test_zoo_mnist.py)
    assert set(ndeconv.zoo.EXTRA_MODELS) == extra | {"mlp_deconv", "simple_v1_deconv", "simple_v2_deconv"}
    # The ten stay what ``ndeconv train`` defaults and weights shipping rely on.
    assert not extra & set(ndeconv.zoo.ZOO_MODELS) and not extra & set(ndeconv.zoo.IMAGENET_MODELS)
    # timm's own vgg11, resnet50, ... stay timm's.
    for arch in ("vgg11", "vgg13", "vgg19", "resnet34", "resnet50"):
        assert _model_to_module[arch] in ("vgg", "resnet")
    assert not set(timm.list_pretrained()) & {n for name in extra for n in timm.list_pretrained(f"{name}*")}


@pytest.mark.parametrize("arch", list(ZOO))
def test_the_authors_names_resolve(arch: str) -> None:
    name = ZOO[arch][0]
    assert ndeconv.zoo.REFERENCE_ARCHS[arch] == name
    assert ndeconv.zoo.resolve_model_name(arch, "--arch") == name
    assert ndeconv.zoo.resolve_model_name(name.removesuffix("_deconv")) == name
    assert ndeconv.zoo.resolve_model_name(name) == name


@pytest.mark.parametrize("name", [name for name, _ in ZOO.values()])
def test_pretrained_cfg_claims_no_weights(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.architecture == name and cfg.tag is None and not cfg.has_weights
    assert not (cfg.file or cfg.url or cfg.hf_hub_id)
    assert cfg.input_size == (3, 32, 32) and cfg.num_classes == 10
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.get_classifier() is model.get_submodule(cfg.classifier)
    assert model.state_dict()[f"{cfg.first_conv}.weight"].shape[1] == 3
    # Asked for weights it has none of, one error names the model (timm alone would warn and return random ones).
    with pytest.raises(NdeconvError, match=rf"^{name}: .*No pretrained weights exist for {name}"):
        timm.create_model(name, pretrained=True)


# name -> (feature channels, reductions) of features_only (every stage of the ResNets; every pool of VGG;
# each resolution of PNASNet).
FEATURES = {
    "vgg11_deconv": ([64, 128, 256, 512, 512], [2, 4, 8, 16, 32]),
    "resnet50_deconv": ([256, 512, 1024, 2048], [1, 2, 4, 8]),
    "pnasnet_b_deconv": ([32, 64, 128], [1, 2, 4]),
}


@pytest.mark.parametrize("deconv", [True, False], ids=["nd", "bn"])
@pytest.mark.parametrize("name", list(FEATURES))
def test_timm_interface(name: str, deconv: bool) -> None:
    """forward, reset_classifier, features_only and forward_intermediates of each new family member (ResNet-50
    with one block per stage: the same Bottleneck code paths, a fraction of the time)."""
    torch.manual_seed(0)
    small = dict(layers=(1, 1, 1, 1)) if name == "resnet50_deconv" else {}
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model(name, deconv=deconv, num_classes=7, **small)
    out = model.train()(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    model.eval()
    chs, reductions = FEATURES[name]
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3)
        assert isinstance(model.get_classifier(), Delinear if deconv else nn.Linear)
        final, intermediates = model.forward_intermediates(x)
    assert [t.shape[1] for t in intermediates] == chs
    assert [32 // t.shape[-1] for t in intermediates] == reductions
    features = timm.create_model(name, deconv=deconv, features_only=True, **small).eval()
    assert features.feature_info.channels() == chs and features.feature_info.reduction() == reductions
    with torch.no_grad():
        maps = features(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(c, 32 // r, 32 // r) for c, r in zip(chs, reductions, strict=True)]


def test_torch_hub_load_local() -> None:
    model = torch.hub.load(str(PROJECT_ROOT), "pnasnet_b_deconv", source="local", num_classes=6)
    assert model.pretrained_cfg["architecture"] == "pnasnet_b_deconv" and model.num_classes == 6
    assert isinstance(model.conv1, FastDeconv) and model.conv1.freeze and model.conv1.n_iter == 10
    bn = torch.hub.load(str(PROJECT_ROOT), "vgg11_deconv", source="local", num_classes=4, deconv=False)
    assert isinstance(bn.features[1], nn.BatchNorm2d) and isinstance(bn.classifier, nn.Linear)
    assert bn.num_classes == 4
