"""Where a conversion command's model comes from: ``MODEL[.TAG]`` or ``--checkpoint FILE [--arch NAME]``.

Both load through ``ndeconv.loading.load_model``, the one loader (a checkpoint's architecture from ``--arch``,
the config.json beside it or the file itself; its shape from that config.json and the state_dict; folded
weights as they are).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UsageError
from ..loading import load_model

__all__ = ["ModelSource", "add_model_source_arguments", "load_model_source"]


@dataclass
class ModelSource:
    model: nn.Module
    description: dict[str, Any] = field(default_factory=dict)  # recorded in what the command writes
    folded: bool = False  # already plain (a file written by ``ndeconv fold``)


def add_model_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL[.TAG]",
                        help="zoo model with its pretrained tag (e.g. resnet18_deconv.fashion_mnist), hf-hub:ORG/NAME, "
                             "local-dir:FOLDER, or a run directory of `ndeconv train`")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="weights file instead of MODEL: safetensors, a torch state_dict, the authors' or timm's "
                             "train.py checkpoint (model_best.pth.tar), or a folded file")
    parser.add_argument("--arch", metavar="NAME", help="zoo architecture of --checkpoint (default: its config.json)")
    parser.add_argument("--random-init", action="store_true",
                        help="build MODEL untrained instead of loading its weights (to try the tooling)")


def load_model_source(args: argparse.Namespace) -> ModelSource:
    """The model named by ``MODEL[.TAG]`` or ``--checkpoint FILE [--arch NAME]`` (exactly one of them)."""
    if (args.model is None) == (args.checkpoint is None):
        raise UsageError("give either MODEL[.TAG] or --checkpoint FILE (with --arch NAME when no config.json is "
                         "beside it)")
    if args.checkpoint is not None:
        if args.random_init:
            raise UsageError("--random-init goes with MODEL, not with --checkpoint")
        source = args.checkpoint
    else:
        if args.arch is not None:
            raise UsageError("--arch describes a --checkpoint; with MODEL, drop it")
        if Path(args.model).is_file():
            raise UsageError(f"{args.model} is a file, not a model name; pass weights files as --checkpoint "
                             f"{args.model}")
        source = args.model
    loaded = load_model(source, arch=args.arch, random_init=args.random_init,
                        weights_file=args.checkpoint is not None)
    return ModelSource(loaded.model, loaded.description, folded=loaded.folded)
