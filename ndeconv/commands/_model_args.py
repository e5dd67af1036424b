"""The ``MODEL[.TAG]`` / ``--checkpoint FILE [--arch NAME]`` arguments of a conversion command, without the loader.

A command registers them at every ``ndeconv ... --help``; ``_model_source.load_model_source`` (torch, timm, the
zoo) reads them only when the command runs, so printing usage imports neither.
"""

from __future__ import annotations

import argparse

__all__ = ["add_model_source_arguments"]


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
