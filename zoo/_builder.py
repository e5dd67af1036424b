"""What every zoo file uses to register its models with timm, like timm's own ``_cfg`` and ``_create_*`` helpers.

A zoo file reads::

    def _create_resnet(variant, pretrained=False, **kwargs):
        return create_zoo_model(ResNet, variant, pretrained, **kwargs)

    default_cfgs = zoo_default_cfgs({
        'resnet18_deconv.fashion_mnist': zoo_cfg(first_conv='conv1', classifier='linear'),
    })

    @register_model
    def resnet18_deconv(pretrained=False, **kwargs):
        model_args = dict(block_fn=BasicBlock, layers=(2, 2, 2, 2))
        return _create_resnet('resnet18_deconv', pretrained, **dict(model_args, **kwargs))

(``block_fn``, not timm's ``block``: ``block`` is the deconvolution's whitening block size, a DeconvSettings field.)

``zoo_default_cfgs`` is timm's ``generate_default_cfgs`` with each weight set's record added to its entry (the
data it was trained on: ``input_size``, ``mean``, ``std``, crop, labels; its ``hf_hub_id``: one record per weight
set, ``ndeconv.zoo._pretrained.tag_record``), before timm's ``register_model`` reads it: nothing writes into
timm's registry afterwards. The shipped file (``zoo/weights/<name>.<tag>/``, or the folder ``NDECONV_WEIGHTS``
names) is found when a model is built, so a zoo file names only its first conv and classifier.
"""

from __future__ import annotations

from typing import Any

from timm.models import DefaultCfg, build_model_with_cfg, generate_default_cfgs
from torch import nn

from ndeconv.datasets import CIFAR10_MEAN, CIFAR10_STD

from ._hub_errors import pretrained_errors
from ._pretrained import apply_tag_model_args, prepare_pretrained, tag_record
from ._registry import is_ndeconv_only, ndeconv_only_cfg
from ._stem import zoo_filter_fn

__all__ = ["create_zoo_model", "zoo_cfg", "zoo_default_cfgs"]


def zoo_default_cfgs(cfgs: dict[str, dict[str, Any]]) -> dict[str, DefaultCfg]:
    """timm's ``generate_default_cfgs`` for a zoo file's ``{'<model>.<tag>': zoo_cfg(...)}``, each entry completed
    with its weight set's record (``tag_record``), which replaces the CIFAR defaults of ``zoo_cfg`` with the data
    the weights were trained on."""
    completed = {}
    for key, cfg in cfgs.items():
        name, _, tag = key.partition(".")
        completed[key] = {**cfg, **tag_record(name, tag)} if tag else dict(cfg)
    return generate_default_cfgs(completed)


def zoo_cfg(**overrides: Any) -> dict[str, Any]:
    """The pretrained_cfg fields shared by every zoo model (CIFAR topology: 32x32 input, 10 classes)."""
    cfg: dict[str, Any] = {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (4, 4),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "conv1",
        "classifier": "linear",
        "license": "mit",
        "origin_url": "https://github.com/yechengxi/deconvolution",
        "paper_name": "Network Deconvolution",
        "paper_ids": "arXiv:1905.11926",
    }
    cfg.update(overrides)
    return cfg


def create_zoo_model(
    model_cls: type[nn.Module], variant: str, pretrained: bool = False,
    feature_indices: tuple[int, ...] | None = None, **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` plus what the zoo needs around it.

    - The default model takes 3 channels, as timm's convention has it, and its pretrained_cfg (the default
      tag's, with or without weights) says so; ``in_chans=1`` builds the gray stem Fashion-MNIST weights were
      trained with, and whatever ``in_chans``, the model's pretrained_cfg describes the model built.
    - With weights, a registered tag's gray weights load into the 3-channel stem through an exact adaptation
      (``zoo_filter_fn``: an RGB copy of a gray image gives the gray image's output, in eval); a user's file
      gives the model its own channels and classes unless asked for others; a shipped file's sha256 is checked
      first, and any failure is one clear error naming the model, the tag and the source.
    - A tag whose weights are another form than the architecture's default (``fashion_mnist_stem``: the hybrid)
      builds that form, with or without weights (``TAG_MODEL_ARGS``).
    - A model not registered with timm (``ndeconv.zoo._registry``) gets its pretrained_cfg from ndeconv's registry,
      where timm's would have held it.
    """
    if is_ndeconv_only(variant):
        kwargs["pretrained_cfg"] = ndeconv_only_cfg(variant, kwargs.get("pretrained_cfg"))
    if feature_indices is not None:
        # features_only by forward hooks on the unmodified model (every zoo forward has functional ops between
        # its children); ``feature_indices`` index the model's ``feature_info``.
        kwargs.setdefault("feature_cfg", dict(feature_cls="hook", no_rewrite=True, out_indices=feature_indices))
    kwargs.setdefault("pretrained_filter_fn", zoo_filter_fn)
    apply_tag_model_args(variant, kwargs)
    if not pretrained:
        kwargs = prepare_pretrained(variant, pretrained, kwargs)
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    with pretrained_errors(variant, kwargs):  # finding and reading the weights included
        kwargs = prepare_pretrained(variant, pretrained, kwargs)
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
