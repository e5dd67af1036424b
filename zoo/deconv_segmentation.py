"""Semantic segmentation as the deconvolution paper trains it on Cityscapes (the authors' ``Segmentation/train.py``
``--model fcn_resnet50d`` ...): torchvision's FCN and DeepLabV3 on a dilated ResNet-50/101.

Built as torchvision's builders build them (``torchvision.models.segmentation.fcn_resnet50`` ...): the ImageNet
ResNet (``ndeconv.zoo.deconv_resnet_imagenet``) with layer3 and layer4 dilated instead of strided (output stride
8), wrapped in ``IntermediateLayerGetter`` (``layer4`` -> ``out``, ``layer3`` -> ``aux``), the head on ``out`` and,
with ``aux_loss``, an FCN head on ``aux``; ``forward`` returns ``{'out': ..., 'aux': ...}`` upsampled (bilinear) to
the input's size. ``num_classes=21`` and ``aux_loss=None`` (no auxiliary head) are the defaults of both
torchvision's builders and the authors'.

Deconvolution form (the authors' ``*_resnet50d`` with ``--deconv True``): the backbone as their ``resnetd`` (every
conv a FastDeconv, a BatchNorm after each projection shortcut's conv; the 3x3 convs of at most 64 input channels
pinned to sampling stride 3), the heads' convs FastDeconv with bias (their ``FCNHead_deconv``,
``DeepLabHead_deconv``, ASPP: no BatchNorm; each head's last 1x1 conv whitens its input as one block). BatchNorm
form (``deconv=False``): torchvision's ``fcn_resnet50`` ... exactly (same state_dict keys and shapes).

These are not timm models (timm has no segmentation API): ``torch.hub.load(REPO, 'fcn_resnet50_deconv', ...)``
or the builders here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

from ndeconv.errors import UsageError

from ._layer_factory import DeconvSettings
from .deconv_resnet_imagenet import Bottleneck, ResNet

__all__ = [
    "SEGMENTATION_MODELS",
    "deeplabv3_resnet50_deconv",
    "deeplabv3_resnet101_deconv",
    "fcn_resnet50_deconv",
    "fcn_resnet101_deconv",
]

ATROUS_RATES = (12, 24, 36)
ASPP_CHANNELS = 256


def _fcn_head(in_chs: int, num_classes: int, settings: DeconvSettings) -> nn.Sequential:
    if not settings.body_deconv:
        return FCNHead(in_chs, num_classes)
    inter = in_chs // 4
    # The authors' FCNHead_deconv: bias=True whatever --bias; the last conv whitens all its inputs as one block.
    return nn.Sequential(
        settings.conv(in_chs, inter, 3, 1, 1, bias=True), nn.ReLU(), nn.Dropout(0.1),
        settings.conv(inter, num_classes, 1, bias=True, block=inter),
    )


class _DeconvASPPPooling(nn.Sequential):
    """torchvision's ASPPPooling with the conv a FastDeconv (with bias) and no BatchNorm."""

    def __init__(self, in_chs: int, out_chs: int, settings: DeconvSettings) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), settings.conv(in_chs, out_chs, 1, bias=True), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class DeconvASPP(nn.Module):
    """torchvision's ASPP (``convs``: 1x1, three dilated 3x3, image pooling; ``project``) as the authors' deconvolution
    form: every conv a FastDeconv with bias, no BatchNorm (same module names as torchvision's, minus the norms)."""

    def __init__(self, in_chs: int, atrous_rates: Sequence[int], settings: DeconvSettings,
                 out_chs: int = ASPP_CHANNELS) -> None:
        super().__init__()
        convs: list[nn.Module] = [nn.Sequential(settings.conv(in_chs, out_chs, 1, bias=True), nn.ReLU())]
        for rate in atrous_rates:
            convs.append(nn.Sequential(settings.conv(in_chs, out_chs, 3, 1, rate, dilation=rate, bias=True),
                                       nn.ReLU()))
        convs.append(_DeconvASPPPooling(in_chs, out_chs, settings))
        self.convs = nn.ModuleList(convs)
        self.project = nn.Sequential(
            settings.conv(len(convs) * out_chs, out_chs, 1, bias=True), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def _deeplab_head(in_chs: int, num_classes: int, settings: DeconvSettings) -> nn.Sequential:
    if not settings.body_deconv:
        return DeepLabHead(in_chs, num_classes)
    return nn.Sequential(
        DeconvASPP(in_chs, ATROUS_RATES, settings),
        settings.conv(ASPP_CHANNELS, ASPP_CHANNELS, 3, 1, 1, bias=True), nn.ReLU(),
        settings.conv(ASPP_CHANNELS, num_classes, 1, bias=True, block=ASPP_CHANNELS),
    )


_HEADS: dict[str, tuple[Callable[[int, int, DeconvSettings], nn.Module], type[nn.Module]]] = {
    "fcn": (_fcn_head, FCN),
    "deeplabv3": (_deeplab_head, DeepLabV3),
}


def _segmentation_model(
    variant: str, head: str, layers: Sequence[int], pretrained: bool = False, num_classes: int = 21,
    aux_loss: bool | None = None, in_chans: int = 3, **deconv_kwargs: Any,
) -> nn.Module:
    if pretrained:
        raise UsageError(f"{variant}: no pretrained weights exist (the authors released no segmentation checkpoints "
                         "and none are shipped); build it with pretrained=False and load your own state_dict")
    settings = DeconvSettings(**dict(deconv_kwargs, block_fc=0))
    # The backbone's own classifier is never run (IntermediateLayerGetter stops after layer4): built without one.
    resnet = ResNet(Bottleneck, layers, replace_stride_with_dilation=(False, True, True), small_sampling_stride=3,
                    num_classes=0, in_chans=in_chans, **settings.to_dict())
    return_layers = {"layer4": "out"}
    if aux_loss:
        return_layers["layer3"] = "aux"
    backbone = IntermediateLayerGetter(resnet, return_layers=return_layers)
    make_head, model_cls = _HEADS[head]
    aux_classifier = _fcn_head(1024, num_classes, settings) if aux_loss else None
    model = model_cls(backbone, make_head(2048, num_classes, settings), aux_classifier)
    # What built it, for converters and configs (the zoo's classification models carry the same attribute).
    model.deconv_settings = settings
    model.num_classes = num_classes
    return model


def fcn_resnet50_deconv(pretrained: bool = False, num_classes: int = 21, aux_loss: bool | None = None,
                        **kwargs: Any) -> nn.Module:
    """FCN on a dilated ResNet-50 with network deconvolution (the authors' ``fcn_resnet50d``); ``deconv=False``
    gives torchvision's ``fcn_resnet50``."""
    return _segmentation_model("fcn_resnet50_deconv", "fcn", (3, 4, 6, 3), pretrained, num_classes, aux_loss,
                               **kwargs)


def fcn_resnet101_deconv(pretrained: bool = False, num_classes: int = 21, aux_loss: bool | None = None,
                         **kwargs: Any) -> nn.Module:
    """FCN on a dilated ResNet-101 with network deconvolution (the authors' ``fcn_resnet101d``); ``deconv=False``
    gives torchvision's ``fcn_resnet101``."""
    return _segmentation_model("fcn_resnet101_deconv", "fcn", (3, 4, 23, 3), pretrained, num_classes, aux_loss,
                               **kwargs)


def deeplabv3_resnet50_deconv(pretrained: bool = False, num_classes: int = 21, aux_loss: bool | None = None,
                              **kwargs: Any) -> nn.Module:
    """DeepLabV3 on a dilated ResNet-50 with network deconvolution (the authors' ``deeplabv3_resnet50d``);
    ``deconv=False`` gives torchvision's ``deeplabv3_resnet50``."""
    return _segmentation_model("deeplabv3_resnet50_deconv", "deeplabv3", (3, 4, 6, 3), pretrained, num_classes,
                               aux_loss, **kwargs)


def deeplabv3_resnet101_deconv(pretrained: bool = False, num_classes: int = 21, aux_loss: bool | None = None,
                               **kwargs: Any) -> nn.Module:
    """DeepLabV3 on a dilated ResNet-101 with network deconvolution (the authors' ``deeplabv3_resnet101d``);
    ``deconv=False`` gives torchvision's ``deeplabv3_resnet101``."""
    return _segmentation_model("deeplabv3_resnet101_deconv", "deeplabv3", (3, 4, 23, 3), pretrained, num_classes,
                               aux_loss, **kwargs)


# Builder of each segmentation model by name (hubconf, the converter and the commands look them up here).
SEGMENTATION_MODELS: dict[str, Callable[..., nn.Module]] = {
    "fcn_resnet50_deconv": fcn_resnet50_deconv,
    "fcn_resnet101_deconv": fcn_resnet101_deconv,
    "deeplabv3_resnet50_deconv": deeplabv3_resnet50_deconv,
    "deeplabv3_resnet101_deconv": deeplabv3_resnet101_deconv,
}
