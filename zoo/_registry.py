"""The zoo models ndeconv builds itself, outside timm's registry, and ``create_model`` for every zoo name.

Registering a model with timm promises timm's model contract, which timm's own model tests check
(``tests/test_timm_model_contract.py`` runs them): ``forward_features`` gives an NCHW map of ``num_features``
channels at the cfg's ``pool_size``, ``reset_classifier(0, '')`` gives that map unpooled, and
``features_only=True`` gives at least three feature maps. A timm user relies on it: ``features_only``, timm's
detection and segmentation backbones, ``forward_intermediates``. Two of the authors' MNIST models cannot keep it,
whatever their code: the MLP (``mlp_deconv``) has no conv and no feature map at all, only (N, 128) vectors, and
``SimpleCNN_v1`` (``simple_v1_deconv``) is one conv over the whole image, a linear classifier with no
intermediate feature. So they are not registered with timm (``timm.create_model('mlp_deconv')`` is timm's
unknown-model error), but with this registry, which ndeconv's own paths build through (``create_model`` here:
``ndeconv train --arch mlp``, run directories and checkpoints, ``fold``, ``export``, ``convert-reference``,
``torch.hub.load``). They are built as any zoo model is (``create_zoo_model``: timm's ``build_model_with_cfg``
with their own pretrained_cfg), so everything else about them is the same.

A zoo file marks such an entrypoint with ``register_ndeconv_model`` instead of timm's ``register_model``; it reads
the module's ``default_cfgs`` entry as timm's decorator does.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from timm.models import PretrainedCfg, split_model_name_tag
from torch import nn

__all__ = [
    "create_model", "get_pretrained_cfg", "is_ndeconv_only", "is_zoo_model", "ndeconv_only_models",
    "register_ndeconv_model",
]

F = TypeVar("F", bound=Callable[..., nn.Module])

# name -> entrypoint, and "name" / "name.tag" -> pretrained_cfg (the default tag's under the bare name), as timm's
# registry keeps them; module name -> the models it registered here.
_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINED_CFGS: dict[str, PretrainedCfg] = {}
_MODULE_MODELS: dict[str, list[str]] = {}


def register_ndeconv_model(fn: F) -> F:
    """timm's ``register_model`` for a model that cannot keep timm's model contract (see the module docstring):
    records the entrypoint and its module's ``default_cfgs`` entry here, and leaves timm's registry alone."""
    module = sys.modules[fn.__module__]
    name = fn.__name__
    default_cfg = module.default_cfgs[name]  # a DefaultCfg, as zoo_default_cfgs makes them
    for index, tag in enumerate(default_cfg.tags):
        cfg = dataclasses.replace(default_cfg.cfgs[tag], architecture=name, tag=tag or None)
        if index == 0:
            _PRETRAINED_CFGS[name] = cfg
        if tag:
            _PRETRAINED_CFGS[f"{name}.{tag}"] = cfg
    _ENTRYPOINTS[name] = fn
    _MODULE_MODELS.setdefault(fn.__module__.rpartition(".")[2], []).append(name)
    return fn


def ndeconv_only_models(module: str | None = None) -> list[str]:
    """The models registered here (not with timm), sorted; ``module``: those of one zoo file (``deconv_simple``)."""
    names = _MODULE_MODELS.get(module, []) if module is not None else list(_ENTRYPOINTS)
    return sorted(names)


def is_ndeconv_only(name: str) -> bool:
    """Whether ``name`` (a tag is ignored) is a model registered here, not with timm."""
    return split_model_name_tag(name)[0] in _ENTRYPOINTS


def is_zoo_model(name: str) -> bool:
    """Whether ``create_model`` builds ``name`` (a timm model, or one registered here); a tag is ignored."""
    import timm

    arch = split_model_name_tag(name)[0]
    return arch in _ENTRYPOINTS or timm.is_model(arch)


def get_pretrained_cfg(model_name: str) -> PretrainedCfg | None:
    """timm's ``get_pretrained_cfg`` (a copy; the default tag's for a bare name; None for a name without one) for
    every zoo model; an unknown tag of a model registered here is timm's error too."""
    from timm.models import get_pretrained_cfg as timm_cfg

    arch, tag = split_model_name_tag(model_name)
    if arch not in _ENTRYPOINTS:
        return timm_cfg(model_name)
    cfg = _PRETRAINED_CFGS.get(f"{arch}.{tag}" if tag else arch)
    if cfg is None:
        raise RuntimeError(f"Invalid pretrained tag ({tag}) for {arch}.")  # timm's words
    return dataclasses.replace(cfg)


def ndeconv_only_cfg(variant: str, pretrained_cfg: Any) -> Any:
    """The ``pretrained_cfg`` ``build_model_with_cfg`` is given for a model registered here: its registered cfg
    when the caller gave none or a tag (timm's registry, where it would look them up, does not have them), else
    what the caller gave (a dict or PretrainedCfg: a Hub folder's config)."""
    if not is_ndeconv_only(variant) or not (pretrained_cfg is None or isinstance(pretrained_cfg, str)):
        return pretrained_cfg
    return get_pretrained_cfg(f"{variant}.{pretrained_cfg}" if pretrained_cfg else variant)


def _folder_config(source: str, ident: str, cache_dir: str | Path | None) -> tuple[dict[str, Any], str, dict]:
    """timm's reading of a ``local-dir:``/``hf-hub:`` folder's config.json: (pretrained_cfg, architecture,
    model_args)."""
    from timm.models import load_model_config_from_hf
    from timm.models._hub import load_model_config_from_path

    if source == "hf-hub":
        return load_model_config_from_hf(ident, cache_dir=cache_dir)
    return load_model_config_from_path(ident)


def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` for every zoo model: timm's own for the models registered with timm, the same steps
    here for the ones that are not (``ndeconv_only_models``), also when a ``local-dir:``/``hf-hub:`` folder's
    config.json names one. The keywords are timm's (``MODEL.TAG``, ``pretrained_cfg``, ``pretrained_cfg_overlay``,
    ``checkpoint_path``, ``cache_dir``, ``scriptable``/``exportable``/``no_jit``; keywords set to None are dropped).
    Any other name is timm's, with timm's errors (an unknown one: ``RuntimeError: Unknown model``)."""
    import timm
    from timm.layers import set_layer_config
    from timm.models import load_checkpoint, parse_model_name

    source, ident = parse_model_name(model_name)
    if source is None:
        arch, tag = split_model_name_tag(ident)
        model_args: dict[str, Any] = {}
        folder_cfg: Any = None
    else:
        if kwargs.get("pretrained_cfg"):  # timm asserts the same
            raise ValueError("pretrained_cfg should not be set when sourcing model from Hugging Face Hub.")
        # Reading the config before timm does: it is the only way to see which architecture the folder names.
        folder_cfg, arch, model_args = _folder_config(source, ident, kwargs.get("cache_dir"))
        tag = ""
    if arch not in _ENTRYPOINTS:
        return timm.create_model(model_name, pretrained=pretrained, **kwargs)

    # timm's create_model, step by step (timm.models._factory.create_model and _resolve_model_source).
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    layer_config = {k: kwargs.pop(k, None) for k in ("scriptable", "exportable", "no_jit")}
    if folder_cfg is not None:
        kwargs["pretrained_cfg"] = folder_cfg
    elif tag and not kwargs.get("pretrained_cfg"):
        kwargs["pretrained_cfg"] = tag
    if model_args:
        kwargs["pretrained_model_args"] = dict(model_args)
        for key, value in model_args.items():
            kwargs.setdefault(key, value)
    with set_layer_config(**layer_config):
        model = _ENTRYPOINTS[arch](pretrained=pretrained, **kwargs)
    # What timm keeps of the factory's keywords (its own named ones and runtime placement left out).
    kept_out = ("device", "dtype", "pretrained_model_args", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
    model._model_args = dict(getattr(model, "_model_args", {}), **{k: v for k, v in kwargs.items()
                                                                      if k not in kept_out})
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    return model
