"""Pretrained weights of the zoo: where they live, how they are checked, and how they are adapted.

Layout of shipped weights (one folder per ``<model>.<tag>``, the folder a ``local-dir:`` or Hub repo has)::

    zoo/weights/resnet18_deconv.fashion_mnist/
        model.safetensors   the state_dict (safetensors only: nothing is ever unpickled)
        config.json         timm's Hub config (architecture, num_classes, model_args, pretrained_cfg)
        SHA256SUMS          ``<sha256>  model.safetensors`` (sha256sum format), checked before every load

``ship_weights`` writes all three atomically. ``pretrained=True`` for a registered tag loads the shipped file
through timm's own ``file`` source after its sha256 matched; a file that is missing, has no recorded checksum or
does not match is refused with one clear error. ``hf-hub:``, ``local-dir:`` and
``pretrained_cfg_overlay=dict(file=...)`` go through timm unchanged, with the same clear errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from timm.models import adapt_input_conv, resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source
from timm.models._registry import _model_default_cfgs, _model_has_pretrained, _model_pretrained_cfgs
from torch import nn

from ndeconv.datasets import FASHION_MNIST_LABELS, folder_name
from ndeconv.errors import UNPICKLE_ERRORS, NdeconvError, UsageError, error_summary
from ndeconv.io import (
    CHECKSUMS_FILE,
    atomic_write,
    check_loadable_weights,
    file_sha256,
    save_json_atomic,
    save_safetensors_atomic,
    verify_checksums_beside,
)
from ndeconv.layers import FastDeconv

__all__ = [
    "CLASS_MAP_FILE",
    "DEFAULT_IN_CHANS",
    "TAG_DATA",
    "WEIGHTS_DIR",
    "complete_pretrained_cfgs",
    "default_in_chans",
    "expand_deconv_stem",
    "registered_tags",
    "ship_weights",
    "shipped_weights_path",
    "verify_sha256",
    "weights_in_chans",
    "write_class_map",
    "zoo_filter_fn",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = "model.safetensors"
CLASS_MAP_FILE = "class_map.txt"
HF_HUB_ORG = "ndeconv"

# What each pretrained tag was trained on: the data fields of its pretrained_cfg, with the channels of the
# images themselves (the weights' stem). Fashion-MNIST is zero-padded from 28x28 to the CIFAR topology's 32x32
# and, as the authors' main.py trains it, only scaled to [0, 1] (ToTensor, no normalisation): mean 0 and std 1
# say exactly that to timm's data config, and crop_pct 32/28 with a centre crop makes timm's eval transform
# Resize(28) + CenterCrop(32), which on a 28x28 image is the same 2-pixel zero border (crop_pct 1.0 would
# resize the 28x28 image up to 32x32 instead: 10 points of top-1 lost).
TAG_DATA: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(
        input_size=(1, 32, 32), mean=(0.0,), std=(1.0,), crop_pct=32 / 28, crop_mode="center",
        num_classes=10, label_names=FASHION_MNIST_LABELS,
        description="Trained on Fashion-MNIST (28x28 grayscale, zero-padded to 32x32).",
    ),
}

# timm's convention: a model takes 3-channel images and its pretrained_cfg says so. Weights trained on gray
# images (1 channel) load into that model through an exact stem adaptation (``zoo_filter_fn``); ``in_chans=1``
# builds their own gray stem, and whatever the channels, a model's pretrained_cfg describes the model built.
DEFAULT_IN_CHANS = 3


def default_in_chans(weights_chans: int) -> int:
    """The channels of the default model for weights of ``weights_chans`` input channels: 3 where the stem
    adapts exactly (3 is a whole multiple of them), else the weights' own."""
    return DEFAULT_IN_CHANS if DEFAULT_IN_CHANS % weights_chans == 0 else weights_chans


def shipped_weights_path(model_name: str, tag: str) -> Path:
    return WEIGHTS_DIR / f"{model_name}.{tag}" / WEIGHTS_FILE


# -- registry --------------------------------------------------------------------------------------------------


def complete_pretrained_cfgs(model_names: list[str]) -> None:
    """Fill in, for each registered ``<model>.<tag>``, the tag's data fields and its weight sources.

    Zoo files only name their first conv and classifier (``zoo_cfg``); what depends on the name and the tag
    (``file`` of the shipped weights, ``hf_hub_id``, input_size/mean/std/labels of the tag's data) is set here,
    once, right after registration, so timm's ``get_pretrained_cfg`` and ``list_pretrained`` see it.
    """
    for name in model_names:
        default_cfg = _model_default_cfgs.get(name)
        if default_cfg is None:
            continue
        for tag_idx, tag in enumerate(default_cfg.tags):
            cfg = default_cfg.cfgs[tag]
            updates: dict[str, Any] = dict(TAG_DATA.get(tag, {}))
            if "input_size" in updates:  # the default model's input, not the weights' (DEFAULT_IN_CHANS)
                updates.update(_with_channels(updates, default_in_chans(updates["input_size"][0])))
            if tag and not (cfg.file or cfg.url or cfg.hf_hub_id):
                updates["file"] = str(shipped_weights_path(name, tag))
                updates["hf_hub_id"] = f"{HF_HUB_ORG}/{name}.{tag}"
            cfg = dataclasses.replace(cfg, architecture=name, tag=tag or None, **updates)
            default_cfg.cfgs[tag] = cfg
            keys = ([name] if tag_idx == 0 else []) + ([f"{name}.{tag}"] if tag else [])
            # timm's list_pretrained means "weights exist": a tag whose shipped file is not trained yet keeps its
            # cfg (pretrained=True then says so clearly) but is not listed as pretrained.
            available = cfg.has_weights and not ("file" in updates and not Path(updates["file"]).is_file())
            for key in keys:
                _model_pretrained_cfgs[key] = cfg
                if available:
                    _model_has_pretrained.add(key)


def registered_tags(model_name: str) -> list[str]:
    """Every pretrained tag registered for a zoo model, with or without weights on disk yet."""
    default_cfg = _model_default_cfgs.get(model_name)
    return [tag for tag in default_cfg.tags if tag] if default_cfg is not None else []


# -- checks ----------------------------------------------------------------------------------------------------


def verify_sha256(path: str | Path) -> None:
    """Check a shipped weights file against the ``SHA256SUMS`` beside it; raise NdeconvError if it does not match
    or none records it (a symlink is followed to the shipped folder first)."""
    verify_checksums_beside(path, required=True)


def local_dir_weights(folder: Path) -> Path | None:
    """The weights file timm's ``local-dir:`` source reads from ``folder`` (its preferred names, then the first
    file of each extension in its order), or None when there is none."""
    try:
        from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES
    except ImportError:  # another timm: its own choice is the model.safetensors every Hub folder has
        _PREFERRED_FILES, _EXT_PRIORITY = (WEIGHTS_FILE,), ()
    if not folder.is_dir():
        return None
    for name in _PREFERRED_FILES:
        if (folder / name).exists():
            return folder / name
    for ext in _EXT_PRIORITY:
        found = sorted(folder.glob(f"*{ext}"))
        if found:
            return found[0]
    return None


def _cached_hub_weights(loc: str | tuple[str, str]) -> Path | None:
    """The weights file of a Hub repo that timm will read from the local cache, if it is cached (a first
    download comes checked by the Hub's own hashes; a SHA256SUMS is beside it only when the repo was fetched whole)."""
    from huggingface_hub import try_to_load_from_cache

    repo, names = (loc, ("model.safetensors", "pytorch_model.bin")) if isinstance(loc, str) else (loc[0], (loc[1],))
    repo_id, _, revision = repo.partition("@")
    for name in names:
        try:
            cached = try_to_load_from_cache(repo_id, name, revision=revision or None)
        except ValueError:  # not a repo name: timm reports it
            return None
        if isinstance(cached, str):
            return Path(cached)
    return None


def _peek_shapes(path: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of some tensors of a safetensors file, read from its header only (no tensor is loaded)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            return {n: tuple(f.get_slice(n).get_shape()) for n in names if n in keys}
    except (SafetensorError, OSError, ValueError) as err:
        raise NdeconvError(f"{path}: not a readable safetensors file ({err}); it may be truncated or corrupt, "
                           "or in another format: only safetensors is loaded, nothing is unpickled (save a "
                           "state_dict with safetensors.torch.save_file; the authors' checkpoints convert with "
                           "`ndeconv convert-reference`)") from err


# -- build-time preparation ------------------------------------------------------------------------------------


def _names(value: Any) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else list(value)


def _label(variant: str, cfg: Any) -> str:
    tag = getattr(cfg, "tag", None)
    return f"{variant}.{tag}" if tag else variant


def _describe_source(cfg: Any) -> str:
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "state_dict":
        return "an in-memory state_dict"
    if not load_from:
        return "nowhere (the pretrained_cfg names no file, url or hf_hub_id)"
    return f"{load_from} {loc}"


# Where timm may find weights. It tries a state_dict, then ``file``, then ``hf_hub_id``, then ``url``, so a
# registered ``file`` would win over an overlay that names only a Hub repo or a URL.
_SOURCES = ("state_dict", "file", "hf_hub_id", "url")


def _only_overlay_source(overlay: dict[str, Any]) -> dict[str, Any]:
    """An overlay that names a weight source replaces the registry's sources rather than ranking below them."""
    if any(overlay.get(key) for key in _SOURCES):
        overlay = {**{key: None for key in _SOURCES}, **overlay}
    return overlay


def _with_channels(data: dict[str, Any], chans: int) -> dict[str, Any]:
    """``input_size``/``mean``/``std`` for ``chans`` channels: statistics repeat for whole multiples (an RGB copy
    of a gray image has the gray statistics in every channel) and come back whole from such a repetition,
    else their average does."""

    def fit(stats: tuple[float, ...]) -> tuple[float, ...]:
        if len(stats) == chans:
            return stats
        if chans % len(stats) == 0:
            return stats * (chans // len(stats))
        if len(stats) % chans == 0 and stats == stats[:chans] * (len(stats) // chans):
            return stats[:chans]
        return (sum(stats) / len(stats),) * chans

    return dict(input_size=(chans, *tuple(data["input_size"])[1:]), mean=fit(tuple(data["mean"])),
                std=fit(tuple(data["std"])))


def _sidecar_data(path: Path, architecture: str | None, chans: int | None) -> dict[str, Any]:
    """The data fields recorded in a ``config.json`` beside a weights file (a run directory or Hub folder).

    A user's file otherwise gets the default tag's normalisation, which a model trained on other data does not use.
    Only a config of the same architecture is trusted, recorded for the weights' channels or, as ``ship_weights``
    writes gray weights' default 3-channel model, for a whole multiple of them with the statistics repeated.
    """
    try:
        recorded = json.loads((path.parent / "config.json").read_text()).get("pretrained_cfg")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(recorded, dict) or recorded.get("architecture") not in (None, architecture):
        return {}
    data = {key: tuple(recorded[key]) for key in ("input_size", "mean", "std", "label_names") if key in recorded}
    if "input_size" in data and chans is not None and data["input_size"][0] != chans:
        recorded_chans = data["input_size"][0]
        if recorded_chans % chans or any(len(data.get(key, ())) != recorded_chans for key in ("mean", "std")):
            return {}
        fitted = _with_channels(data, chans)
        if _with_channels(fitted, recorded_chans) != _with_channels(data, recorded_chans):
            return {}  # per-channel statistics of other images, not copies of the weights' channels
        data.update(fitted)
    return data


def _fit_in_chans(cfg: Any, kwargs: dict[str, Any], user_input_size: bool) -> dict[str, Any]:
    """A model built for other input channels (``in_chans=``) than its pretrained_cfg says gets a pretrained_cfg
    that describes its own input; the stem of weights loaded into it is adapted by ``zoo_filter_fn`` first, so
    timm then neither warns nor adapts it again."""
    in_chans = kwargs.get("in_chans")
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    source = {key: overlay.get(key, getattr(cfg, key)) for key in ("input_size", "mean", "std")}
    if in_chans and not user_input_size and source["input_size"][0] != in_chans:
        overlay.update(_with_channels(source, in_chans))
        kwargs["pretrained_cfg_overlay"] = overlay
    return kwargs


def prepare_pretrained(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Adjust ``build_model_with_cfg`` kwargs before building (see ``create_zoo_model``)."""
    registry_cfg = kwargs.get("pretrained_cfg") is None or isinstance(kwargs.get("pretrained_cfg"), str)
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    user_input_size = "input_size" in overlay
    if registry_cfg and overlay:
        overlay = _only_overlay_source(overlay)
        kwargs["pretrained_cfg_overlay"] = overlay
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay or None)
    if not pretrained:
        # No weights: the default model is timm's (in_chans from the default cfg, DEFAULT_IN_CHANS), and its
        # pretrained_cfg is the default tag's, as for any timm model; another in_chans gets a cfg describing it.
        return _fit_in_chans(cfg, kwargs, user_input_size)

    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from in ("local-dir", "hf-hub"):
        # timm reads these files itself: check the one it will read against a SHA256SUMS beside it first.
        weights = local_dir_weights(Path(loc)) if load_from == "local-dir" else _cached_hub_weights(loc)
        if weights is not None:
            verify_checksums_beside(weights, required=weights.resolve().is_relative_to(WEIGHTS_DIR))
        return _fit_in_chans(cfg, kwargs, user_input_size)
    if load_from != "file":
        return _fit_in_chans(cfg, kwargs, user_input_size)
    path = Path(loc)
    shipped = path.resolve().is_relative_to(WEIGHTS_DIR)
    if not path.is_file():
        where = "shipped weights" if shipped else "weights file"
        hint = (f"no weights are shipped for it yet; train them (`ndeconv train --arch {variant}`) and load "
                "them with pretrained_cfg_overlay=dict(file=...)" if shipped else "check the path")
        raise NdeconvError(f"{_label(variant, cfg)}: no pretrained weights: looked for {where} at {path}; {hint}")
    if shipped:
        verify_sha256(path)
    else:
        verify_checksums_beside(path)  # a user's copy of a shipped or Hub folder carries its SHA256SUMS along
        # A user's file: the model takes the channels and classes of the weights (unless asked for others), and
        # the normalisation recorded beside them.
        first = [f"{n}.weight" for n in _names(cfg.first_conv)]
        head = [f"{n}.weight" for n in _names(cfg.classifier)]
        shapes = _peek_shapes(path, first + head)
        source_chans = cfg.input_size[0]
        if first and first[0] in shapes and len(shapes[first[0]]) == 4:
            source_chans = shapes[first[0]][1]  # no zoo stem is grouped: weight.shape[1] is the input channels
        if not user_input_size:
            data = {"input_size": cfg.input_size, "mean": cfg.mean, "std": cfg.std}
            data.update(_sidecar_data(path, cfg.architecture, source_chans))
            overlay.update({k: v for k, v in data.items() if k not in overlay})
            if source_chans != overlay["input_size"][0]:
                overlay.update(_with_channels(data, source_chans))
        if head and head[0] in shapes and "num_classes" not in overlay:
            overlay["num_classes"] = shapes[head[0]][0]
        # The default tag's name, description and label names describe the shipped weights, not this file: its
        # labels come from a config.json beside it (taken above) or stay unknown.
        for key in ("tag", "description", "label_names"):
            overlay.setdefault(key, None)
    kwargs["pretrained_cfg_overlay"] = overlay
    return _fit_in_chans(cfg, kwargs, user_input_size)


@contextlib.contextmanager
def pretrained_errors(variant: str, kwargs: dict[str, Any]) -> Iterator[None]:
    """Turn a failure while loading weights (deep in timm, safetensors or huggingface_hub) into one clear line."""
    try:
        yield
    except NdeconvError:
        raise
    except (RuntimeError, OSError, SafetensorError, ValueError, AssertionError, *UNPICKLE_ERRORS) as err:
        try:
            cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
            label, source = _label(variant, cfg), _describe_source(cfg)
        except Exception:  # noqa: BLE001 - describing the source must never hide the real error
            label, source = variant, "its pretrained_cfg"
        missing = hub_lookup_failure(err)
        reason = missing or error_summary(err)
        # The Hub has no such repo or file, or cannot be reached: the name is the problem (exit status 2).
        error = UsageError if missing else NdeconvError
        raise error(f"{label}: cannot load pretrained weights from {source}: {reason}") from err


def hub_lookup_failure(err: BaseException) -> str | None:
    """Why a Hub repo or file cannot be found (not on the Hub, or not cached while offline), in one line, or None
    for any other error."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        return None
    if isinstance(err, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return (f"not in the local Hugging Face cache and {why}; download it where there is a connection "
                "(`hf download ORG/NAME`), or load a folder with local-dir:FOLDER")
    if isinstance(err, RepositoryNotFoundError):
        return "no such Hugging Face Hub repo (or it is private or gated: log in with `hf auth login`)"
    if isinstance(err, RevisionNotFoundError):
        return "the Hub repo has no such revision"
    if isinstance(err, EntryNotFoundError):
        return f"the Hub repo has no such file ({error_summary(err)})"
    if isinstance(err, HFValidationError):
        return f"not a Hugging Face Hub repo name ({error_summary(err)}); write hf-hub:ORG/NAME"
    return None


# -- state_dict filter -----------------------------------------------------------------------------------------


def expand_deconv_stem(
    state_dict: dict[str, torch.Tensor], prefix: str, module: FastDeconv
) -> dict[str, torch.Tensor]:
    """Adapt a FastDeconv stem's weight and whitening to ``module.in_channels`` (a whole multiple of the source).

    For an input whose channels repeat the source's (an RGB copy of a gray image), the adapted layer's eval
    output equals the source layer's on the source image: patches become ``[P, P, ...]`` (channel-major unfold
    layout ``c*k*k + p``), so the whitening is ``block_diag(D, D, ...)``, the mean repeats, and the weight
    repeats divided by the number of copies. Only a stem whitened as one block, both before and after
    (in_channels <= block, which every zoo stem is), has that layout; anything else is refused.
    """
    weight = state_dict[prefix + "weight"]
    src, dst = weight.shape[1], module.in_channels
    kh, kw = module.kernel_size
    name = prefix.rstrip(".")
    if module.groups != 1 or dst % src or dst < src:
        raise NdeconvError(
            f"cannot adapt the deconvolution stem {name} from {src} to {dst} input channels: only whole "
            f"multiples are exact; build the model with in_chans={src} and give it {src}-channel images"
        )
    mean, deconv = state_dict.get(prefix + "running_mean"), state_dict.get(prefix + "running_deconv")
    src_features = src * kh * kw
    if mean is None or deconv is None or mean.shape != (src_features,) or deconv.shape != (src_features,) * 2:
        raise NdeconvError(
            f"cannot adapt the deconvolution stem {name} from {src} to {dst} channels: its whitening is not one "
            f"block over all {src} channels (running_deconv {tuple(deconv.shape) if deconv is not None else None})"
        )
    if module.block != dst:
        raise NdeconvError(
            f"cannot adapt the deconvolution stem {name} to {dst} channels: the model whitens them in blocks of "
            f"{module.block}, not as one block; use in_chans <= the model's block"
        )
    copies = dst // src
    out = dict(state_dict)
    # Divide in float64: shipped weights may be stored in float16, where w / 3 alone would lose 5e-4.
    out[prefix + "weight"] = weight.double().repeat(1, copies, 1, 1) / copies
    out[prefix + "running_mean"] = mean.repeat(copies)
    out[prefix + "running_deconv"] = torch.block_diag(*([deconv] * copies))
    return out


def _strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel checkpoints (the authors' main.py) prefix every key with ``module.``."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def zoo_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm ``pretrained_filter_fn``: adapt the stem to ``in_chans``, refuse a foreign state_dict.

    A deconvolution stem is adapted exactly (``expand_deconv_stem``), a plain-conv stem by timm's own
    ``adapt_input_conv``, both from the channels of the weights themselves (the model's pretrained_cfg describes
    the model, not the source). The classifier is left to timm (resized when ``num_classes`` differs); any other
    missing, unexpected or differently shaped key means the file is another architecture (or the other form,
    ``deconv=True``/``False``).
    """
    state_dict = _strip_module_prefix(dict(state_dict))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    stems = _names(cfg.get("first_conv"))
    for stem in stems:
        module = model.get_submodule(stem)
        weight = state_dict.get(f"{stem}.weight")
        if isinstance(module, FastDeconv) and weight is not None and weight.ndim == 4:
            if weight.shape[1] != module.in_channels:
                # The adaptation computes in float64, which would hide integer weights from load_state_dict's check.
                check_loadable_weights(state_dict, module.state_dict(prefix=f"{stem}."))
                state_dict = expand_deconv_stem(state_dict, f"{stem}.", module)
        elif isinstance(module, nn.Conv2d) and weight is not None and weight.ndim == 4:
            if weight.shape[1] != module.in_channels and module.groups == 1:
                # A plain stem (the BatchNorm form): timm's own adaptation, done here from the weights' channels
                # so the pretrained_cfg can describe the model being built rather than the source.
                check_loadable_weights(state_dict, module.state_dict(prefix=f"{stem}."))
                state_dict = dict(state_dict)
                state_dict[f"{stem}.weight"] = adapt_input_conv(module.in_channels, weight, base_chans=weight.shape[1])
    classifiers = _names(cfg.get("classifier"))
    classifier_prefixes = tuple(f"{n}." for n in classifiers)
    expected = model.state_dict()
    # Another num_classes (0 for a feature extractor): timm drops the classifier's weight and bias itself; the
    # rest of the head (a Delinear's whitening of the pooled features) is kept where it fits and dropped where
    # the new head has none or another shape (num_classes=0, global_pool='catavgmax').
    source_classes = next((state_dict[f"{n}.weight"].shape[0] for n in classifiers if f"{n}.weight" in state_dict),
                          None)
    new_head = source_classes is not None and getattr(model, "num_classes", source_classes) != source_classes
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(classifier_prefixes)
                      or (k in expected and v.shape == expected[k].shape)}
    missing = [k for k in expected if k not in state_dict and not (new_head and k.startswith(classifier_prefixes))]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = []
    for key, value in state_dict.items():
        if key not in expected or value.shape == expected[key].shape:
            continue
        if key in {f"{s}.weight" for s in stems} and value.shape[0] == expected[key].shape[0]:
            continue  # a plain stem conv with other input channels: timm adapts it
        mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(expected[key].shape)}")
    if missing or unexpected or mismatched:
        arch = cfg.get("architecture") or type(model).__name__
        form = "deconvolution" if getattr(getattr(model, "deconv_settings", None), "deconv", True) else "BatchNorm"
        parts = []
        for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
        raise NdeconvError(
            f"the weights do not fit {arch} ({form} form): {'; '.join(parts)}; they belong to another "
            "architecture or form (deconv=True/False, block, block_fc)"
        )
    return state_dict


# -- writing ---------------------------------------------------------------------------------------------------


def ship_weights(model: nn.Module, tag: str, root: str | Path = WEIGHTS_DIR, force: bool = False) -> Path:
    """Write ``<root>/<model>.<tag>/`` (model.safetensors, config.json, SHA256SUMS); return the folder.

    The config.json is the Hub layout timm reads for ``hf-hub:`` and ``local-dir:``, so the folder can be
    uploaded unchanged.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    name = cfg.get("architecture")
    if not name:
        raise UsageError("ship_weights: the model has no pretrained_cfg architecture; build it with timm.create_model")
    folder = Path(root) / f"{name}.{tag}"
    weights = folder / WEIGHTS_FILE
    if weights.exists() and not force:
        raise UsageError(f"{weights} already exists; pass force=True to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("file", "hf_hub_id", "url", "source", "state_dict", "hf_hub_filename"):
        cfg.pop(key, None)
    cfg["tag"] = tag
    cfg.update({k: v for k, v in TAG_DATA.get(tag, {}).items() if k not in ("input_size", "num_classes")})
    # The config describes the default model of these weights (DEFAULT_IN_CHANS, as the registry does), so
    # ``hf-hub:``/``local-dir:`` build what ``pretrained=True`` builds; the weights' own channels are their stem's,
    # and model_args leave in_chans to the pretrained_cfg, as timm's Hub configs do.
    chans = model.get_submodule(_names(cfg.get("first_conv"))[0]).in_channels
    cfg.update(_with_channels(_with_channels(cfg, chans), default_in_chans(chans)))
    cfg["num_classes"] = model.num_classes
    settings = getattr(model, "deconv_settings", None)
    model_args = dict(settings.to_dict() if settings is not None else {})
    model_args.update(num_classes=model.num_classes)
    config = dict(
        architecture=name, num_classes=model.num_classes, num_features=model.num_features,
        global_pool=getattr(model, "global_pool_type", "avg"), model_args=model_args,
        pretrained_cfg={k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items() if v is not None},
    )
    if cfg.get("label_names"):
        config["label_names"] = list(cfg["label_names"])
    save_safetensors_atomic(model.state_dict(), weights)
    save_json_atomic(config, folder / "config.json")
    if cfg.get("label_names"):
        write_class_map(cfg["label_names"], folder / CLASS_MAP_FILE)
    sums = f"{file_sha256(weights)}  {WEIGHTS_FILE}\n"
    atomic_write(folder / CHECKSUMS_FILE, lambda tmp: tmp.write_text(sums))
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def write_class_map(label_names: Sequence[str], path: str | Path) -> Path:
    """timm's ``--class-map`` text file: one class folder name per line, line i for class index i.

    An image folder sorted alphabetically (timm's and torchvision's default) does not have the dataset's class
    order; ``--class-map`` with this file gives each folder its index, in timm's ``validate.py``/``train.py`` and
    in ``ndeconv eval --dataset imagefolder``."""
    names = [folder_name(label) for label in label_names]
    if len(set(names)) != len(names):
        raise UsageError(f"label names {list(label_names)} give the same folder name twice: rename them")
    path = Path(path)
    atomic_write(path, lambda tmp: tmp.write_text("".join(f"{n}\n" for n in names)))
    return path


def _hub_or_dir_config(weights: Path) -> dict[str, Any]:
    try:
        config = json.loads((weights.parent / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def weights_in_chans(model_name: str) -> int | None:
    """The input channels of the weights ``timm.create_model(model_name, pretrained=True)`` loads, read from the
    file's header (nothing is loaded): the channels of the images they were trained on. Tools that feed those
    images (``ndeconv eval``, ``fold``, ``viz``) build the weights' own stem with it (``in_chans=``) instead of
    the default 3-channel model. None when the weights are not on this machine or are not safetensors."""
    from timm.models import get_pretrained_cfg, parse_model_name

    source, ident = parse_model_name(model_name)
    first_conv = None
    if source == "local-dir":
        weights = local_dir_weights(Path(ident))
    elif source == "hf-hub":
        weights = _cached_hub_weights(ident)
    else:
        try:
            cfg = get_pretrained_cfg(ident)
        except RuntimeError:  # an unknown tag: creating the model says so
            return None
        if cfg is None:
            return None
        first_conv = cfg.first_conv
        load_from, loc = _resolve_pretrained_source(cfg.to_dict())
        weights = Path(loc) if load_from == "file" else _cached_hub_weights(loc) if load_from == "hf-hub" else None
    if weights is None or not Path(weights).is_file():
        return None
    if first_conv is None:  # a Hub folder: its config.json names the stem, else the architecture's registry cfg
        config = _hub_or_dir_config(Path(weights))
        first_conv = (config.get("pretrained_cfg") or {}).get("first_conv")
        if first_conv is None and config.get("architecture"):
            registered = get_pretrained_cfg(str(config["architecture"]))
            first_conv = registered.first_conv if registered is not None else None
    names = [f"{n}.weight" for n in _names(first_conv)]
    try:
        shapes = _peek_shapes(Path(weights), names)
    except NdeconvError:
        return None
    shape = shapes.get(names[0]) if names else None
    return int(shape[1]) if shape is not None and len(shape) == 4 else None
