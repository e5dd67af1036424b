"""Pre-activation ResNet-18 for 32x32 inputs (He et al., arXiv:1603.05027) as the deconvolution paper trains it.

Deconvolution form: FastDeconv everywhere, a frozen 10-iteration stem, no BatchNorm. BatchNorm form: the
authors' baseline, including their quirk that the stem's ``bn1`` exists (it is in their state_dicts and
parameter count) but is never applied. The projection shortcut is a bare FastDeconv in the deconvolution
form (key ``shortcut.weight``) and ``Sequential(Conv2d)`` in the BatchNorm form (``shortcut.0.weight``).
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

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.bn1 = settings.norm(in_chs)
        self.conv1 = settings.conv(in_chs, planes, 3, stride, 1)
        self.bn2 = settings.norm(planes)
        self.conv2 = settings.conv(planes, planes, 3, 1, 1)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != planes * self.expansion:
            conv = settings.conv(in_chs, planes * self.expansion, 1, stride)
            self.shortcut = conv if settings.deconv else nn.Sequential(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input; the identity sees the raw one (as the authors').
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(ZooClassifierMixin, nn.Module):
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
        self.conv1 = settings.conv(in_chans, 64, 3, 1, 1, freeze=True, n_iter=10)
        # The authors' BatchNorm form builds bn1 but its forward skips it: kept for their state_dicts, unused.
        self.bn1 = settings.norm(64)
        in_chs = 64
        self.feature_info: list[dict[str, Any]] = []
        for idx, (planes, count) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            blocks = []
            for block_idx in range(count):
                stride = 2 if idx > 0 and block_idx == 0 else 1
                blocks.append(PreActBlock(in_chs, planes, stride, settings))
                in_chs = planes * PreActBlock.expansion
            self.add_module(f"layer{idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=2**idx, module=f"layer{idx + 1}"))
        self.deconv1 = settings.channel_deconv()
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # no activation: each pre-activation block starts with its own
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self.run_stage(stage, x)
        if self.deconv1 is not None:
            x = self.deconv1(x)
        return x


def _create_preact_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    return create_zoo_model(PreActResNet, variant, pretrained, feature_indices=(0, 1, 2, 3), **kwargs)


default_cfgs = generate_default_cfgs({
    "preact_resnet18_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
})


@register_model
def preact_resnet18_deconv(pretrained: bool = False, **kwargs: Any) -> PreActResNet:
    """Pre-activation ResNet-18 with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    return _create_preact_resnet("preact_resnet18_deconv", pretrained, **dict(dict(layers=(2, 2, 2, 2)), **kwargs))
