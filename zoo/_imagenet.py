"""What the zoo's ImageNet-topology families share (the authors' ``main_imagenet.py`` models, the paper's Table 2):
their pretrained_cfg, the script's flag defaults, and the refusal of ``pretrained=True`` (no weights exist).

``main_imagenet.py`` differs from ``main.py`` in one model-shaping default: ``--block-fc 64`` (``main.py``: 512), so
the deconvolution form's Delinear heads whiten blocks of 64 features; the ``deconv=False`` form is the baseline,
torchvision's model (``-a resnet18``, ...; VGG's without BatchNorm, ``vgg11``, unless ``batch_norm=True``:
``vgg11_bn``), with a plain Linear head.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ndeconv.errors import UsageError

from ._builder import zoo_cfg

__all__ = ["IMAGENET_BLOCK_FC", "imagenet_cfg", "imagenet_kwargs"]

# main_imagenet.py's --block-fc default: the Delinear head's block in the deconvolution form.
IMAGENET_BLOCK_FC = 64
# Where a weights source would be named, by timm.create_model's overlay or an hf-hub:/local-dir: cfg.
_SOURCES = ("file", "hf_hub_id", "url", "state_dict")


def imagenet_cfg(**overrides: Any) -> dict[str, Any]:
    """The pretrained_cfg of an ImageNet-topology zoo model: 224x224 RGB, ImageNet statistics, 1000 classes, the
    authors' eval transform (Resize(256) + CenterCrop(224): crop_pct 0.875, bilinear). No weights: no tag, no file."""
    cfg = zoo_cfg(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
    )
    cfg.update(overrides)
    return cfg


def _names_a_source(cfg: Any) -> bool:
    if cfg is None or isinstance(cfg, str):
        return False
    data = cfg if isinstance(cfg, dict) else getattr(cfg, "__dict__", {})
    return any(data.get(key) for key in _SOURCES)


def imagenet_kwargs(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with main_imagenet.py's defaults filled in, after refusing ``pretrained=True`` without a source.

    The authors released no ImageNet weights and the zoo ships none, so ``pretrained=True`` alone is one clear
    error (timm would only warn and return random weights); a user's own weights (``pretrained_cfg_overlay=
    dict(file=...)``, ``hf-hub:``, ``local-dir:``) load as for any zoo model.
    """
    if pretrained and not (_names_a_source(kwargs.get("pretrained_cfg_overlay"))
                           or _names_a_source(kwargs.get("pretrained_cfg"))):
        raise UsageError(
            f"{variant}: no pretrained weights exist (the authors released no ImageNet checkpoints and none are "
            "shipped); build it with pretrained=False, or load your own with pretrained_cfg_overlay=dict(file=...)")
    kwargs = dict(kwargs)
    if kwargs.get("block_fc") is None:
        kwargs["block_fc"] = IMAGENET_BLOCK_FC if kwargs.get("deconv", True) is True else 0  # "stem": the BN head
    return kwargs
