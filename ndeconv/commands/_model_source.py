"""Where a conversion command's model comes from: ``MODEL[.TAG]`` or ``--checkpoint FILE [--arch NAME]``.

A checkpoint loads through ``ndeconv.loading.load_checkpoint_model`` (its architecture from ``--arch`` or the
config.json beside it, its shape from that config.json and the state_dict itself; folded weights as they are).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UsageError
from ..loading import load_checkpoint_model

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


def _from_name(spec: str, random_init: bool) -> ModelSource:
    import timm

    from ..loading import create_pretrained_model, pretrained_model_name

    name = pretrained_model_name(spec)  # any name that names nothing fails here, before --random-init is looked at
    if random_init:
        if ":" in name:  # timm's own sources (hf-hub:/local-dir:) name weights
            raise UsageError(f"--random-init builds an untrained zoo model; {spec} names weights: drop one of them")
        arch, _, tag = name.partition(".")
        if tag:
            raise UsageError(f"--random-init builds an untrained {arch}; drop the tag .{tag} or the flag")
        model = timm.create_model(arch, pretrained=False)
        return ModelSource(model.eval(), {"model": arch, "weights": "random init"})
    return ModelSource(create_pretrained_model(name).eval(), {"model": name})


def _from_checkpoint(file: str, arch: str | None) -> ModelSource:
    loaded = load_checkpoint_model(file, arch)
    if loaded.folded:
        return ModelSource(loaded.model, {"checkpoint": file, "folded": True}, folded=True)
    return ModelSource(loaded.model, {"checkpoint": file, "architecture": loaded.architecture,
                                      "model_args": loaded.model_args})


def load_model_source(args: argparse.Namespace) -> ModelSource:
    """The model named by ``MODEL[.TAG]`` or ``--checkpoint FILE [--arch NAME]`` (exactly one of them)."""
    import ndeconv.zoo  # noqa: F401 - registers the zoo with timm

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
