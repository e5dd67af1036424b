"""DenseNet-121, ResNeXt-29, MobileNetV2, DPN-92 and PNASNet-A: forward/backward in both forms, the timm API.

Their layouts (parameters, keys, shapes, FastDeconv settings) are checked against the authors' models in
test_zoo_layout.py, and their outputs against the authors' logits in test_convert_reference.py; here each one
runs forward and backward in both forms and answers timm's model interface. DPN-92 and DenseNet-121 run with
one block per stage (same code paths, a fraction of the time); the other three run at full depth.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import ndeconv  # noqa: F401  (registers the zoo)
from ndeconv import ChannelDeconv, Delinear, FastDeconv

# name -> kwargs that keep the CPU smoke test small (fewer blocks per stage, never other layer kinds).
MODELS = {
    "densenet121_deconv": dict(layers=(1, 1, 1, 1)),
    "resnext29_32x4d_deconv": {},
    "mobilenetv2_deconv": {},
    "dpn92_deconv": dict(layers=(1, 1, 1, 1)),
    "pnasnet_a_deconv": {},
}
NUM_FEATURES = {
    "densenet121_deconv": 1024, "resnext29_32x4d_deconv": 1024, "mobilenetv2_deconv": 1280,
    "dpn92_deconv": 2560, "pnasnet_a_deconv": 176,
}


# Two cores shared by several jobs: torch on one thread is the fast setting (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("deconv", [True, False], ids=["nd", "bn"])
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_backward(name, deconv):
    torch.manual_seed(0)
    model = timm.create_model(name, deconv=deconv, num_classes=7, in_chans=1, **MODELS[name])
    kinds = {type(m) for m in model.modules()}
    if deconv:
        assert FastDeconv in kinds and Delinear in kinds and nn.BatchNorm2d not in kinds
    else:
        assert FastDeconv not in kinds and Delinear not in kinds and nn.BatchNorm2d in kinds
    assert model.conv1.in_channels == 1

    model.train()
    x = torch.randn(2, 1, 32, 32)
    y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []

    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[:2] == (2, model.num_features)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.num_features)
        assert torch.allclose(model.forward_head(features), model(x), rtol=1e-5, atol=1e-6)
        # The authors pool with avg_pool2d on the last map of a 32x32 input: a plain mean over it.
        assert torch.allclose(pooled, features.mean((2, 3)), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_interface(name):
    assert name in timm.list_models("*_deconv")
    with torch.device("meta"):
        assert timm.create_model(name).num_features == NUM_FEATURES[name]
    model = timm.create_model(name, drop_rate=0.25, **MODELS[name])
    features = torch.rand(4, model.num_features, 2, 2) + 1
    dropped = model.train().forward_head(features, pre_logits=True)
    assert (dropped == 0).any() and torch.equal(model.eval().forward_head(features, pre_logits=True),
                                                 features.mean((2, 3)))
    keys = model.state_dict().keys()
    cfg = model.pretrained_cfg
    assert f"{cfg['first_conv']}.weight" in keys and f"{cfg['classifier']}.weight" in keys
    assert cfg["paper_ids"] == "arXiv:1905.11926" and cfg["input_size"] == (3, 32, 32)
    assert model.get_classifier() is model.linear and isinstance(model.linear, Delinear)

    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5
    model.reset_classifier(0)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)

    bn = timm.create_model(name, deconv=False, **MODELS[name])
    assert type(bn.get_classifier()) is nn.Linear and bn.deconv_settings.block_fc == 0


@pytest.mark.parametrize("name", ["pnasnet_a_deconv", "mobilenetv2_deconv"])
def test_channel_deconv_head(name):
    # The reference's --delinear False --block-fc N: a ChannelDeconv on the last map and a Linear head.
    model = timm.create_model(name, delinear=False, block_fc=16)
    assert isinstance(model.deconv1, ChannelDeconv) and type(model.linear) is nn.Linear
    assert any(k.startswith("deconv1.") for k in model.state_dict())
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_features_only():
    model = timm.create_model("pnasnet_a_deconv", features_only=True)
    with torch.no_grad():
        features = model.eval()(torch.randn(2, 3, 32, 32))
    assert [f.shape[1:] for f in features] == [(44, 32, 32), (88, 16, 16), (176, 8, 8)]
    assert model.feature_info.channels() == [44, 88, 176]
