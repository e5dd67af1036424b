"""ResNet-18 for 32x32 inputs (He et al., arXiv:1512.03385) as the network deconvolution paper trains it.

Deconvolution form: every conv is a FastDeconv (the 3x3 stem whitens its 3 input channels as one block) and
there is no BatchNorm; BatchNorm form: the authors' baseline. Module names are the authors' (``conv1``,
``layer1.0.conv1``, ``layer1.0.shortcut.0``, ``linear``), so their state_dicts load unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._builder import create_zoo_model, zoo_cfg
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["BasicBlock", "ResNet"]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.conv1 = settings.conv(in_chs, planes, 3, stride, 1)
        self.bn1 = settings.norm(planes)
        self.conv2 = settings.conv(planes, planes, 3, 1, 1)
        self.bn2 = settings.norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chs != planes * self.expansion:
            # Deconvolution form: Sequential(FastDeconv 1x1); BatchNorm form: Sequential(Conv2d 1x1, BatchNorm2d).
            self.shortcut = nn.Sequential(settings.conv(in_chs, planes * self.expansion, 1, stride))
            if not settings.deconv:
                self.shortcut.append(settings.norm(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(ZooClassifierMixin, nn.Module):
    """The authors' CIFAR ResNet: 3x3 stem at full resolution, four stages of (64, 128, 256, 512) channels."""

    classifier_name = "linear"

    def __init__(
        self,
        layers: Sequence[int] = (2, 2, 2, 2),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self.conv1 = settings.conv(in_chans, 64, 3, 1, 1)
        self.bn1 = settings.norm(64)
        in_chs = 64
        self.feature_info: list[dict[str, Any]] = []
        for idx, (planes, count) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for block_idx in range(count):
                stride = 2 if idx > 0 and block_idx == 0 else 1
                blocks.append(BasicBlock(in_chs, planes, stride, settings))
                in_chs = planes * BasicBlock.expansion
            self.add_module(f"layer{idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=2**idx, module=f"layer{idx + 1}"))
        # The reference's optional ChannelDeconv on the last feature map (--delinear False --block-fc N).
        self.deconv1 = settings.channel_deconv()
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self.run_stage(stage, x)
        if self.deconv1 is not None:
            x = self.deconv1(x)
        return x


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    return create_zoo_model(ResNet, variant, pretrained, feature_indices=(0, 1, 2, 3), **kwargs)


default_cfgs = generate_default_cfgs({
    "resnet18_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
})


@register_model
def resnet18_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 (11.2M parameters) with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    return _create_resnet("resnet18_deconv", pretrained, **dict(dict(layers=(2, 2, 2, 2)), **kwargs))
