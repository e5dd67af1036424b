"""Networks the benchmarks time: the zoo's models through timm, and for the scaling study an
ImageNet-style ResNet-18 stack (7x7/2 stem, max-pool, two stages) of the zoo's own ``BasicBlock``."""

from __future__ import annotations

import timm
import torch
from torch import nn

import ndeconv  # noqa: F401  (registers the zoo with timm)
from ndeconv.zoo._layer_factory import DeconvSettings
from ndeconv.zoo.deconv_resnet import BasicBlock

ZOO_ARCHS = (
    "resnet18_deconv", "vgg16_deconv", "preact_resnet18_deconv", "densenet121_deconv", "resnext29_32x4d_deconv",
    "mobilenetv2_deconv", "dpn92_deconv", "pnasnet_a_deconv", "senet18_deconv", "efficientnet_b0_deconv",
)


class ResNet18Stack(nn.Module):
    """The "ResNet-18-style layer stack" of the scaling study: a 7x7/2 stem and max-pool in front of the
    first ``stages`` ResNet-18 stages, so images of 32 to 224 pixels all make sense."""

    def __init__(self, s: DeconvSettings, num_classes: int = 10, stages: int = 2) -> None:
        super().__init__()
        self.conv1 = s.conv(3, 64, 7, 2, 3)
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.bn1 = s.norm(64)
        layers, chs = [], 64
        for i, width in enumerate((64, 128, 256, 512)[:stages]):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(chs, width, stride, s), BasicBlock(width, width, 1, s)))
            chs = width
        self.layers = nn.Sequential(*layers)
        self.linear = s.head(chs, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.linear(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(arch: str, deconv: bool, num_classes: int = 10) -> tuple[nn.Module, str]:
    """(model, source): a zoo model via ``timm.create_model(arch, deconv=...)``, or ``stack``."""
    if arch == "stack":
        return ResNet18Stack(DeconvSettings(deconv=deconv), num_classes), "ResNet-18-style stack"
    if timm.is_model(arch):
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, deconv=deconv), "zoo"
    raise SystemExit(f"unknown or unregistered architecture {arch!r}; choose from {', '.join(ZOO_ARCHS)} or 'stack'")
