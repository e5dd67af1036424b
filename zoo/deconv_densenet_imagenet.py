"""DenseNet-121 for 224x224 inputs (Huang et al., arXiv:1608.06993) as the deconvolution paper trains it on
ImageNet (its Table 2, the authors' ``main_imagenet.py -a densenet121d``).

torchvision's topology and module names: ``features`` holds the 7x7 stride-2 stem (``conv0``, ``norm0``,
``relu0``, ``pool0``), four dense blocks of 6, 12, 24 and 16 pre-activation layers (growth rate 32, bottleneck
width 4 x 32) with a transition after each of the first three, and ``norm5``; then ReLU, global average pooling and
the ``classifier``. Deconvolution form (the authors' ``densenet121d``): every conv a FastDeconv (the stem frozen
with 15 iterations), no BatchNorm, no ``norm5`` (a ChannelDeconv there with ``delinear=False``), a Delinear head
with ``--block-fc 64``. BatchNorm form (``deconv=False``): exactly torchvision's ``densenet121``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._builder import create_zoo_model
from ._head import ZooClassifierMixin
from ._imagenet import imagenet_cfg, imagenet_kwargs
from ._layer_factory import DeconvSettings

__all__ = ["DenseNet"]


class DenseLayer(nn.Module):
    """Pre-activation 1x1 (to ``bn_size * growth``) then 3x3 (to ``growth``); its output is concatenated after
    its input (torchvision's order)."""

    def __init__(self, in_chs: int, growth_rate: int, bn_size: int, settings: DeconvSettings) -> None:
        super().__init__()
        # torchvision's names; the deconvolution form has no norm1/norm2 (settings.norm is an Identity there).
        self.norm1 = settings.norm(in_chs)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = settings.conv(in_chs, bn_size * growth_rate, 1)
        self.norm2 = settings.norm(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = settings.conv(bn_size * growth_rate, growth_rate, 3, 1, 1)
        self.norm1_is_identity = isinstance(self.norm1, nn.Identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm1_is_identity:
            # The authors' deconvolution layer is Sequential(relu1 in place, conv1, ...) on x, then cat([x, new]):
            # the in-place ReLU rectifies x itself, so what is concatenated is relu(x). Same values, out of place.
            x = F.relu(x)
            out = x
        else:
            out = self.relu1(self.norm1(x))
        out = self.conv2(self.relu2(self.norm2(self.conv1(out))))
        return torch.cat([x, out], 1)


class Transition(nn.Sequential):
    """Pre-activation 1x1 conv halving the channels, then 2x2 average pooling (torchvision's ``_Transition``)."""

    def __init__(self, in_chs: int, out_chs: int, settings: DeconvSettings) -> None:
        super().__init__()
        if not settings.body_deconv:
            self.add_module("norm", settings.norm(in_chs))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", settings.conv(in_chs, out_chs, 1))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(ZooClassifierMixin, nn.Module):
    """DenseNet-BC for 224x224 inputs; ``features`` is one stage, its feature maps taken after each dense block."""

    classifier_name = "classifier"
    stage_names = ("features",)
    tail_names = ()

    def __init__(
        self,
        block_config: Sequence[int] = (6, 12, 24, 16),
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...)."""
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        stem: list[tuple[str, nn.Module]] = [
            ("conv0", settings.stem_conv(in_chans, num_init_features, 7, 2, 3, freeze=True, n_iter=15))]
        if not settings.stem_deconv:
            stem.append(("norm0", settings.stem_norm(num_init_features)))
        stem += [("relu0", nn.ReLU(inplace=True)), ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))]
        self.features = nn.Sequential(OrderedDict(stem))

        self.feature_info = []
        num_chs = num_init_features
        for i, depth in enumerate(block_config):
            block = nn.Sequential(OrderedDict(
                (f"denselayer{j + 1}", DenseLayer(num_chs + j * growth_rate, growth_rate, bn_size, settings))
                for j in range(depth)))
            self.features.add_module(f"denseblock{i + 1}", block)
            num_chs += depth * growth_rate
            self.feature_info.append(
                dict(num_chs=num_chs, reduction=2 ** (i + 2), module=f"features.denseblock{i + 1}"))
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}", Transition(num_chs, num_chs // 2, settings))
                num_chs //= 2
        # The final norm: BatchNorm2d in the BN form; in the deconvolution form nothing, or the ChannelDeconv of
        # --delinear False --block-fc N, under the same name (as the authors').
        norm5 = settings.norm(num_chs) if not settings.body_deconv else settings.channel_deconv(num_chs)
        if norm5 is not None:
            self.features.add_module("norm5", norm5)
        self._init_head(num_chs, num_classes, global_pool, drop_rate)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's: He normal on the convs, BatchNorm 1/0, Linear bias 0.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the stem is the start of ``features``

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


def _create_densenet(variant: str, pretrained: bool = False, **kwargs: Any) -> DenseNet:
    kwargs = imagenet_kwargs(variant, pretrained, kwargs)
    feature_indices = tuple(range(len(kwargs["block_config"])))  # after every dense block
    return create_zoo_model(DenseNet, variant, pretrained, feature_indices=feature_indices, **kwargs)


default_cfgs = generate_default_cfgs({
    "densenet121_imagenet_deconv": imagenet_cfg(first_conv="features.conv0", classifier="classifier"),
})


@register_model
def densenet121_imagenet_deconv(pretrained: bool = False, **kwargs: Any) -> DenseNet:
    """DenseNet-121, ImageNet topology, with network deconvolution (the authors' ``densenet121d``);
    ``deconv=False`` gives torchvision's ``densenet121``."""
    model_args = dict(block_config=(6, 12, 24, 16), growth_rate=32, num_init_features=64)
    return _create_densenet("densenet121_imagenet_deconv", pretrained, **dict(model_args, **kwargs))
