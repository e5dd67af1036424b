"""The MNIST-sized models of the authors' ``models/simple.py`` (``main.py --arch mlp``, ``simple_v1``, ``simple_v2``),
built for 28x28 gray images as ``main.py`` feeds MNIST and Fashion-MNIST (1 channel, no padding, no augmentation).

- ``mlp_deconv`` (``MLP``): 784 -> 128 -> 128 -> classes with sigmoids, every Linear bias-free. Deconvolution
  form (the authors' default ``--method 3``): a ChannelDeconv of block 32 (the authors' fixed ``num_groups``, with
  its own eps 1e-2) whitens the input of each Linear; BatchNorm form (``--method 2``): a BatchNorm1d before each
  sigmoid. The hybrid whitens the input pixels only.
- ``simple_v1_deconv`` (``SimpleConvNet``, one conv): a single conv whose kernel covers the whole image, i.e. a
  linear classifier on the pixels. Plain form (``--method 1``): that Conv2d, with bias; deconvolution form: it
  is a FastDeconv, which whitens the whole image.
- ``simple_v2_deconv`` (``SimpleConvNet``, twelve convs): twelve unpadded 3x3 convs widening 4, 8, ..., 44 channels
  and a last conv to the classes, then global average pooling. BatchNorm form (``--method 1``): Conv2d (with
  bias) + BatchNorm2d + ReLU, the last without ReLU; deconvolution form: FastDeconv + ReLU.

The authors' code at HEAD builds only the plain/BatchNorm forms of ``simple_v1``/``simple_v2`` (their
deconvolution forms call ``DeConv2d``, removed from ``models/deconv.py`` in their commit 39704d4 "cleaned"), so our
deconvolution forms put a FastDeconv where that layer was, as the cleaned code did in every other model; the
layouts of everything their HEAD builds are checked against it (tests/test_zoo_mnist.py), and the MLP's outputs
too. No weights exist for these models.

Only ``simple_v2_deconv`` is registered with timm. ``mlp_deconv`` (no conv, no feature map: its features are
(N, 128) vectors) and ``simple_v1_deconv`` (one conv over the whole image: no intermediate feature) cannot keep
timm's model contract (an NCHW ``forward_features``, ``features_only`` with at least three maps; timm's model tests
check it), so they are registered with ndeconv only (``ndeconv.zoo._registry``): build them with
``ndeconv.zoo.create_model`` (``torch.hub.load``, ``ndeconv train --arch mlp`` and every ndeconv command do), with
the same keywords timm's ``create_model`` takes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

from ndeconv.layers import ChannelDeconv

from ._builder import create_zoo_model, zoo_cfg, zoo_default_cfgs
from ._layer_factory import DeconvSettings
from ._registry import register_ndeconv_model

__all__ = ["MLP", "SimpleConvNet"]

# main.py's MNIST models (ndeconv.zoo.EXTRA_MODELS): no weights, no shipping.
EXTRA_MODELS = ("mlp_deconv", "simple_v1_deconv", "simple_v2_deconv")
MNIST_SIZE = 28
MLP_BLOCK = 32  # models/simple.py's num_groups of every ChannelDeconv of the MLP
MLP_EPS = 1e-2  # ChannelDeconv's default eps, which models/simple.py keeps
SIMPLE_V2_WIDTHS = tuple(range(4, 48, 4))  # 4 -> 44 channels: the first conv, then ten widening by 4


class _PlainHead:
    """timm's forward split for these models: ``forward_features`` then ``forward_head``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # type: ignore[attr-defined]


class MLP(_PlainHead, nn.Module):
    """The authors' ``MLP(input_nodes=784, hidden_nodes=128, hidden_layers=3)``: ``layers`` (the first Linear, then
    ``hidden_layers - 2`` of [norm or whitening, sigmoid, Linear]) and the classifier ``linear`` ([norm,] sigmoid,
    [whitening,] Linear), keyed as theirs."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = MNIST_SIZE,
        hidden_nodes: int = 128,
        hidden_layers: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "",
        **deconv_kwargs: Any,
    ) -> None:
        super().__init__()
        if hidden_layers < 2:
            raise ValueError(f"MLP: hidden_layers must be >= 2 (the first Linear and the classifier), "
                             f"got {hidden_layers}")
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self.in_features = in_chans * img_size * img_size
        self.num_features = self.head_hidden_size = hidden_nodes
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        first = [self._whiten(self.in_features)] if settings.stem_deconv else []
        self.layers = nn.ModuleList([nn.Sequential(*first, nn.Linear(self.in_features, hidden_nodes, bias=False))])
        for _ in range(hidden_layers - 2):
            self.layers.append(nn.Sequential(*self._before_linear(hidden_nodes),
                                             nn.Linear(hidden_nodes, hidden_nodes, bias=False)))
        self.linear = self._classifier(num_classes)

    def _whiten(self, features: int) -> nn.Module:
        if self.deconv_settings.folded:  # what ChannelDeconv.fuse() gives for (N, C) input
            return nn.Linear(features, features, bias=True)
        return ChannelDeconv(MLP_BLOCK, eps=MLP_EPS, num_channels=features, input_dim=2)

    def _before_linear(self, features: int) -> list[nn.Module]:
        # method 3 (deconvolution): sigmoid, then whitening; method 2 (BatchNorm): norm, then sigmoid.
        if self.deconv_settings.body_deconv:
            return [nn.Sigmoid(), self._whiten(features)]
        return [nn.BatchNorm1d(features), nn.Sigmoid()]

    def _classifier(self, num_classes: int) -> nn.Module:
        last = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()
        return nn.Sequential(*self._before_linear(self.num_features), last)

    def get_classifier(self) -> nn.Module:
        return self.linear[-1]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new last Linear; the whitening (or norm) before it is the features', kept."""
        self.num_classes = num_classes
        self.linear[-1] = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        # torch._assert, not `if ... raise`: torch.fx traces it (fold fuses the BatchNorm form's norms that way).
        torch._assert(x.shape[1] == self.in_features, f"MLP: expects {self.in_features} input values per image "
                      "(build it with the images' in_chans and img_size)")
        for layer in self.layers:
            x = layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        for module in list(self.linear)[:-1]:  # the installed modules, one by one (a slice would be a new module)
            x = module(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.linear[-1](x)


class SimpleConvNet(_PlainHead, nn.Module):
    """The authors' ``SimpleCNN_v1`` (``widths=()``: one conv ``conv`` of kernel ``img_size``) and ``SimpleCNN_v2``
    (``widths``: ``layers`` of unpadded 3x3 [conv, norm, ReLU] blocks of these widths, then the classifier block
    [conv, norm] to the classes, then global average pooling), keyed as theirs."""

    def __init__(
        self,
        widths: tuple[int, ...] = SIMPLE_V2_WIDTHS,
        num_classes: int = 10,
        in_chans: int = 1,
        img_size: int = MNIST_SIZE,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool {global_pool!r}: SimpleConvNet pools with 'avg' (v1: its conv reads the "
                             "whole map), or '' for none")
        self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self.widths, self.img_size, self.drop_rate = tuple(widths), img_size, drop_rate
        self.num_classes = num_classes
        self.global_pool_type = global_pool
        self.feature_info = []
        chs = in_chans
        if not self.widths:
            # v1's classifier is a conv over the whole image: what it reads, its "pooled" features, are the
            # image's values flattened (timm's head_hidden_size); the unpooled map is the image itself.
            self.num_features = in_chans
            self.head_hidden_size = in_chans * img_size * img_size
            self.conv = self._classifier(num_classes)
            return
        blocks = []
        for i, width in enumerate(self.widths):
            blocks.append(nn.Sequential(self._conv(chs, width, 3, first=i == 0), self._norm(width, first=i == 0),
                                        nn.ReLU()))
            self.feature_info.append(dict(num_chs=width, reduction=1, module=f"layers.{i}"))
            chs = width
        self.num_features = self.head_hidden_size = chs
        self.layers = nn.ModuleList([*blocks, self._classifier(num_classes)])

    def _conv(self, in_chs: int, out_chs: int, kernel_size: int, first: bool) -> nn.Module:
        settings = self.deconv_settings
        if first and settings.stem_deconv:
            return settings.stem_conv(in_chs, out_chs, kernel_size)
        if settings.body_deconv:
            return settings.conv(in_chs, out_chs, kernel_size)
        return nn.Conv2d(in_chs, out_chs, kernel_size)  # the authors' plain convs keep their bias

    def _norm(self, chs: int, first: bool) -> nn.Module:
        settings = self.deconv_settings
        return settings.stem_norm(chs) if first else settings.norm(chs)

    def _classifier(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        if not self.widths:  # v1: the only conv is the classifier; it sees the whole image
            return self._conv(self.num_features, num_classes, self.img_size, first=True)
        return nn.Sequential(self._conv(self.num_features, num_classes, 3, first=False),
                             self._norm(num_classes, first=False))

    def get_classifier(self) -> nn.Module:
        return self.layers[-1] if self.widths else self.conv

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool {global_pool!r}: SimpleConvNet pools with 'avg' or ''")
            self.global_pool_type = global_pool
        self.num_classes = num_classes
        if self.widths:
            self.layers[-1] = self._classifier(num_classes)
        else:
            self.conv = self._classifier(num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.widths:
            for block in self.layers[:-1]:
                x = block(x)
        return x

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        if not self.global_pool_type:  # global_pool '': the map as it is (timm's unpooled output)
            return x
        return F.adaptive_avg_pool2d(x, 1).flatten(1) if self.widths else x.flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """v2 pools after its classifier conv (the authors' order), so ``pre_logits`` are the features pooled as
        the classifier would not see them; v1's classifier conv reads the whole image, its pre-logits."""
        if pre_logits:
            return self._pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return self._pool(self.get_classifier()(x))


def _create(model_cls: type[nn.Module], variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    features = None
    if model_cls is SimpleConvNet and kwargs.get("widths", SIMPLE_V2_WIDTHS):
        features = tuple(range(len(kwargs.get("widths", SIMPLE_V2_WIDTHS))))
    return create_zoo_model(model_cls, variant, pretrained, feature_indices=features, **kwargs)


def _mnist_cfg(**overrides: Any) -> dict[str, Any]:
    # main.py's MNIST-family input: 1 channel, 28x28, ToTensor() only for Fashion-MNIST.
    return zoo_cfg(**{**dict(input_size=(1, MNIST_SIZE, MNIST_SIZE), mean=(0.0,), std=(1.0,), pool_size=None),
                      **overrides})


default_cfgs = zoo_default_cfgs({
    "mlp_deconv": _mnist_cfg(first_conv="layers.0.0", classifier="linear.2"),
    # pool_size: the unpooled map forward_features gives at 28x28: v1's is the image, v2's eleven unpadded 3x3
    # convs leave 28 - 22 = 6.
    "simple_v1_deconv": _mnist_cfg(first_conv="conv", classifier="conv", pool_size=(MNIST_SIZE, MNIST_SIZE)),
    "simple_v2_deconv": _mnist_cfg(first_conv="layers.0.0", classifier="layers.11.0",
                                   pool_size=(MNIST_SIZE - 2 * len(SIMPLE_V2_WIDTHS),) * 2),
})


@register_ndeconv_model  # not timm's: an MLP has no feature maps (module docstring)
def mlp_deconv(pretrained: bool = False, **kwargs: Any) -> MLP:
    """The authors' MLP (``main.py --arch mlp``) with ChannelDeconv whitening; ``deconv=False``: BatchNorm1d."""
    return _create(MLP, "mlp_deconv", pretrained, **kwargs)


@register_ndeconv_model  # not timm's: one conv over the whole image has no feature maps (module docstring)
def simple_v1_deconv(pretrained: bool = False, **kwargs: Any) -> SimpleConvNet:
    """The authors' one-conv ``SimpleCNN_v1`` (``main.py --arch simple_v1``) as a FastDeconv; ``deconv=False``:
    a plain Conv2d."""
    return _create(SimpleConvNet, "simple_v1_deconv", pretrained, **dict(dict(widths=()), **kwargs))


@register_model
def simple_v2_deconv(pretrained: bool = False, **kwargs: Any) -> SimpleConvNet:
    """The authors' twelve-conv ``SimpleCNN_v2`` (``main.py --arch simple_v2``) with FastDeconv;
    ``deconv=False``: Conv2d + BatchNorm2d."""
    return _create(SimpleConvNet, "simple_v2_deconv", pretrained, **dict(dict(widths=SIMPLE_V2_WIDTHS), **kwargs))
