"""Zoo models from weight files: the one loader behind ``ndeconv eval``, ``fold``, ``export`` and ``viz``.

A checkpoint is a state_dict of a zoo model: safetensors (what ``ndeconv train`` and ``convert-reference``
write), or a torch file read with ``weights_only=True`` (never unpickling code; the authors' checkpoints keep
it under ``state_dict`` with keys prefixed ``module.``). What it is comes, most specific first, from the
caller's ``model_args``, the ``config.json`` beside it (a run directory's or a shipped folder's), and the
state_dict itself: classes (the classifier's rows), input channels (the stem's), the deconvolution or
BatchNorm form and the head's Delinear block (the buffers it holds). Folded weights written by ``ndeconv
fold`` load as the plain network they are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UNPICKLE_ERRORS, NdeconvError, UsageError, error_summary

__all__ = [
    "LoadedCheckpoint",
    "create_pretrained_model",
    "infer_model_args",
    "load_checkpoint_model",
    "pretrained_model_name",
    "read_state_dict",
]


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    architecture: str | None  # None for folded weights (their file names what they were)
    model_args: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the config.json beside the file, if any
    folded: bool = False


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a torch checkpoint of tensors, ``module.`` prefixes stripped."""
    from .io import folder_not_file, load_safetensors, verify_checksums_beside

    if path.is_dir():
        raise UsageError(folder_not_file(path))
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        if not path.is_file():
            raise UsageError(f"{path}: no such file")
        verify_checksums_beside(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - pickle/zip errors vary
            # error_summary never repeats torch's advice to retry with weights_only=False (that runs the file's code).
            raise UsageError(f"{path}: not loadable as weights only ({error_summary(err)}); use a safetensors file "
                             "or a torch checkpoint of tensors") from err
        for key in ("state_dict", "model", "net"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _config_beside(path: Path) -> dict[str, Any]:
    beside = path.with_name("config.json")
    if not beside.is_file():
        return {}
    try:
        config = json.loads(beside.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{beside}: not readable JSON ({err}); fix or remove it, or pass --arch") from err
    return config if isinstance(config, dict) else {}


def infer_model_args(state: dict[str, torch.Tensor], arch: str) -> dict[str, Any]:
    """What a state_dict itself says: classes, input channels, the deconvolution or BatchNorm form (the stem's;
    a BatchNorm network may still have a ChannelDeconv head), ``bias``, ``block`` and the head's settings.

    The search over block sizes and heads is ``ndeconv.convert.reference.infer_model_args`` (exact: equal buffer shapes
    everywhere); a state_dict without the stem or the classifier says nothing, so the defaults stay and loading
    it names what differs.
    """
    from ndeconv.convert.reference import infer_model_args as infer_from_shapes

    from .errors import NdeconvError

    try:
        return infer_from_shapes(arch, state)
    except NdeconvError:
        return {}


def load_checkpoint_model(path: str | Path, arch: str | None = None,
                          model_args: dict[str, Any] | None = None) -> LoadedCheckpoint:
    """The eval-mode zoo model whose weights ``path`` holds (see the module docstring for what decides its shape)."""
    import timm

    import ndeconv.zoo  # noqa: F401 - registers the zoo with timm
    from ndeconv.convert import is_folded_file, load_folded

    path = Path(path)
    if is_folded_file(path):
        if arch is not None:
            raise UsageError(f"{path} holds folded weights that name their architecture; drop --arch")
        return LoadedCheckpoint(load_folded(path).eval(), None, folded=True)
    state = read_state_dict(path)
    config = _config_beside(path)
    name = arch or config.get("architecture")
    if not name:
        raise UsageError(f"{path}: no config.json beside it names the architecture; pass --arch NAME")
    import ndeconv.zoo as zoo

    name = zoo.resolve_model_name(str(name))
    args = infer_model_args(state, name)
    if arch is None or config.get("architecture") in (name, name.removesuffix("_deconv")):
        # The config.json describes these weights (not when --arch names another architecture).
        recorded = dict(config.get("model_args") or {})
        recorded.update({k: config[k] for k in ("num_classes", "in_chans") if k in config})
        args.update({k: v for k, v in recorded.items() if v is not None})
    args.update(model_args or {})
    try:
        model = timm.create_model(name, pretrained=False, **args)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build {name} with {args}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UsageError(f"{path} does not fit {name} ({detail}); check --arch and the model's settings, or put "
                         "the training config.json beside it") from err
    return LoadedCheckpoint(model.eval(), name, args, config)


# -- models named by MODEL[.TAG], hf-hub:ORG/NAME or local-dir:FOLDER ------------------------------------------

HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"


def _looks_like_path(spec: str) -> bool:
    # No zoo name or tag holds a path separator or starts with a dot: such a name was meant as a path.
    return "/" in spec or "\\" in spec or spec.startswith(".")


def pretrained_model_name(spec: str, run_dirs: bool = False) -> str:
    """The timm name for ``MODEL[.TAG]`` (any spelling ``ndeconv.zoo.resolve_model_name`` takes),
    ``hf-hub:ORG/NAME[@REV]`` or ``local-dir:FOLDER``, checked before anything is loaded: a name that names
    nothing is one UsageError. ``run_dirs``: the caller also takes run directories (said so when a path does
    not exist)."""
    import ndeconv.zoo as zoo
    from ndeconv.zoo._pretrained import local_dir_weights, registered_tags

    if spec.startswith(HUB_PREFIX):
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        repo_id, _, revision = spec[len(HUB_PREFIX):].partition("@")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as err:
            raise UsageError(f"{spec}: not a Hugging Face Hub repo name; write hf-hub:ORG/NAME (letters, digits, "
                             "'-', '_' and '.', no '..' or '--')") from err
        if "@" in revision:
            raise UsageError(f"{spec}: one @REVISION at most; write hf-hub:ORG/NAME[@REVISION]")
        return spec
    if spec.startswith(LOCAL_DIR_PREFIX):
        folder = Path(spec[len(LOCAL_DIR_PREFIX):])
        layout = "local-dir: takes a folder in timm's Hub layout (config.json and model.safetensors)"
        if not folder.is_dir():
            raise UsageError(f"{spec}: {folder} is not a folder; {layout}")
        if not (folder / "config.json").is_file():
            raise UsageError(f"{spec}: no config.json in {folder}; {layout}")
        if local_dir_weights(folder) is None:
            raise UsageError(f"{spec}: no weights file in {folder}; {layout}")
        return spec
    if _looks_like_path(spec):
        path = Path(spec)
        if path.is_file():
            raise UsageError(f"{spec} is a file, not a model name; pass weights files as --checkpoint {spec}")
        if path.is_dir():
            what = "not a run directory of `ndeconv train` (no config.json in it)" if run_dirs else "not a model name"
            raise UsageError(f"{spec} is a folder, {what}; load a Hub-layout folder as local-dir:{spec}, or its "
                             "weights with --checkpoint FILE")
        raise UsageError(f"{spec}: no such {'run directory' if run_dirs else 'file or folder'}, and not a zoo model "
                         "name (MODEL[.TAG] holds no '/', e.g. resnet18_deconv.fashion_mnist; see `ndeconv list`)")
    arch, _, tag = spec.partition(".")
    arch = zoo.resolve_model_name(arch)
    tags = registered_tags(arch)
    if tag and tag not in tags:
        raise UsageError(f"{arch} has no pretrained tag {tag!r}; known: {', '.join(tags) or 'none'}")
    return f"{arch}.{tag}" if tag else arch


def create_pretrained_model(spec: str, model_args: dict[str, Any] | None = None, run_dirs: bool = False) -> nn.Module:
    """``timm.create_model(spec, pretrained=True)`` for a name ``pretrained_model_name`` accepts, with one clear
    error for every failure: a name that names nothing (also a Hub repo that is not there or not cached while
    offline) is a UsageError, weights that do not load an NdeconvError."""
    import timm

    from ndeconv.zoo._pretrained import hub_lookup_failure, weights_in_chans

    name = pretrained_model_name(spec, run_dirs)
    args = dict(model_args or {})
    if "in_chans" not in args:
        # The weights' own stem (gray for Fashion-MNIST), not timm's default 3-channel model: the commands feed
        # the images the weights were trained on, and fold, export and draw the stem they have.
        chans = weights_in_chans(name)
        if chans is not None:
            args["in_chans"] = chans
    try:
        return timm.create_model(name, pretrained=True, **args)
    except NdeconvError:
        raise
    except Exception as err:  # noqa: BLE001 - timm, huggingface_hub and torch raise many kinds; each is one line
        missing = hub_lookup_failure(err)
        if missing is not None:
            raise UsageError(f"{spec}: {missing}") from err
        if not isinstance(err, (RuntimeError, OSError, ValueError, TypeError, *UNPICKLE_ERRORS)):
            raise
        raise NdeconvError(f"{spec}: cannot load its weights: {error_summary(err)}") from err
