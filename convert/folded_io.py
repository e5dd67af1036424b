"""Save and load folded models: one safetensors file, whose metadata says what its weights are.

A folded zoo model is the architecture ``timm.create_model(name, folded=True, **model_args)`` builds (every
FastDeconv a Conv2d with bias, the head a Linear, a ChannelDeconv its plain layer: ``DeconvSettings``' folded
form), with, when the fold was asked to fuse BatchNorms, those BatchNorms fused into their convs. The
folded config records the architecture and its ``model_args`` (timm's Hub config names), the BatchNorm pairs
fused and the dtype. Loading builds that architecture (no deconvolution layer is ever constructed), fuses the same
pairs (structure only: the weights come next) and loads the weights with ``strict=True``. The forward code is
the architecture's own, so the loaded network computes exactly what the folded one did. ``save_folded`` builds
the same architecture on the meta device before writing anything, so a file it writes is one it can load.

The folded config is JSON in the file's safetensors metadata (key ``ndeconv_folded``; ``read_folded_config``
reads it), so the file is all there is: ``save_folded`` (and ``ndeconv fold -o FILE``) writes that one file and
nothing beside it, where another model's or a run directory's config.json may live. Files written before that
(with a config.json beside them, tests/fixtures/folded_v1) load as they always did: the embedded config first,
the config.json beside the file only for a file whose metadata lost it.

Format version 1 (ndeconv before the folded architecture) described every layer in a ``layers`` spec instead.
Such a file loads through the same build, checked against that spec first; where the two differ, one line says
how to fold the source again.
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
from ndeconv.io import load_safetensors, parse_json, read_json, save_safetensors_atomic
from ndeconv.layers._conv import plain_conv_type

from .fold import DECONV_TYPES, FoldReport, find_conv_batchnorm_pairs, fuse_conv_batchnorm_pairs

__all__ = ["FOLDED_FORMAT", "folded_config", "is_folded_file", "load_folded", "read_folded_config", "save_folded"]

FOLDED_FORMAT = "ndeconv-folded"
FORMAT_VERSION = 2
METADATA_KEY = "ndeconv_folded"
_CFG_FIELDS = ("input_size", "mean", "std", "interpolation", "crop_pct", "label_names", "license", "origin_url")


def _global_pool(model: nn.Module) -> str:
    pool_type = getattr(model, "global_pool_type", None)
    if pool_type is None:
        pool_type = getattr(getattr(model, "global_pool", None), "pool_type", "avg")
    return str(pool_type)


def _settings_of(folded: nn.Module) -> Any:
    settings = getattr(folded, "deconv_settings", None)
    if not (dataclasses.is_dataclass(settings) and "folded" in {f.name for f in dataclasses.fields(settings)}):
        raise UsageError(f"{type(folded).__name__} has no zoo deconv_settings: only zoo models "
                         "(timm.create_model('<name>_deconv')) can be saved as folded weights")
    return settings


def folded_config(folded: nn.Module, report: FoldReport | None = None, source: dict[str, Any] | None = None) -> dict:
    """The folded config of a folded zoo model (the file's metadata holds it): what it is (architecture,
    model_args, fused BatchNorms), where it came from, and what the fold did. ``report`` defaults to the one
    ``fold`` left on the model."""
    left = [n for n, m in folded.named_modules() if isinstance(m, DECONV_TYPES)]
    if left:
        raise UsageError(f"the model is not folded ({left[0]} is a {type(folded.get_submodule(left[0])).__name__}); "
                         "run convert.fold(model) first")
    cfg = dict(getattr(folded, "pretrained_cfg", None) or {})
    architecture = cfg.get("architecture")
    if not architecture:
        raise UsageError(f"{type(folded).__name__} has no pretrained_cfg['architecture']: only zoo models "
                         "(timm.create_model('<name>_deconv')) can be saved as folded weights")
    settings = _settings_of(folded)
    report = report if report is not None else getattr(folded, "fold_report", None)
    first = next((m for m in folded.modules() if isinstance(m, nn.Conv2d)), None)
    # An MLP (mlp_deconv) has no conv: its pretrained_cfg, which describes the model as built, has its channels.
    in_chans = first.in_channels if first is not None else int(cfg.get("input_size", (3,))[0])
    num_classes, global_pool = int(getattr(folded, "num_classes", 0)), _global_pool(folded)
    # A model folded by timm's reparameterize_model keeps its unfolded settings: the architecture is the folded one.
    model_args = {**dataclasses.replace(settings, folded=True).to_dict(), "num_classes": num_classes,
                  "in_chans": in_chans, "global_pool": global_pool, **getattr(folded, "architecture_args", {})}
    if hasattr(folded, "aux_classifier"):  # a segmentation model (torchvision's FCN/DeepLabV3): its builder's aux head
        model_args["aux_loss"] = folded.aux_classifier is not None
    source_settings = getattr(folded, "folded_from_settings", settings)
    return {
        "format": FOLDED_FORMAT,
        "format_version": FORMAT_VERSION,
        "about": "Network deconvolution model with its whitening folded into plain conv/linear weights "
                 "(inference only). Load with ndeconv.convert.load_folded(path).",
        "architecture": architecture,
        "num_classes": num_classes,
        "in_chans": in_chans,
        "global_pool": global_pool,
        "dtype": str(next(folded.parameters()).dtype).removeprefix("torch."),
        "model_args": model_args,
        "fused_batchnorms": dict(report.bn_fused) if report is not None else {},
        "channel_deconvs": dict(report.channel_deconv) if report is not None else {},
        "folded_from": {
            "deconv_settings": dataclasses.asdict(source_settings),
            **(source or {}),
        },
        "fold": None if report is None else {
            "summary": report.summary(), "bn_fused": report.bn_fused, "bn_kept": report.bn_kept,
            "channel_deconv": report.channel_deconv, "identity_whitening": len(report.identity_whitening),
        },
        "pretrained_cfg": {k: cfg[k] for k in _CFG_FIELDS if k in cfg},
    }


def save_folded(
    folded: nn.Module, path: str | os.PathLike, report: FoldReport | None = None,
    source: dict[str, Any] | None = None, force: bool = False,
) -> Path:
    """Write ``path`` (safetensors), atomically, with the folded config in its metadata; return it. It is the only
    file written (a config.json beside it would be put where the caller did not point, and clash with another
    model's or a run's). Refuses to overwrite without ``force``, and refuses a model that its config would not
    rebuild (checked on the meta device, before anything is written)."""
    from ndeconv.io import check_output_path

    path = Path(path)
    check_output_path(path, force)
    config = folded_config(folded, report, source)
    state = folded.state_dict()
    shapes = {k: v.shape for k, v in state.items()}
    with torch.device("meta"):
        config["fused_batchnorms"] = _fused_batchnorms(folded, config, shapes, path)
        rebuilt = _build(config, shapes, path)
    _check_fits(rebuilt, state, config["architecture"], what="cannot save folded weights")
    save_safetensors_atomic(state, path, metadata={METADATA_KEY: json.dumps(config), "format": "pt"})
    return path


def _fused_batchnorms(folded: nn.Module, config: dict[str, Any], shapes: dict[str, torch.Size],
                      path: Path) -> dict[str, str]:
    """The BatchNorm pairs of the architecture whose BatchNorm the folded model no longer has: those fold's pass
    fused, and those another tool removed the same way (``deconvolve()``, ``ndeconv convert-bn``: the conv kept,
    with a bias in the norm's place), so the record does not depend on who fused them."""
    recorded = dict(config["fused_batchnorms"])
    architecture = _build({**config, "fused_batchnorms": {}}, shapes, path)
    try:
        candidates = find_conv_batchnorm_pairs(architecture)
    except Exception:  # noqa: BLE001 - an untraceable architecture: what the fold recorded is all there is
        return recorded
    modules = dict(folded.named_modules())
    gone = {bn: conv for bn, conv in candidates.items()
            if not isinstance(modules.get(bn), nn.modules.batchnorm._BatchNorm)}
    return {**gone, **recorded}


def _read_config(path: Path) -> dict[str, Any] | None:
    # The config embedded in the file first: it always describes these weights, while a config.json beside them
    # may be stale (another file copied in) or another model's. The config.json beside the file (what ndeconv
    # before one-file folds also wrote) is for older files whose metadata was stripped.
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except Exception:  # noqa: BLE001 - unreadable files get load_safetensors' clear error later
        return None
    if text:
        where = f"{path} (its {METADATA_KEY} metadata)"
        try:
            return _checked_config(parse_json(text), where)
        except ValueError as err:
            raise NdeconvError(f"{where}: not JSON ({err}); the file is damaged: fold the model again with "
                               "`ndeconv fold`") from err
    sidecar = path.with_name("config.json")
    if sidecar.is_file():
        try:
            config = read_json(sidecar)
        except (OSError, ValueError) as err:
            raise NdeconvError(f"{sidecar}: not readable JSON ({err})") from err
        if isinstance(config, dict) and config.get("format") == FOLDED_FORMAT:
            return _checked_config(config, str(sidecar))
    return None


def _checked_config(config: Any, where: str) -> dict[str, Any]:
    """A folded config whose fields have the types loading relies on, else one NdeconvError naming the field: the
    metadata of a file is input like any other (a crafted or damaged one must not reach the builder)."""
    def bad(what: str) -> NdeconvError:
        return NdeconvError(f"{where}: {what}; it is not a folded config `ndeconv fold` writes: fold the model again")

    if not isinstance(config, dict):
        raise bad(f"the folded config is a JSON {type(config).__name__}, not an object")
    version = config.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise bad(f"format_version {version!r} is not a version number")
    dtype = config.get("dtype", "float32")
    if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None), torch.dtype) or \
            not getattr(torch, dtype).is_floating_point:
        raise bad(f"dtype {dtype!r} is not a floating-point torch dtype")
    if not isinstance(config.get("architecture"), str):
        raise bad(f"architecture {config.get('architecture')!r} is not a model name")
    for key in ("model_args", "pretrained_cfg"):
        if not isinstance(config.get(key, {}), dict):
            raise bad(f"{key} is not a JSON object")
    return config


def read_folded_config(path: str | os.PathLike) -> dict[str, Any]:
    """The folded config of a file :func:`save_folded` wrote (``path``: the .safetensors file or its folder): the
    architecture, its ``model_args``, the BatchNorm pairs fused, the dtype and where it was folded from. A file
    without one is one UsageError."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    config = _read_config(path) if path.is_file() else None
    if config is None:
        raise UsageError(f"{path}: no folded config (safetensors metadata, or a config.json beside it); it is not a "
                         "file written by `ndeconv fold`")
    return config


def is_folded_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` (a .safetensors file) holds folded weights written by :func:`save_folded`."""
    path = Path(path)
    return path.is_file() and _read_config(path) is not None


def load_folded(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """The plain network saved by :func:`save_folded` (``path``: the .safetensors file or its folder), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    state = load_safetensors(path, device=str(device))  # a missing or damaged file: its own clear error first
    config = read_folded_config(path)
    version = config.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise NdeconvError(f"{path}: folded format version {version} is newer than this ndeconv reads "
                           f"({FORMAT_VERSION}); upgrade ndeconv")
    shapes = {k: v.shape for k, v in state.items()}
    if version < 2:
        model = _build_version_1(config, shapes, path)
    else:
        model = _build(config, shapes, path)
    dtype = getattr(torch, config.get("dtype", "float32"))
    model = model.to(device=device, dtype=dtype)
    _check_fits(model, state, config["architecture"], what=str(path))
    model.load_state_dict(state, strict=True)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **config.get("pretrained_cfg", {})}
    return model.eval().requires_grad_(False)


# -- building the folded architecture --------------------------------------------------------------------------


def _create(architecture: str, model_args: dict[str, Any], path: Path) -> nn.Module:
    from ndeconv.zoo import create_model  # timm's, and the zoo models timm does not know
    from ndeconv.zoo._registry import is_zoo_model
    from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

    if architecture in SEGMENTATION_MODELS:  # a torchvision-style builder (not timm's): no global pool to pass
        model_args = {k: v for k, v in model_args.items() if k != "global_pool"}
        try:
            return SEGMENTATION_MODELS[architecture](**model_args)
        except TypeError as err:
            raise NdeconvError(f"{path}: {architecture} does not build with the recorded model_args ({err}); fold "
                               "the source again with this ndeconv's `ndeconv fold`") from err
    if not is_zoo_model(architecture):
        raise UsageError(f"{path}: unknown architecture {architecture!r}")
    try:
        return create_model(architecture, pretrained=False, **model_args)
    except TypeError as err:  # a model_args key this ndeconv's architecture does not take
        raise NdeconvError(f"{path}: {architecture} does not build with the recorded model_args ({err}); fold "
                           "the source again with this ndeconv's `ndeconv fold`") from err


def _build(config: dict[str, Any], shapes: dict[str, torch.Size], path: Path) -> nn.Module:
    """``timm.create_model(architecture, folded=True, ...)`` with the recorded BatchNorm pairs fused into it."""
    from ndeconv.zoo._layer_factory import ChannelCountUnknown

    architecture, model_args = config["architecture"], dict(config["model_args"])
    try:
        model = _create(architecture, model_args, path)
    except ChannelCountUnknown:
        # A model file that does not pass its ChannelDeconv's channel count cannot build the folded layer: build
        # the network without it (a Linear head either way) and size the plain layer from its weights.
        model = _create(architecture, {**model_args, "delinear": True}, path)
        _attach_channel_deconvs(model, config.get("channel_deconvs") or {}, shapes, path)
    fuse_conv_batchnorm_pairs(model, config.get("fused_batchnorms") or {})
    return model


def _attach_channel_deconvs(model: nn.Module, names: dict[str, str], shapes: dict[str, torch.Size],
                            path: Path) -> None:
    if not names:
        raise NdeconvError(f"{path}: the model has a ChannelDeconv but the folded config does not name it; fold the "
                           "source again with `ndeconv fold`")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        shape = shapes.get(f"{name}.weight")
        if getattr(parent, child, "absent") is not None or shape is None or shape[0] != shape[1]:
            raise NdeconvError(f"{path}: the folded ChannelDeconv {name} does not fit the {_name_of(model)} "
                               "architecture")
        channels = int(shape[0])
        setattr(parent, child, nn.Linear(channels, channels) if len(shape) == 2 else nn.Conv2d(channels, channels, 1))


def _name_of(model: nn.Module) -> str:
    return str((getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__)


def _check_fits(model: nn.Module, state: dict[str, torch.Tensor], architecture: str, what: str) -> None:
    """One line naming the first difference between ``state`` and the rebuilt model's state_dict."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and v.shape != expected[k].shape]
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
            raise NdeconvError(f"{what}: the weights do not fit the folded {architecture}: {kind} {items[0]}{more}")


# -- format version 1 ------------------------------------------------------------------------------------------


def _version_1_spec(module: nn.Module) -> dict[str, Any] | None:
    """A state-holding layer as version 1 described it (its Identity entries say nothing the build lacks)."""
    if plain_conv_type(module) is nn.Conv2d:
        return dict(type="Conv2d", in_channels=module.in_channels, out_channels=module.out_channels,
                    kernel_size=list(module.kernel_size), stride=list(module.stride), padding=list(module.padding),
                    dilation=list(module.dilation), groups=module.groups, bias=module.bias is not None)
    if type(module) is nn.Linear:
        return dict(type="Linear", in_features=module.in_features, out_features=module.out_features,
                    bias=module.bias is not None)
    if type(module) is nn.BatchNorm2d:
        return dict(type="BatchNorm2d", num_features=module.num_features, eps=module.eps, momentum=module.momentum,
                    affine=module.affine, track_running_stats=module.track_running_stats)
    return None


def _owns_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def _refold_hint(config: dict[str, Any], path: Path) -> str:
    source = config.get("folded_from") or {}
    if source.get("model") or source.get("run"):
        what = str(source.get("model") or source.get("run"))
    elif source.get("checkpoint"):
        what = f"--checkpoint {source['checkpoint']} --arch {config.get('architecture')}"
    else:
        what = f"--checkpoint WEIGHTS --arch {config.get('architecture')}"
    return f"fold the source again: ndeconv fold {what} -o {path} --force"


def _build_version_1(config: dict[str, Any], shapes: dict[str, torch.Size], path: Path) -> nn.Module:
    """A version-1 file: the folded architecture from its recorded settings, checked against its layer spec."""
    from ndeconv.zoo._layer_factory import DeconvSettings

    def refold(reason: str) -> NdeconvError:
        return NdeconvError(f"{path}: written by an older ndeconv (folded format 1) in a form this version does not "
                            f"rebuild ({reason}); {_refold_hint(config, path)}")

    settings = (config.get("folded_from") or {}).get("deconv_settings")
    specs = config.get("layers")
    if not isinstance(settings, dict) or not isinstance(specs, dict):
        raise refold("it records no deconvolution settings")
    known = {f.name for f in dataclasses.fields(DeconvSettings)}
    model_args = {k: v for k, v in settings.items() if k in known}
    model_args.update(folded=True, num_classes=config["num_classes"], in_chans=config["in_chans"],
                      global_pool=config["global_pool"])
    report = config.get("fold")
    channel_deconvs = dict((report or {}).get("channel_deconv") or {})
    if any(not str(v).endswith(("Conv2d", "Linear")) for v in channel_deconvs.values()):
        raise refold("a ChannelDeconv merged into another layer")
    draft = {"architecture": config["architecture"], "model_args": model_args, "channel_deconvs": channel_deconvs}
    try:
        model = _build(draft, shapes, path)
        # Version 1 always ran the BatchNorm pass; a file saved without its report does not say what it fused,
        # and the pass on the rebuilt architecture finds what it found then (the spec check below confirms it).
        pairs = report.get("bn_fused") if isinstance(report, dict) else find_conv_batchnorm_pairs(model)
        fuse_conv_batchnorm_pairs(model, pairs or {})
    except NdeconvError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to rebuild is the same advice
        raise refold(f"{type(err).__name__}: {err}") from err
    built = {n: spec for n, m in model.named_modules() if n and (spec := _version_1_spec(m)) is not None}
    recorded = {n: spec for n, spec in specs.items() if spec.get("type") != "Identity"}
    stateful = [n for n, m in model.named_modules() if n and _owns_state(m) and n not in built]
    differ = sorted(n for n in set(built) | set(recorded) if built.get(n) != recorded.get(n))
    if stateful or differ:
        raise refold(f"layer {(stateful or differ)[0]} differs")
    return model
