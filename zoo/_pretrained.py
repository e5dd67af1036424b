"""Pretrained weights of the zoo: where they live, how they are checked, and how they are adapted.

Layout of shipped weights (one folder per ``<model>.<tag>``, the folder a ``local-dir:`` or Hub repo has)::

    zoo/weights/resnet18_deconv.fashion_mnist/
        model.safetensors   the state_dict (safetensors only: nothing is ever unpickled)
        config.json         timm's Hub config (architecture, num_classes, model_args, pretrained_cfg)
        SHA256SUMS          ``<sha256>  model.safetensors`` (sha256sum format), checked before every load

``ship_weights`` writes all three atomically. On every route (a registered tag's shipped file, its Hub copy,
``hf-hub:``, ``local-dir:``, ``pretrained_cfg_overlay=dict(file=...)``) ``pretrained_weights_file`` names the file
timm would read, ``read_pretrained_state`` reads it once, checks those bytes (``ndeconv.io.read_verified``: the
SHA256SUMS beside that very file, which must list it, or a Hugging Face blob's name) and deserializes them, and
timm is handed the tensors (``VerifiedWeights``): it never reads a weights file itself. A file that is missing,
unlisted, without the checksum a shipped file needs, or that does not match is refused with one clear error.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from timm.models import resolve_pretrained_cfg
from timm.models._builder import _resolve_pretrained_source
from torch import nn

from ndeconv.datasets import FASHION_MNIST_LABELS
from ndeconv.errors import ChecksumError, NdeconvError, UsageError
from ndeconv.io import read_json

from ._stem import _fit_in_chans, _names, _with_channels, default_in_chans

__all__ = [
    "HF_HUB_ORG",
    "TAG_DATA",
    "TAG_MODEL_ARGS",
    "WEIGHTS_DIR",
    "WEIGHTS_ENV",
    "WEIGHTS_FILE",
    "local_dir_weights",
    "missing_weights_line",
    "prepare_pretrained",
    "registered_tags",
    "shipped_hub_id",
    "shipped_weights_path",
    "tag_dataset",
    "tag_record",
    "weights_in_chans",
]

# Where the shipped weights are: a clone's (or an editable install's) zoo/weights, or the folder NDECONV_WEIGHTS
# names. The wheel carries no weights (PyPI's file limit, and one copy of 356 MB per install): a pip user points
# NDECONV_WEIGHTS at a clone's zoo/weights or any copy of its folders, or timm reads the tag's hf_hub_id from the
# Hugging Face cache.
WEIGHTS_ENV = "NDECONV_WEIGHTS"
PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_WEIGHTS_FROM_ENV = os.environ.get(WEIGHTS_ENV)
WEIGHTS_DIR = Path(_WEIGHTS_FROM_ENV).expanduser().resolve() if _WEIGHTS_FROM_ENV else PACKAGE_WEIGHTS_DIR
WEIGHTS_FILE = "model.safetensors"
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
# The 20-epoch (converged) weights on the same data: a tag of their own, listed first in an architecture's
# default_cfgs once shipped (the default), while ``fashion_mnist`` keeps naming the one-epoch weights it always has.
TAG_DATA["fashion_mnist_e20"] = dict(
    TAG_DATA["fashion_mnist"],
    description="Trained for 20 epochs on Fashion-MNIST (28x28 grayscale, zero-padded to 32x32).",
)
# The hybrid's weights (deconvolution stem, BatchNorm elsewhere: ``deconv="stem"``) on the same data.
TAG_DATA["fashion_mnist_stem"] = dict(
    TAG_DATA["fashion_mnist"],
    description="Hybrid (deconvolution stem, BatchNorm elsewhere), trained on Fashion-MNIST (28x28 grayscale, "
                "zero-padded to 32x32).",
)
# The model arguments a tag's weights were trained with, beyond the architecture's defaults: the tag names the
# model as well as its weights, so ``timm.create_model('resnet18_deconv.fashion_mnist_stem')`` builds the hybrid
# those weights fit (timm's pretrained_cfg has no field for model arguments; a tag is timm's only handle).
TAG_MODEL_ARGS: dict[str, dict[str, Any]] = {
    "fashion_mnist_stem": dict(deconv="stem"),
}
# The dataset of a tag that is more than a dataset's name (the hybrid's: the dataset's with the form's suffix).
_TAG_DATASETS = {"fashion_mnist_stem": "fashion_mnist", "fashion_mnist_e20": "fashion_mnist"}


def tag_dataset(tag: str | None) -> str | None:
    """The dataset (an ``ndeconv.datasets`` name) a tag's weights were trained on, None when the tag says none."""
    from ndeconv.datasets import DATASETS

    dataset = _TAG_DATASETS.get(tag or "", tag)
    return dataset if dataset in DATASETS else None


def shipped_weights_path(model_name: str, tag: str) -> Path:
    return WEIGHTS_DIR / f"{model_name}.{tag}" / WEIGHTS_FILE


# -- registry --------------------------------------------------------------------------------------------------


def tag_record(model_name: str, tag: str) -> dict[str, Any]:
    """The facts of one weight set (``<model>.<tag>``) as timm's ``default_cfgs`` entry holds them: the data it
    was trained on (input_size of the default model, mean/std, crop, label names) and its Hub repo. The shipped
    file itself is found when a model is built (``prepare_pretrained``: ``WEIGHTS_DIR``, which
    ``NDECONV_WEIGHTS`` may name), so a pip install without weights and a clone with them share one registry.
    A tag this module has no data for (an architecture whose weights are not trained) gets nothing."""
    if tag not in TAG_DATA:
        return {}
    record = dict(TAG_DATA[tag])
    # The default model's input, not the weights' (DEFAULT_IN_CHANS; zoo_filter_fn adapts the gray stem).
    record.update(_with_channels(record, default_in_chans(record["input_size"][0])))
    record["hf_hub_id"] = shipped_hub_id(model_name, tag)
    return record


def shipped_hub_id(model_name: str, tag: str) -> str:
    return f"{HF_HUB_ORG}/{model_name}.{tag}"


def registered_tags(model_name: str) -> list[str]:
    """Every pretrained tag registered for a zoo model (through timm's public registry)."""
    from timm.models import list_pretrained

    return sorted(key.partition(".")[2] for key in list_pretrained(f"{model_name}.*") if "." in key)


def _shipped_source(cfg: Any) -> Path | None:
    """The shipped weights folder's file for a registry cfg that names a zoo weight set, else None."""
    if not (cfg.architecture and cfg.tag and cfg.hf_hub_id == shipped_hub_id(cfg.architecture, cfg.tag)):
        return None
    if cfg.source in ("hf-hub", "local-dir"):
        return None  # the user named a Hub repo or a folder (hf-hub:, local-dir:): timm reads that, not our copy
    if cfg.file is not None or cfg.url is not None or cfg.state_dict is not None:
        return None  # an overlay named its own source (file='' too: it switches the shipped file off)
    return shipped_weights_path(cfg.architecture, cfg.tag)


# -- checks ----------------------------------------------------------------------------------------------------


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


# -- the one reader of pretrained weights ----------------------------------------------------------------------


@dataclass(frozen=True)
class WeightsSource:
    """The file whose bytes a pretrained model's weights come from, and how it is named in errors."""

    path: Path  # as it is read: a Hub cache snapshot's link, a folder's file, a shipped file
    kind: str  # "file" (shipped or a user's file), "local-dir" or "hf-hub": timm's name for the route
    where: str  # the route as errors name it: "file PATH", "hf-hub ORG/NAME", "local-dir FOLDER"
    shipped: bool = False  # a shipped file: its SHA256SUMS must list it


def _hub_weights_file(loc: str | tuple[str, str], cache_dir: str | Path | None = None) -> Path:
    """The file of a Hub repo that timm's ``load_state_dict_from_hf`` reads (model.safetensors before
    pytorch_model.bin, or the ``hf_hub_filename`` asked for), from the cache or downloaded as timm would."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, filename = (loc, "pytorch_model.bin") if isinstance(loc, str) else loc
    repo_id, _, revision = repo.partition("@")
    names = [filename]
    if filename.endswith(".bin"):  # timm's safe alternative (_get_safe_alternatives), tried first
        names.insert(0, "model.safetensors" if filename == "pytorch_model.bin" else f"{filename[:-4]}.safetensors")
    for name in names[:-1]:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision or None, cache_dir=cache_dir))
        except EntryNotFoundError:  # no safetensors in the repo (offline: not cached): the next name, as timm
            continue
    return Path(hf_hub_download(repo_id, names[-1], revision=revision or None, cache_dir=cache_dir))


def pretrained_weights_file(variant: str, cfg: Any, cache_dir: str | Path | None = None) -> WeightsSource | None:
    """The file ``timm.create_model(..., pretrained=True)`` takes ``cfg``'s weights from, on every route: a
    registered tag's shipped file (in ``WEIGHTS_DIR``, which ``NDECONV_WEIGHTS`` names) or, without one, its Hub
    copy; ``pretrained_cfg_overlay=dict(file=...)``; ``local-dir:`` (the file timm's folder loader picks);
    ``hf-hub:`` (the cache snapshot's file, downloaded first where there is a connection, as timm does).

    None where no file is read: an in-memory ``state_dict``, or a URL (no zoo weights are served from one)."""
    shipped_file = _shipped_source(cfg)
    if shipped_file is not None and shipped_file.is_file():
        return WeightsSource(shipped_file, "file", f"file {shipped_file}", shipped=True)
    load_from, loc = _resolve_pretrained_source(cfg.to_dict())
    if load_from == "hf-hub":
        if shipped_file is not None:  # this install lacks the tag's folder (a pip install): its Hub copy
            from huggingface_hub import constants

            if _cached_hub_weights(loc) is None and constants.HF_HUB_OFFLINE:
                raise UsageError(missing_weights_line(_label(variant, cfg), shipped_file.parent, cfg.hf_hub_id))
        where = f"hf-hub {loc if isinstance(loc, str) else '/'.join(loc)}"
        return WeightsSource(_hub_weights_file(loc, cache_dir), "hf-hub", where)
    if load_from == "local-dir":
        path = local_dir_weights(Path(loc))
        if path is None:
            raise UsageError(f"{_label(variant, cfg)}: no weights file in {loc}; local-dir: takes a folder in timm's "
                             "Hub layout (config.json and model.safetensors)")
        return WeightsSource(path, "local-dir", f"local-dir {loc}", path.resolve().is_relative_to(WEIGHTS_DIR))
    if load_from != "file":
        return None
    path = Path(loc)
    shipped = path.resolve().is_relative_to(WEIGHTS_DIR)
    if not path.is_file():
        where = "shipped weights" if shipped else "weights file"
        hint = (f"no weights are shipped for it yet; train them (`ndeconv train --arch {variant}`) and load "
                "them with pretrained_cfg_overlay=dict(file=...)" if shipped else "check the path")
        raise NdeconvError(f"{_label(variant, cfg)}: no pretrained weights: looked for {where} at {path}; {hint}")
    return WeightsSource(path, "file", f"file {path}", shipped)


def read_pretrained_state(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The state_dict in ``source``'s file, read once and verified (``ndeconv.io.read_verified``: the SHA256SUMS
    beside the file read, a Hugging Face blob's name; a folder's SHA256SUMS must list it) before anything of it
    is deserialized, and never unpickled: safetensors, or a torch file read weights-only from a Hub repo or a
    ``local-dir:`` folder (the entries timm's loaders take: EMA weights first, ``module.`` prefixes stripped)."""
    from timm.models import clean_state_dict

    from ndeconv.io import load_safetensors, load_torch_file

    if source.kind == "file" or source.path.name.endswith(".safetensors"):
        try:
            return load_safetensors(source.path, required=source.shipped)
        except ChecksumError:
            raise
        except NdeconvError as err:
            if source.kind != "file":
                raise
            # A file named by pretrained_cfg_overlay is taken as safetensors whatever its suffix.
            raise NdeconvError(f"{err}; only safetensors is loaded, nothing is unpickled (save a state_dict with "
                               "safetensors.torch.save_file; the authors' checkpoints convert with `ndeconv "
                               "convert-reference`)") from err
    checkpoint = load_torch_file(source.path, required=source.shipped)
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise NdeconvError(f"{source.path}: holds no state_dict of tensors; save the model's state_dict")
    return clean_state_dict(checkpoint)


# timm deep-copies its pretrained_cfg (dataclasses.asdict) before loading: verified tensors placed there would
# be copied whole (a second for 90 MB). timm is given a one-entry stand-in instead, which takes its
# highest-priority ``state_dict`` route, and ``VerifiedWeights`` (the filter it calls first) swaps it for them.
_STAND_IN = "ndeconv.verified_weights"


class VerifiedWeights:
    """The ``pretrained_filter_fn`` that gives timm the tensors ``read_pretrained_state`` read and verified, in
    place of the stand-in ``overlay`` puts in the pretrained_cfg, then applies the model's own filter to them.
    It also puts the cfg's source fields back, so the model's pretrained_cfg names where its weights came from."""

    def __init__(self, state: dict[str, torch.Tensor], source: WeightsSource, cfg: Any,
                 filter_fn: Callable[..., dict[str, torch.Tensor]] | None) -> None:
        self.state, self.source, self.filter_fn = state, source, filter_fn
        self.restore = {"source": cfg.source, "state_dict": cfg.state_dict}

    @staticmethod
    def overlay(source: WeightsSource) -> dict[str, Any]:
        """The pretrained_cfg fields that route timm to the stand-in (a Hub or folder ``source`` would win)."""
        return {"source": None, "state_dict": {_STAND_IN: source.where}}

    def __call__(self, state_dict: dict[str, Any], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
        if _STAND_IN not in state_dict:  # not timm's state_dict route: never load anything but verified tensors
            raise NdeconvError(f"{self.source.path}: timm did not load the verified weights; this timm version "
                               "routes pretrained weights differently: report it with `pip show timm`")
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, dict) and _STAND_IN in (cfg.get("state_dict") or {}):
            cfg.update(self.restore)
        if self.filter_fn is None:
            return dict(self.state)
        return self.filter_fn(self.state, model) if model is not None else self.filter_fn(self.state)


def verified_source(cfg: dict[str, Any]) -> str | None:
    """How errors name the weights a pretrained_cfg dict was routed to by ``VerifiedWeights``, else None."""
    stand_in = cfg.get("state_dict")
    return stand_in.get(_STAND_IN) if isinstance(stand_in, dict) else None


@contextlib.contextmanager
def _read_errors(variant: str, cfg: Any, source: WeightsSource | None = None) -> Iterator[None]:
    """The reader's failures (a checksum, a damaged file) as one line naming the model, the route and the file;
    the Hub's and timm's are turned into one line by ``pretrained_errors`` around the whole build
    (``create_zoo_model``), which this module cannot import: that module reads this one."""
    label = _label(variant, cfg)
    try:
        yield
    except NdeconvError as err:
        if str(err).startswith(label):
            raise
        route = f" from {source.kind}" if source is not None else ""
        raise type(err)(f"{label}: cannot load pretrained weights{route}: {err}") from err


# -- build-time preparation ------------------------------------------------------------------------------------


def _label(variant: str, cfg: Any) -> str:
    tag = getattr(cfg, "tag", None)
    return f"{variant}.{tag}" if tag else variant


# Where timm may find weights. It tries a state_dict, then ``file``, then ``hf_hub_id``, then ``url``, so a
# registered ``file`` would win over an overlay that names only a Hub repo or a URL.
_SOURCES = ("state_dict", "file", "hf_hub_id", "url")


def _only_overlay_source(overlay: dict[str, Any]) -> dict[str, Any]:
    """An overlay that names a weight source replaces the registry's sources rather than ranking below them."""
    if any(overlay.get(key) for key in _SOURCES):
        overlay = {**{key: None for key in _SOURCES}, **overlay}
    return overlay


def _sidecar_data(path: Path, architecture: str | None, chans: int | None) -> dict[str, Any]:
    """The data fields recorded in a ``config.json`` beside a weights file (a run directory or Hub folder).

    A user's file otherwise gets the default tag's normalisation, which a model trained on other data does not use.
    Only a config of the same architecture is trusted, recorded for the weights' channels or, as ``ship_weights``
    writes gray weights' default 3-channel model, for a whole multiple of them with the statistics repeated.
    """
    try:
        recorded = read_json(path.parent / "config.json").get("pretrained_cfg")
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


def apply_tag_model_args(variant: str, kwargs: dict[str, Any]) -> None:
    """Give the model the arguments its tag's weights were trained with (``TAG_MODEL_ARGS``): a tag naming the
    hybrid builds the hybrid. An argument given otherwise than the tag's weights need is one clear error."""
    cfg = kwargs.get("pretrained_cfg")  # timm passes a tag, or a Hub folder's config dict
    tag = cfg if isinstance(cfg, str) else cfg.get("tag") if isinstance(cfg, dict) else getattr(cfg, "tag", None)
    for key, value in TAG_MODEL_ARGS.get(tag or "", {}).items():
        if key in kwargs and kwargs[key] != value:
            raise UsageError(
                f"{variant}.{tag}: these weights are the model with {key}={value!r}, not {key}={kwargs[key]!r}; "
                f"leave {key} out (the tag sets it), or pick a tag of the form you want "
                f"({', '.join(registered_tags(variant))})")
        kwargs[key] = value


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

    with _read_errors(variant, cfg):
        source = pretrained_weights_file(variant, cfg, kwargs.get("cache_dir"))
    if source is not None:
        with _read_errors(variant, cfg, source):
            state = read_pretrained_state(source)
    if source is None:  # an in-memory state_dict, or a URL: timm reads it (no zoo weights come from either)
        kwargs["pretrained_cfg_overlay"] = overlay
        return _fit_in_chans(cfg, kwargs, user_input_size)
    if source.kind in ("local-dir", "hf-hub"):
        _check_config_fits(cfg, state, source)
    # timm loads these tensors, not the file again: the bytes checked are the bytes loaded.
    kwargs["pretrained_filter_fn"] = VerifiedWeights(state, source, cfg, kwargs.get("pretrained_filter_fn"))
    overlay.update(VerifiedWeights.overlay(source))
    if source.kind == "file":
        overlay["file"] = str(source.path)  # the model's pretrained_cfg names the file its weights came from
    if source.kind == "file" and not source.shipped:
        # A user's file: the model takes the channels and classes of the weights (unless asked for others), and
        # the normalisation recorded beside them.
        first = [f"{n}.weight" for n in _names(cfg.first_conv)]
        head = [f"{n}.weight" for n in _names(cfg.classifier)]
        shapes = {n: tuple(state[n].shape) for n in first + head if n in state}
        source_chans = cfg.input_size[0]
        if first and first[0] in shapes and len(shapes[first[0]]) == 4:
            source_chans = shapes[first[0]][1]  # no zoo stem is grouped: weight.shape[1] is the input channels
        if not user_input_size:
            data = {"input_size": cfg.input_size, "mean": cfg.mean, "std": cfg.std}
            data.update(_sidecar_data(source.path, cfg.architecture, source_chans))
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


# More classes than any classifier a zoo model is trained for: a mistyped value (10**9), not a real head.
_MAX_CLASSES = 1_000_000


def _check_config_fits(cfg: Any, state: dict[str, torch.Tensor], source: WeightsSource) -> None:
    """The config.json of a Hub or local-dir folder checked against the weights it describes, as ``--checkpoint``
    checks one beside a file: its ``num_classes`` must be a number of classes, and the weights' own classifier's
    (a config that says 0 would drop the trained head and score pooled features as logits)."""
    where = source.path.parent / "config.json"
    num_classes = getattr(cfg, "num_classes", None)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 <= num_classes <= _MAX_CLASSES:
        raise UsageError(f"{where}: num_classes {num_classes!r} is not a number of classes (0 to {_MAX_CLASSES:,}); "
                         "correct the file")
    head = next((state[f"{n}.weight"] for n in _names(cfg.classifier) if f"{n}.weight" in state), None)
    if head is not None and head.dim() >= 1 and head.shape[0] != num_classes:
        raise UsageError(f"{where}: num_classes {num_classes} does not match the weights' {head.shape[0]}-class "
                         f"classifier ({_names(cfg.classifier)[0]}.weight); correct the file, or pass num_classes= "
                         "to build another head on the same features")


def missing_weights_line(label: str, folder: Path, hf_hub_id: str) -> str:
    """The one line for a shipped tag this install has no weights for, saying the two ways to get them."""
    return (f"{label}: no weights in this install ({folder} does not exist; the pip wheel carries none) and none in "
            f"the Hugging Face cache ({hf_hub_id}); point {WEIGHTS_ENV} to a folder holding {folder.name}/ (a clone's "
            f"zoo/weights: export {WEIGHTS_ENV}=CLONE/zoo/weights), or fetch the Hub copy where there is a connection "
            f"(`hf download {hf_hub_id}`)")


# -- state_dict filter -----------------------------------------------------------------------------------------


# -- writing ---------------------------------------------------------------------------------------------------


def _hub_or_dir_config(weights: Path) -> dict[str, Any]:
    try:
        config = read_json(weights.parent / "config.json")
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
        shipped_file = _shipped_source(cfg)
        load_from, loc = _resolve_pretrained_source(cfg.to_dict())
        if shipped_file is not None and shipped_file.is_file():
            weights = shipped_file
        else:
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
