"""The stem adaptation of the zoo's pretrained weights: gray (1-channel) weights load into timm's default
3-channel model exactly (an RGB copy of a gray image gives the gray image's output, in eval), and the cfg's
``input_size``/``mean``/``std`` follow the channels of the model built. ``zoo_filter_fn`` is the
``pretrained_filter_fn`` timm calls with every state_dict it loads into a zoo model."""

from __future__ import annotations

from typing import Any

import torch
from timm.models import adapt_input_conv
from torch import nn

from ndeconv.errors import NdeconvError
from ndeconv.io import check_loadable_weights
from ndeconv.layers import FastDeconv

__all__ = ["DEFAULT_IN_CHANS", "default_in_chans", "expand_deconv_stem", "zoo_filter_fn"]

# timm's convention: a model takes 3-channel images and its pretrained_cfg says so. Weights trained on gray
# images (1 channel) load into that model through an exact stem adaptation (``zoo_filter_fn``); ``in_chans=1``
# builds their own gray stem, and whatever the channels, a model's pretrained_cfg describes the model built.
DEFAULT_IN_CHANS = 3


def default_in_chans(weights_chans: int) -> int:
    """The channels of the default model for weights of ``weights_chans`` input channels: 3 where the stem
    adapts exactly (3 is a whole multiple of them), else the weights' own."""
    return DEFAULT_IN_CHANS if DEFAULT_IN_CHANS % weights_chans == 0 else weights_chans


def _names(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _with_channels(data: dict[str, Any], chans: int) -> dict[str, Any]:
    """``input_size``/``mean``/``std`` for ``chans`` channels: statistics repeat for whole multiples (an RGB copy
    of a gray image has the gray statistics in every channel) and come back whole from such a repetition,
    else their average does."""

    def fit(stats: tuple[float, ...]) -> tuple[float, ...]:
        if len(stats) == chans:
            return stats
        if chans % len(stats) == 0:
            return stats * (chans // len(stats))
        if len(stats) % chans == 0 and stats == stats[:chans] * (len(stats) // chans):
            return stats[:chans]
        return (sum(stats) / len(stats),) * chans

    return dict(input_size=(chans, *tuple(data["input_size"])[1:]), mean=fit(tuple(data["mean"])),
                std=fit(tuple(data["std"])))


def _fit_in_chans(cfg: Any, kwargs: dict[str, Any], user_input_size: bool) -> dict[str, Any]:
    """A model built for other input channels (``in_chans=``) than its pretrained_cfg says gets a pretrained_cfg
    that describes its own input; the stem of weights loaded into it is adapted by ``zoo_filter_fn`` first, so
    timm then neither warns nor adapts it again."""
    in_chans = kwargs.get("in_chans")
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    source = {key: overlay.get(key, getattr(cfg, key)) for key in ("input_size", "mean", "std")}
    if in_chans and not user_input_size and source["input_size"][0] != in_chans:
        overlay.update(_with_channels(source, in_chans))
        kwargs["pretrained_cfg_overlay"] = overlay
    return kwargs


def expand_deconv_stem(
    state_dict: dict[str, torch.Tensor], prefix: str, module: FastDeconv
) -> dict[str, torch.Tensor]:
    """Adapt a FastDeconv stem's weight and whitening to ``module.in_channels`` (a whole multiple of the source).

    For an input whose channels repeat the source's (an RGB copy of a gray image), the adapted layer's eval
    output equals the source layer's on the source image: patches become ``[P, P, ...]`` (channel-major unfold
    layout ``c*k*k + p``), so the whitening is ``block_diag(D, D, ...)``, the mean repeats, and the weight
    repeats divided by the number of copies. Only a stem whitened as one block, both before and after
    (in_channels <= block, which every zoo stem is), has that layout; anything else is refused.
    """
    weight = state_dict[prefix + "weight"]
    src, dst = weight.shape[1], module.in_channels
    kh, kw = module.kernel_size
    name = prefix.rstrip(".")
    if module.groups != 1 or dst % src or dst < src:
        raise NdeconvError(
            f"cannot adapt the deconvolution stem {name} from {src} to {dst} input channels: only whole "
            f"multiples are exact; build the model with in_chans={src} and give it {src}-channel images"
        )
    mean, deconv = state_dict.get(prefix + "running_mean"), state_dict.get(prefix + "running_deconv")
    src_features = src * kh * kw
    if mean is None or deconv is None or mean.shape != (src_features,) or deconv.shape != (src_features,) * 2:
        raise NdeconvError(
            f"cannot adapt the deconvolution stem {name} from {src} to {dst} channels: its whitening is not one "
            f"block over all {src} channels (running_deconv {tuple(deconv.shape) if deconv is not None else None})"
        )
    if module.block != dst:
        raise NdeconvError(
            f"cannot adapt the deconvolution stem {name} to {dst} channels: the model whitens them in blocks of "
            f"{module.block}, not as one block; use in_chans <= the model's block"
        )
    copies = dst // src
    out = dict(state_dict)
    # Divide in float64: shipped weights may be stored in float16, where w / 3 alone would lose 5e-4.
    out[prefix + "weight"] = weight.double().repeat(1, copies, 1, 1) / copies
    out[prefix + "running_mean"] = mean.repeat(copies)
    out[prefix + "running_deconv"] = torch.block_diag(*([deconv] * copies))
    return out


def _strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel checkpoints (the authors' main.py) prefix every key with ``module.``."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def zoo_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: adapt the stem to ``in_chans``, refuse a foreign state_dict.

    A deconvolution stem is adapted exactly (``expand_deconv_stem``), a plain-conv stem by timm's own
    ``adapt_input_conv``, both from the channels of the weights themselves (the model's pretrained_cfg describes
    the model, not the source). The classifier is left to timm (resized when ``num_classes`` differs); any other
    missing, unexpected or differently shaped key means the file is another architecture (or the other form,
    ``deconv=True``/``False``).
    """
    state_dict = _strip_module_prefix(dict(state_dict))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    stems = _names(cfg.get("first_conv"))
    for stem in stems:
        module = model.get_submodule(stem)
        weight = state_dict.get(f"{stem}.weight")
        if isinstance(module, FastDeconv) and weight is not None and weight.ndim == 4:
            if weight.shape[1] != module.in_channels:
                # The adaptation computes in float64, which would hide integer weights from load_state_dict's check.
                check_loadable_weights(state_dict, module.state_dict(prefix=f"{stem}."))
                state_dict = expand_deconv_stem(state_dict, f"{stem}.", module)
        elif isinstance(module, nn.Conv2d) and weight is not None and weight.ndim == 4:
            if weight.shape[1] != module.in_channels and module.groups == 1:
                # A plain stem (the BatchNorm form): timm's own adaptation, done here from the weights' channels
                # so the pretrained_cfg can describe the model being built rather than the source.
                check_loadable_weights(state_dict, module.state_dict(prefix=f"{stem}."))
                state_dict = dict(state_dict)
                state_dict[f"{stem}.weight"] = adapt_input_conv(module.in_channels, weight, base_chans=weight.shape[1])
    classifiers = _names(cfg.get("classifier"))
    classifier_prefixes = tuple(f"{n}." for n in classifiers)
    expected = model.state_dict()
    # Another num_classes (0 for a feature extractor): timm drops the classifier's weight and bias itself; the
    # rest of the head (a Delinear's whitening of the pooled features) is kept where it fits and dropped where
    # the new head has none or another shape (num_classes=0, global_pool='catavgmax').
    source_classes = next((state_dict[f"{n}.weight"].shape[0] for n in classifiers if f"{n}.weight" in state_dict),
                          None)
    new_head = source_classes is not None and getattr(model, "num_classes", source_classes) != source_classes
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(classifier_prefixes)
                      or (k in expected and v.shape == expected[k].shape)}
    missing = [k for k in expected if k not in state_dict and not (new_head and k.startswith(classifier_prefixes))]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for key, value in state_dict.items():
        if key not in expected or value.shape == expected[key].shape:
            continue
        if key in {f"{s}.weight" for s in stems} and value.shape[0] == expected[key].shape[0]:
            continue  # a plain stem conv with other input channels: timm adapts it
        mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)}")
    if missing or unexpected or mismatched:
        arch = cfg.get("architecture") or type(model).__name__
        deconv = getattr(getattr(model, "deconv_settings", None), "deconv", True)
        form = "hybrid (deconv='stem')" if deconv == "stem" else "deconvolution" if deconv else "BatchNorm"
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
        raise NdeconvError(
            f"the weights do not fit {arch} ({form} form): {'; '.join(parts)}; they belong to another "
            "architecture or form (deconv=True/False/'stem', block, block_fc)"
        )
    return state_dict
