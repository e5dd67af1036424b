"""Fold and verified ONNX export of the authors' classifiers beyond the paper's ten: main.py's other CIFAR models
and the main_imagenet.py topologies (the MNIST ones: tests/test_zoo_mnist.py; segmentation:
tests/test_segmentation_cli.py), in both forms, after train-mode steps so the whitening is far from the identity.

The ImageNet topologies are traced at 64x64 (their global pooling takes any size; 224x224 only costs time), but
VGG at 224x224 (its 7x7 adaptive pool must pool evenly), with 10 classes; the heaviest builds run in the full
suite only."""

from __future__ import annotations

import pytest
import timm
import torch
from test_fold import correlated_batch

import ndeconv.zoo
from ndeconv.convert import export_onnx, fold, fold_with_report, verify_onnx_for_model
from ndeconv.zoo import deconv_vgg_imagenet

pytestmark = pytest.mark.usefixtures("one_thread")
# One case per family and block type, both forms where the family's BatchNorm form differs in kind (VGG, ResNet,
# PNASNet): the other depths of a family are the same modules in another number (VGG-13/19, ResNet-34/34d/101d,
# VGG-16d; ResNet-34's BasicBlock is ResNet-18's, exported in tests/test_export.py). VGG-11d is traced at 224x224
# with a narrow classifier: the full suite only, as the ResNet-50s, DenseNet-121 and PNASNet-B (7 s per form).
CASES = [
    ("vgg11_deconv", True), ("vgg11_deconv", False), ("resnet50_deconv", True),
    ("pnasnet_b_deconv", True), ("pnasnet_b_deconv", False),
    ("resnet18_imagenet_deconv", True), ("resnet18_imagenet_deconv", False), ("resnet50_imagenet_deconv", True),
    ("densenet121_imagenet_deconv", True), ("vgg11_imagenet_deconv", True),
]
SLOW = {"resnet50_deconv", "resnet50_imagenet_deconv", "densenet121_imagenet_deconv", "vgg11_imagenet_deconv",
        "pnasnet_b_deconv"}


def _trained(name: str, deconv: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[torch.nn.Module, int]:
    size = 64 if name in ndeconv.zoo.IMAGENET_MODELS else 32
    if name.startswith("vgg") and name in ndeconv.zoo.IMAGENET_MODELS:
        size = 224  # VGG's 7x7 adaptive pool is only an ONNX pooling op where the map is a multiple of 7x7
        # The classifier's 4096-wide layers at 64: the same modules (Delinear, ReLU, Dropout, adaptive pool) in a
        # 2 MB export instead of a 0.5 GB one.
        monkeypatch.setattr(deconv_vgg_imagenet, "HIDDEN", 64)
    torch.manual_seed(0)
    model = timm.create_model(name, deconv=deconv, num_classes=10)
    model.train()
    with torch.no_grad():
        for seed in range(2):
            model(correlated_batch(8, 3, size, seed=seed))
    return model.eval(), size


@pytest.mark.parametrize("name, deconv", [c if c[0] not in SLOW else pytest.param(*c, marks=pytest.mark.slow)
                                          for c in CASES])
def test_folds_and_exports_verified_onnx(name: str, deconv: bool, tmp_path, monkeypatch) -> None:
    model, size = _trained(name, deconv, monkeypatch)
    x = correlated_batch(3, 3, size, seed=7)
    with torch.no_grad():
        ref = model(x)
        folded = fold(model)
        assert float((folded(x) - ref).abs().max() / ref.abs().max()) <= 1e-4
    result = export_onnx(model, tmp_path / "model.onnx", input_size=(3, size, size))
    verification = verify_onnx_for_model(result, batches=(1, 3))
    assert verification.max_rel <= 1e-4
    assert not {"Einsum", "ReduceSum", "Sqrt"} & set(verification.ops)


def test_imagenet_vgg_traces_so_its_batchnorms_fuse() -> None:
    # The classifier runs layer by layer: a slice of it would be a Sequential torch.fx cannot find in the model,
    # the trace would fail and the BN form's BatchNorms would stay in the folded network.
    torch.manual_seed(0)
    model = timm.create_model("vgg11_imagenet_deconv", deconv=False, batch_norm=True, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    plain, report = fold_with_report(model, example_input=x, fuse_batchnorm=True)
    assert report.traced and len(report.bn_fused) == 8 and not report.bn_kept
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
