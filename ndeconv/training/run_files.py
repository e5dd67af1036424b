"""The files of a training run directory that other code reads: its config.json and its model, rebuilt. Apart from
the trainer (``ndeconv.training.loop``) so that the one model loader (``ndeconv.loading``) can read run directories
while the trainer loads initial weights through it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError, error_summary
from ..io import load_safetensors
from ..layers.deconvolve import deconvolve

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_run_model", "read_run_config"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {CONFIG_FILE}; it is not a run directory of `ndeconv train`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not readable JSON ({err}); the run directory is damaged") from err
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise UsageError(f"{path}: has no 'train' settings; it is not a run directory of `ndeconv train`")
    return data



def load_run_model(run_dir: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a run directory, built from its config.json and loaded from its model.safetensors."""
    import timm

    import ndeconv.zoo  # noqa: F401 - registers the zoo with timm

    config = read_run_config(run_dir)
    args = dict(config.get("model_args", {}))
    args["num_classes"] = config.get("num_classes", args.get("num_classes"))
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise UsageError(f"{run_dir}: no {WEIGHTS_FILE}; the run has not finished an epoch yet "
                         f"(continue it with `ndeconv train --resume {run_dir}`)")
    try:
        model = timm.create_model(config["architecture"], pretrained=False, **args)
        recipe = (config.get("train") or {}).get("deconvolve")
        if recipe:  # started from an ndeconv convert-bn checkpoint: its layout
            model = deconvolve(model, **recipe)
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        raise UsageError(f"{run_dir}: its config.json does not build a model ({error_summary(err)})") from err
    try:
        model.load_state_dict(load_safetensors(weights), strict=True)
    except RuntimeError as err:
        raise UsageError(f"{weights} does not fit the model its config.json describes ({error_summary(err)}); "
                         "the run directory is mixed up") from err
    return model.to(device).eval()
