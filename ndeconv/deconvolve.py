"""Put deconvolution into an existing network: Conv2d (+ the BatchNorm2d after it) -> FastDeconv."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .fast_deconv import FastDeconv

__all__ = ["deconvolve"]


def _to_fast_deconv(conv: nn.Conv2d, deconv_kwargs: dict[str, Any]) -> FastDeconv:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(
            f"deconvolve: cannot convert {conv}: FastDeconv supports zero padding given as ints only"
        )
    layer = FastDeconv(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
        device=conv.weight.device, dtype=conv.weight.dtype, **deconv_kwargs,
    )
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        if conv.bias is not None:
            layer.bias.copy_(conv.bias)
    layer.train(conv.training)
    return layer


def deconvolve(model: nn.Module, which: Literal["all", "stem"] = "all", **deconv_kwargs: Any) -> nn.Module:
    """Replace ``nn.Conv2d`` layers of ``model`` (in place) with :class:`FastDeconv` carrying their weights.

    A ``BatchNorm2d`` registered directly after a converted conv in the same parent (the
    usual conv-bn pair of torchvision and timm) becomes ``nn.Identity``: deconvolution
    replaces batch normalisation. ``which='stem'`` converts only the first conv, the
    cheap and most effective place (the input pixels are the most correlated).
    ``deconv_kwargs`` go to FastDeconv (``block``, ``n_iter``, ``eps``, ``sampling_stride``, ...).
    Returns ``model``.
    """
    if which not in ("all", "stem"):
        raise ValueError(f"deconvolve: which must be 'all' or 'stem', got {which!r}")
    converted = 0

    def visit(parent: nn.Module) -> bool:
        nonlocal converted
        names = list(parent._modules.keys())
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None:
                continue
            if type(child) is nn.Conv2d:
                setattr(parent, name, _to_fast_deconv(child, deconv_kwargs))
                converted += 1
                nxt = parent._modules.get(names[i + 1]) if i + 1 < len(names) else None
                if isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == child.out_channels:
                    setattr(parent, names[i + 1], nn.Identity())
                if which == "stem":
                    return True
            elif visit(child):
                return True
        return False

    visit(model)
    if converted == 0:
        raise ValueError("deconvolve: the model has no nn.Conv2d to convert")
    return model
