"""Transfer learning into deconvolution: a trained BatchNorm network as the deconvolution network with the same eval
function (``ndeconv convert-bn``).

``convert_batchnorm`` is ``ndeconv.deconvolve(model, which, calibrate=batches)`` (the math is in
``ndeconv.layers.calibrate``) plus a report and a check on held-out images; ``calibration_batches`` reads the
calibration images of a dataset with its normalisation; ``save_converted`` writes the converted zoo model as
safetensors and a config.json beside it that rebuilds it: the source architecture (``model_args``, its BatchNorm
form) and the ``deconvolve`` call that turned it into deconvolution, replayed by ``ndeconv.loading`` before
the strict ``load_state_dict`` (``rebuild_converted``). The converted file then loads, trains, folds and exports as
any weights file does (``--checkpoint FILE``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ndeconv.errors import UsageError
from ndeconv.layers import FastDeconv, deconvolve

from .fold import output_difference

__all__ = [
    "CONVERTED_FORMAT",
    "ConversionReport",
    "calibration_batches",
    "convert_batchnorm",
    "converted_config",
    "rebuild_converted",
    "save_converted",
]

CONVERTED_FORMAT = "ndeconv-converted-batchnorm"
# The deconvolve() keywords a conversion records: FastDeconv's settings (the rest keep their defaults).
RECIPE_KEYS = ("which", "bias", "block", "eps", "n_iter", "sampling_stride")


@dataclass
class ConversionReport:
    """What ``convert_batchnorm`` did: the convs that became FastDeconvs, the BatchNorms removed with them (folded
    in, or never called), the BatchNorms that stay, and the eval outputs' difference on the check batch."""

    converted: list[str] = field(default_factory=list)
    batchnorms_removed: list[str] = field(default_factory=list)
    batchnorms_kept: list[str] = field(default_factory=list)
    calibration_batches: int = 0
    calibration_images: int = 0
    check_images: int = 0
    check_max_abs: float | None = None
    check_rel: float | None = None

    def summary(self) -> str:
        text = (f"{len(self.converted)} convs -> FastDeconv, {len(self.batchnorms_removed)} BatchNorms folded into "
                f"them, {len(self.batchnorms_kept)} kept (not right after a conv); calibrated on "
                f"{self.calibration_images} images in {self.calibration_batches} batches")
        if self.check_rel is not None:
            text += (f"; eval outputs on {self.check_images} held-out images: max relative difference "
                     f"{self.check_rel:.3g} (max abs {self.check_max_abs:.3g})")
        return text


def _batchnorms(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def convert_batchnorm(
    model: nn.Module, batches: list[torch.Tensor], which: str = "all", check_batch: torch.Tensor | None = None,
    **deconv_kwargs: Any,
) -> tuple[nn.Module, ConversionReport]:
    """Convert ``model`` in place (``deconvolve(model, which, calibrate=batches, **deconv_kwargs)``) and say what
    was done; with ``check_batch`` (held-out inputs), compare the eval outputs before and after on it."""
    report = ConversionReport(calibration_batches=len(batches), calibration_images=sum(len(b) for b in batches))
    before = _batchnorms(model)
    reference = None
    if check_batch is not None:
        reference = _eval_output(model, check_batch)
    deconvolve(model, which=which, calibrate=batches, **deconv_kwargs)
    after = set(_batchnorms(model))
    report.converted = [n for n, m in model.named_modules() if isinstance(m, FastDeconv)]
    report.batchnorms_removed = [n for n in before if n not in after]
    report.batchnorms_kept = [n for n in before if n in after]
    if reference is not None:
        report.check_images = len(check_batch)
        report.check_max_abs, report.check_rel = output_difference(reference, _eval_output(model, check_batch))
    return model, report


def _eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    modes = {m: m.training for m in model.modules()}
    param = next(model.parameters())
    try:
        model.eval()
        with torch.no_grad():
            return model(x.to(device=param.device, dtype=param.dtype))
    finally:
        for m, mode in modes.items():
            m.training = mode


def calibration_batches(
    dataset: str, in_chans: int, *, split: str = "train", data_dir: str | None = None, images: int = 1024,
    batch_size: int = 128, seed: int = 0, img_size: int = 32, num_classes: int | None = None,
    class_names: list[str] | None = None,
) -> list[torch.Tensor]:
    """``images`` images of a dataset's ``split`` (a seeded random choice), normalised as the dataset's training
    normalises them (``ndeconv.datasets``: its mean and std; no augmentation), in batches of ``batch_size`` (the
    last one may be smaller). Fails when the model's ``in_chans`` are not the dataset's."""
    from ndeconv.datasets import get_spec, load_split

    if images < 1:
        raise UsageError(f"calibration needs at least 1 image, got {images}")
    if batch_size < 1:
        raise UsageError(f"calibration batch size must be >= 1, got {batch_size}")
    spec = get_spec(dataset)
    if spec.in_chans != in_chans:
        raise UsageError(f"the model takes {in_chans}-channel images but {spec.name} has {spec.in_chans}; calibrate "
                         "it on data like the data it was trained on")
    source = load_split(dataset, split, data_dir, img_size, num_classes, class_names)
    if len(source) == 0:
        raise UsageError(f"{spec.name} {split}: no images to calibrate on")
    order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:images]
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return [(source.batch(idx).float() / 255.0 - mean) / std for idx in order.split(batch_size)]


def _architecture_and_args(model: nn.Module) -> tuple[str, dict[str, Any]]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    settings = getattr(model, "deconv_settings", None)
    if not cfg.get("architecture") or not dataclasses.is_dataclass(settings):
        raise UsageError(f"{type(model).__name__} is not a zoo model (no pretrained_cfg architecture and "
                         "deconv_settings): only zoo models can be saved as a converted weights file; save "
                         "model.state_dict() yourself and rebuild it with ndeconv.deconvolve")
    first = next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    model_args = {**settings.to_dict(), "num_classes": int(getattr(model, "num_classes", 0)),
                  "in_chans": first.in_channels, **getattr(model, "architecture_args", {})}
    return str(cfg["architecture"]), model_args


def converted_config(
    model: nn.Module, recipe: dict[str, Any], source: dict[str, Any] | None = None,
    report: ConversionReport | None = None, calibration: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None, label_names: list[str] | None = None,
) -> dict[str, Any]:
    """The config.json of a converted zoo model: the BatchNorm architecture it was built as, the ``deconvolve``
    keywords that made it a deconvolution network, where it came from and how it was calibrated."""
    unknown = set(recipe) - set(RECIPE_KEYS)
    if unknown:
        raise UsageError(f"a converted model records only {', '.join(RECIPE_KEYS)}; got {', '.join(sorted(unknown))}")
    architecture, model_args = _architecture_and_args(model)
    config: dict[str, Any] = {
        "format": CONVERTED_FORMAT,
        "about": "A BatchNorm network converted into network deconvolution with the same eval function "
                 "(ndeconv convert-bn). Load with ndeconv.loading.load_model(path) or --checkpoint FILE.",
        "architecture": architecture,
        "num_classes": model_args["num_classes"],
        "in_chans": model_args["in_chans"],
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "model_args": model_args,
        "deconvolve": {"bias": True, **recipe},
        "converted_from": dict(source or {}),
        "calibration": dict(calibration or {}),
    }
    if report is not None:
        config["conversion"] = dataclasses.asdict(report) | {"summary": report.summary()}
    if train:
        config["train"] = dict(train)  # what the source was trained on: ndeconv eval's default dataset
    if label_names:
        config["label_names"] = list(label_names)
    return config


def rebuild_converted(model: nn.Module, config: dict[str, Any]) -> nn.Module:
    """Turn a freshly built source architecture into the converted one a config.json describes (``deconvolve``
    without calibration builds the same layers; the weights file then fills them). A config without a conversion
    leaves ``model`` alone."""
    recipe = config.get("deconvolve")
    if not isinstance(recipe, dict):
        return model
    return deconvolve(model, **recipe)


def check_converted_config_path(path: str | os.PathLike, force: bool) -> Path:
    """The config.json beside converted weights at ``path``; ``force`` replaces only one ``save_converted`` wrote."""
    from ndeconv.io import check_config_beside

    return check_config_beside(Path(path).with_name("config.json"), force,
                               lambda config: config.get("format") == CONVERTED_FORMAT, "`ndeconv convert-bn`")


def save_converted(model: nn.Module, path: str | os.PathLike, config: dict[str, Any],
                   force: bool = False) -> tuple[Path, Path]:
    """Write the converted model's state_dict to ``path`` (safetensors) and ``config`` (``converted_config``) to the
    config.json beside it, atomically; refuses to overwrite without ``force``, and refuses a model its config would
    not rebuild (checked on the meta device before anything is written)."""
    from ndeconv.io import check_output_path, save_json_atomic, save_safetensors_atomic
    from ndeconv.zoo import create_model  # timm's, and the zoo models timm does not know

    path = Path(path)
    if path.suffix != ".safetensors":
        raise UsageError(f"{path}: converted weights are written as safetensors; name the file *.safetensors")
    check_output_path(path, force)
    config_path = check_converted_config_path(path, force)
    state = model.state_dict()
    with torch.device("meta"):
        rebuilt = rebuild_converted(create_model(config["architecture"], **config["model_args"]), config)
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if expected != got:
        differ = sorted(set(expected) ^ set(got)) or [k for k in got if expected[k] != got[k]]
        raise UsageError(f"the converted model does not fit what its config.json rebuilds ({config['architecture']} "
                         f"with deconvolve {config['deconvolve']}): {differ[0]} differs; nothing was written")
    save_safetensors_atomic(state, path, metadata={"format": "pt", CONVERTED_FORMAT: json.dumps(config)})
    save_json_atomic(config, config_path, finite=True)
    return path, config_path
