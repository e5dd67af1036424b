"""PNASNet-A and -B (Liu et al., Progressive Neural Architecture Search) as the deconvolution authors built them.

The CIFAR model of the authors' ``models/pnasnet.py``: a stem conv, then five stages of the "A" cell (a 7x7
depthwise-separable conv beside a 3x3 max-pool), 44 -> 88 -> 176 channels, downsampling twice by a single
stride-2 cell. PNASNet-B (``main.py --arch pnasnetB``, not one of the paper's ten; no weights exist for it) is the
"B" cell (7x7 and 3x3 separable convs on one side, 5x5 separable conv beside a 3x3 max-pool on the other,
concatenated and reduced by a 1x1 conv) at 32 -> 64 -> 128 channels. Module names and state_dict keys are the
authors', so their checkpoints load unchanged.

Deconvolution form: every conv is a FastDeconv (the stem frozen after its first steps, 10 Newton-Schulz
iterations), there is no BatchNorm, and the head is a Delinear. BatchNorm form: bias-free convs, each followed by
a BatchNorm2d (the authors' ``--deconv False`` baseline).
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

__all__ = ["CellA", "CellB", "PNASNet"]


class SepConv(nn.Module):
    """The authors' "separable" conv: one grouped conv with ``groups=in_chs`` (no pointwise part), then a norm."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.conv1 = settings.conv(in_chs, out_chs, kernel_size, stride, (kernel_size - 1) // 2, groups=in_chs)
        self.bn1 = settings.norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x))


class CellA(nn.Module):
    """relu(sep_conv7x7(x) + maxpool3x3(x)); a stride-2 cell projects the pooled branch with a 1x1 conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.stride = stride
        self.sep_conv1 = SepConv(in_chs, out_chs, 7, stride, settings)
        if stride == 2:
            # The 1x1 projection runs after the pooling, hence stride 1 here.
            self.conv1 = settings.conv(in_chs, out_chs, 1)
            self.bn1 = settings.norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.sep_conv1(x)
        y2 = F.max_pool2d(x, kernel_size=3, stride=self.stride, padding=1)
        if self.stride == 2:
            y2 = self.bn1(self.conv1(y2))
        return F.relu(y1 + y2)


class CellB(nn.Module):
    """relu(conv1x1(cat(relu(sep7x7(x) + sep3x3(x)), relu(maxpool3x3(x) + sep5x5(x))))); a stride-2 cell
    projects the pooled branch with a 1x1 conv, as CellA."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, settings: DeconvSettings) -> None:
        super().__init__()
        self.stride = stride
        self.sep_conv1 = SepConv(in_chs, out_chs, 7, stride, settings)
        self.sep_conv2 = SepConv(in_chs, out_chs, 3, stride, settings)
        self.sep_conv3 = SepConv(in_chs, out_chs, 5, stride, settings)
        if stride == 2:
            self.conv1 = settings.conv(in_chs, out_chs, 1)
            self.bn1 = settings.norm(out_chs)
        # The 1x1 conv that reduces the concatenated branches back to ``out_chs``.
        self.conv2 = settings.conv(2 * out_chs, out_chs, 1)
        self.bn2 = settings.norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y1 = self.sep_conv1(x)
        y2 = self.sep_conv2(x)
        y3 = F.max_pool2d(x, kernel_size=3, stride=self.stride, padding=1)
        if self.stride == 2:
            y3 = self.bn1(self.conv1(y3))
        y4 = self.sep_conv3(x)
        y = torch.cat([F.relu(y1 + y2), F.relu(y3 + y4)], 1)
        return F.relu(self.bn2(self.conv2(y)))


class PNASNet(ZooClassifierMixin, nn.Module):
    """PNASNet for 32x32 inputs: stem, ``cell_fn`` cells at ``num_planes``, x2 (one stride-2 cell) and x4
    channels."""

    stage_names = ("layer1", "layer2", "layer3", "layer4", "layer5")

    def __init__(
        self,
        cell_fn: type[CellA | CellB] = CellA,
        num_cells: int = 6,
        num_planes: int = 44,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...)."""
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)
        self._init_stem(in_chans, num_planes, freeze=True, n_iter=10)
        self.layer1 = self._make_stage(cell_fn, num_planes, num_planes, num_cells, settings)
        self.layer2 = cell_fn(num_planes, num_planes * 2, 2, settings)
        self.layer3 = self._make_stage(cell_fn, num_planes * 2, num_planes * 2, num_cells, settings)
        self.layer4 = cell_fn(num_planes * 2, num_planes * 4, 2, settings)
        self.layer5 = self._make_stage(cell_fn, num_planes * 4, num_planes * 4, num_cells, settings)
        # The map of each resolution: the stride-2 cells (layer2, layer4) only downsample into the next stage.
        self.feature_info = [
            dict(num_chs=num_planes, reduction=1, module="layer1"),
            dict(num_chs=num_planes * 2, reduction=2, module="layer3"),
            dict(num_chs=num_planes * 4, reduction=4, module="layer5"),
        ]
        self.deconv1 = settings.channel_deconv(num_planes * 4)
        self._init_head(num_planes * 4, num_classes, global_pool, drop_rate)

    @staticmethod
    def _make_stage(
        cell_fn: type[CellA | CellB], in_chs: int, out_chs: int, num_cells: int, settings: DeconvSettings,
    ) -> nn.Sequential:
        return nn.Sequential(*[cell_fn(in_chs if i == 0 else out_chs, out_chs, 1, settings) for i in range(num_cells)])


# Models of the authors' main.py beyond the paper's ten (ndeconv.zoo.EXTRA_MODELS): no weights, no shipping.
EXTRA_MODELS = ("pnasnet_b_deconv",)


def _create_pnasnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PNASNet:
    return create_zoo_model(PNASNet, variant, pretrained, feature_indices=(0, 1, 2), **kwargs)


default_cfgs = zoo_default_cfgs({
    "pnasnet_a_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(8, 8)),
    # No tag: no weights exist for it, so its pretrained_cfg claims none.
    "pnasnet_b_deconv": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(8, 8)),
})


@register_model
def pnasnet_a_deconv(pretrained: bool = False, **kwargs: Any) -> PNASNet:
    """PNASNet-A (44 planes, 6 cells per stage) with network deconvolution; ``deconv=False`` for the BN baseline."""
    model_args = dict(cell_fn=CellA, num_cells=6, num_planes=44)
    return _create_pnasnet("pnasnet_a_deconv", pretrained, **dict(model_args, **kwargs))


@register_model
def pnasnet_b_deconv(pretrained: bool = False, **kwargs: Any) -> PNASNet:
    """PNASNet-B (``main.py --arch pnasnetB``: 32 planes, 6 cells per stage) with network deconvolution;
    ``deconv=False`` for the BN form."""
    model_args = dict(cell_fn=CellB, num_cells=6, num_planes=32)
    return _create_pnasnet("pnasnet_b_deconv", pretrained, **dict(model_args, **kwargs))
