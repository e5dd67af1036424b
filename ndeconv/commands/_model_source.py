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

__all__ = ["ModelSource", "load_model_source"]


@dataclass
class ModelSource:
    model: nn.Module
    description: dict[str, Any] = field(default_factory=dict)  # recorded in what the command writes
    folded: bool = False  # already plain (a file written by ``ndeconv fold``)


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
