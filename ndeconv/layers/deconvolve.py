"""Put deconvolution into an existing network: Conv2d (+ the BatchNorm2d after it) -> FastDeconv."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from .fast_deconv import FastDeconv

__all__ = ["deconvolve", "norm_remainder"]


def _check_convertible(name: str, conv: nn.Conv2d) -> None:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"deconvolve: cannot convert {name or 'the model'} ({conv}): FastDeconv supports zero "
                         "padding given as ints only; nothing was changed")


def _to_fast_deconv(conv: nn.Conv2d, bias: bool, deconv_kwargs: dict[str, Any]) -> FastDeconv:
    layer = FastDeconv(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=bias,
        device=conv.weight.device, dtype=conv.weight.dtype, **deconv_kwargs,
    )
    with torch.no_grad():
        layer.weight.copy_(conv.weight)
        if layer.bias is not None and conv.bias is not None:
            layer.bias.copy_(conv.bias)
        elif layer.bias is not None:
            layer.bias.zero_()  # a new bias: the per-channel shift the removed BatchNorm's beta gave
    layer.train(conv.training)
    return layer


def norm_remainder(norm: nn.BatchNorm2d) -> nn.Module:
    """What stays of a BatchNorm after the conv before it whitens: nothing, or the activation (and dropout) of
    a norm+act layer such as timm's ``BatchNormAct2d``, whose forward is norm -> drop -> act."""
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", None)
    kept = [m for m in (drop, act) if isinstance(m, nn.Module) and not isinstance(m, nn.Identity)]
    if not kept:
        return nn.Identity()
    return kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def _plan(model: nn.Module, which: str) -> list[tuple[nn.Module, str, str | None]]:
    """(parent, conv name, name of the BatchNorm right after it or None) for each conv to convert, in order."""
    plan: list[tuple[nn.Module, str, str | None]] = []

    def visit(parent: nn.Module, prefix: str) -> bool:
        names = list(parent._modules.keys())
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None:
                continue
            if type(child) is nn.Conv2d:
                _check_convertible(prefix + name, child)
                nxt_name = names[i + 1] if i + 1 < len(names) else None
                nxt = parent._modules.get(nxt_name) if nxt_name else None
                is_norm = isinstance(nxt, nn.BatchNorm2d) and nxt.num_features == child.out_channels
                plan.append((parent, name, nxt_name if is_norm else None))
                if which == "stem":
                    return True
            elif visit(child, f"{prefix}{name}."):
                return True
        return False

    visit(model, "")
    return plan


def deconvolve(model: nn.Module, which: Literal["all", "stem"] = "all", **deconv_kwargs: Any) -> nn.Module:
    """Replace ``nn.Conv2d`` layers of ``model`` (in place) with :class:`FastDeconv` carrying their weights.

    A ``BatchNorm2d`` registered directly after a converted conv in the same parent (the usual conv-bn pair of
    torchvision and timm) is removed: deconvolution replaces batch normalisation. A norm+act layer (timm's
    ``BatchNormAct2d``) keeps its activation and dropout. A conv whose BatchNorm is removed gets a bias (zero,
    the shift the norm's beta gave; the authors' deconvolution networks have one), unless ``bias=`` says
    otherwise. ``which='stem'`` converts only the first conv, the cheap and most effective place (the input
    pixels are the most correlated). ``deconv_kwargs`` go to FastDeconv (``block``, ``n_iter``, ``eps``,
    ``sampling_stride``, ``bias``, ...). Every conv is checked before any is replaced, so an unsupported one
    raises with the model unchanged. Returns ``model``.
    """
    if which not in ("all", "stem"):
        raise ValueError(f"deconvolve: which must be 'all' or 'stem', got {which!r}")
    bias = deconv_kwargs.pop("bias", None)
    plan = _plan(model, which)
    if not plan:
        raise ValueError("deconvolve: the model has no nn.Conv2d to convert")
    # Every replacement is built before any is swapped in: FastDeconv's own checks (a non-square stride, a bad
    # keyword) then leave the model unchanged too.
    replacements = []
    for parent, name, norm_name in plan:
        conv = parent._modules[name]
        with_bias = bias if bias is not None else (conv.bias is not None or norm_name is not None)
        replacements.append((parent, name, norm_name, _to_fast_deconv(conv, with_bias, deconv_kwargs)))
    for parent, name, norm_name, layer in replacements:
        setattr(parent, name, layer)
        if norm_name is not None:
            setattr(parent, norm_name, norm_remainder(parent._modules[norm_name]))
    return model
