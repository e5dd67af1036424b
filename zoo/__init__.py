"""The ndeconv model zoo: the paper's ten CIFAR-topology architectures, registered with timm as ``*_deconv``.

Importing ``ndeconv.zoo`` (``import ndeconv`` does) imports every ``zoo/deconv_*.py`` file, each of which registers its
models with timm, then completes their pretrained_cfgs (weight locations and data fields of each tag).
"""

from __future__ import annotations

import importlib
import pkgutil

from timm.models import list_models

from ._builder import create_zoo_model, zoo_cfg
from ._names import REFERENCE_ARCHS
from ._names import resolve_model_name as _resolve
from ._pretrained import complete_pretrained_cfgs

__all__ = ["REFERENCE_ARCHS", "ZOO_MODELS", "create_zoo_model", "resolve_model_name", "zoo_cfg"]


def _register_all() -> list[str]:
    names: list[str] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("deconv_"):
            importlib.import_module(f"{__name__}.{info.name}")
            names.extend(list_models(module=info.name))
    complete_pretrained_cfgs(names)
    return sorted(names)


ZOO_MODELS: list[str] = _register_all()


def resolve_model_name(name: str, what: str = "model") -> str:
    """A zoo model name from what a user typed: ``resnet18_deconv``, ``resnet18``, or the authors' ``resnet``."""
    return _resolve(name, ZOO_MODELS, what)
