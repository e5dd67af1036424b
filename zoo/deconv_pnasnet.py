"""PNASNet-A (Liu et al., Progressive Neural Architecture Search) as the deconvolution paper's authors built it.

The CIFAR model of the authors' ``models/pnasnet.py``: a stem conv, then five stages of the "A" cell (a 7x7
depthwise-separable conv beside a 3x3 max-pool), 44 -> 88 -> 176 channels, downsampling twice by a single
stride-2 cell. Module names and state_dict keys are the authors', so their checkpoints load unchanged.

Deconvolution form: every conv is a FastDeconv (the stem frozen after its first steps, 10 Newton-Schulz
iterations), there is no BatchNorm, and the head is a Delinear. BatchNorm form: bias-free convs, each followed by
a BatchNorm2d (the authors' ``--deconv False`` baseline).
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

__all__ = ["PNASNet"]


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


class PNASNet(ZooClassifierMixin, nn.Module):
    """PNASNet for 32x32 inputs: stem, cells at ``num_planes``, x2 (one stride-2 cell) and x4 channels."""

    def __init__(
        self,
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
        settings = DeconvSettings(**deconv_kwargs)
        self.deconv_settings = settings

        # The stem's whitening is frozen after its first steps, with 10 iterations (the authors' choice).
        self.conv1 = settings.conv(in_chans, num_planes, 3, 1, 1, freeze=True, n_iter=10)
        self.bn1 = settings.norm(num_planes)
        self.layer1 = self._make_stage(num_planes, num_planes, num_cells, settings)
        self.layer2 = CellA(num_planes, num_planes * 2, 2, settings)
        self.layer3 = self._make_stage(num_planes * 2, num_planes * 2, num_cells, settings)
        self.layer4 = CellA(num_planes * 2, num_planes * 4, 2, settings)
        self.layer5 = self._make_stage(num_planes * 4, num_planes * 4, num_cells, settings)
        self.feature_info = [
            dict(num_chs=num_planes, reduction=1, module="layer1"),
            dict(num_chs=num_planes * 2, reduction=2, module="layer3"),
            dict(num_chs=num_planes * 4, reduction=4, module="layer5"),
        ]

        # The reference's optional ChannelDeconv on the last feature map (--delinear False --block-fc N).
        self.deconv1 = settings.channel_deconv()
        self._init_head(num_planes * 4, num_classes, global_pool, drop_rate)

    @staticmethod
    def _make_stage(in_chs: int, out_chs: int, num_cells: int, settings: DeconvSettings) -> nn.Sequential:
        return nn.Sequential(*[CellA(in_chs if i == 0 else out_chs, out_chs, 1, settings) for i in range(num_cells)])

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.run_stage(self.layer1, x)
        x = self.run_stage(self.layer2, x)
        x = self.run_stage(self.layer3, x)
        x = self.run_stage(self.layer4, x)
        x = self.run_stage(self.layer5, x)
        if self.deconv1 is not None:
            x = self.deconv1(x)
        return x


_FEATURE_INDICES = tuple(range(3))  # every entry of feature_info


def _create_pnasnet(variant: str, pretrained: bool = False, **kwargs: Any) -> PNASNet:
    return create_zoo_model(PNASNet, variant, pretrained, feature_indices=_FEATURE_INDICES, **kwargs)


default_cfgs = generate_default_cfgs({
    "pnasnet_a_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear", pool_size=(8, 8)),
})


@register_model
def pnasnet_a_deconv(pretrained: bool = False, **kwargs: Any) -> PNASNet:
    """PNASNet-A (44 planes, 6 cells per stage) with network deconvolution; ``deconv=False`` for the BN baseline."""
    return _create_pnasnet("pnasnet_a_deconv", pretrained, **dict(num_cells=6, num_planes=44) | kwargs)
