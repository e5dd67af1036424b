"""MobileNetV2 (Sandler et al., Inverted Residuals and Linear Bottlenecks) as the ND authors built it.

The CIFAR model of the authors' ``models/mobilenetv2.py``: a stride-1 stem (CIFAR change), seventeen inverted
residual blocks (expand 1x1, depthwise 3x3, project 1x1), a 1x1 conv to 1280 channels and the classifier.
The second stage keeps stride 1 (CIFAR change). Module names and state_dict keys are the authors'.

Deconvolution form, with the authors' per-layer settings: the stem frozen with 10 Newton-Schulz iterations, the
depthwise conv whitened per channel with a single iteration, the projection whitened in blocks of the block's
*input* width with a single iteration, all other convs at the model-wide settings; no BatchNorm; a Delinear head.
BatchNorm form: bias-free convs, each followed by a BatchNorm2d (the authors' ``--deconv False`` baseline).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from ._builder import create_zoo_model, zoo_cfg, zoo_default_cfgs
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["MobileNetV2"]

# (expansion, out_chs, num_blocks, stride) per stage; the second stage's stride is 1 for 32x32 inputs.
STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """Expand 1x1 + depthwise 3x3 + linear projection 1x1; residual on every stride-1 block."""

    def __init__(self, in_chs: int, out_chs: int, expansion: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.stride = stride
        mid_chs = expansion * in_chs
        self.conv1 = settings.conv(in_chs, mid_chs, 1)
        self.bn1 = settings.norm(mid_chs)
        self.conv2 = settings.conv(mid_chs, mid_chs, 3, stride, 1, groups=mid_chs, n_iter=1)
        self.bn2 = settings.norm(mid_chs)
        self.conv3 = settings.conv(mid_chs, out_chs, 1, block=in_chs, n_iter=1)
        self.bn3 = settings.norm(out_chs)
        # Stride-1 blocks add a shortcut, projected by a 1x1 conv when the width changes (the authors' rule).
        if stride == 1 and in_chs != out_chs:
            self.shortcut = nn.Sequential(settings.conv(in_chs, out_chs, 1), settings.norm(out_chs))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(ZooClassifierMixin, nn.Module):
    """MobileNetV2 for 32x32 inputs (stride-1 stem and second stage), 1280 features."""

    stage_names = ("layers",)
    tail_names = ("conv2", "bn2", "deconv1")

    def __init__(
        self,
        stem_chs: int = 32,
        num_features: int = 1280,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...)."""
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self._init_stem(in_chans, stem_chs, freeze=True, n_iter=10)

        blocks: list[nn.Module] = []
        self.feature_info = []
        in_chs, reduction = stem_chs, 1
        for expansion, out_chs, num_blocks, stride in STAGES:
            reduction *= stride
            for i in range(num_blocks):
                blocks.append(InvertedResidual(in_chs, out_chs, expansion, stride if i == 0 else 1, settings))
                in_chs = out_chs
            self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"layers.{len(blocks) - 1}"))
        self.layers = nn.Sequential(*blocks)

        # The 1x1 conv to ``num_features`` after the last stage feeds only the head (as timm's conv_head).
        self.conv2 = settings.conv(in_chs, num_features, 1)
        self.bn2 = settings.norm(num_features)
        self.deconv1 = settings.channel_deconv(num_features)
        self._init_head(num_features, num_classes, global_pool, drop_rate)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_tail(F.relu(self.bn2(self.conv2(x))))


def _create_mobilenetv2(variant: str, pretrained: bool = False, **kwargs: Any) -> MobileNetV2:
    return create_zoo_model(MobileNetV2, variant, pretrained, feature_indices=tuple(range(len(STAGES))), **kwargs)


default_cfgs = zoo_default_cfgs({
    "mobilenetv2_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
    "mobilenetv2_deconv.fashion_mnist_stem": zoo_cfg(first_conv="conv1", classifier="linear"),
})


@register_model
def mobilenetv2_deconv(pretrained: bool = False, **kwargs: Any) -> MobileNetV2:
    """MobileNetV2 (CIFAR strides) with network deconvolution; ``deconv=False`` for the BN baseline."""
    return _create_mobilenetv2("mobilenetv2_deconv", pretrained, **kwargs)
