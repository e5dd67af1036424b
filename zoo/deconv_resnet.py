"""The CIFAR ResNet family as the network deconvolution paper trains it, one class parameterised by its block
(as timm's resnet.py): ResNet-18, pre-activation ResNet-18, SENet-18 and ResNeXt-29 (32x4d) of the paper's ten,
and the authors' ResNet-34 and ResNet-50 (``main.py --arch resnet34``, ``resnet50``; no weights exist for them).

Every member has a stride-1 stem at full resolution, then stages whose first block halves the resolution (but
the first stage's), the reference's optional ChannelDeconv on the last map (``deconv1``) and a ``linear`` head.
Module names are the authors' (``conv1``, ``layer1.0.conv1``, ``layer1.0.shortcut.0``, ``linear``), so their
state_dicts load unchanged. Deconvolution form: every conv a FastDeconv, no BatchNorm, a Delinear head;
BatchNorm form: the authors' ``--deconv False`` baseline. The members, as the authors built them:

- ResNet-18 (He et al., arXiv:1512.03385), ``BasicBlock``: the 3x3 stem at the model-wide settings (it whitens
  its 3 input channels as one block).
- ResNet-34 (``BasicBlock``) and ResNet-50 (``Bottleneck``: 1x1 reduce, 3x3 carrying the stride, 1x1 expand by
  4, 2048 features), stages of 3, 4, 6, 3 blocks, the stem as ResNet-18's.
- Pre-activation ResNet-18 (arXiv:1603.05027), ``PreActBlock``: a frozen 10-iteration stem with no activation
  (each block pre-activates its input), and the authors' quirk that the stem's ``bn1`` exists in the BatchNorm
  form (it is in their state_dicts and parameter count) but is never applied.
- SENet-18 (Hu et al., arXiv:1709.01507), ``SEPreActBlock``: the pre-activation block with a squeeze-excitation
  gate (1x1 convs ``fc1``, ``fc2``: FastDeconv, or Conv2d with bias in the BatchNorm form); a frozen 15-iteration
  stem, activated.
- ResNeXt-29 32x4d (Xie et al., Aggregated Residual Transformations), ``ResNeXtBlock``: three stages of grouped
  bottlenecks (cardinality 32, group width 128 doubling per stage, expansion 2: 256 -> 512 -> 1024 channels), the
  grouped 3x3 conv whitened per group with 3 iterations; a frozen 10-iteration 1x1 stem.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from ._builder import create_zoo_model, zoo_cfg, zoo_default_cfgs
from ._head import ZooClassifierMixin
from ._layer_factory import DeconvSettings

__all__ = ["BasicBlock", "Bottleneck", "PreActBlock", "ResNeXtBlock", "ResNet", "SEPreActBlock"]


def _check_ungrouped(block: str, cardinality: int) -> None:
    if cardinality != 1:
        raise ValueError(f"{block} has no groups (cardinality {cardinality}); ResNeXtBlock has")


class BasicBlock(nn.Module):
    """Two 3x3 convs, post-activation; the projection shortcut a 1x1 conv (+ BatchNorm in that form)."""

    expansion = 1

    def __init__(
        self, in_chs: int, planes: int, stride: int, settings: DeconvSettings, cardinality: int = 1,
    ) -> None:
        super().__init__()
        _check_ungrouped(type(self).__name__, cardinality)
        self.conv1 = settings.conv(in_chs, planes, 3, stride, 1)
        self.bn1 = settings.norm(planes)
        self.conv2 = settings.conv(planes, planes, 3, 1, 1)
        self.bn2 = settings.norm(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chs != planes * self.expansion:
            # Deconvolution form: Sequential(FastDeconv 1x1); BatchNorm form: Sequential(Conv2d 1x1, BatchNorm2d).
            self.shortcut = nn.Sequential(settings.conv(in_chs, planes * self.expansion, 1, stride))
            if not settings.body_deconv:
                self.shortcut.append(settings.norm(planes * self.expansion))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce to ``planes``, 3x3 (carries the stride), 1x1 expand to 4x; post-activation; the projection
    shortcut as BasicBlock's (``Sequential(conv)``, + BatchNorm in that form)."""

    expansion = 4

    def __init__(
        self, in_chs: int, planes: int, stride: int, settings: DeconvSettings, cardinality: int = 1,
    ) -> None:
        super().__init__()
        _check_ungrouped(type(self).__name__, cardinality)
        out_chs = planes * self.expansion
        self.conv1 = settings.conv(in_chs, planes, 1)
        self.bn1 = settings.norm(planes)
        self.conv2 = settings.conv(planes, planes, 3, stride, 1)
        self.bn2 = settings.norm(planes)
        self.conv3 = settings.conv(planes, out_chs, 1)
        self.bn3 = settings.norm(out_chs)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_chs != out_chs:
            self.shortcut = nn.Sequential(settings.conv(in_chs, out_chs, 1, stride))
            if not settings.body_deconv:
                self.shortcut.append(settings.norm(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation: norm + ReLU before each 3x3 conv. The projection shortcut is a bare FastDeconv in the
    deconvolution form (key ``shortcut.weight``) and ``Sequential(Conv2d)`` in the BatchNorm form
    (``shortcut.0.weight``), as the authors'."""

    expansion = 1

    def __init__(
        self, in_chs: int, planes: int, stride: int, settings: DeconvSettings, cardinality: int = 1,
    ) -> None:
        super().__init__()
        _check_ungrouped(type(self).__name__, cardinality)
        self.bn1 = settings.norm(in_chs)
        self.conv1 = settings.conv(in_chs, planes, 3, stride, 1)
        self.bn2 = settings.norm(planes)
        self.conv2 = settings.conv(planes, planes, 3, 1, 1)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_chs != planes * self.expansion:
            conv = settings.conv(in_chs, planes * self.expansion, 1, stride)
            self.shortcut = conv if settings.body_deconv else nn.Sequential(conv)

    def excite(self, out: torch.Tensor) -> torch.Tensor:
        """The residual branch's output as it is added (SEPreActBlock gates it)."""
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection sees the pre-activated input; the identity sees the raw one (as the authors').
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return self.excite(out) + shortcut


class SEPreActBlock(PreActBlock):
    """PreActBlock whose residual branch is scaled per channel by a squeeze-excitation gate (``fc1``, ``fc2``)."""

    def __init__(
        self, in_chs: int, planes: int, stride: int, settings: DeconvSettings, cardinality: int = 1,
    ) -> None:
        super().__init__(in_chs, planes, stride, settings, cardinality)
        # The authors' BatchNorm form keeps the gate convs' bias (settings.conv would drop it there).
        gate_conv = settings.conv if settings.body_deconv else nn.Conv2d
        self.fc1 = gate_conv(planes, planes // 16, 1)
        self.fc2 = gate_conv(planes // 16, planes, 1)

    def excite(self, out: torch.Tensor) -> torch.Tensor:
        w = F.avg_pool2d(out, out.size(2))  # squeeze (square maps, as the authors assume)
        return out * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


class ResNeXtBlock(nn.Module):
    """Grouped bottleneck: 1x1 reduce to ``planes`` (the group width), 3x3 grouped conv (carries the stride),
    1x1 expand to twice that; projected shortcut (conv + norm)."""

    expansion = 2

    def __init__(
        self, in_chs: int, planes: int, stride: int, settings: DeconvSettings, cardinality: int = 1,
    ) -> None:
        super().__init__()
        out_chs = self.expansion * planes
        self.conv1 = settings.conv(in_chs, planes, 1)
        self.bn1 = settings.norm(planes)
        self.conv2 = settings.conv(planes, planes, 3, stride, 1, groups=cardinality, n_iter=3)
        self.bn2 = settings.norm(planes)
        self.conv3 = settings.conv(planes, out_chs, 1)
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


class ResNet(ZooClassifierMixin, nn.Module):
    """The authors' CIFAR ResNets: a 64-channel stride-1 stem, then a stage of ``block_fn`` blocks per entry of
    ``layers``, at ``channels`` planes; the stride is 2 in the first block of every stage but the first.

    ``block_fn`` is the block type (``block`` is DeconvSettings' whitening block size, the reference's
    ``--block``); ``stem_deconv`` are FastDeconv settings of the stem alone (``freeze``, ``n_iter``);
    ``stem_act=False`` leaves the stem's output to the blocks' own pre-activation.
    """

    def __init__(
        self,
        block_fn: type[BasicBlock | Bottleneck | PreActBlock | ResNeXtBlock] = BasicBlock,
        layers: Sequence[int] = (2, 2, 2, 2),
        channels: Sequence[int] = (64, 128, 256, 512),
        cardinality: int = 1,
        stem_kernel_size: int = 3,
        stem_deconv: Mapping[str, Any] | None = None,
        stem_act: bool = True,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...)."""
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self.stem_act = stem_act
        in_chs = 64
        self._init_stem(in_chans, in_chs, stem_kernel_size, **(stem_deconv or {}))

        self.feature_info = []
        for idx, (planes, count) in enumerate(zip(channels, layers, strict=True)):
            blocks = []
            for block_idx in range(count):
                stride = 2 if idx > 0 and block_idx == 0 else 1
                blocks.append(block_fn(in_chs, planes, stride, settings, cardinality))
                in_chs = planes * block_fn.expansion
            self.add_module(f"layer{idx + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=in_chs, reduction=2**idx, module=f"layer{idx + 1}"))
        self.stage_names = tuple(info["module"] for info in self.feature_info)
        self.deconv1 = settings.channel_deconv(in_chs)
        self._init_head(in_chs, num_classes, global_pool, drop_rate)

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        return F.relu(self.bn1(x)) if self.stem_act else x


# Models of the authors' main.py beyond the paper's ten (ndeconv.zoo.EXTRA_MODELS): no weights, no shipping.
EXTRA_MODELS = ("resnet34_deconv", "resnet50_deconv")


def _create_resnet(variant: str, pretrained: bool = False, **kwargs: Any) -> ResNet:
    feature_indices = tuple(range(len(kwargs["layers"])))  # every stage's output
    return create_zoo_model(ResNet, variant, pretrained, feature_indices=feature_indices, **kwargs)


default_cfgs = zoo_default_cfgs({
    "resnet18_deconv.fashion_mnist_e20": zoo_cfg(first_conv="conv1", classifier="linear"),
    "resnet18_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
    "resnet18_deconv.fashion_mnist_stem": zoo_cfg(first_conv="conv1", classifier="linear"),
    "preact_resnet18_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
    "senet18_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
    "resnext29_32x4d_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(8, 8)),
    # No tag: no weights exist for these, so their pretrained_cfg claims none.
    **{name: zoo_cfg(first_conv="conv1", classifier="linear") for name in EXTRA_MODELS},
})


@register_model
def resnet18_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-18 (11.2M parameters) with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    model_args = dict(block_fn=BasicBlock, layers=(2, 2, 2, 2))
    return _create_resnet("resnet18_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet34_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-34 (``main.py --arch resnet34``) with network deconvolution; ``deconv=False`` gives the BatchNorm
    form."""
    model_args = dict(block_fn=BasicBlock, layers=(3, 4, 6, 3))
    return _create_resnet("resnet34_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def resnet50_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNet-50 (``main.py --arch resnet50``) with network deconvolution; ``deconv=False`` gives the BatchNorm
    form."""
    model_args = dict(block_fn=Bottleneck, layers=(3, 4, 6, 3))
    return _create_resnet("resnet50_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def preact_resnet18_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """Pre-activation ResNet-18 with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    model_args = dict(block_fn=PreActBlock, layers=(2, 2, 2, 2), stem_deconv=dict(freeze=True, n_iter=10),
                      stem_act=False)
    return _create_resnet("preact_resnet18_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def senet18_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """SENet-18 with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    model_args = dict(block_fn=SEPreActBlock, layers=(2, 2, 2, 2), stem_deconv=dict(freeze=True, n_iter=15))
    return _create_resnet("senet18_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def resnext29_32x4d_deconv(pretrained: bool = False, **kwargs: Any) -> ResNet:
    """ResNeXt-29 (32x4d) with network deconvolution; ``deconv=False`` gives the BatchNorm baseline."""
    model_args = dict(block_fn=ResNeXtBlock, layers=(3, 3, 3), channels=(128, 256, 512), cardinality=32,
                      stem_kernel_size=1, stem_deconv=dict(freeze=True, n_iter=10))
    return _create_resnet("resnext29_32x4d_deconv", pretrained, **dict(model_args, **kwargs))
