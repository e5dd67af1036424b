"""SENet-18 for 32x32 inputs (Hu et al., arXiv:1709.01507) as the deconvolution paper trains it.

The authors' SENet-18 is built from pre-activation blocks with a squeeze-excitation gate (1x1 convs ``fc1``,
``fc2``). Deconvolution form: every conv, the gate's included, is a FastDeconv; the stem is frozen with 15
iterations. BatchNorm form: the authors' baseline (the gate convs keep their bias there).
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

__all__ = ["SEPreActBlock", "SENet"]


def _gate_conv(settings: DeconvSettings, in_chs: int, out_chs: int) -> nn.Module:
    """A squeeze-excitation 1x1 conv: FastDeconv, or a Conv2d *with* bias in the BatchNorm form."""
    return settings.conv(in_chs, out_chs, 1) if settings.deconv else nn.Conv2d(in_chs, out_chs, 1)


class SEPreActBlock(nn.Module):
    def __init__(self, in_chs: int, planes: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.bn1 = settings.norm(in_chs)
        self.conv1 = settings.conv(in_chs, planes, 3, stride, 1)
        self.bn2 = settings.norm(planes)
        self.conv2 = settings.conv(planes, planes, 3, 1, 1)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != planes:
            conv = settings.conv(in_chs, planes, 1, stride)
            self.shortcut = conv if settings.deconv else nn.Sequential(conv)
        self.fc1 = _gate_conv(settings, planes, planes // 16)
        self.fc2 = _gate_conv(settings, planes // 16, planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        w = F.avg_pool2d(out, out.size(2))  # squeeze (square maps, as the authors assume)
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return out * w + shortcut


class SENet(ZooClassifierMixin, nn.Module):
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
        self.conv1 = settings.conv(in_chans, 64, 3, 1, 1, freeze=True, n_iter=15)
        self.bn1 = settings.norm(64)
        in_chs = 64
        self.feature_info: list[dict[str, Any]] = []
        for idx, (planes, count) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for block_idx in range(count):
                stride = 2 if idx > 0 and block_idx == 0 else 1
                blocks.append(SEPreActBlock(in_chs, planes, stride, settings))
                in_chs = planes
            self.add_module(f"layer{idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=2**idx, module=f"layer{idx + 1}"))
        self.deconv1 = settings.channel_deconv()
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self.run_stage(stage, x)
        if self.deconv1 is not None:
            x = self.deconv1(x)
        return x


def _create_senet(variant: str, pretrained: bool = False, **kwargs: Any) -> SENet:
    return create_zoo_model(SENet, variant, pretrained, feature_indices=(0, 1, 2, 3), **kwargs)


default_cfgs = generate_default_cfgs({
    "senet18_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
})


@register_model
def senet18_deconv(pretrained: bool = False, **kwargs: Any) -> SENet:
    """SENet-18 with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    return _create_senet("senet18_deconv", pretrained, **dict(dict(layers=(2, 2, 2, 2)), **kwargs))
