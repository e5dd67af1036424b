"""Convert a checkpoint written by one of the authors' scripts into a zoo model's safetensors + config.json.

- ``main.py`` saves ``{'state_dict': ..., 'arch': ..., 'epoch': ..., 'best_acc': ..., 'optimizer': ..., ...}``
  (the state_dict ``module.``-prefixed when it came from a DataParallel model).
- ``main_imagenet.py`` saves ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}``: ``module.`` keys
  (DataParallel, DistributedDataParallel), and ``features.module.`` for VGG, whose ``features`` alone it wraps
  in DataParallel; its ``arch`` is ``resnet18d`` ... or, for the baselines, torchvision's ``resnet18``, ``vgg11``,
  ``vgg11_bn``, ... (the ImageNet zoo models with ``deconv=False``; ``vgg11_bn`` with ``batch_norm=True`` too).
- ``Segmentation/train.py`` saves ``{'model': state_dict, 'optimizer', 'epoch'}`` and no arch (pass it:
  ``fcn_resnet50d`` ...); the model is a segmentation builder of ``ndeconv.zoo.deconv_segmentation``.
 Our zoo models use their module
names, so the tensors carry over unchanged; what a checkpoint does not say (the form, ``--block``,
``--block-fc``, the input channels and classes) is read off the tensors' shapes.

Only ``torch.load(weights_only=True)`` is used: a checkpoint can never run code, and one that needs more than
tensors and plain containers to unpickle is refused.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ndeconv.datasets import DATASETS
from ndeconv.errors import NdeconvError, UsageError
from ndeconv.io import (
    check_config_beside,
    check_output_path,
    load_torch_file,
    save_json_atomic,
    save_safetensors_atomic,
)
from ndeconv.zoo import IMAGENET_MODELS, REFERENCE_ARCHS, create_model, get_pretrained_cfg, resolve_model_name
from ndeconv.zoo._names import IMAGENET_BASELINE_ARCHS, SEGMENTATION_BASELINE_ARCHS
from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

__all__ = [
    "REFERENCE_ARCHS",
    "ConvertedCheckpoint",
    "convert_reference",
    "convert_reference_checkpoint",
    "infer_model_args",
    "load_reference_checkpoint",
]


# Checkpoint fields copied into config.json (when they are plain values) to record where the weights came from.
_PROVENANCE_FIELDS = ("arch", "epoch", "best_acc", "best_acc1")
# Block sizes tried, after the reference default, when inferring ``--block`` from the buffers' shapes.
_BLOCK_CANDIDATES = (64, 1, 2, 4, 8, 16, 32, 128, 256, 512, 1024)


@dataclass
class ConvertedCheckpoint:
    """A reference checkpoint as one of our models: the model (weights loaded), its args and its config.json."""

    model_name: str
    model: nn.Module
    model_args: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)


# -- reading ---------------------------------------------------------------------------------------------------


def load_reference_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Unpickle a checkpoint with ``weights_only=True``; return it as a dict with a tensor-only ``state_dict``.

    A bare state_dict (what ``torch.save(model.state_dict())`` writes) is accepted as ``{'state_dict': it}``.
    """
    path = Path(path)
    checkpoint = load_torch_file(path)

    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict) and "optimizer" in checkpoint:
        state_dict = checkpoint["model"]  # Segmentation/train.py's checkpoint
    elif isinstance(checkpoint, dict) and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        state_dict, checkpoint = checkpoint, {}
    else:
        kind = f"a dict with keys {sorted(map(str, checkpoint))[:6]}" if isinstance(checkpoint, dict) else (
            type(checkpoint).__name__)
        raise NdeconvError(f"{path}: not a reference checkpoint: expected a dict with a 'state_dict', got {kind}")
    if not isinstance(state_dict, dict) or not state_dict:
        raise NdeconvError(f"{path}: its 'state_dict' is empty or not a dict")
    not_tensors = [str(k) for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise NdeconvError(f"{path}: state_dict entries that are not tensors: {', '.join(not_tensors[:5])}")
    return {**checkpoint, "state_dict": strip_module_prefix(state_dict)}


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` that DataParallel / DistributedDataParallel put in front of every key, and the one
    ``main_imagenet.py`` puts inside VGG's keys (``features.module.0.weight``: it wraps ``features`` alone)."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        out["features." + key[len("features.module."):] if key.startswith("features.module.") else key] = value
    return out


# -- inferring the model's arguments ---------------------------------------------------------------------------


def _stem_and_head(model_name: str) -> tuple[str, str]:
    cfg = get_pretrained_cfg(model_name)
    first, head = cfg.first_conv, cfg.classifier
    return (first if isinstance(first, str) else first[0]), (head if isinstance(head, str) else head[0])


def _shapes_of(model_name: str, model_args: dict[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """The state_dict shapes of a candidate layout; None when the candidate cannot be built (a ChannelDeconv
    head whose block exceeds the channels it whitens, say): it then fits no checkpoint."""
    try:
        with torch.device("meta"):  # layout only: nothing is allocated or initialised
            model = create_model(model_name, **model_args)
    except ValueError:  # a layer refused the candidate's settings
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _fits(expected: dict[str, tuple[int, ...]] | None, shapes: dict[str, tuple[int, ...]],
          skip: tuple[str, ...]) -> bool:
    return expected is not None and all(shapes.get(k) == s for k, s in expected.items() if not k.startswith(skip))


def _architecture_args(model_name: str) -> dict[str, Any]:
    """The kwargs beyond the deconvolution settings that shape the model (VGG's ``batch_norm``), at their defaults."""
    with torch.device("meta"):
        return dict(getattr(create_model(model_name), "architecture_args", {}))


def _has_batchnorm(state_dict: dict[str, torch.Tensor]) -> bool:
    # A BatchNorm's running_mean and running_var side by side: a FastDeconv or Delinear has no running_var, a
    # ChannelDeconv no running_mean (its means are running_mean1/2).
    return any(k.endswith(".running_mean") and k[: -len("mean")] + "var" in state_dict for k in state_dict)


def infer_model_args(model_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The ``timm.create_model`` kwargs that rebuild the model a reference state_dict came from.

    The form is the stem's (a FastDeconv has ``running_deconv``), ``bias`` whether it has one, ``in_chans`` and
    ``num_classes`` the stem's and classifier's weight shapes; ``block`` and the head (``block_fc``,
    ``delinear``) are the first candidates (reference defaults first) whose buffer shapes are the checkpoint's.
    Equal shapes everywhere mean equal whitening blocks everywhere, so the choice is exact, not a guess.
    Settings no tensor records (``deconv_iter``, ``eps``, ``sampling_stride``) keep the reference defaults.
    VGG's ``batch_norm`` is whether the state_dict has BatchNorm statistics (``vgg11_bn``'s layout, not ``vgg11``'s).
    The MLP (``main.py --arch mlp``), which has no conv, is read by ``_mlp_args``.
    """
    if model_name == "mlp_deconv":
        return _mlp_args(state_dict)
    stem, head = _stem_and_head(model_name)
    for key in (f"{stem}.weight", f"{head}.weight"):
        if key not in state_dict:
            raise NdeconvError(f"the checkpoint has no {key}, so it is not a {model_name} state_dict")
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    deconv = f"{stem}.running_deconv" in state_dict
    args: dict[str, Any] = dict(
        pretrained=False, num_classes=shapes[f"{head}.weight"][0], in_chans=shapes[f"{stem}.weight"][1],
        deconv=deconv,
    )
    if deconv:
        args["bias"] = f"{stem}.bias" in state_dict
    if "batch_norm" in _architecture_args(model_name):
        args["batch_norm"] = _has_batchnorm(state_dict)

    # --block: compare every tensor outside the head (the head's own settings are decided next).
    head_keys = (f"{head}.",) + tuple(k.rsplit(".", 1)[0] + "." for k in state_dict if k.endswith(".running_mean1"))
    if deconv:
        # The reference default when nothing fits, so that the caller reports what differs from it.
        args["block"] = next((b for b in _BLOCK_CANDIDATES
                              if _fits(_shapes_of(model_name, dict(args, block=b, block_fc=0)), shapes, head_keys)),
                             _BLOCK_CANDIDATES[0])

    # The head: a Delinear (its running_deconv gives block_fc), a ChannelDeconv before a Linear, or a Linear.
    if f"{head}.running_deconv" in state_dict:
        heads = [dict(block_fc=b, delinear=True) for b in (512, shapes[f"{head}.running_deconv"][0])]
    else:
        sizes = [shapes[k[: -len("running_mean1")] + "running_deconv"][0] for k in state_dict
                 if k.endswith(".running_mean1") and k[: -len("running_mean1")] + "running_deconv" in shapes]
        heads = [dict(block_fc=b, delinear=False) for b in (512, *sizes)] if sizes else [dict(block_fc=0)]
    for head_args in heads:
        candidate = dict(args, **head_args)
        if _shapes_of(model_name, candidate) == shapes:
            return {k: v for k, v in candidate.items() if k != "pretrained"}
    # Nothing fits exactly: the reference defaults for this form, so that the caller names what differs.
    return {k: v for k, v in dict(args, **heads[0]).items() if k != "pretrained"}


def _mlp_args(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The MLP's kwargs from its Linear layers: the form (a ChannelDeconv before the first Linear), the input size
    (784 = 1 x 28 x 28 values, or 3 x H x W), the hidden width and depth, the classes."""
    deconv = "layers.0.0.running_deconv" in state_dict
    first = "layers.0.1.weight" if deconv else "layers.0.0.weight"
    if first not in state_dict or "linear.2.weight" not in state_dict:
        raise NdeconvError(f"the checkpoint has no {first} and linear.2.weight, so it is not an mlp_deconv state_dict")
    hidden, in_features = state_dict[first].shape
    for in_chans in (1, 3):
        side = math.isqrt(in_features // in_chans)
        if in_features % in_chans == 0 and side * side * in_chans == in_features:
            break
    else:
        raise NdeconvError(f"the MLP's first Linear takes {in_features} values, not C x H x H images (C 1 or 3)")
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("layers.")}) + 1
    return dict(deconv=deconv, in_chans=in_chans, img_size=side, hidden_nodes=hidden, hidden_layers=depth,
                num_classes=state_dict["linear.2.weight"].shape[0])


# -- converting ------------------------------------------------------------------------------------------------


def _layout_errors(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (the model has {tuple(expected[k].shape)})"
             for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    problems = []
    for what, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", wrong)):
        if items:
            more = f" and {len(items) - 4} more" if len(items) > 4 else ""
            problems.append(f"{len(items)} {what}: {', '.join(items[:4])}{more}")
    return problems


def _config(converted_name: str, model: nn.Module, model_args: dict[str, Any], checkpoint: dict[str, Any],
            source: Path) -> dict[str, Any]:
    """timm's Hub config.json (``hf-hub:``/``local-dir:`` read it), plus where the weights came from."""
    drop = ("file", "hf_hub_id", "url", "source", "state_dict", "hf_hub_filename", "label_names", "description", "tag")
    cfg = {k: v for k, v in dict(getattr(model, "pretrained_cfg", None) or {}).items() if k not in drop}
    cfg.update(architecture=converted_name, num_classes=model_args["num_classes"])
    cfg["input_size"] = (model_args["in_chans"], *cfg.get("input_size", (3, 32, 32))[1:])
    if model_args["in_chans"] == 3 and converted_name not in IMAGENET_MODELS:  # ImageNet's: the cfg's own
        # The authors' main.py trains RGB on CIFAR, normalised with its statistics: CIFAR-100 for its one
        # 100-class dataset, else CIFAR-10 (a zoo model's own cfg is its default tag's, Fashion-MNIST's).
        spec = DATASETS["cifar100" if model_args["num_classes"] == DATASETS["cifar100"].num_classes else "cifar10"]
        cfg.update(mean=spec.mean, std=spec.std)
    provenance = {k: checkpoint[k] for k in _PROVENANCE_FIELDS if isinstance(checkpoint.get(k), (str, int, float))}
    return dict(
        architecture=converted_name,
        num_classes=model_args["num_classes"],
        num_features=model.num_features,
        global_pool="avg",
        model_args=model_args,
        pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if v is not None},
        converted_from=dict(file=source.name, **provenance),
    )


def convert_reference_checkpoint(path: str | os.PathLike, arch: str | None = None) -> ConvertedCheckpoint:
    """Read a reference checkpoint and load it into the zoo model it belongs to (``arch`` overrides its field)."""
    path = Path(path)
    checkpoint = load_reference_checkpoint(path)
    state_dict = checkpoint["state_dict"]
    if arch is None:
        arch = checkpoint.get("arch")
        if not isinstance(arch, str):
            raise UsageError(f"{path}: the checkpoint names no 'arch'; pass --arch (a zoo name or the reference's "
                             f"--arch value, e.g. resnet18_deconv or resnet; fcn_resnet50d for a segmentation one)")
        if "best_acc1" in checkpoint and arch in IMAGENET_BASELINE_ARCHS:
            arch = IMAGENET_BASELINE_ARCHS[arch]  # main_imagenet.py's baseline: torchvision's name, ImageNet model
    arch = SEGMENTATION_BASELINE_ARCHS.get(arch, arch)
    model_name = resolve_model_name(arch, "architecture")
    if model_name in SEGMENTATION_MODELS:
        return _convert_segmentation(path, model_name, checkpoint)
    model_args = infer_model_args(model_name, state_dict)
    model = create_model(model_name, pretrained=False, **model_args)  # timm's, or ndeconv's own (mlp_deconv)
    problems = _layout_errors(model, state_dict)
    if problems:
        form = f"deconvolution form, block {model_args.get('block', 'n/a')}" if model_args["deconv"] else \
            "form without BatchNorm" if model_args.get("batch_norm") is False else "BatchNorm form"
        own = checkpoint.get("arch")
        hint = (f"; the checkpoint's own arch is {own!r}, drop --arch to use it"
                if isinstance(own, str) and own != arch and own in {*REFERENCE_ARCHS, *REFERENCE_ARCHS.values()}
                else "; check --arch")
        raise NdeconvError(f"{path}: does not fit {model_name} ({form}, block_fc {model_args.get('block_fc', 0)}): "
                           f"{'; '.join(problems)}{hint}")
    model.load_state_dict(state_dict)
    full_args = dict(model.deconv_settings.to_dict(), in_chans=model_args["in_chans"],
                     num_classes=model_args["num_classes"])
    # The MLP's own shape arguments, and VGG's batch_norm (the other models' are all in their settings).
    full_args.update({k: model_args[k] for k in ("img_size", "hidden_nodes", "hidden_layers") if k in model_args})
    full_args.update(getattr(model, "architecture_args", {}))
    config = _config(model_name, model, full_args, checkpoint, path)
    return ConvertedCheckpoint(model_name=model_name, model=model, model_args=full_args, config=config)


def _segmentation_args(model_name: str, state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The builder kwargs of a segmentation state_dict: the form and bias from the stem, the auxiliary head from
    its keys, the classes from the head's last conv, ``block`` the first candidate whose shapes are the file's."""
    if "backbone.conv1.weight" not in state_dict:
        raise NdeconvError(f"the checkpoint has no backbone.conv1.weight, so it is not a {model_name} state_dict")
    deconv = "backbone.conv1.running_deconv" in state_dict
    head = max((k for k in state_dict if k.startswith("classifier.") and k.endswith(".weight")
                and state_dict[k].ndim == 4), key=lambda k: int(k.split(".")[1]))
    args: dict[str, Any] = dict(deconv=deconv, num_classes=state_dict[head].shape[0],
                                in_chans=state_dict["backbone.conv1.weight"].shape[1],
                                aux_loss=any(k.startswith("aux_classifier.") for k in state_dict))
    if not deconv:
        return args
    args["bias"] = "backbone.conv1.bias" in state_dict
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    for block in _BLOCK_CANDIDATES:
        with torch.device("meta"):
            model = SEGMENTATION_MODELS[model_name](**args, block=block)
        if {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes:
            return dict(args, block=block)
    return dict(args, block=_BLOCK_CANDIDATES[0])  # nothing fits: the default, so that the caller names what differs


def _convert_segmentation(path: Path, model_name: str, checkpoint: dict[str, Any]) -> ConvertedCheckpoint:
    state_dict = checkpoint["state_dict"]
    model_args = _segmentation_args(model_name, state_dict)
    model = SEGMENTATION_MODELS[model_name](**model_args)
    problems = _layout_errors(model, state_dict)
    if problems:
        raise NdeconvError(f"{path}: does not fit {model_name} ({model_args}): {'; '.join(problems)}; check --arch")
    model.load_state_dict(state_dict)
    full_args = dict(model.deconv_settings.to_dict(), in_chans=model_args["in_chans"],
                     num_classes=model_args["num_classes"], aux_loss=model_args["aux_loss"])
    provenance = {k: checkpoint[k] for k in _PROVENANCE_FIELDS if isinstance(checkpoint.get(k), (str, int, float))}
    config = dict(architecture=model_name, num_classes=model_args["num_classes"], model_args=full_args,
                  converted_from=dict(file=path.name, **provenance))
    return ConvertedCheckpoint(model_name=model_name, model=model, model_args=full_args, config=config)


def convert_reference(
    path: str | os.PathLike, output: str | os.PathLike, arch: str | None = None, force: bool = False
) -> ConvertedCheckpoint:
    """Convert ``path`` and write ``output`` (safetensors) and ``config.json`` beside it, both atomically."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise UsageError(f"{output}: the output must be a .safetensors file (e.g. model.safetensors)")
    if arch is not None:
        resolve_model_name(arch, "architecture")  # an unknown name is reported first, before any file is touched
    check_output_path(output, force)
    config_path = check_config_beside(output.with_name("config.json"), force,
                                      lambda config: "converted_from" in config, "`ndeconv convert-reference`")
    converted = convert_reference_checkpoint(path, arch)
    metadata = {"format": "pt", "architecture": converted.model_name}
    save_safetensors_atomic(converted.model.state_dict(), output, metadata=metadata)
    save_json_atomic(converted.config, config_path)
    return converted
