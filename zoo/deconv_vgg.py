"""VGG-16 for 32x32 inputs (Simonyan & Zisserman, arXiv:1409.1556) as the deconvolution paper trains it.

One ``features`` Sequential, indexed as the authors': deconvolution form ``[FastDeconv, ReLU]`` per conv (the
first frozen with 15 iterations), BatchNorm form ``[Conv2d (with bias), BatchNorm2d, ReLU]``; 2x2 max pools;
a trailing ``AvgPool2d(1)``. Five pools bring 32x32 to 1x1, so the classifier sees 512 features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ndeconv.layers import FastDeconv

from ._builder import create_zoo_model, zoo_cfg
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["VGG"]

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _make_features(layout: Sequence[int | str], in_chans: int, settings: DeconvSettings) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_chs = in_chans
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_chs = int(item)
        if settings.deconv:
            stem = dict(freeze=True, n_iter=15) if not layers else {}
            layers += [settings.conv(in_chs, out_chs, 3, 1, 1, **stem), nn.ReLU(inplace=True)]
        else:  # the authors' VGG keeps the conv bias in front of its BatchNorm
            layers += [nn.Conv2d(in_chs, out_chs, 3, padding=1), settings.norm(out_chs), nn.ReLU(inplace=True)]
        in_chs = out_chs
    layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
    return nn.Sequential(*layers)


class VGG(ZooClassifierMixin, nn.Module):
    classifier_name = "classifier"

    def __init__(
        self,
        layout: Sequence[int | str] = VGG16_LAYOUT,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self.channel_deconv = settings.channel_deconv()
        self.features = _make_features(layout, in_chans, settings)
        # A feature map after every max-pool (reduction 2, 4, 8, ...), taken by a hook on the pool.
        self.feature_info: list[dict[str, Any]] = []
        chs = in_chans
        for idx, module in enumerate(self.features):
            if isinstance(module, (FastDeconv, nn.Conv2d)):
                chs = module.out_channels
            elif isinstance(module, nn.MaxPool2d):
                reduction = 2 ** (len(self.feature_info) + 1)
                self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"features.{idx}"))
        widths = [item for item in layout if item != "M"]
        self._init_head(int(widths[-1]), num_classes, global_pool, drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.run_stage(self.features, x)
        if self.channel_deconv is not None:
            x = self.channel_deconv(x)
        return x


def _create_vgg(variant: str, pretrained: bool = False, **kwargs: Any) -> VGG:
    layout = kwargs.get("layout", VGG16_LAYOUT)
    return create_zoo_model(VGG, variant, pretrained, feature_indices=tuple(range(list(layout).count("M"))), **kwargs)


default_cfgs = generate_default_cfgs({
    "vgg16_deconv.fashion_mnist": zoo_cfg(first_conv="features.0", classifier="classifier", pool_size=(1, 1)),
})


@register_model
def vgg16_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-16 with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    return _create_vgg("vgg16_deconv", pretrained, **dict(dict(layout=VGG16_LAYOUT), **kwargs))
