"""ResNeXt-29 32x4d (Xie et al., Aggregated Residual Transformations) as the deconvolution paper's authors built it.

The CIFAR model of the authors' ``models/resnext.py``: a 1x1 stem to 64 channels, three stages of three grouped
bottleneck blocks (cardinality 32, bottleneck width 4 doubling per stage, expansion 2), 256 -> 512 -> 1024
channels. Module names and state_dict keys are the authors'.

Deconvolution form: the stem frozen with 10 Newton-Schulz iterations, the grouped 3x3 conv whitened per group
with 3 iterations, all other convs at the model-wide settings; no BatchNorm; a Delinear head. BatchNorm form:
bias-free convs, each followed by a BatchNorm2d (the authors' ``--deconv False`` baseline).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._builder import create_zoo_model, zoo_cfg
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["ResNeXt"]


class Block(nn.Module):
    """Grouped bottleneck: 1x1 reduce, 3x3 grouped conv (carries the stride), 1x1 expand; projected shortcut."""

    expansion = 2

    def __init__(
        self, in_chs: int, cardinality: int, bottleneck_width: int, stride: int, settings: DeconvSettings
    ) -> None:
        super().__init__()
        group_width = cardinality * bottleneck_width
        out_chs = self.expansion * group_width
        self.conv1 = settings.conv(in_chs, group_width, 1)
        self.bn1 = settings.norm(group_width)
        self.conv2 = settings.conv(group_width, group_width, 3, stride, 1, groups=cardinality, n_iter=3)
        self.bn2 = settings.norm(group_width)
        self.conv3 = settings.conv(group_width, out_chs, 1)
        self.bn3 = settings.norm(out_chs)
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(settings.conv(in_chs, out_chs, 1, stride), settings.norm(out_chs))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNeXt(ZooClassifierMixin, nn.Module):
    """ResNeXt for 32x32 inputs: stem, three stages (strides 1, 2, 2), bottleneck width doubling per stage."""

    def __init__(
        self,
        num_blocks: tuple[int, ...] = (3, 3, 3),
        cardinality: int = 32,
        bottleneck_width: int = 4,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...)."""
        super().__init__()
        settings = DeconvSettings(**deconv_kwargs)
        self.deconv_settings = settings

        stem_chs = 64
        # A 1x1 stem whose whitening is frozen after its first steps, with 10 iterations (the authors' choice).
        self.conv1 = settings.conv(in_chans, stem_chs, 1, freeze=True, n_iter=10)
        self.bn1 = settings.norm(stem_chs)

        self.feature_info: list[dict[str, Any]] = []
        in_chs, width, reduction = stem_chs, bottleneck_width, 1
        for i, depth in enumerate(num_blocks):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                blocks.append(Block(in_chs, cardinality, width, stride if j == 0 else 1, settings))
                in_chs = Block.expansion * cardinality * width
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=reduction, module=f"layer{i + 1}"))
            width *= 2
        self.num_stages = len(num_blocks)

        # The reference's optional ChannelDeconv on the last feature map (--delinear False --block-fc N).
        self.deconv1 = settings.channel_deconv()
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = self.run_stage(getattr(self, f"layer{i + 1}"), x)
        if self.deconv1 is not None:
            x = self.deconv1(x)
        return x


_FEATURE_INDICES = tuple(range(3))  # every entry of feature_info


def _create_resnext(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNeXt:
    return create_zoo_model(ResNeXt, variant, pretrained, feature_indices=_FEATURE_INDICES, **kwargs)


default_cfgs = generate_default_cfgs({
    "resnext29_32x4d_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(8, 8)),
})


@register_model
def resnext29_32x4d_deconv(pretrained: bool = False, **kwargs: Any) -> ResNeXt:
    """ResNeXt-29 (32x4d) with network deconvolution; ``deconv=False`` for the BN baseline."""
    model_args = dict(num_blocks=(3, 3, 3), cardinality=32, bottleneck_width=4)
    return _create_resnext("resnext29_32x4d_deconv", pretrained, **model_args | kwargs)
