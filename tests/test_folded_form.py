"""The folded architecture: ``timm.create_model(name, folded=True)`` builds what ``fold`` leaves, for every zoo model.

Each deconvolution layer folds by its own ``fuse()``; ``ndeconv.convert.fold`` is the walk over them (timm's
``reparameterize_model`` walk), and ``DeconvSettings(folded=True)`` builds the same network directly (a Conv2d
with bias per FastDeconv, a Linear head, a ChannelDeconv's plain layer), so folded weights load into it with
``strict=True``. Exactness: against the authors' logits where fixtures exist (PNASNet-A, MobileNetV2), against
the unfolded model otherwise. Statistics are moved off identity by hand (a seeded perturbation of every running
buffer) rather than by training, which keeps the whole zoo cheap: one image, eval mode only.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
from safetensors.torch import load_file
from timm.models import reparameterize_model
from torch import nn

import ndeconv  # noqa: F401 - registers the zoo
from ndeconv import ChannelDeconv, Delinear, FastDeconv
from ndeconv.convert import FoldWarning, fold, fold_with_report, output_difference
from ndeconv.layers._conv import plain_conv_type
from ndeconv.zoo import ZOO_MODELS
from ndeconv.zoo._layer_factory import ChannelCountUnknown, DeconvSettings

pytestmark = pytest.mark.usefixtures("one_thread")

DECONV = (FastDeconv, Delinear, ChannelDeconv)
# Half the pretrained_cfg's input size quarters the work of the deep ones; VGG-16 pools five times and
# EfficientNet-B0 strides five times, so they need their full 32x32.
INPUT_SIZE = {"vgg16_deconv": 32, "efficientnet_b0_deconv": 32}


def moved_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every running buffer moved off its initial value (identity whitening, zero mean, unit variance), seeded:
    the fold's algebra holds for any values, so no training step is needed to make the comparison a real one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DECONV):
                d = m.running_deconv
                d.copy_(torch.eye(d.shape[-1]).expand_as(d) + 0.1 * torch.randn(d.shape, generator=g))
                for name in ("running_mean", "running_mean1", "running_mean2"):
                    if hasattr(m, name):
                        getattr(m, name).copy_(torch.randn(getattr(m, name).shape, generator=g))
                if isinstance(m, ChannelDeconv):
                    m.running_var.uniform_(0.5, 2.0, generator=g)
                    m.num_batches_tracked.fill_(1)
            elif isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


def image(model: nn.Module, seed: int = 1) -> torch.Tensor:
    cfg = model.pretrained_cfg
    channels, height, _ = cfg["input_size"]
    size = INPUT_SIZE.get(cfg["architecture"], height // 2)
    return torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def built_types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


def test_every_zoo_model_is_covered() -> None:
    """The tests below run over the registry, which holds at least the paper's ten architectures."""
    from test_fold import ZOO

    assert set(ZOO) <= set(ZOO_MODELS)


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_fold_reparameterize_and_folded_build_agree(name: str) -> None:
    """fold == timm's reparameterize_model (module by module, bit for bit) == the unfolded eval output, and the
    folded weights load strictly into ``timm.create_model(name, folded=True)``, which computes the same."""
    torch.manual_seed(0)
    model = moved_statistics(timm.create_model(name)).double()
    x = image(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FoldWarning)  # moved statistics, eval mode: nothing to warn about
        folded, report = fold_with_report(model, example_input=x)
    assert report.check_rel <= 1e-12
    assert not built_types(folded) & set(DECONV)

    plain = reparameterize_model(model)
    assert {n: type(m) for n, m in plain.named_modules()} == {n: type(m) for n, m in folded.named_modules()}
    assert plain.state_dict().keys() == folded.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in folded.state_dict().items())

    built = timm.create_model(name, folded=True).double()
    assert not built_types(built) & set(DECONV)  # no deconvolution layer is ever constructed
    assert built.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(built.eval()(x), folded(x))
        assert output_difference(expected, folded(x))[1] <= 1e-12


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_folded_batchnorm_form_is_the_batchnorm_form(name: str) -> None:
    """``deconv=False, folded=True``: nothing to fold, so the BatchNorm baseline's own layout (its weights load), its
    strided depthwise convs torch's own ``nn.Conv2d`` (as fold leaves them: their bf16 training path is moot)."""
    with torch.device("meta"):
        bn = timm.create_model(name, deconv=False)
        folded_bn = timm.create_model(name, deconv=False, folded=True)
    assert {k: v.shape for k, v in bn.state_dict().items()} == {k: v.shape for k, v in folded_bn.state_dict().items()}
    assert {n: plain_conv_type(m) or type(m) for n, m in bn.named_modules()} == \
        {n: type(m) for n, m in folded_bn.named_modules()}


@pytest.mark.parametrize("name", ["pnasnet_a", "mobilenetv2"])
def test_folded_authors_model_gives_the_authors_logits(reference_dir, name: str) -> None:
    """The authors' trained PNASNet-A / MobileNetV2 state_dict, folded and reloaded into the folded architecture:
    their own eval logits, to 1e-9 in float64."""
    state = {k: v.double() for k, v in load_file(str(reference_dir / f"{name}_nd_state_dict.safetensors")).items()}
    io = load_file(str(reference_dir / f"{name}_nd_io.safetensors"))
    model = timm.create_model(f"{name}_deconv").double()
    model.load_state_dict(state)
    folded = fold(model.eval(), example_input=io["eval.x"])
    built = timm.create_model(f"{name}_deconv", folded=True).double()
    built.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        for net in (folded, built.eval()):
            _, rel = output_difference(io["eval.logits"], net(io["eval.x"]))
            assert rel <= 1e-9


def test_folded_model_stays_folded() -> None:
    """A new head on a folded model (reset_classifier) is plain, as a freshly built folded one's."""
    folded = fold(moved_statistics(timm.create_model("pnasnet_a_deconv")), check=False)
    assert folded.deconv_settings.folded and folded.folded_from_settings == DeconvSettings()
    folded.reset_classifier(4)
    assert type(folded.get_classifier()) is nn.Linear and folded.get_classifier().out_features == 4
    built = timm.create_model("pnasnet_a_deconv", folded=True, num_classes=4)
    assert type(built.get_classifier()) is nn.Linear and type(built.conv1) is nn.Conv2d and built.conv1.bias is not None


def test_folded_setting_is_left_out_of_unfolded_configs() -> None:
    """Shipped, trained and converted weights record DeconvSettings.to_dict(): their config.json keys stay."""
    assert "folded" not in DeconvSettings().to_dict()
    assert DeconvSettings(folded=True).to_dict()["folded"] is True
    model_args = DeconvSettings(folded=True).to_dict()
    assert DeconvSettings(**model_args) == DeconvSettings(folded=True)


# -- ChannelDeconv knows its channels ------------------------------------------------------------------------


def _trained_channel_deconv(flat: bool = False) -> tuple[ChannelDeconv, torch.Tensor]:
    """A reference-constructed ChannelDeconv (block 4) trained on 10 correlated channels (two left over)."""
    torch.manual_seed(0)
    layer = ChannelDeconv(4, eps=1e-2).double().train()
    shape = (16, 10) if flat else (4, 10, 5, 5)
    mix = torch.randn(10, 10, dtype=torch.float64) + 1.0
    x = torch.einsum("dc,nc...->nd...", mix, torch.randn(*shape, dtype=torch.float64)) + 0.5
    with torch.no_grad():
        layer(x)
    return layer.eval(), torch.randn(*((3, 10) if flat else (3, 10, 4, 4)), dtype=torch.float64)


@pytest.mark.parametrize("flat", [False, True])
def test_channel_deconv_built_with_its_channels_fuses_without_an_input(flat: bool) -> None:
    trained_layer, x = _trained_channel_deconv(flat)
    layer = ChannelDeconv(4, eps=1e-2, num_channels=10, input_dim=2 if flat else 4).double()
    assert layer.state_dict().keys() == trained_layer.state_dict().keys()  # the reference's layout
    layer.load_state_dict(trained_layer.state_dict())
    plain = layer.eval().fuse()  # no input seen
    assert type(plain) is (nn.Linear if flat else nn.Conv2d) and plain.weight.shape[:2] == (10, 10)
    with torch.no_grad():
        assert output_difference(layer(x), plain(x))[1] <= 1e-12
        assert output_difference(trained_layer(x), plain(x))[1] <= 1e-12
    assert "num_channels=10" in repr(layer)


def test_channel_deconv_built_with_its_channels_refuses_other_inputs() -> None:
    layer = ChannelDeconv(4, num_channels=10)
    with pytest.raises(ValueError, match="input has 12 channels but the layer was built for num_channels=10"):
        layer(torch.randn(2, 12, 3, 3))
    with pytest.raises(ValueError, match="built with input_dim=4"):
        ChannelDeconv(4, num_channels=10, input_dim=4)(torch.randn(2, 10))
    with pytest.raises(ValueError, match="num_channels must be an int >= 1"):
        ChannelDeconv(4, num_channels=0)
    short = ChannelDeconv(4, num_channels=3)  # builds, as the authors' layer (their checkpoints have such layouts)
    with pytest.raises(ValueError, match="fewer than block=4"):
        short.fuse()
    unsized = ChannelDeconv(4)  # the reference's layer takes any count, and says why it cannot fold unseen
    with pytest.raises(ValueError, match="channel count is unknown"):
        unsized.fuse()
    unsized.eval()(torch.randn(2, 9, 3, 3))
    assert unsized.fuse().weight.shape == (9, 9, 1, 1)


def test_authors_channel_deconv_state_loads_into_a_sized_layer(reference_dir) -> None:
    """The authors' ChannelDeconv runs: their final state, loaded into a layer built with its channel count,
    gives their eval output, and so does its fuse(), to 1e-9 in float64."""
    import json

    cases = [c for c in json.loads((reference_dir / "layers.json").read_text())["layers"]
             if c["class"] == "ChannelDeconv"]
    assert cases
    tensors = load_file(str(reference_dir / "layers.safetensors"))
    for case in cases:
        name, last = case["name"], case["steps"] - 1
        prefix = f"{name}/step{last}.state."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        x, y = tensors[f"{name}/eval.x"], tensors[f"{name}/eval.y"]
        layer = ChannelDeconv(**case["kwargs"], num_channels=x.shape[1], input_dim=x.dim()).double()
        layer.load_state_dict(state)
        with torch.no_grad():
            assert output_difference(y, layer.eval()(x))[1] <= 1e-9, name
            assert output_difference(y, layer.fuse()(x))[1] <= 1e-9, name


def test_settings_build_a_sized_channel_deconv_and_its_folded_layer() -> None:
    settings = DeconvSettings(block_fc=16, delinear=False)
    layer = settings.channel_deconv(176)
    assert isinstance(layer, ChannelDeconv) and layer.num_channels == 176 and layer.block == 16
    flat = settings.channel_deconv(320, input_dim=2)
    assert flat.input_dim == 2
    folded = DeconvSettings(block_fc=16, delinear=False, folded=True)
    assert type(folded.channel_deconv(176)) is nn.Conv2d and folded.channel_deconv(176).weight.shape == (176, 176, 1, 1)
    assert type(folded.channel_deconv(320, input_dim=2)) is nn.Linear
    with pytest.raises(ChannelCountUnknown, match=r"settings.channel_deconv\(num_channels\)"):
        folded.channel_deconv()
    assert DeconvSettings(folded=True).channel_deconv(176) is None  # a Delinear head: no ChannelDeconv


@pytest.mark.parametrize("name", ["pnasnet_a_deconv", "efficientnet_b0_deconv"])
def test_zoo_channel_deconv_knows_its_channels(name: str) -> None:
    """``--delinear False --block-fc N``: the zoo builds the ChannelDeconv for its feature map's channels, so it
    folds without an input and the folded architecture builds its plain layer directly."""
    model = timm.create_model(name, delinear=False, block_fc=16)
    if model.deconv1.num_channels is None:
        pytest.skip(f"{name}'s model file does not pass the channel count yet (settings.channel_deconv(C))")
    assert model.deconv1.num_channels == model.num_features
    assert model.deconv1.input_dim == (2 if name == "efficientnet_b0_deconv" else 4)
    folded = fold(copy.deepcopy(moved_statistics(model)), check=False)
    assert model.deconv1.last_input is None  # folded without a forward
    built = timm.create_model(name, delinear=False, block_fc=16, folded=True)
    built.load_state_dict(folded.state_dict(), strict=True)
