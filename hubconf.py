"""torch.hub entrypoints for the ndeconv zoo: ``torch.hub.load(REPO, 'resnet18_deconv', pretrained=False)``.

One documented entrypoint per zoo model (not a re-export of timm's registry). Each takes timm's keywords
(``num_classes``, ``in_chans``, ``drop_rate``, ``global_pool``) and the deconvolution switches (``deconv=False``
for the authors' BatchNorm baseline, ``block``, ``block_fc``, ``deconv_iter``, ...). ``pretrained=True`` loads the
default tag's weights (Fashion-MNIST) through timm, or fails with a message naming where it looked; ``tag=`` picks
another tag (``tag='fashion_mnist_stem'``: the hybrid's weights, which builds the hybrid), as timm's
``name.tag``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch.hub.list() takes every public callable here as an entrypoint: keep typing names out
    from typing import Any

dependencies = ["torch", "timm", "safetensors", "huggingface_hub"]


def _create(name: str, pretrained: bool, tag: str | None = None, **kwargs: Any):
    # ndeconv's create_model: timm.create_model for the models registered with timm, the same for the two that
    # are not (mlp_deconv, simple_v1_deconv: no feature maps for timm's contract).
    from ndeconv.zoo import create_model

    return create_model(f"{name}.{tag}" if tag else name, pretrained=pretrained, **kwargs)


def vgg16_deconv(pretrained: bool = False, **kwargs: Any):
    """VGG-16 (CIFAR topology) with network deconvolution (frozen 15-iteration stem, Delinear head)."""
    return _create("vgg16_deconv", pretrained, **kwargs)


def resnet18_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNet-18 (CIFAR topology) with network deconvolution: FastDeconv convs, no BatchNorm, Delinear head."""
    return _create("resnet18_deconv", pretrained, **kwargs)


def preact_resnet18_deconv(pretrained: bool = False, **kwargs: Any):
    """Pre-activation ResNet-18 with network deconvolution (frozen 10-iteration stem)."""
    return _create("preact_resnet18_deconv", pretrained, **kwargs)


def densenet121_deconv(pretrained: bool = False, **kwargs: Any):
    """DenseNet-121 (CIFAR topology) with network deconvolution."""
    return _create("densenet121_deconv", pretrained, **kwargs)


def resnext29_32x4d_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNeXt-29 (32x4d) with network deconvolution (grouped FastDeconv in the 3x3 convs)."""
    return _create("resnext29_32x4d_deconv", pretrained, **kwargs)


def mobilenetv2_deconv(pretrained: bool = False, **kwargs: Any):
    """MobileNetV2 (CIFAR topology) with network deconvolution (depthwise FastDeconv)."""
    return _create("mobilenetv2_deconv", pretrained, **kwargs)


def dpn92_deconv(pretrained: bool = False, **kwargs: Any):
    """DPN-92 (dual path network, CIFAR topology) with network deconvolution."""
    return _create("dpn92_deconv", pretrained, **kwargs)


def pnasnet_a_deconv(pretrained: bool = False, **kwargs: Any):
    """PNASNet-A (CIFAR topology) with network deconvolution."""
    return _create("pnasnet_a_deconv", pretrained, **kwargs)


def senet18_deconv(pretrained: bool = False, **kwargs: Any):
    """SENet-18 with network deconvolution (the squeeze-excitation convs deconvolved too)."""
    return _create("senet18_deconv", pretrained, **kwargs)


def efficientnet_b0_deconv(pretrained: bool = False, **kwargs: Any):
    """EfficientNet-B0 (CIFAR topology); as the authors, only the stem and the head are deconvolved."""
    return _create("efficientnet_b0_deconv", pretrained, **kwargs)


# -- the authors' other main.py CIFAR models (``--arch vgg11 vgg13 vgg19 resnet34 resnet50 pnasnetB``): no weights --


def vgg11_deconv(pretrained: bool = False, **kwargs: Any):
    """VGG-11 (CIFAR topology, ``main.py --arch vgg11``) with network deconvolution; ``deconv=False`` for BN."""
    return _create("vgg11_deconv", pretrained, **kwargs)


def vgg13_deconv(pretrained: bool = False, **kwargs: Any):
    """VGG-13 (CIFAR topology, ``main.py --arch vgg13``) with network deconvolution; ``deconv=False`` for BN."""
    return _create("vgg13_deconv", pretrained, **kwargs)


def vgg19_deconv(pretrained: bool = False, **kwargs: Any):
    """VGG-19 (CIFAR topology, ``main.py --arch vgg19``) with network deconvolution; ``deconv=False`` for BN."""
    return _create("vgg19_deconv", pretrained, **kwargs)


def resnet34_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNet-34 (CIFAR topology, ``main.py --arch resnet34``) with network deconvolution."""
    return _create("resnet34_deconv", pretrained, **kwargs)


def resnet50_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNet-50 (CIFAR topology, ``main.py --arch resnet50``, bottleneck blocks) with network deconvolution."""
    return _create("resnet50_deconv", pretrained, **kwargs)


def pnasnet_b_deconv(pretrained: bool = False, **kwargs: Any):
    """PNASNet-B (CIFAR topology, ``main.py --arch pnasnetB``) with network deconvolution."""
    return _create("pnasnet_b_deconv", pretrained, **kwargs)


# -- the authors' MNIST-sized models (``main.py --arch mlp simple_v1 simple_v2``): 28x28 gray input, no weights --


def mlp_deconv(pretrained: bool = False, **kwargs: Any):
    """The authors' MLP (``main.py --arch mlp``: 784-128-128-classes, sigmoids) with ChannelDeconv whitening;
    ``deconv=False`` for its BatchNorm1d form."""
    return _create("mlp_deconv", pretrained, **kwargs)


def simple_v1_deconv(pretrained: bool = False, **kwargs: Any):
    """The authors' one-conv ``SimpleCNN_v1`` (``main.py --arch simple_v1``) as a FastDeconv; ``deconv=False``: a
    plain Conv2d."""
    return _create("simple_v1_deconv", pretrained, **kwargs)


def simple_v2_deconv(pretrained: bool = False, **kwargs: Any):
    """The authors' twelve-conv ``SimpleCNN_v2`` (``main.py --arch simple_v2``) with FastDeconv; ``deconv=False``:
    Conv2d + BatchNorm2d."""
    return _create("simple_v2_deconv", pretrained, **kwargs)


# -- the authors' ImageNet models (main_imagenet.py, the paper's Table 2): 224x224, 1000 classes, no weights --------


def resnet18_imagenet_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNet-18, ImageNet topology, with network deconvolution (the authors' ``resnet18d``); ``deconv=False`` is
    torchvision's ``resnet18``."""
    return _create("resnet18_imagenet_deconv", pretrained, **kwargs)


def resnet34_imagenet_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNet-34, ImageNet topology, with network deconvolution (the authors' ``resnet34d``)."""
    return _create("resnet34_imagenet_deconv", pretrained, **kwargs)


def resnet50_imagenet_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNet-50, ImageNet topology, with network deconvolution (the authors' ``resnet50d``)."""
    return _create("resnet50_imagenet_deconv", pretrained, **kwargs)


def resnet101_imagenet_deconv(pretrained: bool = False, **kwargs: Any):
    """ResNet-101, ImageNet topology, with network deconvolution (the authors' ``resnet101d``)."""
    return _create("resnet101_imagenet_deconv", pretrained, **kwargs)


def vgg11_imagenet_deconv(pretrained: bool = False, **kwargs: Any):
    """VGG-11, ImageNet topology, with network deconvolution (the authors' ``vgg11d``); ``deconv=False`` is
    torchvision's ``vgg11`` (no BatchNorm), ``deconv=False, batch_norm=True`` torchvision's ``vgg11_bn``."""
    return _create("vgg11_imagenet_deconv", pretrained, **kwargs)


def vgg16_imagenet_deconv(pretrained: bool = False, **kwargs: Any):
    """VGG-16, ImageNet topology, with network deconvolution (the authors' ``vgg16d``); ``deconv=False`` is
    torchvision's ``vgg16`` (no BatchNorm), ``deconv=False, batch_norm=True`` torchvision's ``vgg16_bn``."""
    return _create("vgg16_imagenet_deconv", pretrained, **kwargs)


def densenet121_imagenet_deconv(pretrained: bool = False, **kwargs: Any):
    """DenseNet-121, ImageNet topology, with network deconvolution (the authors' ``densenet121d``)."""
    return _create("densenet121_imagenet_deconv", pretrained, **kwargs)


# -- segmentation (Segmentation/train.py): torchvision's builder conventions, output {'out', 'aux'} ----------------


def _segmentation(name: str, pretrained: bool, **kwargs: Any):
    from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

    return SEGMENTATION_MODELS[name](pretrained=pretrained, **kwargs)


def fcn_resnet50_deconv(pretrained: bool = False, **kwargs: Any):
    """FCN on a dilated ResNet-50 with network deconvolution (the authors' ``fcn_resnet50d``): ``num_classes=21``,
    ``aux_loss`` as torchvision's; ``deconv=False`` is torchvision's ``fcn_resnet50``."""
    return _segmentation("fcn_resnet50_deconv", pretrained, **kwargs)


def fcn_resnet101_deconv(pretrained: bool = False, **kwargs: Any):
    """FCN on a dilated ResNet-101 with network deconvolution (the authors' ``fcn_resnet101d``)."""
    return _segmentation("fcn_resnet101_deconv", pretrained, **kwargs)


def deeplabv3_resnet50_deconv(pretrained: bool = False, **kwargs: Any):
    """DeepLabV3 on a dilated ResNet-50 with network deconvolution (the authors' ``deeplabv3_resnet50d``)."""
    return _segmentation("deeplabv3_resnet50_deconv", pretrained, **kwargs)


def deeplabv3_resnet101_deconv(pretrained: bool = False, **kwargs: Any):
    """DeepLabV3 on a dilated ResNet-101 with network deconvolution (the authors' ``deeplabv3_resnet101d``)."""
    return _segmentation("deeplabv3_resnet101_deconv", pretrained, **kwargs)
