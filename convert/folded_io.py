"""Save and load folded models: safetensors weights plus a config.json saying what they are.

A folded zoo model is the zoo architecture with plain layers: its convs carry biases, merged BatchNorms and
ChannelDeconvs are ``nn.Identity``. The files record, besides the weights, the architecture name, its
``num_classes``/``in_chans``/``global_pool`` and the exact type and shape of every leaf layer. Loading builds
the architecture in its plain BatchNorm form (``deconv=False``, no FastDeconv/Delinear/ChannelDeconv is ever
constructed), swaps in the recorded plain layers by name, and loads the weights strictly. The forward code is
the architecture's own, so the loaded network computes exactly what the folded one did.

The same JSON is stored in the safetensors metadata (key ``ndeconv_folded``), so a weights file that lost its
config.json still loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ndeconv.errors import NdeconvError, UsageError
from ndeconv.io import load_safetensors, save_json_atomic, save_safetensors_atomic

from .fold import DECONV_TYPES, FoldReport

__all__ = ["FOLDED_FORMAT", "folded_config", "is_folded_file", "load_folded", "save_folded"]

FOLDED_FORMAT = "ndeconv-folded"
FORMAT_VERSION = 1
METADATA_KEY = "ndeconv_folded"
_CFG_FIELDS = ("input_size", "mean", "std", "interpolation", "crop_pct", "label_names", "license", "origin_url")


def _layer_spec(module: nn.Module) -> dict[str, Any] | None:
    if type(module) is nn.Conv2d:
        return dict(type="Conv2d", in_channels=module.in_channels, out_channels=module.out_channels,
                    kernel_size=list(module.kernel_size), stride=list(module.stride), padding=list(module.padding),
                    dilation=list(module.dilation), groups=module.groups, bias=module.bias is not None)
    if type(module) is nn.Linear:
        return dict(type="Linear", in_features=module.in_features, out_features=module.out_features,
                    bias=module.bias is not None)
    if type(module) is nn.BatchNorm2d:
        return dict(type="BatchNorm2d", num_features=module.num_features, eps=module.eps, momentum=module.momentum,
                    affine=module.affine, track_running_stats=module.track_running_stats)
    if type(module) is nn.Identity:
        return dict(type="Identity")
    return None


def _build_layer(spec: dict[str, Any]) -> nn.Module:
    kind = spec["type"]
    args = {k: v for k, v in spec.items() if k != "type"}
    if kind == "Conv2d":
        return nn.Conv2d(**args)
    if kind == "Linear":
        return nn.Linear(**args)
    if kind == "BatchNorm2d":
        return nn.BatchNorm2d(**args)
    if kind == "Identity":
        return nn.Identity()
    raise NdeconvError(f"unknown layer type {kind!r} in a folded config; it was written by a newer ndeconv")


def _global_pool(model: nn.Module) -> str:
    pool_type = getattr(model, "global_pool_type", None)
    if pool_type is None:
        pool_type = getattr(getattr(model, "global_pool", None), "pool_type", "avg")
    return str(pool_type)


def folded_config(folded: nn.Module, report: FoldReport | None = None, source: dict[str, Any] | None = None) -> dict:
    """The config.json of a folded zoo model (what it is, where it came from, every plain layer's shape)."""
    left = [n for n, m in folded.named_modules() if isinstance(m, DECONV_TYPES)]
    if left:
        raise UsageError(f"the model is not folded ({left[0]} is a {type(folded.get_submodule(left[0])).__name__}); "
                         "run convert.fold(model) first")
    cfg = dict(getattr(folded, "pretrained_cfg", None) or {})
    architecture = cfg.get("architecture")
    if not architecture:
        raise UsageError(f"{type(folded).__name__} has no pretrained_cfg['architecture']: only zoo models "
                         "(timm.create_model('<name>_deconv')) can be saved as folded weights")
    first = next(m for m in folded.modules() if isinstance(m, nn.Conv2d))
    settings = getattr(folded, "folded_from_settings", None)
    return {
        "format": FOLDED_FORMAT,
        "format_version": FORMAT_VERSION,
        "about": "Network deconvolution model with its whitening folded into plain conv/linear weights "
                 "(inference only). Load with convert.load_folded(path).",
        "architecture": architecture,
        "num_classes": int(getattr(folded, "num_classes", 0)),
        "in_chans": first.in_channels,
        "global_pool": _global_pool(folded),
        "dtype": str(next(folded.parameters()).dtype).removeprefix("torch."),
        "folded_from": {
            "deconv_settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else None,
            **(source or {}),
        },
        "fold": None if report is None else {
            "summary": report.summary(), "bn_fused": report.bn_fused, "bn_kept": report.bn_kept,
            "channel_deconv": report.channel_deconv, "identity_whitening": len(report.identity_whitening),
        },
        "pretrained_cfg": {k: cfg[k] for k in _CFG_FIELDS if k in cfg},
        "layers": _layer_specs(folded),
    }


def _owns_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _layer_specs(folded: nn.Module) -> dict[str, dict[str, Any]]:
    specs = {}
    for name, module in folded.named_modules():
        spec = _layer_spec(module) if name else None
        if spec is not None:
            specs[name] = spec
        elif _owns_state(module) and name:
            raise UsageError(f"cannot save folded weights: layer {name} is a {type(module).__name__}, which the "
                             "folded format does not describe (Conv2d, Linear, BatchNorm2d and Identity only)")
    return specs


def save_folded(
    folded: nn.Module, path: str | os.PathLike, report: FoldReport | None = None,
    source: dict[str, Any] | None = None, force: bool = False,
) -> tuple[Path, Path]:
    """Write ``path`` (safetensors) and ``config.json`` beside it, atomically; refuses to overwrite without force."""
    from ndeconv.io import check_output_path

    path = Path(path)
    check_output_path(path, force)
    config_path = check_folded_config_path(path, force)
    config = folded_config(folded, report, source)
    text = json.dumps(config)
    save_safetensors_atomic(folded.state_dict(), path, metadata={METADATA_KEY: text, "format": "pt"})
    save_json_atomic(config, config_path)
    return path, config_path


def check_folded_config_path(path: str | os.PathLike, force: bool) -> Path:
    """The config.json beside folded weights at ``path``; ``force`` replaces only one ``save_folded`` wrote."""
    from ndeconv.io import check_config_beside

    return check_config_beside(Path(path).with_name("config.json"), force,
                               lambda config: config.get("format") == FOLDED_FORMAT, "`ndeconv fold`")


def _read_config(path: Path) -> dict[str, Any] | None:
    # The config embedded in the file first: it always describes these weights, while a config.json beside them
    # may be stale (another file copied in) or half-written. The sidecar is for files whose metadata was stripped.
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except Exception:  # noqa: BLE001 - unreadable files get load_safetensors' clear error later
        return None
    if text:
        return json.loads(text)
    sidecar = path.with_name("config.json")
    if sidecar.is_file():
        try:
            config = json.loads(sidecar.read_text())
        except (OSError, ValueError) as err:
            raise NdeconvError(f"{sidecar}: not readable JSON ({err})") from err
        if isinstance(config, dict) and config.get("format") == FOLDED_FORMAT:
            return config
    return None


def is_folded_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a .safetensors file) holds folded weights written by :func:`save_folded`."""
    path = Path(path)
    return path.is_file() and _read_config(path) is not None


def load_folded(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The plain network saved by :func:`save_folded` (``path``: the .safetensors file or its folder), in eval mode."""
    import timm

    import ndeconv.zoo  # noqa: F401 - registers the architectures with timm

    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    state = load_safetensors(path, device=str(device))
    config = _read_config(path)
    if config is None:
        raise UsageError(f"{path}: no folded config (config.json beside it or safetensors metadata); "
                         "it is not a file written by `ndeconv fold`")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise NdeconvError(f"{path}: folded format version {config['format_version']} is newer than this ndeconv "
                           f"reads ({FORMAT_VERSION}); upgrade ndeconv")
    arch = config["architecture"]
    if not timm.is_model(arch):
        raise UsageError(f"{path}: unknown architecture {arch!r}")
    # The plain BatchNorm form: no deconvolution layer is constructed.
    model = timm.create_model(arch, pretrained=False, num_classes=config["num_classes"], in_chans=config["in_chans"],
                              global_pool=config["global_pool"], deconv=False, block_fc=0)
    for name, spec in config["layers"].items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError as err:
            raise NdeconvError(f"{path}: layer {name} does not fit the {arch} architecture") from err
        setattr(parent, child, _build_layer(spec))
    # Layers only the BatchNorm form has (e.g. the BN after a shortcut conv in a Sequential) carry nothing.
    for name, module in list(model.named_modules()):
        if name and name not in config["layers"] and _owns_state(module):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, DECONV_TYPES)]
    if left:
        raise NdeconvError(f"{path}: the rebuilt {arch} still holds a deconvolution layer ({left[0]})")
    dtype = getattr(torch, config.get("dtype", "float32"))
    model = model.to(device=device, dtype=dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:2] or [str(err)]
        raise NdeconvError(f"{path}: the weights do not fit the rebuilt {arch}: {first[0].strip()}") from err
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **config.get("pretrained_cfg", {})}
    return model.eval().requires_grad_(False)
