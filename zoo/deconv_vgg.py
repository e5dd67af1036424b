"""VGG-11/13/16/19 for 32x32 inputs (Simonyan & Zisserman, arXiv:1409.1556) as the deconvolution paper trains it.

VGG-16 is one of the paper's ten; VGG-11, -13 and -19 are the other layouts of the authors' ``models/vgg.py``
(``main.py --arch vgg11``, ``vgg13``, ``vgg19``), no weights exist for them.

One ``features`` Sequential, indexed as the authors': deconvolution form ``[FastDeconv, ReLU]`` per conv (the
first frozen with 15 iterations), BatchNorm form ``[Conv2d (with bias), BatchNorm2d, ReLU]``; 2x2 max pools;
a trailing ``AvgPool2d(1)``. Five pools bring 32x32 to 1x1, so the classifier sees 512 features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import register_model
from torch import nn

from ndeconv.layers import FastDeconv

from ._builder import create_zoo_model, zoo_cfg, zoo_default_cfgs
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["VGG"]

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG13_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")

# Models of the authors' main.py beyond the paper's ten (ndeconv.zoo.EXTRA_MODELS): no weights, no shipping.
EXTRA_MODELS = ("vgg11_deconv", "vgg13_deconv", "vgg19_deconv")


def _make_features(layout: Sequence[int | str], in_chans: int, settings: DeconvSettings) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_chs = in_chans
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_chs = int(item)
        if settings.body_deconv:
            stem = dict(freeze=True, n_iter=15) if not layers else {}
            layers += [settings.conv(in_chs, out_chs, 3, 1, 1, **stem), nn.ReLU(inplace=True)]
        elif settings.stem_deconv and not layers:
            # The hybrid's stem: its FastDeconv, and an Identity where the BN form's first BatchNorm sits, so every
            # later module keeps the BN form's index (features.N) and state_dict key.
            layers += [settings.stem_conv(in_chs, out_chs, 3, 1, 1, freeze=True, n_iter=15),
                       settings.stem_norm(out_chs), nn.ReLU(inplace=True)]
        else:  # the authors' VGG keeps the conv bias in front of its BatchNorm
            layers += [nn.Conv2d(in_chs, out_chs, 3, padding=1), settings.norm(out_chs), nn.ReLU(inplace=True)]
        in_chs = out_chs
    layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
    return nn.Sequential(*layers)


class VGG(ZooClassifierMixin, nn.Module):
    classifier_name = "classifier"
    stage_names = ("features",)
    tail_names = ("channel_deconv",)

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
        self.channel_deconv = settings.channel_deconv(int([w for w in layout if w != "M"][-1]))
        self.features = _make_features(layout, in_chans, settings)
        # A feature map after every max-pool (reduction 2, 4, 8, ...), taken by a hook on the pool.
        self.feature_info = []
        chs = in_chans
        for idx, module in enumerate(self.features):
            if isinstance(module, (FastDeconv, nn.Conv2d)):
                chs = module.out_channels
            elif isinstance(module, nn.MaxPool2d):
                reduction = 2 ** (len(self.feature_info) + 1)
                self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"features.{idx}"))
        widths = [item for item in layout if item != "M"]
        self._init_head(int(widths[-1]), num_classes, global_pool, drop_rate)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the stem is ``features.0``

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.channel_deconv is None else self.channel_deconv(x)


def _create_vgg(variant: str, pretrained: bool = False, **kwargs: Any) -> VGG:
    layout = kwargs.get("layout", VGG16_LAYOUT)
    return create_zoo_model(VGG, variant, pretrained, feature_indices=tuple(range(list(layout).count("M"))), **kwargs)


default_cfgs = zoo_default_cfgs({
    "vgg16_deconv.fashion_mnist": zoo_cfg(first_conv="features.0", classifier="classifier", pool_size=(1, 1)),
    # No tag: no weights exist for these, so their pretrained_cfg claims none.
    **{name: zoo_cfg(first_conv="features.0", classifier="classifier", pool_size=(1, 1)) for name in EXTRA_MODELS},
})


@register_model
def vgg16_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-16 with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    model_args = dict(layout=VGG16_LAYOUT)
    return _create_vgg("vgg16_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg11_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-11 (``main.py --arch vgg11``) with network deconvolution; ``deconv=False`` gives the BatchNorm form."""
    model_args = dict(layout=VGG11_LAYOUT)
    return _create_vgg("vgg11_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg13_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-13 (``main.py --arch vgg13``) with network deconvolution; ``deconv=False`` gives the BatchNorm form."""
    model_args = dict(layout=VGG13_LAYOUT)
    return _create_vgg("vgg13_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg19_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-19 (``main.py --arch vgg19``) with network deconvolution; ``deconv=False`` gives the BatchNorm form."""
    model_args = dict(layout=VGG19_LAYOUT)
    return _create_vgg("vgg19_deconv", pretrained, **dict(model_args, **kwargs))
