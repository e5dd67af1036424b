"""DPN-92 (Chen et al., Dual Path Networks) as the deconvolution paper's authors built it.

The CIFAR model of the authors' ``models/dpn.py``: a 3x3 stem to 64 channels, then four stages (3, 4, 20, 3
blocks; strides 1, 2, 2, 2) of grouped bottlenecks (32 groups) whose output splits into a residual path (added)
and a densely connected path (concatenated), ending at 2048 + 4 * 128 = 2560 channels. Module names and
state_dict keys are the authors'.

Deconvolution form: the stem frozen with 10 Newton-Schulz iterations, all other convs at the model-wide
settings; no BatchNorm; a Delinear head. BatchNorm form: bias-free convs, each followed by a BatchNorm2d
(the authors' ``--deconv False`` baseline).
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

__all__ = ["DPN"]


class Bottleneck(nn.Module):
    """Grouped bottleneck whose first ``out_chs`` channels join the residual path, the rest the dense path."""

    def __init__(
        self, last_chs: int, mid_chs: int, out_chs: int, dense_depth: int, stride: int, first: bool,
        settings: DeconvSettings,
    ) -> None:
        super().__init__()
        self.out_chs = out_chs
        self.conv1 = settings.conv(last_chs, mid_chs, 1)
        self.bn1 = settings.norm(mid_chs)
        self.conv2 = settings.conv(mid_chs, mid_chs, 3, stride, 1, groups=32)
        self.bn2 = settings.norm(mid_chs)
        self.conv3 = settings.conv(mid_chs, out_chs + dense_depth, 1)
        self.bn3 = settings.norm(out_chs + dense_depth)
        if not first:
            self.shortcut = nn.Identity()
        elif settings.body_deconv:
            # The authors' deconvolution form projects with a bare FastDeconv (keys ``shortcut.weight``, ...)...
            self.shortcut = settings.conv(last_chs, out_chs + dense_depth, 1, stride)
        else:
            # ...and their BatchNorm form with a conv + BatchNorm pair (``shortcut.0``, ``shortcut.1``).
            self.shortcut = nn.Sequential(
                settings.conv(last_chs, out_chs + dense_depth, 1, stride), settings.norm(out_chs + dense_depth)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        x = self.shortcut(x)
        d = self.out_chs
        out = torch.cat([x[:, :d] + out[:, :d], x[:, d:], out[:, d:]], 1)
        return F.relu(out)


class DPN(ZooClassifierMixin, nn.Module):
    """Dual Path Network for 32x32 inputs: stem, four stages (strides 1, 2, 2, 2)."""

    def __init__(
        self,
        mid_chs: tuple[int, ...] = (96, 192, 384, 768),
        out_chs: tuple[int, ...] = (256, 512, 1024, 2048),
        layers: tuple[int, ...] = (3, 4, 20, 3),
        dense_depth: tuple[int, ...] = (16, 32, 24, 128),
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **deconv_kwargs: Any,
    ) -> None:
        """``deconv_kwargs`` are the DeconvSettings fields (deconv, block, block_fc, deconv_iter, eps, ...)."""
        super().__init__()
        settings = self.deconv_settings = DeconvSettings(**deconv_kwargs)

        last_chs, reduction = 64, 1
        self._init_stem(in_chans, last_chs, freeze=True, n_iter=10)

        self.feature_info = []
        for i, (mid, out, depth, dense) in enumerate(zip(mid_chs, out_chs, layers, dense_depth, strict=True)):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = []
            for j in range(depth):
                blocks.append(Bottleneck(last_chs, mid, out, dense, stride if j == 0 else 1, j == 0, settings))
                # The residual path stays ``out`` wide; the dense path grows by ``dense`` per block (twice at first).
                last_chs = out + (j + 2) * dense
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=last_chs, reduction=reduction, module=f"layer{i + 1}"))
        self.stage_names = tuple(info["module"] for info in self.feature_info)
        self.deconv1 = settings.channel_deconv(last_chs)
        self._init_head(last_chs, num_classes, global_pool, drop_rate)


def _create_dpn(variant: str, pretrained: bool = False, **kwargs: Any) -> DPN:
    feature_indices = tuple(range(len(kwargs["layers"])))  # every stage's output
    return create_zoo_model(DPN, variant, pretrained, feature_indices=feature_indices, **kwargs)


default_cfgs = zoo_default_cfgs({
    "dpn92_deconv.fashion_mnist": zoo_cfg(first_conv="conv1", classifier="linear"),
})


@register_model
def dpn92_deconv(pretrained: bool = False, **kwargs: Any) -> DPN:
    """DPN-92 (CIFAR) with network deconvolution; ``deconv=False`` for the BN baseline."""
    model_args = dict(mid_chs=(96, 192, 384, 768), out_chs=(256, 512, 1024, 2048), layers=(3, 4, 20, 3),
                      dense_depth=(16, 32, 24, 128))
    return _create_dpn("dpn92_deconv", pretrained, **dict(model_args, **kwargs))
