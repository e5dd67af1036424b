"""Put deconvolution into an existing network: Conv2d (+ the BatchNorm2d after it) -> FastDeconv, Conv1d (+ the
BatchNorm1d after it) -> FastDeconv1d, Conv3d (+ the BatchNorm3d after it) -> FastDeconv3d."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch
from torch import nn

from ._conv import plain_conv_type
from .fast_deconv import FastDeconv
from .fast_deconv1d import FastDeconv1d
from .fast_deconv3d import FastDeconv3d

__all__ = ["deconvolve", "norm_remainder"]


def _check_convertible(name: str, conv: nn.Conv2d) -> None:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError(f"deconvolve: cannot convert {name or 'the model'} ({conv}): FastDeconv supports zero "
                         "padding given as ints only; nothing was changed")


# Each plain conv type, the deconvolution layer that replaces it and the BatchNorm that goes with it.
_REPLACEMENTS: dict[type[nn.Module], tuple[type[FastDeconv], type[nn.Module]]] = {
    nn.Conv1d: (FastDeconv1d, nn.BatchNorm1d),
    nn.Conv2d: (FastDeconv, nn.BatchNorm2d),
    nn.Conv3d: (FastDeconv3d, nn.BatchNorm3d),
}


def _to_fast_deconv(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, bias: bool, deconv_kwargs: dict[str, Any]) -> FastDeconv:
    layer_type = _REPLACEMENTS[plain_conv_type(conv)][0]
    layer = layer_type(
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
    """(parent, conv name, name of the BatchNorm right after it or None) for each conv to convert, in order.

    The convolutions of the network's own dimensionality, the highest it has: its Conv3d layers (a volume or video
    network), else its Conv2d layers, else its Conv1d layers (a 1-D network). A Conv1d inside an image network is
    not the image's convolution (timm's ECA gates convolve the pooled channel descriptor) and stays as it is."""
    plan: list[tuple[nn.Module, str, str | None]] = []
    present = {plain_conv_type(m) for m in model.modules()}
    conv_type = next((t for t in (nn.Conv3d, nn.Conv2d) if t in present), nn.Conv1d)
    norm_type = _REPLACEMENTS[conv_type][1]

    seen: dict[int, str] = {}  # id of each conv planned -> its name

    def visit(parent: nn.Module, prefix: str) -> bool:
        names = list(parent._modules.keys())
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None:
                continue
            if plain_conv_type(child) is conv_type:
                _check_convertible(prefix + name, child)
                if id(child) in seen:
                    # Replacing each place by its own FastDeconv would untie the weights (twice the parameters)
                    # and give each place statistics of its own: not the network that was given.
                    raise ValueError(
                        f"deconvolve: {seen[id(child)]} and {prefix + name} are one conv module used twice; "
                        "deconvolution would untie them into two layers with their own weights: untie them in the "
                        "model first (a copy.deepcopy of one) if that is what you want")
                seen[id(child)] = prefix + name
                nxt_name = names[i + 1] if i + 1 < len(names) else None
                nxt = parent._modules.get(nxt_name) if nxt_name else None
                is_norm = isinstance(nxt, norm_type) and nxt.num_features == child.out_channels
                plan.append((parent, name, nxt_name if is_norm else None))
                if which == "stem":
                    return True
            elif visit(child, f"{prefix}{name}."):
                return True
        return False

    visit(model, "")
    return plan


def deconvolve(model: nn.Module, which: Literal["all", "stem"] = "all", calibrate: Iterable[Any] | None = None,
               **deconv_kwargs: Any) -> nn.Module:
    """Replace ``nn.Conv2d`` layers of ``model`` (in place) with :class:`FastDeconv` carrying their weights; in a
    1-D network (no Conv2d), its ``nn.Conv1d`` layers with :class:`FastDeconv1d`, and in a volume or video network
    (one with a Conv3d) its ``nn.Conv3d`` layers with :class:`FastDeconv3d` (a ``BatchNorm1d``/``BatchNorm3d``
    right after one is removed likewise).

    A ``BatchNorm2d`` registered directly after a converted conv in the same parent (the usual conv-bn pair of
    torchvision and timm) is removed: deconvolution replaces batch normalisation. A norm+act layer (timm's
    ``BatchNormAct2d``) keeps its activation and dropout. A conv whose BatchNorm is removed gets a bias (zero,
    the shift the norm's beta gave; the authors' deconvolution networks have one), unless ``bias=`` says
    otherwise. ``which='stem'`` converts only the first conv, the cheap and most effective place (the input
    pixels are the most correlated). ``deconv_kwargs`` go to FastDeconv (``block``, ``n_iter``, ``eps``,
    ``sampling_stride``, ``bias``, ...). Every conv is checked before any is replaced, so an unsupported one
    raises with the model unchanged. Returns ``model``.

    ``calibrate=batches`` (an iterable of input tensors, or of ``(input, ...)`` tuples as a DataLoader yields) makes
    the conversion exact: each FastDeconv's running statistics are calibrated on the batches (what a training
    run's running averages reach on them) and its weight and bias set so that its eval output is its conv's and
    removed BatchNorm's, so the model computes the same function in eval (``ndeconv.layers.calibrate``). Every
    converted conv then has a bias; the model is unchanged if any step fails.
    """
    if which not in ("all", "stem"):
        raise ValueError(f"deconvolve: which must be 'all' or 'stem', got {which!r}")
    bias = deconv_kwargs.pop("bias", None)
    if calibrate is not None and bias is not False:
        bias = True  # an exact conversion puts the patch mean's shift into the bias
    plan = _plan(model, which)
    if not plan:
        raise ValueError("deconvolve: the model has no nn.Conv2d (or nn.Conv1d, nn.Conv3d) to convert")
    # Every replacement is built before any is swapped in: FastDeconv's own checks (a non-square stride, a bad
    # keyword) then leave the model unchanged too.
    replacements = []
    for parent, name, norm_name in plan:
        conv = parent._modules[name]
        with_bias = bias if bias is not None else (conv.bias is not None or norm_name is not None)
        replacements.append((parent, name, norm_name, _to_fast_deconv(conv, with_bias, deconv_kwargs)))
    if calibrate is not None:
        from .calibrate import swap_in_calibrated

        return swap_in_calibrated(model, replacements, calibrate, norm_remainder)
    for parent, name, norm_name, layer in replacements:
        setattr(parent, name, layer)
        if norm_name is not None:
            setattr(parent, norm_name, norm_remainder(parent._modules[norm_name]))
    return model
