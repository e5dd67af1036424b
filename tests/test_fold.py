"""Folding: the folded plain network reproduces the unfolded model's eval outputs exactly, for the whole zoo.

Running statistics are moved off their initial identity first by train-mode forward passes on correlated
data (what a training step does to them; the backward pass never touches them), so the whitening folded in
is a real one. Inputs are 32x32, so every padded border is part of the comparison. BatchNorm fusion is the
opt-in pass (``fuse_batchnorm=True``); the folded architecture and its files are tests/test_folded_form.py's
and tests/test_fold_io.py's.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ndeconv  # noqa: F401 - registers the zoo
from ndeconv import ChannelDeconv, Delinear, FastDeconv
from ndeconv.convert import FoldWarning, fold, fold_with_report, load_folded, output_difference, save_folded
from ndeconv.convert.fold import has_identity_whitening
from ndeconv.errors import NdeconvError

ZOO = [
    "vgg16_deconv", "resnet18_deconv", "preact_resnet18_deconv", "densenet121_deconv", "resnext29_32x4d_deconv",
    "mobilenetv2_deconv", "dpn92_deconv", "pnasnet_a_deconv", "senet18_deconv", "efficientnet_b0_deconv",
]
# Fast enough for every run; the others (deep 3x3 stacks: each train-mode forward runs Newton-Schulz on
# 576x576 matrices per layer) run with the slow tests.
FAST = {"resnet18_deconv", "mobilenetv2_deconv", "pnasnet_a_deconv", "resnext29_32x4d_deconv", "efficientnet_b0_deconv"}
PRE_ACTIVATION = {"preact_resnet18_deconv", "densenet121_deconv", "senet18_deconv"}  # BN -> ReLU -> conv


def zoo_param(name: str):
    return name if name in FAST else pytest.param(name, marks=pytest.mark.slow)


def correlated_batch(batch: int, channels: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Pixel- and channel-correlated data with an offset, so whitening is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(batch, channels, size + 2, size + 2, generator=g), 3, 1)
    mix = torch.randn(channels, channels, generator=g) + 1.5
    return torch.einsum("dc,nchw->ndhw", mix, x) + 0.5


def require_model(name: str) -> None:
    import timm

    if not timm.is_model(name):
        pytest.skip(f"{name} is not registered yet (its zoo file has not landed)")


@functools.cache
def _trained(name: str, deconv: bool, in_chans: int = 3, **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, deconv=deconv, in_chans=in_chans, **kwargs)
    with torch.no_grad():
        for m in model.modules():  # BatchNorm affine at its init (1, 0) would make its fusion a weak test
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    # A few real training steps (forward, backward, SGD) on correlated data move the running statistics off
    # their initial identity and the weights off their initialisation.
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for step in range(3):
        x = correlated_batch(4, in_chans, seed=1 + step)
        labels = torch.arange(4) % model.num_classes
        optimizer.zero_grad()
        F.cross_entropy(model(x), labels).backward()
        optimizer.step()
    return model.eval()


def trained(name: str, deconv: bool = True, **kwargs) -> nn.Module:
    """A seeded zoo model whose running statistics moved off identity (cached; copy before changing it)."""
    require_model(name)
    return _trained(name, deconv, **kwargs)


def plain_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def assert_folded_exact(model: nn.Module, dtype: torch.dtype, tol: float, x: torch.Tensor) -> nn.Module:
    model = copy.deepcopy(model).to(dtype).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FoldWarning)  # a trained eval model folds without any warning
        folded = fold(model, check=False)
    assert not plain_types(folded) & {FastDeconv, Delinear, ChannelDeconv}
    x = x.to(dtype)
    with torch.no_grad():
        expected, got = model(x), folded(x)
    _, rel = output_difference(expected, got)
    assert rel <= tol, f"{dtype}: folded vs unfolded relative error {rel:.3g} > {tol:g}"
    return folded


@pytest.mark.parametrize("name", [zoo_param(n) for n in ZOO])
def test_fold_matches_unfolded_eval(name: str) -> None:
    model = trained(name)
    layers = [m for m in model.modules() if isinstance(m, (FastDeconv, Delinear))]
    untouched = [m for m in layers if has_identity_whitening(m)]
    # (SENet's excitation conv may see only zeros after a ReLU on a batch of 2: a few may stay at identity.)
    assert layers and len(untouched) <= 0.1 * len(layers)
    x = correlated_batch(2, 3, seed=7)
    folded = assert_folded_exact(model, torch.float64, 1e-10, x)
    assert_folded_exact(model, torch.float32, 1e-5, x)
    # No per-forward weight computation: every remaining layer is a stock torch module with stored weights.
    assert all(type(m).__module__.startswith("torch.nn") for m in folded.modules()
               if any(True for _ in m.parameters(False)))


@pytest.mark.parametrize("name", [zoo_param(n) for n in ZOO])
def test_fold_bn_baseline_fuses_batchnorm(name: str) -> None:
    model = copy.deepcopy(trained(name, deconv=False)).double()
    x = correlated_batch(2, 3, seed=8).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldWarning)  # PreAct-ResNet keeps its pre-activation BatchNorms
        folded, report = fold_with_report(model, check=False, fuse_batchnorm=True)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(report.bn_fused) + len(report.bn_kept) == n_bn and report.bn_fused
    if name not in PRE_ACTIVATION:  # there a BatchNorm after a sum or concat, before a ReLU, cannot fuse
        assert not report.bn_kept, f"unfused BatchNorms: {report.bn_kept}"
    with torch.no_grad():
        _, rel = output_difference(model(x), folded(x))
    assert rel <= 1e-10


def test_fold_rule_follows_dataflow_not_names() -> None:
    """PreAct-ResNet: ``bn2`` (after ``conv1``) fuses; ``bn1`` (after a residual sum) cannot and stays."""
    with pytest.warns(FoldWarning, match="do not directly follow a conv"):
        _, report = fold_with_report(trained("preact_resnet18_deconv", deconv=False), check=False,
                                     fuse_batchnorm=True)
    assert report.bn_fused["layer1.0.bn2"] == "layer1.0.conv1"
    assert "layer1.0.bn1" in report.bn_kept


def test_efficientnet_nd_inner_batchnorms_fuse() -> None:
    _, report = fold_with_report(trained("efficientnet_b0_deconv"), check=True, fuse_batchnorm=True)
    assert len(report.bn_fused) == 50 and not report.bn_kept and report.check_rel <= 1e-5


def test_batchnorm_fusion_is_opt_in() -> None:
    """By default a fold replaces the deconvolution layers only: BatchNorms stay, unwarned, and say so."""
    model = trained("efficientnet_b0_deconv")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FoldWarning)  # kept BatchNorms were not asked to go: nothing to warn about
        folded, report = fold_with_report(model, check=True)
    assert not report.bn_fused and len(report.bn_kept) == 50 and report.check_rel <= 1e-5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 50
    assert "50 BatchNorm kept (BatchNorm fusion not asked for)" in report.summary()
    assert len(fold_with_report(model, check=False, fuse_batchnorm=True)[1].bn_fused) == 50


def test_channel_deconv_of_timm_features_stays_in_the_features() -> None:
    """``--delinear False --block-fc N``: the ChannelDeconv ends forward_features, so it becomes a 1x1 conv there
    (merged into the Linear, forward_features and pre_logits would lose the whitening while logits matched)."""
    model = trained("pnasnet_a_deconv", block_fc=16, delinear=False)
    assert isinstance(model.deconv1, ChannelDeconv) and int(model.deconv1.num_batches_tracked) > 0
    model = copy.deepcopy(model).double().eval()
    folded, report = fold_with_report(model, check=True)
    assert report.channel_deconv == {"deconv1": "1x1 Conv2d"} and report.check_rel <= 1e-10
    x = torch.randn(2, *model.pretrained_cfg["input_size"], dtype=torch.float64)
    with torch.no_grad():
        features = model.forward_features(x)
        assert output_difference(features, folded.forward_features(x))[1] <= 1e-10
        pre_logits = model.forward_head(features, pre_logits=True)
        assert output_difference(pre_logits, folded.forward_head(features, pre_logits=True))[1] <= 1e-10


class _ChannelDeconvHead(nn.Module):
    """A plain module: ChannelDeconv -> pooling -> Linear, with no features of its own to keep."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cd = ChannelDeconv(4, eps=1e-2)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.cd(self.conv(x)).mean((2, 3)))


def test_channel_deconv_becomes_its_own_layer_in_a_plain_model() -> None:
    """Each layer folds by its own fuse(): a ChannelDeconv before pooling and a Linear becomes a 1x1 conv there,
    in a plain module as in a timm-style one (no merging into its neighbours)."""
    torch.manual_seed(0)
    model = _ChannelDeconvHead().double()
    model.train()(torch.randn(8, 3, 8, 8, dtype=torch.float64) + torch.linspace(0, 1, 8, dtype=torch.float64))
    folded, report = fold_with_report(model.eval(), example_input=torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert report.channel_deconv == {"cd": "1x1 Conv2d"} and type(folded.cd) is nn.Conv2d
    assert torch.equal(folded.fc.weight, model.fc.weight)  # the Linear is left as it was
    assert report.check_rel <= 1e-10


def test_channel_deconv_built_with_its_channels_folds_without_a_forward() -> None:
    """The reference's constructor leaves the channel count to the input; given, fold needs no example input."""
    torch.manual_seed(0)
    model = _ChannelDeconvHead().double()
    model.train()(torch.randn(8, 3, 8, 8, dtype=torch.float64) + torch.linspace(0, 1, 8, dtype=torch.float64))
    sized = _ChannelDeconvHead().double()
    sized.cd = ChannelDeconv(4, eps=1e-2, num_channels=8).double()
    sized.load_state_dict(model.state_dict())  # the reference's state_dict layout, unchanged
    assert sized.cd.last_input is None
    folded = fold(sized.eval(), check=False)
    assert sized.cd.last_input is None and type(folded.cd) is nn.Conv2d  # no forward ran
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert output_difference(model.eval()(x), folded(x))[1] <= 1e-12


class _ChannelDeconvThenRelu(nn.Module):
    """A ChannelDeconv with a non-linearity after it cannot merge: it must become a 1x1 conv."""

    def __init__(self, flat: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.cd = ChannelDeconv(4, eps=1e-2)
        self.flat = flat
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.flat:
            x = x.mean((2, 3))
        x = F.relu(self.cd(x))
        return self.fc(x.mean((2, 3)) if not self.flat else x)


@pytest.mark.parametrize("flat", [False, True])
def test_channel_deconv_alone_becomes_affine_layer(flat: bool) -> None:
    torch.manual_seed(0)
    model = _ChannelDeconvThenRelu(flat).double().train()
    with torch.no_grad():
        model(correlated_batch(4, 3).double())
    folded, report = fold_with_report(model.eval(), example_input=correlated_batch(2, 3).double())
    assert isinstance(folded.cd, nn.Linear if flat else nn.Conv2d)
    assert report.check_rel <= 1e-10


@pytest.mark.parametrize("flat", [False, True])
def test_channel_deconv_fuse_takes_the_input_it_saw(flat: bool) -> None:
    # timm's reparameterize_model calls fuse() bare: (N, C) features need a Linear, (N, C, H, W) a 1x1 conv.
    from timm.models import reparameterize_model

    torch.manual_seed(0)
    model = _ChannelDeconvThenRelu(flat).double().train()
    with torch.no_grad():
        model(correlated_batch(4, 3).double())
    x = correlated_batch(2, 3, seed=5).double()
    with torch.no_grad():
        expected = model.eval()(x)
        plain = reparameterize_model(model)
        assert isinstance(plain.cd, nn.Linear if flat else nn.Conv2d)
        torch.testing.assert_close(plain(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_deconv_evaluates_in_half_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    layer = ChannelDeconv(4, eps=1e-2).train()
    x = correlated_batch(4, 3)[:, :3].repeat(1, 3, 1, 1)[:, :8] + 0.1 * torch.randn(4, 8, 32, 32)
    with torch.no_grad():
        layer(x)
        expected = layer.eval()(x)
        got = layer.to(dtype)(x.to(dtype))
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_warns_on_identity_whitening_and_train_mode() -> None:
    import timm

    require_model("pnasnet_a_deconv")
    model = timm.create_model("pnasnet_a_deconv")  # untrained, and in train mode as built
    with pytest.warns(FoldWarning) as caught:
        folded = fold(model)
    text = " | ".join(str(w.message) for w in caught)
    assert "initial identity whitening" in text and "training mode" in text and "running statistics" in text
    assert model.training and not folded.training  # the source keeps its mode


def test_untraceable_model_still_folds_exactly() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = FastDeconv(3, 8, 3, padding=1, block=3)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = x * 2
            return self.bn(self.conv(x))

    model = Branchy().double().train()
    with torch.no_grad():
        model(correlated_batch(4, 3).double())
    with pytest.warns(FoldWarning, match="could not trace"):
        folded, report = fold_with_report(model.eval(), example_input=correlated_batch(2, 3).double(),
                                          fuse_batchnorm=True)
    assert not report.traced and isinstance(folded.conv, nn.Conv2d) and report.check_rel <= 1e-10
    assert isinstance(folded.bn, nn.BatchNorm2d)


def test_timm_reparameterize_model_agrees() -> None:
    """fold is timm's walk over each layer's fuse(): the same modules under the same names, the same numbers."""
    from timm.models import reparameterize_model

    model = trained("resnet18_deconv")
    x = correlated_batch(2, 3, seed=3)
    plain, folded = reparameterize_model(model), fold(model, check=False)
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in folded.named_modules()}
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), folded.state_dict().values(),
                                                 strict=True))
    with torch.no_grad():
        assert torch.equal(plain(x), folded(x))


@pytest.mark.parametrize("name,deconv,fuse_bn", [
    ("resnet18_deconv", True, False), ("efficientnet_b0_deconv", True, True),
    ("preact_resnet18_deconv", False, True), ("preact_resnet18_deconv", False, False),
])
def test_saved_folded_weights_load_as_plain_network(tmp_path, name: str, deconv: bool, fuse_bn: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldWarning)
        folded, report = fold_with_report(trained(name, deconv=deconv), check=False, fuse_batchnorm=fuse_bn)
    weights = save_folded(folded, tmp_path / "model.safetensors", report, {"model": name})
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # the config is in its metadata
    loaded = load_folded(tmp_path)
    assert not plain_types(loaded) & {FastDeconv, Delinear, ChannelDeconv}
    assert loaded.state_dict().keys() == folded.state_dict().keys()
    x = correlated_batch(2, 3, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
        assert torch.equal(load_folded(weights)(x), folded(x))


def test_save_folded_refuses_unfolded_and_overwrites(tmp_path) -> None:
    from ndeconv.errors import UsageError

    model = trained("pnasnet_a_deconv")
    with pytest.raises(UsageError, match="not folded"):
        save_folded(model, tmp_path / "m.safetensors")
    folded = fold(model)
    save_folded(folded, tmp_path / "m.safetensors")
    with pytest.raises(UsageError, match="already exists"):
        save_folded(folded, tmp_path / "m.safetensors")
    save_folded(folded, tmp_path / "m.safetensors", force=True)


def _timm_norm_act_net() -> nn.Module:
    """timm's MobileNetV3 (BatchNormAct2d everywhere) with its stem deconvolved, trained one step."""
    import timm

    from ndeconv import deconvolve

    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", num_classes=10)
    deconvolve(model, which="stem")
    model.train()(torch.randn(4, 3, 64, 64))
    return model.eval()


def test_fold_keeps_the_activation_of_timms_norm_act_layers():
    """conv -> BatchNormAct2d fuses the norm only: its activation stays (it used to become an Identity)."""
    model = _timm_norm_act_net()
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldWarning)
        folded, report = fold_with_report(model, example_input=x, fuse_batchnorm=True)
    assert report.bn_fused and report.check_rel < 1e-4
    with torch.no_grad():
        assert output_difference(model(x), folded(x))[1] < 1e-4


def test_inplace_fold_is_checked_against_the_model_before_folding(monkeypatch):
    """With inplace=True the check must not compare the folded model with itself: a wrong fold is caught."""
    import importlib

    fold_module = importlib.import_module("ndeconv.convert.fold")  # the attribute is the function
    model = _timm_norm_act_net()
    monkeypatch.setattr(fold_module, "norm_remainder", lambda norm: nn.Identity())  # drops the activations
    with warnings.catch_warnings(), pytest.raises(NdeconvError, match="disagrees with the unfolded model"):
        warnings.simplefilter("ignore", FoldWarning)
        fold(model, example_input=torch.randn(2, 3, 64, 64), inplace=True, fuse_batchnorm=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batchnorm_network_folds_in_half_precision(dtype):
    """conv + BatchNorm fusion rounds in the model's dtype: the check allows that rounding, no more."""
    torch.manual_seed(0)
    import timm

    model = timm.create_model("pnasnet_a_deconv", deconv=False, in_chans=1)
    model.train()(torch.randn(8, 1, 32, 32))
    model = model.eval().to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldWarning)
        folded, report = fold_with_report(model, example_input=torch.randn(2, 1, 32, 32, dtype=dtype),
                                          fuse_batchnorm=True)
    assert report.bn_fused and 0 < report.check_rel < 0.05
