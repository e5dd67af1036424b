"""``ndeconv convert-reference`` on the checkpoints of ``main_imagenet.py`` and ``Segmentation/train.py``.

The checkpoints are written in those scripts' exact layouts: ``main_imagenet.py``'s ``{'epoch', 'arch',
'state_dict', 'best_acc1', 'optimizer'}`` with DataParallel's ``module.`` keys (``features.module.`` for VGG,
whose ``features`` alone it wraps), and the segmentation script's ``{'model', 'optimizer', 'epoch'}``. The key
names are the authors' (tests/test_zoo_imagenet.py and tests/test_segmentation.py check ours are theirs, from
``tests/fixtures/reference_extra``); the weights are a zoo model's after a training step, so the whitening is not
the identity, and the converted model must give that model's outputs.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch

import ndeconv  # noqa: F401  (registers the zoo)
from ndeconv.cli import main
from ndeconv.convert.reference import convert_reference_checkpoint, load_reference_checkpoint
from ndeconv.errors import UsageError
from ndeconv.zoo import deconv_vgg_imagenet
from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZER = {"state": {0: {"momentum_buffer": torch.zeros(3)}},
             "param_groups": [{"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}


def trained(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """One train-mode forward: the running statistics move off their initial identity."""
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def imagenet_checkpoint(path, state_dict, arch, prefix="module."):
    """What main_imagenet.py's save_checkpoint writes."""
    torch.save({"epoch": 4, "arch": arch, "state_dict": {prefix + k: v for k, v in state_dict.items()},
                "best_acc1": torch.tensor(31.25).item(), "optimizer": OPTIMIZER}, path)
    return path


@pytest.mark.parametrize("deconv,arch", [(True, "resnet18d"), (False, "resnet18")])
def test_main_imagenet_resnet_checkpoint(tmp_path, deconv: bool, arch: str) -> None:
    """resnet18d (deconvolution, Delinear head of block 64) and the baseline, which the script names by
    torchvision's name ``resnet18``: both the ImageNet ResNet-18, not the CIFAR one."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    source = trained(timm.create_model("resnet18_imagenet_deconv", num_classes=10, deconv=deconv), x)
    ckpt = imagenet_checkpoint(tmp_path / "checkpoint.pth.tar", source.state_dict(), arch)
    out = tmp_path / "converted" / "model.safetensors"
    assert main(["convert-reference", str(ckpt), "-o", str(out)]) == 0
    config = json.loads((out.parent / "config.json").read_text())
    assert config["architecture"] == "resnet18_imagenet_deconv"
    expected = dict(deconv=deconv, block_fc=64 if deconv else 0, in_chans=3, num_classes=10)
    assert {k: config["model_args"][k] for k in expected} == expected
    assert config["converted_from"] == dict(file="checkpoint.pth.tar", arch=arch, epoch=4, best_acc1=31.25)
    # The ImageNet model's data fields, not main.py's CIFAR statistics.
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224]
    assert config["pretrained_cfg"]["mean"] == list(timm.data.IMAGENET_DEFAULT_MEAN)
    model = timm.create_model(f"local-dir:{out.parent}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))


def wrap_vgg_features(state_dict: dict) -> dict:
    """main_imagenet.py wraps VGG's ``features`` alone in DataParallel: ``features.module.0.weight``."""
    return {("features.module." + k[len("features."):] if k.startswith("features.") else k): v
            for k, v in state_dict.items()}


def test_main_imagenet_vgg_keys_lose_features_module(tmp_path) -> None:
    """VGG's checkpoint keys (``features.module.0.weight``, ``classifier.0.weight``) become the model's own."""
    with torch.device("meta"):
        keys = list(timm.create_model("vgg11_imagenet_deconv", deconv=False, batch_norm=True).state_dict())
    wrapped = wrap_vgg_features(dict.fromkeys(keys, torch.zeros(1)))
    assert "features.module.1.running_var" in wrapped
    ckpt = imagenet_checkpoint(tmp_path / "vgg.pth.tar", wrapped, "vgg11_bn", prefix="")
    assert list(load_reference_checkpoint(ckpt)["state_dict"]) == keys
    # DistributedDataParallel wraps the whole model instead: module.features.0.weight.
    ckpt = imagenet_checkpoint(tmp_path / "vgg_ddp.pth.tar", dict.fromkeys(keys, torch.zeros(1)), "vgg11_bn")
    assert list(load_reference_checkpoint(ckpt)["state_dict"]) == keys


@pytest.mark.parametrize("arch,kwargs", [
    ("vgg11", dict(deconv=False)),  # -a vgg11: torchvision's, no BatchNorm
    ("vgg11_bn", dict(deconv=False, batch_norm=True)),  # -a vgg11_bn: torchvision's BatchNorm VGG
    ("vgg11d", dict(deconv=False, block_fc=64)),  # -a vgg11d --deconv False: no BatchNorm, its Delinear head
])
def test_main_imagenet_vgg_checkpoint(tmp_path, monkeypatch, arch: str, kwargs: dict) -> None:
    """The VGG a checkpoint came from, with or without BatchNorm, and a config.json whose model_args rebuild it."""
    monkeypatch.setattr(deconv_vgg_imagenet, "HIDDEN", 64)  # the same modules without a 0.5 GB classifier
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    source = trained(timm.create_model("vgg11_imagenet_deconv", num_classes=10, **kwargs), x)
    ckpt = imagenet_checkpoint(tmp_path / "checkpoint.pth.tar", wrap_vgg_features(source.state_dict()), arch,
                               prefix="")
    converted = convert_reference_checkpoint(ckpt)
    assert converted.model_name == "vgg11_imagenet_deconv"
    args = converted.config["model_args"]
    assert args["deconv"] is False and args["batch_norm"] is kwargs.get("batch_norm", False)
    assert args["block_fc"] == kwargs.get("block_fc", 0) and args["num_classes"] == 10
    rebuilt = timm.create_model("vgg11_imagenet_deconv", **args).eval()
    rebuilt.load_state_dict(converted.model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), source(x))


@pytest.mark.parametrize("deconv", [True, False])
def test_segmentation_checkpoint(tmp_path, deconv: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 40)
    source = trained(SEGMENTATION_MODELS["fcn_resnet50_deconv"](num_classes=4, aux_loss=True, deconv=deconv), x)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": source.state_dict(), "optimizer": OPTIMIZER, "epoch": 7}, ckpt)  # Segmentation/train.py's
    with pytest.raises(UsageError, match="names no 'arch'"):
        convert_reference_checkpoint(ckpt)
    converted = convert_reference_checkpoint(ckpt, arch="fcn_resnet50d" if deconv else "fcn_resnet50")
    assert converted.model_name == "fcn_resnet50_deconv"
    assert converted.model_args["aux_loss"] is True and converted.model_args["num_classes"] == 4
    assert converted.model_args["deconv"] is deconv and converted.config["converted_from"]["epoch"] == 7
    with torch.no_grad():
        ours, theirs = converted.model.eval()(x), source(x)
    assert ours.keys() == theirs.keys() == {"out", "aux"}
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_the_cli_takes_the_authors_segmentation_name(tmp_path) -> None:
    torch.manual_seed(0)
    source = SEGMENTATION_MODELS["deeplabv3_resnet50_deconv"](num_classes=3)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": source.state_dict(), "optimizer": OPTIMIZER, "epoch": 0}, ckpt)
    out = tmp_path / "seg.safetensors"
    assert main(["convert-reference", str(ckpt), "--arch", "deeplabv3_resnet50d", "-o", str(out)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "deeplabv3_resnet50_deconv" and config["model_args"]["aux_loss"] is False
