"""The hybrid form (``deconv="stem"``): a FastDeconv stem with no norm after it, the BatchNorm form everywhere else.

Layouts on the meta device for the paper's ten; one train step, eval and fold on three cheap models; the
``ndeconv train --deconv stem`` flag once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import ndeconv.zoo  # noqa: F401 - registers the zoo with timm
from ndeconv import deconvolve
from ndeconv.convert import fold
from ndeconv.errors import UsageError
from ndeconv.layers import ChannelDeconv, Delinear, FastDeconv
from ndeconv.zoo._layer_factory import DeconvSettings
from ndeconv.zoo._pretrained import registered_tags

TEN = ("vgg16", "resnet18", "preact_resnet18", "senet18", "resnext29_32x4d", "densenet121", "mobilenetv2",
       "dpn92", "pnasnet_a", "efficientnet_b0")
# The extra CIFAR ones and the ImageNet ones build their stems through the same DeconvSettings.stem_* methods.
# (The MNIST models have no conv stem of that kind, the MLP no conv at all: tests/test_zoo_mnist.py checks their
# hybrids fold.)
MNIST = {"mlp_deconv", "simple_v1_deconv", "simple_v2_deconv"}
OTHERS = tuple(sorted(
    n.removesuffix("_deconv") for n in set(timm.list_models("*_deconv")) - {f"{n}_deconv" for n in TEN} - MNIST))


def _meta(name: str, **kwargs: object) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(f"{name}_deconv", **kwargs)


def _fast_deconvs(model: nn.Module) -> list[tuple[str, FastDeconv]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, FastDeconv)]


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", TEN + OTHERS)
def test_layout_is_the_bn_forms_but_the_stem(name: str) -> None:
    hybrid, bn, nd = _meta(name, deconv="stem"), _meta(name, deconv=False), _meta(name, deconv=True)
    stems = _fast_deconvs(hybrid)
    assert len(stems) == 1, "only the stem whitens"
    stem_name, stem = stems[0]
    assert not any(isinstance(m, (Delinear, ChannelDeconv)) for m in hybrid.modules())
    assert type(hybrid.get_classifier()) is nn.Linear  # the BN form's head (block_fc 0)
    assert hybrid.deconv_settings.block_fc == 0

    # The stem is the ND form's first FastDeconv, with that stem's own settings (frozen, n_iter).
    nd_name, nd_stem = _fast_deconvs(nd)[0]
    assert stem_name == nd_name
    for attr in ("n_iter", "freeze", "block", "sampling_stride", "in_channels", "out_channels", "kernel_size"):
        assert getattr(stem, attr) == getattr(nd_stem, attr), attr

    # The same network deconvolve(which="stem") makes of the BN form: its stem conv -> FastDeconv, the BatchNorm
    # after it (where there is one) -> Identity. The only difference allowed is the stem's bias: deconvolve gives
    # one only where a BatchNorm was removed (DenseNet's stem has none), the hybrid's stem has the ND form's.
    converted = deconvolve(bn, which="stem")
    assert [n for n, _ in _fast_deconvs(converted)] == [stem_name]
    expected, got = _shapes(converted), _shapes(hybrid)
    expected.pop(f"{stem_name}.bias", None)
    got.pop(f"{stem_name}.bias", None)
    assert got == expected

    # ...which is the BN form's state_dict minus the stem conv's and its norm's keys, plus the FastDeconv's.
    bn_form = _meta(name, deconv=False)
    bn_keys = set(bn_form.state_dict())
    hybrid_keys = set(hybrid.state_dict())
    stem_keys = {k for k in hybrid_keys if k.startswith(f"{stem_name}.")}
    assert hybrid_keys - stem_keys <= bn_keys
    # All the BN form has beyond that: one BatchNorm2d (the stem's; DenseNet's stem has none).
    missing = {k.rpartition(".")[0] for k in bn_keys - hybrid_keys}
    assert len(missing) <= 1
    assert all(isinstance(bn_form.get_submodule(m), nn.BatchNorm2d) for m in missing)

    # config.json / run configs: the recorded kwargs build the same model.
    settings = hybrid.deconv_settings.to_dict()
    assert settings["deconv"] == "stem"
    assert _shapes(_meta(name, **settings)) == _shapes(hybrid)


def test_bad_deconv_value_is_refused() -> None:
    with pytest.raises(Exception, match="deconv must be True, False or 'stem'"):
        DeconvSettings(deconv="Stem")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="deconv must be True, False or 'stem'"):
        DeconvSettings(deconv=2)  # type: ignore[arg-type]
    # An int where a bool was meant keeps its old meaning (the full deconvolution form).
    assert DeconvSettings(deconv=1).body_deconv and DeconvSettings(deconv=1).deconv is True


@pytest.mark.parametrize("name", ("resnet18", "pnasnet_a", "vgg16"))
def test_train_step_eval_and_fold(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(f"{name}_deconv", deconv="stem", in_chans=1)
    x, y = torch.randn(2, 1, 32, 32), torch.tensor([0, 1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    (stem_name, stem), = _fast_deconvs(model)
    before = stem.running_mean.clone()
    model.train()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, stem.running_mean), "the stem's whitening statistics update in training"
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()

    # Folding leaves the BN body alone, and with fuse_batchnorm folds it too: no FastDeconv, no BatchNorm left.
    folded = fold(model, x)
    assert not _fast_deconvs(folded)
    assert any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    fused = fold(model, x, fuse_batchnorm=True)
    assert not _fast_deconvs(fused)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), out, rtol=1e-3, atol=1e-4)
    # The folded hybrid's layout is what folded=True builds for the hybrid.
    assert set(folded.state_dict()) == set(
        timm.create_model(f"{name}_deconv", deconv="stem", in_chans=1, folded=True).state_dict())


def test_train_cli_accepts_deconv_stem(tmp_path: Path) -> None:
    from ndeconv.cli import build_parser, main
    from ndeconv.datasets import FASHION_MNIST_DIR
    from ndeconv.training import load_run_model

    assert build_parser().parse_args(["train", "--deconv", "stem"]).deconv == "stem"
    assert build_parser().parse_args(["train", "--deconv", "false"]).deconv is False
    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (scripts/test.sh)")
    out = tmp_path / "run"
    assert main(["train", "--arch", "pnasnet_a", "--deconv", "stem", "--epochs", "1", "--train-subset", "64",
                 "--test-subset", "32", "--max-steps", "2", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["deconv"] == "stem"
    model = load_run_model(out)
    assert len(_fast_deconvs(model)) == 1 and model.deconv_settings.deconv == "stem"


# -- the hybrid's tag: it names the model as well as the weights -------------------------------------------------


def test_the_hybrid_tag_builds_the_hybrid_with_or_without_weights() -> None:
    # timm's pretrained_cfg has no field for model arguments: the tag alone must give the form its weights fit.
    for model in (timm.create_model("resnet18_deconv.fashion_mnist_stem"),
                  timm.create_model("resnet18_deconv", pretrained_cfg="fashion_mnist_stem"),
                  timm.create_model("resnet18_deconv.fashion_mnist_stem", deconv="stem")):
        assert model.deconv_settings.deconv == "stem" and model.pretrained_cfg["tag"] == "fashion_mnist_stem"
        assert isinstance(model.conv1, FastDeconv) and isinstance(model.layer1[0].bn1, nn.BatchNorm2d)
    assert timm.create_model("resnet18_deconv").deconv_settings.deconv is True  # the default tag: ND


def test_the_hybrid_tag_refuses_another_form() -> None:
    tags = re.escape(", ".join(registered_tags("resnet18_deconv")))  # every one, the hybrid's among them
    assert "fashion_mnist_stem" in tags
    with pytest.raises(UsageError, match=r"^resnet18_deconv\.fashion_mnist_stem: these weights are the model with "
                                         rf"deconv='stem', not deconv=False; leave deconv out .*\({tags}\)$"):
        timm.create_model("resnet18_deconv.fashion_mnist_stem", deconv=False)


def test_torch_hub_takes_the_tag() -> None:
    from conftest import PROJECT_ROOT

    model = torch.hub.load(str(PROJECT_ROOT), "resnet18_deconv", source="local", tag="fashion_mnist_stem")
    assert model.deconv_settings.deconv == "stem" and model.pretrained_cfg["tag"] == "fashion_mnist_stem"
