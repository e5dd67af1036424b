"""The files of a training run directory that other code reads: its config.json and its model, rebuilt. Apart from
the trainer (``ndeconv.training.loop``) so that the one model loader (``ndeconv.loading``) can read run directories
while the trainer loads initial weights through it."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError, error_summary
from ..io import CHECKSUMS_FILE, load_safetensors, read_json
from ..layers.deconvolve import deconvolve
from .lock import LOCK_FILE

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "check_new_run_dir", "load_run_model", "load_run_weights", "read_run_config",
           "refuse_resume_clashes"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def check_new_run_dir(run_dir: Path, force: bool, is_run: Callable[[Path], bool], command: str) -> None:
    """Refuse to start a new run of ``command`` (``ndeconv train``, ``ndeconv train-seg``) in ``run_dir`` where it
    would mix with or delete files: a file there, a folder with files (without --force), or --force on a folder
    that is not one of ``command``'s run directories (``is_run``): --force deletes only a run's own files."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--out {run_dir} is a file; choose a folder path")
    # The lock file alone is no run's (it is there while a run starts, and after one killed before writing).
    has_files = run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir())
    if has_files and not force:
        raise UsageError(f"{run_dir} already exists and is not empty; pass --resume {run_dir} to continue it, "
                         "--force to start over in it, or another --out")
    if has_files and force and (run_dir / CHECKSUMS_FILE).exists():
        # A shipped or published weights folder holds a run's config.json too, but its weights are the product:
        # --force never replaces them.
        raise UsageError(f"--force starts over only in a run directory of `{command}`; {run_dir} is a weights "
                         f"folder (it has a {CHECKSUMS_FILE}), so nothing in it is touched: choose another --out")
    if has_files and force and not is_run(run_dir):
        raise UsageError(f"--force starts over only in a run directory of `{command}`; {run_dir} is not one "
                         "(no config.json of such a run), so nothing in it is touched: choose another --out")


def refuse_resume_clashes(run_dir: Path, saved: Mapping[str, Any], current: Mapping[str, Any],
                          given: Collection[str], resumable: Collection[str]) -> dict[str, Any]:
    """The settings a resumed run continues with: its ``saved`` ones, with the ``given`` flags that do not change
    what it computes (``resumable``) taken from ``current``; any other given flag that differs is refused."""
    clashes = [f"--{k.replace('_', '-')} {current[k]} (the run has {saved[k]})" for k in sorted(given)
               if k in saved and k not in resumable and current[k] != saved[k]]
    if clashes:
        raise UsageError(f"--resume {run_dir}: {'; '.join(clashes)}; a resumed run keeps its settings (start a new "
                         "run with --out to change them)")
    return {**saved, **{k: current[k] for k in given if k in resumable}}


def read_run_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir}: no {CONFIG_FILE}; it is not a run directory of `ndeconv train`")
    try:
        data = read_json(path)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not readable JSON ({err}); the run directory is damaged") from err
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict):
        raise UsageError(f"{path}: has no 'train' settings; it is not a run directory of `ndeconv train`")
    return data



def load_run_model(run_dir: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model of a run directory, built from its config.json and loaded from its model.safetensors."""
    import ndeconv.zoo as zoo

    config = read_run_config(run_dir)
    args = dict(config.get("model_args", {}))
    args["num_classes"] = config.get("num_classes", args.get("num_classes"))
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise UsageError(f"{run_dir}: no {WEIGHTS_FILE}; the run has not finished an epoch yet "
                         f"(continue it with `ndeconv train --resume {run_dir}`)")
    try:
        model = zoo.create_model(config["architecture"], pretrained=False, **args)  # timm's, or ndeconv's own
        recipe = (config.get("train") or {}).get("deconvolve")
        if recipe:  # started from an ndeconv convert-bn checkpoint: its layout
            model = deconvolve(model, **recipe)
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        raise UsageError(f"{run_dir}: its config.json does not build a model ({error_summary(err)})") from err
    return load_run_weights(model, weights).to(device).eval()


def load_run_weights(model: nn.Module, weights: Path) -> nn.Module:
    """A run directory's model.safetensors into the model its config.json built (strict); a file that does not
    fit is one clear error."""
    try:
        model.load_state_dict(load_safetensors(weights), strict=True)
    except RuntimeError as err:
        raise UsageError(f"{weights} does not fit the model its config.json describes ({error_summary(err)}); "
                         "the run directory is mixed up") from err
    return model
