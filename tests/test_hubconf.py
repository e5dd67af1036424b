"""torch.hub: the root hubconf.py, loaded from the local checkout."""

from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT

ALL_TEN = (
    "vgg16_deconv", "resnet18_deconv", "preact_resnet18_deconv", "densenet121_deconv", "resnext29_32x4d_deconv",
    "mobilenetv2_deconv", "dpn92_deconv", "pnasnet_a_deconv", "senet18_deconv", "efficientnet_b0_deconv",
)
# The authors' other main.py CIFAR models (tests/test_zoo_layout_extra.py loads them).
MAIN_PY_EXTRA = ("vgg11_deconv", "vgg13_deconv", "vgg19_deconv", "resnet34_deconv", "resnet50_deconv",
                 "pnasnet_b_deconv", "mlp_deconv", "simple_v1_deconv", "simple_v2_deconv")
# The authors' ImageNet and segmentation models (tests/test_zoo_imagenet.py, tests/test_segmentation.py load them).
IMAGENET_AND_SEGMENTATION = (
    "resnet18_imagenet_deconv", "resnet34_imagenet_deconv", "resnet50_imagenet_deconv", "resnet101_imagenet_deconv",
    "vgg11_imagenet_deconv", "vgg16_imagenet_deconv", "densenet121_imagenet_deconv",
    "fcn_resnet50_deconv", "fcn_resnet101_deconv", "deeplabv3_resnet50_deconv", "deeplabv3_resnet101_deconv",
)


@pytest.fixture(scope="module")
def hubconf():
    spec = importlib.util.spec_from_file_location("ndeconv_hubconf", PROJECT_ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entrypoints(hubconf):
    assert {"torch", "timm"} <= set(hubconf.dependencies)
    for dep in hubconf.dependencies:
        assert importlib.util.find_spec(dep) is not None, dep
    public = {n for n, f in vars(hubconf).items() if inspect.isfunction(f) and not n.startswith("_")}
    assert public == {*ALL_TEN, *MAIN_PY_EXTRA, *IMAGENET_AND_SEGMENTATION}  # one per zoo model, nothing else exported
    # torch.hub.list()'s own filter (it has no local source to call it on): every public callable, so an
    # imported name (typing.Any) would show up as an entrypoint
    listed = {f for f in dir(hubconf) if callable(getattr(hubconf, f)) and not f.startswith("_")}
    assert listed == {*ALL_TEN, *MAIN_PY_EXTRA, *IMAGENET_AND_SEGMENTATION}
    for name in (*ALL_TEN, *MAIN_PY_EXTRA, *IMAGENET_AND_SEGMENTATION):
        fn = getattr(hubconf, name)
        assert fn.__doc__ and list(inspect.signature(fn).parameters) == ["pretrained", "kwargs"]


def test_torch_hub_load_local():
    model = torch.hub.load(str(PROJECT_ROOT), "resnet18_deconv", source="local", pretrained=False)
    assert model.pretrained_cfg["architecture"] == "resnet18_deconv"
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    bn = torch.hub.load(str(PROJECT_ROOT), "resnet18_deconv", source="local", deconv=False, num_classes=4)
    assert type(bn.bn1).__name__ == "BatchNorm2d" and bn.num_classes == 4


def test_torch_hub_load_pretrained_without_weights_is_clear(empty_weights_dir: Path) -> None:
    from conftest import zoo_model_without_weights

    from ndeconv.errors import NdeconvError

    name = zoo_model_without_weights()
    # The same one line as timm.create_model gives (tests/test_pretrained_loading.py): which weights, and where.
    looked_at = empty_weights_dir / f"{name}.fashion_mnist"
    with pytest.raises(NdeconvError, match=re.escape(f"{name}.fashion_mnist: no weights in this install ({looked_at} "
                                                     "does not exist;")):
        torch.hub.load(str(PROJECT_ROOT), name, source="local", pretrained=True)


def test_imagenet_vgg_takes_batch_norm(hubconf):
    """deconv=False is torchvision's vgg11 (no BatchNorm); batch_norm=True passes through to give vgg11_bn."""
    with torch.device("meta"):
        plain = hubconf.vgg11_imagenet_deconv(deconv=False)
        bn = hubconf.vgg11_imagenet_deconv(deconv=False, batch_norm=True)
    assert [type(m).__name__ for m in plain.features[:2]] == ["Conv2d", "ReLU"]
    assert [type(m).__name__ for m in bn.features[:2]] == ["Conv2d", "BatchNorm2d"]


@pytest.mark.parametrize("name", ALL_TEN)
def test_every_entrypoint_builds(hubconf, name):
    with torch.device("meta"):
        model = getattr(hubconf, name)(pretrained=False)
    assert model.pretrained_cfg["architecture"] == name
