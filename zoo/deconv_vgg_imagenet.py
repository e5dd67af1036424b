"""VGG-11 and VGG-16 for 224x224 inputs (Simonyan & Zisserman, arXiv:1409.1556) as the deconvolution paper trains
them on ImageNet (its Table 2, the authors' ``main_imagenet.py -a vgg11d``/``vgg16d``).

torchvision's topology and module names: one ``features`` Sequential of 3x3 convs and 2x2 max pools, adaptive
average pooling to 7x7, and the ``classifier`` MLP (25088 -> 4096 -> 4096 -> classes, ReLU and Dropout(0.5)
between). Deconvolution form (the authors' ``vgg11d``): ``[FastDeconv, ReLU]`` per conv (the first frozen with 15
iterations), no BatchNorm, and every classifier layer a Delinear with ``--block-fc 64`` (or, with
``delinear=False``, a ChannelDeconv before each Linear, as theirs). Plain form (``deconv=False``):
``[Conv2d, ReLU]`` per conv and Linear layers, the authors' ``vgg11d --deconv False --block-fc 0``, which is
torchvision's ``vgg11``/``vgg16``. ``batch_norm=True`` (the authors' and torchvision's ``make_layers`` flag) puts a
BatchNorm2d after every conv: with ``deconv=False`` that is exactly torchvision's ``vgg11_bn``/``vgg16_bn``
(``main_imagenet.py -a vgg11_bn``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ndeconv.layers import FastDeconv

from ._builder import create_zoo_model
from ._head import ZooClassifierMixin
from ._imagenet import imagenet_cfg, imagenet_kwargs
from ._layer_factory import DeconvSettings

__all__ = ["VGG"]

VGG11_LAYOUT = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
HIDDEN = 4096


def _make_features(layout: Sequence[int | str], in_chans: int, settings: DeconvSettings,
                   batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_chs = in_chans
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_chs = int(item)
        first = not layers
        if first and settings.stem_deconv:  # the deconvolution form's stem (the hybrid's too): frozen, 15 iterations
            conv = settings.stem_conv(in_chs, out_chs, 3, 1, 1, freeze=True, n_iter=15, sampling_stride=3)
        elif settings.body_deconv:
            conv = settings.conv(in_chs, out_chs, 3, 1, 1)
        else:  # torchvision's VGG keeps the conv bias, in front of a BatchNorm too
            conv = nn.Conv2d(in_chs, out_chs, 3, padding=1)
        if not batch_norm:
            layers += [conv, nn.ReLU(inplace=True)]
        elif first and settings.deconv == "stem":
            # The hybrid's stem has no norm: an Identity where the BN form's first BatchNorm sits, so every later
            # module keeps the BN form's index (features.N) and state_dict key.
            layers += [conv, settings.stem_norm(out_chs), nn.ReLU(inplace=True)]
        else:  # the authors' make_layers: a BatchNorm after every conv, FastDeconvs included
            layers += [conv, nn.BatchNorm2d(out_chs), nn.ReLU(inplace=True)]
        in_chs = out_chs
    return nn.Sequential(*layers)


class VGG(ZooClassifierMixin, nn.Module):
    """``features``, ``pre_logits`` as timm calls it (pool to 7x7, flatten, the classifier but its last layer) and
    the last layer ``classifier.<n>``, whose index depends on the form (6, or 9 with ChannelDeconvs)."""

    classifier_name = "classifier"
    stage_names = ("features",)
    tail_names = ()

    def __init__(
        self,
        layout: Sequence[int | str] = VGG16_LAYOUT,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.5,
        global_pool: str = "avg",
        batch_norm: bool = False,
        **deconv_kwargs: Any,
    ) -> None:
        """``drop_rate`` is the classifier's dropout (torchvision's 0.5). ``global_pool`` is 'avg' (the head takes
        the 7x7 average-pooled map flattened, 25088 features) or '' with ``num_classes=0``: no head at all, the
        model's output is the unpooled feature map (timm's contract for ``global_pool=''``). ``batch_norm``: a
        BatchNorm2d after every conv (``deconv=False``: torchvision's ``vgg*_bn``; the hybrid's stem keeps none)."""
        super().__init__()
        _check_head(num_classes, global_pool)
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self.batch_norm = bool(batch_norm)
        self.features = _make_features(layout, in_chans, settings, self.batch_norm)
        self.feature_info = []
        chs = in_chans
        for idx, module in enumerate(self.features):
            if isinstance(module, (FastDeconv, nn.Conv2d)):
                chs = module.out_channels
            elif isinstance(module, nn.MaxPool2d):
                reduction = 2 ** (len(self.feature_info) + 1)
                self.feature_info.append(dict(num_chs=chs, reduction=reduction, module=f"features.{idx}"))
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.num_features = chs
        self.head_hidden_size = HIDDEN
        self._build_head(num_classes, global_pool)
        self._init_weights()

    @property
    def architecture_args(self) -> dict[str, Any]:
        """The constructor kwargs beyond ``deconv_settings`` that shape the network: a saved config (converted,
        folded) records them so that ``timm.create_model(name, **model_args)`` rebuilds this layout."""
        return dict(batch_norm=self.batch_norm)

    def _build_head(self, num_classes: int, global_pool: str) -> None:
        """``avgpool`` and the ``classifier`` MLP; none of it with ``global_pool=''`` (the MLP's 25088 inputs are the
        7x7 pooled map, which an unpooled map of any other size is not)."""
        self.global_pool_type = global_pool
        if not global_pool:
            self.avgpool, self.classifier = nn.Identity(), nn.Sequential()
            return
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        layers: list[nn.Module] = []
        for layer_in in (self.num_features * 7 * 7, HIDDEN):
            layers += self._linear(layer_in, HIDDEN)
            layers += [nn.ReLU(True), nn.Dropout(self.drop_rate)]
        layers += self._linear(HIDDEN, num_classes)
        self.classifier = nn.Sequential(*layers)

    def _linear(self, in_features: int, out_features: int) -> list[nn.Module]:
        """A classifier layer as the authors': Delinear (or Linear); with ``delinear=False`` and ``block_fc``, a
        ChannelDeconv of the flat features in front of a plain Linear."""
        settings = self.deconv_settings
        if out_features <= 0:
            return [nn.Identity()]
        channel_deconv = settings.channel_deconv(in_features, input_dim=2)
        head = nn.Linear(in_features, out_features) if channel_deconv is not None else settings.head(
            in_features, out_features)
        return [head] if channel_deconv is None else [channel_deconv, head]

    @property
    def _last_index(self) -> int:
        return len(self.classifier) - 1

    def get_classifier(self) -> nn.Module:
        return self.classifier[self._last_index] if len(self.classifier) else nn.Identity()

    def _set_classifier(self, num_classes: int) -> None:
        self.classifier[self._last_index] = self._linear(HIDDEN, num_classes)[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new last layer; ``reset_classifier(0, '')`` drops the whole head (pooling and the MLP before the
        last layer), so the model returns its unpooled features, as timm's models do. Asking for 'avg' back
        builds a new head (untrained: the old one is gone)."""
        global_pool = self.global_pool_type if global_pool is None else global_pool
        _check_head(num_classes, global_pool)
        self.num_classes = num_classes
        if global_pool != self.global_pool_type or not global_pool:
            self._build_head(num_classes, global_pool)
            self._init_weights(self.classifier)
        else:
            self._set_classifier(num_classes)

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head=False)
        # The head is sized for the 7x7 pooled 512-channel map: with the features cut, drop it whole.
        self._build_head(0, "")
        self.num_classes = 0
        return take

    def _init_weights(self, root: nn.Module | None = None) -> None:
        # torchvision's (and the authors') initialisation; a Delinear keeps its own (theirs is not an nn.Linear).
        for module in (self if root is None else root).modules():
            if isinstance(module, (nn.Conv2d, FastDeconv)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the stem is ``features.0``

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if len(self.classifier) == 0:  # global_pool '' or pruned for features: nothing of the head is left
            return x
        x = torch.flatten(self.avgpool(x), 1)
        # Layer by layer, not ``self.classifier[:-1](x)``: a slice is a new Sequential that torch.fx cannot find
        # among the model's submodules, so the fold could not trace (nor fuse) the network.
        for layer in list(self.classifier)[: self._last_index]:
            x = layer(x)
        return x if pre_logits else self.get_classifier()(x)


def _check_head(num_classes: int, global_pool: str) -> None:
    if global_pool not in ("avg", ""):
        raise ValueError(f"global_pool {global_pool!r}: the VGG head takes the 7x7 average-pooled map ('avg'), or "
                         "'' with num_classes=0 for the unpooled features")
    if not global_pool and num_classes:
        raise ValueError(f"global_pool '' with num_classes={num_classes}: without pooling there is no VGG head "
                         "(its MLP takes the 7x7 pooled map); pass num_classes=0 for the unpooled features")


def _create_vgg(variant: str, pretrained: bool = False, **kwargs: Any) -> VGG:
    kwargs = imagenet_kwargs(variant, pretrained, kwargs)
    pools = list(kwargs["layout"]).count("M")
    return create_zoo_model(VGG, variant, pretrained, feature_indices=tuple(range(pools)), **kwargs)


default_cfgs = generate_default_cfgs({
    "vgg11_imagenet_deconv": imagenet_cfg(first_conv="features.0", classifier="classifier.6"),
    "vgg16_imagenet_deconv": imagenet_cfg(first_conv="features.0", classifier="classifier.6"),
})


@register_model
def vgg11_imagenet_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-11, ImageNet topology, with network deconvolution (the authors' ``vgg11d``); ``deconv=False`` gives
    torchvision's ``vgg11`` (no BatchNorm: the authors' ``vgg11d --deconv False --block-fc 0``), ``deconv=False,
    batch_norm=True`` torchvision's ``vgg11_bn``."""
    model_args = dict(layout=VGG11_LAYOUT)
    return _create_vgg("vgg11_imagenet_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def vgg16_imagenet_deconv(pretrained: bool = False, **kwargs: Any) -> VGG:
    """VGG-16, ImageNet topology, with network deconvolution (the authors' ``vgg16d``); ``deconv=False`` gives
    torchvision's ``vgg16`` (no BatchNorm: the authors' ``vgg16d --deconv False --block-fc 0``), ``deconv=False,
    batch_norm=True`` torchvision's ``vgg16_bn``."""
    model_args = dict(layout=VGG16_LAYOUT)
    return _create_vgg("vgg16_imagenet_deconv", pretrained, **dict(model_args, **kwargs))
