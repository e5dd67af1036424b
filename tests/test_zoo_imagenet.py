"""The authors' ImageNet models (main_imagenet.py, the paper's Table 2) in the zoo: layouts against theirs, the
``deconv=False`` forms (and VGG's ``batch_norm=True``) against torchvision's, the timm interface, torch.hub and
the names users type.

``tests/fixtures/reference_extra/reference_imagenet_models.json`` was written from the authors' own code by
``scripts/reference_layouts.py`` (its README says how): for each of ours, the same parameter count, state_dict keys
and shapes, layer types under the same names, and every FastDeconv's settings. Big models are built on the meta
device (nothing allocated); forward checks use ResNet-18 at 64x64.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision
from conftest import PROJECT_ROOT
from timm.models._registry import _model_to_module
from torch import nn

import ndeconv.zoo
from ndeconv import ChannelDeconv, Delinear, FastDeconv
from ndeconv.errors import UsageError
from ndeconv.layers._conv import Conv2d

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "reference_extra" / "reference_imagenet_models.json"
# The authors' -a name -> (zoo model, zoo file, torchvision's model of the deconv=False form). VGG's has no BatchNorm:
# the authors' vgg11d/vgg16d --deconv False, which is torchvision's vgg11/vgg16.
ZOO = {
    "resnet18d": ("resnet18_imagenet_deconv", "deconv_resnet_imagenet", "resnet18"),
    "resnet34d": ("resnet34_imagenet_deconv", "deconv_resnet_imagenet", "resnet34"),
    "resnet50d": ("resnet50_imagenet_deconv", "deconv_resnet_imagenet", "resnet50"),
    "resnet101d": ("resnet101_imagenet_deconv", "deconv_resnet_imagenet", "resnet101"),
    "vgg11d": ("vgg11_imagenet_deconv", "deconv_vgg_imagenet", "vgg11"),
    "vgg16d": ("vgg16_imagenet_deconv", "deconv_vgg_imagenet", "vgg16"),
    "densenet121d": ("densenet121_imagenet_deconv", "deconv_densenet_imagenet", "densenet121"),
}
CASES = [f"{arch}/{form}" for arch in ZOO for form in ("nd", "bn")]
# main_imagenet.py -a vgg11_bn / vgg16_bn (torchvision's BatchNorm VGG) -> the zoo model with batch_norm=True.
BATCHNORM_VGG = {"vgg11_bn": "vgg11_imagenet_deconv", "vgg16_bn": "vgg16_imagenet_deconv"}
# ndeconv's Conv2d (strided depthwise convs of the BatchNorm form) is an nn.Conv2d by name and layout.
LISTED_TYPES = (FastDeconv, Delinear, ChannelDeconv, nn.Conv2d, Conv2d, nn.Linear, nn.BatchNorm2d)


def deconv_settings(model: nn.Module) -> dict[str, dict]:
    return {
        n: dict(block=m.block, kernel_size=list(m.kernel_size), stride=list(m.stride), groups=m.groups,
                n_iter=m.n_iter, freeze=m.freeze, sampling_stride=m.sampling_stride, dilation=list(m.dilation),
                padding=list(m.padding), bias=m.bias is not None)
        for n, m in model.named_modules() if isinstance(m, FastDeconv)
    }


def assert_layout(model: nn.Module, ref: dict) -> None:
    """The layout checks of tests/test_zoo_layout.py, shared with tests/test_segmentation.py."""
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ref["params"]
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(shapes) - set(ref["state_dict"])) == [], "keys the reference does not have"
    assert sorted(set(ref["state_dict"]) - set(shapes)) == [], "reference keys we lack"
    assert {k: v for k, v in shapes.items() if v != ref["state_dict"][k]} == {}
    assert {n: type(m).__name__ for n, m in model.named_modules() if type(m) in LISTED_TYPES} == ref["modules"]
    assert deconv_settings(model) == ref["deconv_settings"]


@pytest.fixture(scope="module")
def reference_models() -> dict:
    assert FIXTURE.is_file(), f"{FIXTURE} is missing: scripts/reference_layouts.py writes it"
    return json.loads(FIXTURE.read_text())["models"]


def test_the_fixture_records_main_imagenet_defaults() -> None:
    flags = json.loads(FIXTURE.read_text())["flags"]
    assert flags == dict(block=64, block_fc=64, deconv_iter=5, eps=1e-5, bias=True, stride=3, delinear=True)


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_reference(case: str, reference_models: dict) -> None:
    arch, form = case.split("/")
    name, module, _ = ZOO[arch]
    assert _model_to_module[name] == module
    with torch.device("meta"):
        model = timm.create_model(name, deconv=form == "nd")  # the defaults: 1000 classes, --block-fc 64
    assert_layout(model, reference_models[case])
    assert model.deconv_settings.deconv is (form == "nd")
    assert model.deconv_settings.block_fc == (64 if form == "nd" else 0)


@pytest.mark.parametrize("tv_name", list(BATCHNORM_VGG))
def test_batchnorm_vgg_matches_reference(tv_name: str, reference_models: dict) -> None:
    """batch_norm=True: main_imagenet.py -a vgg11_bn, torchvision's BatchNorm VGG, as the script builds it."""
    with torch.device("meta"):
        model = timm.create_model(BATCHNORM_VGG[tv_name], deconv=False, batch_norm=True)
    assert_layout(model, reference_models[f"{tv_name}/bn"])
    assert model.architecture_args == dict(batch_norm=True)


@pytest.mark.parametrize("name,params,bn_params", [
    ("vgg11_imagenet_deconv", 132_863_336, 132_868_840), ("vgg16_imagenet_deconv", 138_357_544, 138_365_992),
])
def test_vgg_deconv_false_has_no_batchnorm(name: str, params: int, bn_params: int) -> None:
    """The authors' vgg11d/vgg16d with --deconv False: [Conv2d, ReLU] per conv (their make_layers' batch_norm=False),
    torchvision's vgg11/vgg16; batch_norm=True is vgg11_bn/vgg16_bn."""
    with torch.device("meta"):
        plain = timm.create_model(name, deconv=False)
        bn = timm.create_model(name, deconv=False, batch_norm=True)
    assert sum(p.numel() for p in plain.parameters()) == params
    assert not any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert [type(m) for m in plain.features[:3]] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d if "11" in name else nn.Conv2d]
    assert sum(p.numel() for p in bn.parameters()) == bn_params
    assert [type(m) for m in bn.features[:3]] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_vgg_batch_norm_in_the_deconvolution_forms() -> None:
    """As the authors' make_layers: a BatchNorm after every FastDeconv; the hybrid's stem keeps none (an Identity
    in its place, so the rest keeps vgg11_bn's keys)."""
    with torch.device("meta"):
        nd = timm.create_model("vgg11_imagenet_deconv", batch_norm=True)
        hybrid = timm.create_model("vgg11_imagenet_deconv", deconv="stem", batch_norm=True)
        bn = timm.create_model("vgg11_imagenet_deconv", deconv=False, batch_norm=True)
    convs = [i for i, m in enumerate(nd.features) if isinstance(m, FastDeconv)]
    assert len(convs) == 8 and all(isinstance(nd.features[i + 1], nn.BatchNorm2d) for i in convs)
    assert [type(m) for m in hybrid.features[:3]] == [FastDeconv, nn.Identity, nn.ReLU]
    stem = {k for k in bn.state_dict() if k.startswith(("features.0.", "features.1."))}
    assert set(hybrid.state_dict()) - {k for k in hybrid.state_dict() if k.startswith("features.0.")} == \
        set(bn.state_dict()) - stem


TORCHVISION_FORMS = [(name, False, baseline) for name, _, baseline in ZOO.values()] + [
    (name, True, tv_name) for tv_name, name in BATCHNORM_VGG.items()]


@pytest.mark.parametrize("name,batch_norm,baseline", TORCHVISION_FORMS)
def test_deconv_false_form_is_torchvisions(name: str, batch_norm: bool, baseline: str) -> None:
    """deconv=False is torchvision's own model, key for key (its weights load strictly): the paper's BatchNorm
    baselines, VGG's without BatchNorm unless batch_norm=True."""
    kwargs = dict(batch_norm=True) if batch_norm else {}
    with torch.device("meta"):
        ours = timm.create_model(name, deconv=False, num_classes=10, **kwargs)
        theirs = torchvision.models.get_model(baseline, weights=None, num_classes=10)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), assign=True)


def test_the_zoo_lists_exactly_these_and_shadows_nothing() -> None:
    assert set(ndeconv.zoo.IMAGENET_MODELS) == {name for name, _, _ in ZOO.values()}
    assert not set(ndeconv.zoo.IMAGENET_MODELS) & set(ndeconv.zoo.ZOO_MODELS)
    # The authors' -a names are timm's ResNet-D (another network) where timm has them: left to timm.
    for arch in ("resnet18d", "resnet34d", "resnet50d", "resnet101d"):
        assert _model_to_module[arch] == "resnet"
    assert not timm.list_pretrained("*_imagenet_deconv*")


@pytest.mark.parametrize("name", [name for name, _, _ in ZOO.values()])
def test_pretrained_cfg_says_imagenet_and_no_weights(name: str) -> None:
    cfg = timm.models.get_pretrained_cfg(name)
    assert cfg.architecture == name and cfg.tag is None
    assert cfg.input_size == (3, 224, 224) and cfg.num_classes == 1000 and cfg.crop_pct == 0.875
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    assert not (cfg.file or cfg.url or cfg.hf_hub_id) and not cfg.has_weights
    with torch.device("meta"):
        model = timm.create_model(name)
    sd = model.state_dict()
    assert sd[f"{cfg.first_conv}.weight"].shape[1] == 3 and sd[f"{cfg.classifier}.weight"].shape[0] == 1000
    assert model.get_classifier() is model.get_submodule(cfg.classifier)
    with pytest.raises(UsageError, match=rf"^{name}: no pretrained weights exist .*pretrained_cfg_overlay"):
        timm.create_model(name, pretrained=True)


def test_timm_interface_on_resnet18() -> None:
    """features_only, reset_classifier, pre_logits and num_classes=0 at a small input (64x64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model("resnet18_imagenet_deconv", num_classes=7).eval()
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 512)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and isinstance(model.fc, Delinear) and model.fc.block == 64
    features = timm.create_model("resnet18_imagenet_deconv", features_only=True).eval()
    assert features.feature_info.reduction() == [4, 8, 16, 32]
    assert features.feature_info.channels() == [64, 128, 256, 512]
    with torch.no_grad():
        maps = features(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    headless = timm.create_model("resnet18_imagenet_deconv", num_classes=0, deconv=False).eval()
    with torch.no_grad():
        assert headless(x).shape == (2, 512)


@pytest.mark.parametrize("name", ["vgg11_imagenet_deconv", "densenet121_imagenet_deconv"])
def test_timm_interface_of_vgg_and_densenet(name: str) -> None:
    """Built on meta (VGG has 133M parameters): the classifier methods and feature_info, by shapes."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=5)
        assert model.get_classifier().out_features == 5
        model.reset_classifier(12)
        assert model.get_classifier().out_features == 12 and model.num_classes == 12
        assert isinstance(model.get_classifier(), Delinear)
        model.reset_classifier(0)
        assert isinstance(model.get_classifier(), nn.Identity)
        bn = timm.create_model(name, deconv=False)
    assert isinstance(bn.get_classifier(), nn.Linear)
    expected = {"vgg11_imagenet_deconv": [64, 128, 256, 512, 512],
                "densenet121_imagenet_deconv": [256, 512, 1024, 1024]}
    assert [info["num_chs"] for info in model.feature_info] == expected[name]


def test_densenet_forward_small() -> None:
    """The DenseNet's forward (the deconvolution form's concatenation of the rectified input) at 32x32."""
    model = timm.create_model("densenet121_imagenet_deconv", num_classes=4)
    model.train()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 4)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 4)


@pytest.mark.parametrize("typed,name", [
    ("resnet18d", "resnet18_imagenet_deconv"), ("resnet101d", "resnet101_imagenet_deconv"),
    ("vgg11d", "vgg11_imagenet_deconv"), ("densenet121d", "densenet121_imagenet_deconv"),
    ("resnet50_imagenet", "resnet50_imagenet_deconv"), ("fcn_resnet50d", "fcn_resnet50_deconv"),
    ("deeplabv3_resnet101d", "deeplabv3_resnet101_deconv"), ("resnet", "resnet18_deconv"),
])
def test_the_authors_names_resolve(typed: str, name: str) -> None:
    assert ndeconv.zoo.resolve_model_name(typed) == name
    assert ndeconv.zoo.REFERENCE_ARCHS.get(typed, name) == name


def test_torch_hub_load_local() -> None:
    model = torch.hub.load(str(PROJECT_ROOT), "resnet18_imagenet_deconv", source="local", num_classes=6)
    assert model.pretrained_cfg["architecture"] == "resnet18_imagenet_deconv" and model.num_classes == 6
    assert isinstance(model.conv1, FastDeconv) and model.conv1.freeze and model.conv1.n_iter == 15
    bn = torch.hub.load(str(PROJECT_ROOT), "resnet18_imagenet_deconv", source="local", num_classes=6, deconv=False)
    assert isinstance(bn.bn1, nn.BatchNorm2d) and isinstance(bn.fc, nn.Linear)

