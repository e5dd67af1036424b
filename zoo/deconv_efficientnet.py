"""EfficientNet-B0 for 32x32 inputs (Tan & Le, arXiv:1905.11946) as the deconvolution paper trains it.

The authors deconvolve only the stem (a frozen 10-iteration FastDeconv) and the head (Delinear): their
``_make_layers`` passes ``deconv=None``, so the MBConv blocks keep BatchNorm in both forms. We build the
same. Each block: 1x1 expand, 3x3 depthwise, 1x1 project, squeeze-excitation gate (``fc1``, ``fc2``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.adaptive_avgmax_pool import adaptive_pool_feat_mult
from timm.models import register_model
from torch import nn

from ._builder import create_zoo_model, zoo_cfg, zoo_default_cfgs
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["EfficientNet", "MBConvBlock"]

# (expansion, out_chs, num_blocks, stride) per stage, the authors' B0 for 32x32.
B0_STAGES = ((1, 16, 1, 2), (6, 24, 2, 1), (6, 40, 2, 2), (6, 80, 3, 2), (6, 112, 3, 1), (6, 192, 4, 2), (6, 320, 1, 2))


class MBConvBlock(nn.Module):
    """Expand + depthwise + project + squeeze-excitation, in the BatchNorm form (see the module docstring)."""

    def __init__(self, in_chs: int, out_chs: int, expansion: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.stride = stride
        mid = expansion * in_chs
        self.conv1 = settings.conv(in_chs, mid, 1)
        self.bn1 = settings.norm(mid)
        self.conv2 = settings.conv(mid, mid, 3, stride, 1, groups=mid)
        self.bn2 = settings.norm(mid)
        self.conv3 = settings.conv(mid, out_chs, 1)
        self.bn3 = settings.norm(out_chs)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_chs != out_chs:
            self.shortcut = nn.Sequential(settings.conv(in_chs, out_chs, 1), settings.norm(out_chs))
        self.fc1 = nn.Conv2d(out_chs, out_chs // 16, 1)
        self.fc2 = nn.Conv2d(out_chs // 16, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # A strided block adds its own output (the authors' residual), a stride-1 block its input.
        shortcut = self.shortcut(x) if self.stride == 1 else out
        w = F.avg_pool2d(out, out.size(2))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return out * w + shortcut


class EfficientNet(ZooClassifierMixin, nn.Module):
    stage_names = ("layers",)
    # The reference's optional ChannelDeconv acts on the pooled features (in forward_head), not on the last map.
    tail_names = ("deconv1",)

    def __init__(
        self,
        stages: Sequence[Sequence[int]] = B0_STAGES,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self._init_stem(in_chans, 32, freeze=True, n_iter=10)
        block_settings = dataclasses.replace(settings, deconv=False)  # the blocks are BatchNorm in both forms
        blocks, in_chs, reduction = [], 32, 1
        self.feature_info = []
        for expansion, out_chs, count, stride in stages:
            for block_idx in range(count):
                blocks.append(MBConvBlock(in_chs, out_chs, expansion, stride if block_idx == 0 else 1, block_settings))
                in_chs = out_chs
            reduction *= stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"layers.{len(blocks) - 1}"))
        self.layers = nn.Sequential(*blocks)
        # The authors apply it to the flattened pooled features (twice as many with catavgmax pooling).
        self.deconv1 = settings.channel_deconv(in_chs * adaptive_pool_feat_mult(global_pool), input_dim=2)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.deconv1 is not None:
            x = self.deconv1(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear(x)


def _create_efficientnet(variant: str, pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    stages = kwargs.get("stages", B0_STAGES)
    return create_zoo_model(EfficientNet, variant, pretrained, feature_indices=tuple(range(len(stages))), **kwargs)


default_cfgs = zoo_default_cfgs({
    "efficientnet_b0_deconv.fashion_mnist_e20": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(1, 1)),
    "efficientnet_b0_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(1, 1)),
    "efficientnet_b0_deconv.fashion_mnist_stem": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(1, 1)),
})


@register_model
def efficientnet_b0_deconv(pretrained: bool = False, **kwargs: Any) -> EfficientNet:
    """EfficientNet-B0 (deconvolved stem and head); ``deconv=False`` gives the BatchNorm baseline."""
    model_args = dict(stages=B0_STAGES)
    return _create_efficientnet("efficientnet_b0_deconv", pretrained, **dict(model_args, **kwargs))
