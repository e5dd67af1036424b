"""The ndeconv model zoo: the paper's ten CIFAR-topology architectures (``ZOO_MODELS``), the other CIFAR models of
the authors' main.py (``EXTRA_MODELS``: VGG-11/13/19, ResNet-34/50, PNASNet-B, no weights) and the authors' seven
ImageNet-topology ones (``IMAGENET_MODELS``, files ``deconv_*_imagenet.py``), registered with timm as ``*_deconv``;
the segmentation models (``deconv_segmentation``) are torchvision-style builders, not timm models.

Importing ``ndeconv.zoo`` (``import ndeconv`` does) imports every ``zoo/deconv_*.py`` file, each of which registers its
models with timm through its ``default_cfgs`` (``zoo_default_cfgs``: one record per weight set).

Two of main.py's MNIST models, ``mlp_deconv`` and ``simple_v1_deconv`` (``NDECONV_ONLY_MODELS``, in
``EXTRA_MODELS`` too), have no feature maps, so they cannot keep timm's model contract and are not registered with
timm: ``create_model`` builds every zoo model, those two included, with timm's keywords (``zoo/_registry.py``
says why).
"""

from __future__ import annotations

import importlib
import pkgutil

from timm.models import list_models

from ._builder import create_zoo_model, zoo_cfg
from ._names import REFERENCE_ARCHS
from ._names import resolve_model_name as _resolve
from ._registry import create_model, get_pretrained_cfg, ndeconv_only_models

__all__ = [
    "EXTRA_MODELS", "IMAGENET_MODELS", "NDECONV_ONLY_MODELS", "REFERENCE_ARCHS", "ZOO_MODELS", "create_model",
    "create_zoo_model", "get_pretrained_cfg", "resolve_model_name", "zoo_cfg",
]


def _register_all() -> tuple[list[str], list[str], list[str]]:
    """(CIFAR models, ImageNet models, extra CIFAR models): kept apart because main.py's ten are what ``ndeconv
    train`` trains and weights ship for; the ImageNet ones (224x224, up to 138M parameters) have none, nor do the
    other CIFAR models of main.py (``--arch vgg11``, ``resnet50``, ``pnasnetB``, ...), which a family file names in
    its module-level ``EXTRA_MODELS``."""
    names: list[str] = []
    imagenet: list[str] = []
    extra: list[str] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("deconv_"):
            module = importlib.import_module(f"{__name__}.{info.name}")
            module_extra = set(getattr(module, "EXTRA_MODELS", ()))
            # timm's models of the file, and those registered with ndeconv only (no feature maps: _registry.py).
            registered = list_models(module=info.name) + ndeconv_only_models(module=info.name)
            extra.extend(name for name in registered if name in module_extra)
            registered = [name for name in registered if name not in module_extra]
            (imagenet if info.name.endswith("_imagenet") else names).extend(registered)
    return sorted(names), sorted(imagenet), sorted(extra)


ZOO_MODELS, IMAGENET_MODELS, EXTRA_MODELS = _register_all()
# The zoo models timm does not know (``timm.create_model`` refuses them): build them with ``create_model``.
NDECONV_ONLY_MODELS = ndeconv_only_models()


def resolve_model_name(name: str, what: str = "model") -> str:
    """A zoo model name from what a user typed: ``resnet18_deconv``, ``resnet18``, or the authors' ``resnet``."""
    return _resolve(name, ZOO_MODELS + EXTRA_MODELS + IMAGENET_MODELS, what)
