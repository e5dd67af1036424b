"""DenseNet-121 (Huang et al., Densely Connected Convolutional Networks) as the deconvolution paper's authors built it.

The CIFAR model of the authors' ``models/densenet.py``: a 3x3 stem to 64 channels, four dense stages of 6, 12,
24 and 16 pre-activation bottlenecks (growth rate 32), each of the first three followed by a transition that
halves the channels and the resolution, ending at 1024 channels. Module names and state_dict keys are the
authors'.

Deconvolution form: every conv a FastDeconv at the model-wide settings (the stem too: unlike the other zoo
models the authors did not freeze it), no BatchNorm, a Delinear head. BatchNorm form: bias-free convs with
pre-activation BatchNorm2d and a final BatchNorm2d (the authors' ``--deconv False`` baseline).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from ._builder import create_zoo_model, zoo_cfg, zoo_default_cfgs
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["DenseNet"]


class Bottleneck(nn.Module):
    """Pre-activation 1x1 (to 4 * growth) then 3x3 (to growth); the new features are concatenated in front."""

    def __init__(self, in_chs: int, growth_rate: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.bn1 = settings.norm(in_chs)
        self.conv1 = settings.conv(in_chs, 4 * growth_rate, 1)
        self.bn2 = settings.norm(4 * growth_rate)
        self.conv2 = settings.conv(4 * growth_rate, growth_rate, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """Pre-activation 1x1 conv reducing the channels, then 2x2 average pooling."""

    def __init__(self, in_chs: int, out_chs: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.bn = settings.norm(in_chs)
        self.conv = settings.conv(in_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(ZooClassifierMixin, nn.Module):
    """DenseNet for 32x32 inputs: stem, dense stages with transitions between them, final norm + ReLU."""

    tail_names = ("bn", "channel_deconv")

    def __init__(
        self,
        layers: tuple[int, ...] = (6, 12, 24, 16),
        growth_rate: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...)."""
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)

        num_chs = 2 * growth_rate
        # No norm after the stem: every bottleneck starts with its own (pre-activation).
        self.conv1 = settings.stem_conv(in_chans, num_chs, 3, padding=1)

        # A feature map after each transition (reductions 2, 4, 8) and the last stage's, the deepest (as timm's).
        self.feature_info = []
        stage_names: list[str] = []
        for i, depth in enumerate(layers):
            stage = nn.Sequential(*[Bottleneck(num_chs + j * growth_rate, growth_rate, settings) for j in range(depth)])
            self.add_module(f"dense{i + 1}", stage)
            stage_names.append(f"dense{i + 1}")
            num_chs += depth * growth_rate
            if i < len(layers) - 1:
                out_chs = int(math.floor(num_chs * reduction))
                self.add_module(f"trans{i + 1}", Transition(num_chs, out_chs, settings))
                stage_names.append(f"trans{i + 1}")
                self.feature_info.append(dict(num_chs=out_chs, reduction=2 ** (i + 1), module=f"trans{i + 1}"))
                num_chs = out_chs
        self.feature_info.append(dict(num_chs=num_chs, reduction=2 ** (len(layers) - 1), module=stage_names[-1]))
        self.stage_names = tuple(stage_names)

        # The final norm exists only in the BN form; the ND form may put a ChannelDeconv there instead
        # (the authors' DenseNet never combines the two).
        self.bn = settings.norm(num_chs)
        self.channel_deconv = settings.channel_deconv(num_chs) if settings.body_deconv else None
        self._init_head(num_chs, num_classes, global_pool, drop_rate)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(x)

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(x))
        return x if self.channel_deconv is None else self.channel_deconv(x)


def _create_densenet(variant: str, pretrained: bool = False, **kwargs: Any) -> DenseNet:
    feature_indices = tuple(range(len(kwargs["layers"])))  # every entry of feature_info
    return create_zoo_model(DenseNet, variant, pretrained, feature_indices=feature_indices, **kwargs)


default_cfgs = zoo_default_cfgs({
    "densenet121_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
    "densenet121_deconv.fashion_mnist_stem": zoo_cfg(first_conv="conv1", classifier="linear"),
})


@register_model
def densenet121_deconv(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (CIFAR, growth rate 32) with network deconvolution; ``deconv=False`` for the BN baseline."""
    model_args = dict(layers=(6, 12, 24, 16), growth_rate=32)
    return _create_densenet("densenet121_deconv", pretrained, **dict(model_args, **kwargs))
