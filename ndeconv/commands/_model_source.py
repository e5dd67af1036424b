"""Where a conversion command's model comes from: ``MODEL[.TAG]`` or ``--checkpoint FILE [--arch NAME]``.

A checkpoint is a safetensors state_dict of a zoo model (as ``ndeconv train`` and ``ndeconv convert-reference``
write it; a leading ``module.`` is stripped). Its architecture comes from ``--arch`` or the config.json beside
it; ``num_classes`` and ``in_chans`` from that config.json, else from the checkpoint itself (the classifier's
rows and the first conv's input channels); whether it is the deconvolution or the BatchNorm form, and the head's
Delinear block, from the buffers it holds. Folded weights written by ``ndeconv fold`` load as they are.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import NdeconvError, UsageError

__all__ = ["ModelSource", "add_model_source_arguments", "load_model_source"]


@dataclass
class ModelSource:
    model: nn.Module
    description: dict[str, Any] = field(default_factory=dict)  # recorded in what the command writes
    folded: bool = False  # already plain (a file written by ``ndeconv fold``)


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL[.TAG]",
                        help="zoo model with its pretrained tag (e.g. resnet18_deconv.fashion_mnist)")
    parser.add_argument("--checkpoint", metavar="FILE", help="safetensors state_dict of a zoo model instead of MODEL")
    parser.add_argument("--arch", metavar="NAME", help="zoo architecture of --checkpoint (default: its config.json)")
    parser.add_argument("--random-init", action="store_true",
                        help="build MODEL untrained instead of loading its weights (to try the tooling)")


def _zoo_names() -> list[str]:
    import zoo

    return list(zoo.ZOO_MODELS)


def _resolve_arch(name: str) -> str:
    """A zoo name, also without its ``_deconv`` suffix (``resnet18`` is timm's own ResNet, not ours)."""
    zoo_names = _zoo_names()
    for candidate in (name, f"{name}_deconv"):
        if candidate in zoo_names:
            return candidate
    raise UsageError(f"unknown model {name!r}; known: {', '.join(_zoo_names())}")


def _from_name(spec: str, random_init: bool) -> ModelSource:
    import timm

    arch, _, tag = spec.partition(".")
    arch = _resolve_arch(arch)
    if random_init:
        if tag:
            raise UsageError(f"--random-init builds an untrained {arch}; drop the tag .{tag} or the flag")
        model = timm.create_model(arch, pretrained=False)
        return ModelSource(model.eval(), {"model": arch, "weights": "random init"})
    tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
    if tag and tag not in tags:
        raise UsageError(f"{arch} has no pretrained tag {tag!r}; known: {', '.join(tags) or 'none'}")
    name = f"{arch}.{tag}" if tag else arch
    try:
        model = timm.create_model(name, pretrained=True)
    except NdeconvError:
        raise
    except (RuntimeError, OSError, ValueError) as err:
        raise NdeconvError(f"{name}: cannot load its weights: {str(err).strip().splitlines()[0]}") from err
    return ModelSource(model.eval(), {"model": name})


def _read_beside(path: Path) -> dict[str, Any]:
    beside = path.with_name("config.json")
    if not beside.is_file():
        return {}
    try:
        config = json.loads(beside.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{beside}: not readable JSON ({err}); fix or remove it, or pass --arch") from err
    return config if isinstance(config, dict) else {}


def _infer_args(state: dict[str, Any], arch: str) -> dict[str, Any]:
    """What the state_dict itself says: classes, input channels, deconvolution or BatchNorm form, head block."""
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    cfg = cfg.to_dict() if cfg is not None else {}
    args: dict[str, Any] = {"deconv": any(k.endswith("running_deconv") for k in state)}
    classifier, first_conv = cfg.get("classifier", "linear"), cfg.get("first_conv", "conv1")
    head = state.get(f"{classifier}.weight")
    if head is not None and head.ndim == 2:
        args["num_classes"] = head.shape[0]
        head_deconv = state.get(f"{classifier}.running_deconv")
        args["block_fc"] = 0 if head_deconv is None else head_deconv.shape[0]
    channel = next((v for k, v in state.items() if k.endswith("running_mean1")), None)
    if channel is not None:  # a ChannelDeconv before the pooling: the --delinear False --block-fc N form
        args.update(delinear=False, block_fc=channel.shape[0])
    stem = state.get(f"{first_conv}.weight")
    if stem is not None and stem.ndim == 4:
        args["in_chans"] = stem.shape[1]
    return args


def _from_checkpoint(file: str, arch: str | None) -> ModelSource:
    import timm

    from convert import is_folded_file, load_folded

    from ..io import load_safetensors

    path = Path(file)
    if is_folded_file(path):
        if arch is not None:
            raise UsageError(f"{path} holds folded weights that name their architecture; drop --arch")
        return ModelSource(load_folded(path), {"checkpoint": str(path), "folded": True}, folded=True)
    state = load_safetensors(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    config = _read_beside(path)
    arch = arch or config.get("architecture")
    if not arch:
        raise UsageError(f"{path}: no config.json beside it names the architecture; pass --arch NAME")
    arch = _resolve_arch(str(arch))
    args = _infer_args(state, arch)
    recorded = dict(config.get("model_args") or {})
    for key in ("num_classes", "in_chans"):
        if key in config:
            recorded[key] = config[key]
    args.update({k: v for k, v in recorded.items() if v is not None})
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build {arch} with {args}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UsageError(f"{path} does not fit {arch} ({detail}); check --arch, or put the training config.json "
                         "beside it") from err
    return ModelSource(model.eval(), {"checkpoint": str(path), "architecture": arch, "model_args": args})


def load_model_source(args: argparse.Namespace) -> ModelSource:
    """The model named by ``MODEL[.TAG]`` or ``--checkpoint FILE [--arch NAME]`` (exactly one of them)."""
    import ndeconv  # noqa: F401 - registers the zoo with timm

    if (args.model is None) == (args.checkpoint is None):
        raise UsageError("give either MODEL[.TAG] or --checkpoint FILE (with --arch NAME when no config.json is "
                         "beside it)")
    if args.checkpoint is not None:
        if args.random_init:
            raise UsageError("--random-init goes with MODEL, not with --checkpoint")
        return _from_checkpoint(args.checkpoint, args.arch)
    if args.arch is not None:
        raise UsageError("--arch describes a --checkpoint; with MODEL, drop it")
    return _from_name(args.model, args.random_init)
