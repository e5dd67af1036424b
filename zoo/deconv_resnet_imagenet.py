"""ResNet-18/34/50/101 for 224x224 inputs (He et al., arXiv:1512.03385) as the deconvolution paper trains them on
ImageNet (its Table 2, the authors' ``main_imagenet.py -a resnet18d ...``), one class parameterised by its block
(as timm's resnet.py).

torchvision's topology and module names (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``,
``fc``): a 7x7 stride-2 stem and a 3x3 max pool, four stages of ``BasicBlock`` or ``Bottleneck`` (stride in the
3x3 conv), adaptive average pooling. Deconvolution form (the authors' ``resnet18d``): every conv a FastDeconv, the
stem frozen with 15 iterations, no BatchNorm in the blocks but still one after each projection shortcut's conv
(``downsample.1``: their ``_make_layer`` always appends its norm layer), a Delinear head with ``--block-fc 64``.
BatchNorm form (``deconv=False``): exactly torchvision's ``resnet18`` ... ``resnet101``, the paper's baseline (same
state_dict keys and shapes).

``replace_stride_with_dilation`` dilates the last stages instead of striding them (torchvision's option), which
the segmentation models' backbones use (``ndeconv.zoo.deconv_segmentation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ndeconv.layers import FastDeconv

from ._builder import create_zoo_model
from ._head import ZooClassifierMixin
from ._imagenet import imagenet_cfg, imagenet_kwargs
from ._layer_factory import DeconvSettings

__all__ = ["BasicBlock", "Bottleneck", "ResNet"]


class BasicBlock(nn.Module):
    """Two 3x3 convs, post-activation (torchvision's)."""

    expansion = 1

    def __init__(
        self, in_chs: int, planes: int, stride: int, downsample: nn.Module | None, settings: DeconvSettings,
        dilation: int = 1, small_sampling_stride: int | None = None,
    ) -> None:
        super().__init__()
        if dilation > 1:
            raise ValueError("BasicBlock has no dilated form (as torchvision's): use Bottleneck for a dilated ResNet")
        self.conv1 = _conv3x3(settings, in_chs, planes, stride, 1, small_sampling_stride)
        self.bn1 = settings.norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(settings, planes, planes, 1, 1, small_sampling_stride)
        self.bn2 = settings.norm(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride and the dilation), 1x1 expand by 4 (torchvision's ResNet v1.5)."""

    expansion = 4

    def __init__(
        self, in_chs: int, planes: int, stride: int, downsample: nn.Module | None, settings: DeconvSettings,
        dilation: int = 1, small_sampling_stride: int | None = None,
    ) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = settings.conv(in_chs, planes, 1)
        self.bn1 = settings.norm(planes)
        self.conv2 = _conv3x3(settings, planes, planes, stride, dilation, small_sampling_stride)
        self.bn2 = settings.norm(planes)
        self.conv3 = settings.conv(planes, out_chs, 1)
        self.bn3 = settings.norm(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _conv3x3(
    settings: DeconvSettings, in_chs: int, out_chs: int, stride: int, dilation: int, small_sampling_stride: int | None,
) -> nn.Module:
    # The segmentation script's backbone pins sampling_stride=3 on the 3x3 convs of at most 64 input channels,
    # whatever --stride says (``small_sampling_stride``); the ImageNet script's takes --stride everywhere.
    overrides = dict(sampling_stride=small_sampling_stride) if small_sampling_stride and in_chs <= 64 else {}
    return settings.conv(in_chs, out_chs, 3, stride, dilation, dilation=dilation, **overrides)


class ResNet(ZooClassifierMixin, nn.Module):
    """The authors' ImageNet ResNet: stem (``conv1``, ``bn1``, ``relu``, ``maxpool``), ``layer1``..``layer4`` of
    ``block_fn`` blocks, the optional ChannelDeconv (``deconv1``) and the ``fc`` head.

    The children are registered in the order they run, as torchvision's, so ``IntermediateLayerGetter`` (the
    segmentation models' backbone wrapper) runs the stem and stages from them directly.
    """

    classifier_name = "fc"

    def __init__(
        self,
        block_fn: type[BasicBlock | Bottleneck] = BasicBlock,
        layers: Sequence[int] = (2, 2, 2, 2),
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        small_sampling_stride: int | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...);
        ``small_sampling_stride`` is the segmentation backbone's pinned sampling stride (see ``_conv3x3``)."""
        super().__init__()
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation takes 3 flags (layer2..layer4), got "
                             f"{tuple(replace_stride_with_dilation)}")
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        in_chs = 64
        # The authors' stem: frozen after 100 iterations, 15 Newton-Schulz steps, sampling stride 3 whatever --stride.
        self.conv1 = settings.stem_conv(in_chans, in_chs, 7, 2, 3, freeze=True, n_iter=15, sampling_stride=3)
        self.bn1 = settings.stem_norm(in_chs)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        self.feature_info = []
        dilation, reduction = 1, 4
        for idx, (planes, count) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if idx == 0 else 2
            previous_dilation = dilation
            if idx > 0 and replace_stride_with_dilation[idx - 1]:
                dilation *= stride
                stride = 1
            reduction *= stride
            out_chs = planes * block_fn.expansion
            downsample = None
            if stride != 1 or in_chs != out_chs:
                # A BatchNorm after the projection in both forms: the authors' _make_layer appends its norm layer
                # (BatchNorm2d) whether or not the conv is a FastDeconv.
                downsample = nn.Sequential(settings.conv(in_chs, out_chs, 1, stride), nn.BatchNorm2d(out_chs))
            blocks = [block_fn(in_chs, planes, stride, downsample, settings, previous_dilation, small_sampling_stride)]
            blocks += [block_fn(out_chs, planes, 1, None, settings, dilation, small_sampling_stride)
                       for _ in range(1, count)]
            in_chs = out_chs
            self.add_module(f"layer{idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{idx + 1}"))
        self.stage_names = tuple(info["module"] for info in self.feature_info)
        self.deconv1 = settings.channel_deconv(in_chs)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's (and the authors') initialisation: He normal, fan_out, on every conv, FastDeconv included.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, FastDeconv)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    kwargs = imagenet_kwargs(variant, pretrained, kwargs)
    feature_indices = tuple(range(len(kwargs["layers"])))  # every stage's output
    return create_zoo_model(ResNet, variant, pretrained, feature_indices=feature_indices, **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_imagenet_deconv": imagenet_cfg(first_conv="conv1", classifier="fc"),
    "resnet34_imagenet_deconv": imagenet_cfg(first_conv="conv1", classifier="fc"),
    "resnet50_imagenet_deconv": imagenet_cfg(first_conv="conv1", classifier="fc"),
    "resnet101_imagenet_deconv": imagenet_cfg(first_conv="conv1", classifier="fc"),
})


@register_model
def resnet18_imagenet_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18, ImageNet topology, with network deconvolution (the authors' ``resnet18d``); ``deconv=False``
    gives torchvision's ``resnet18``."""
    model_args = dict(block_fn=BasicBlock, layers=(2, 2, 2, 2))
    return _create_resnet("resnet18_imagenet_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_imagenet_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34, ImageNet topology, with network deconvolution (the authors' ``resnet34d``); ``deconv=False``
    gives torchvision's ``resnet34``."""
    model_args = dict(block_fn=BasicBlock, layers=(3, 4, 6, 3))
    return _create_resnet("resnet34_imagenet_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_imagenet_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50, ImageNet topology, with network deconvolution (the authors' ``resnet50d``); ``deconv=False``
    gives torchvision's ``resnet50``."""
    model_args = dict(block_fn=Bottleneck, layers=(3, 4, 6, 3))
    return _create_resnet("resnet50_imagenet_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet101_imagenet_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-101, ImageNet topology, with network deconvolution (the authors' ``resnet101d``); ``deconv=False``
    gives torchvision's ``resnet101``."""
    model_args = dict(block_fn=Bottleneck, layers=(3, 4, 23, 3))
    return _create_resnet("resnet101_imagenet_deconv", pretrained, **dict(model_args, **kwargs))
