"""The one model loader: ``load_model(SOURCE)`` takes anything a user can name and every command calls it.

SOURCE is a zoo name with or without its pretrained tag (``resnet18_deconv.fashion_mnist``, the authors' names
too), timm's ``hf-hub:ORG/NAME`` or ``local-dir:FOLDER``, a run directory of ``ndeconv train``, or a weights
file: safetensors, a torch checkpoint of tensors (the authors' ``main.py`` checkpoints, timm's ``train.py``
``model_best.pth.tar``), or folded weights written by ``ndeconv fold``. A segmentation model's name
(``fcn_resnet50_deconv``, the authors' ``fcn_resnet50d``) builds its torchvision-style builder, not a timm model:
untrained with ``random_init`` (no weights exist for them), or from a checkpoint of it. The authors' BatchNorm
names (``fcn_resnet50``, ``deeplabv3_resnet101``, ...) name the same builders with ``deconv=False`` (unless the
caller's ``model_args`` say otherwise).

A checkpoint is a state_dict of a zoo model: safetensors (what ``ndeconv train`` and ``convert-reference``
write), or a torch file read with ``weights_only=True`` (never unpickling code; the authors' checkpoints keep
it under ``state_dict`` with keys prefixed ``module.``). What it is comes, most specific first, from the
caller's ``model_args``, the ``config.json`` beside it (a run directory's or a shipped folder's), and the
state_dict itself: classes (the classifier's rows), input channels (the stem's), the deconvolution or
BatchNorm form and the head's Delinear block (the buffers it holds). Folded weights written by ``ndeconv
fold`` load as the plain network they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UNPICKLE_ERRORS, ChecksumError, NdeconvError, UsageError, error_summary
from .io import read_json

__all__ = [
    "LoadedCheckpoint",
    "LoadedModel",
    "load_eval_model",
    "load_model",
    "create_pretrained_model",
    "infer_model_args",
    "load_checkpoint_model",
    "pretrained_model_name",
    "read_checkpoint",
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
    return read_checkpoint(path)[0]


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state_dict of a weights file and what the file says of its model (``arch``), weights-only.

    Reads safetensors files, torch files of tensors, the authors' checkpoints (``{'net'|'state_dict': ...}``,
    ``module.`` keys of DataParallel) and timm's ``train.py`` checkpoints (``model_best.pth.tar``: ``arch``,
    ``state_dict``, ``args``, optimizer state), never unpickling code (``torch.load(weights_only=True)``)."""
    from .io import folder_not_file, load_safetensors, load_torch_file

    meta: dict[str, Any] = {}
    if path.is_dir():
        raise UsageError(folder_not_file(path))
    if path.suffix == ".safetensors":
        state = load_safetensors(path)
    else:
        try:
            state = load_torch_file(path)
        except ChecksumError:
            raise  # the file is not the one recorded: no other format would help
        except NdeconvError as err:
            raise UsageError(f"{err}; or use a safetensors file") from err
        if isinstance(state, dict) and isinstance(state.get("arch"), str):
            meta["arch"] = state["arch"]
        for key in ("state_dict", "model", "net"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: holds no state_dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}, meta


def _config_beside(path: Path) -> dict[str, Any]:
    beside = path.with_name("config.json")
    if not beside.is_file():
        return {}
    try:
        config = read_json(beside)
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
    from ndeconv.convert import is_folded_file, load_folded

    path = Path(path)
    if is_folded_file(path):
        if arch is not None:
            raise UsageError(f"{path} holds folded weights that name their architecture; drop --arch")
        return LoadedCheckpoint(load_folded(path).eval(), None, folded=True)
    state, meta = read_checkpoint(path)
    config = _config_beside(path)
    name = arch or config.get("architecture") or meta.get("arch")
    if not name:
        raise UsageError(f"{path}: no config.json beside it names the architecture; pass --arch NAME")
    import ndeconv.zoo as zoo

    name = zoo.resolve_model_name(_segmentation_baseline(str(name)) or str(name))
    if name in _segmentation_models():
        return _load_segmentation_checkpoint(path, name, state, config, arch, model_args)
    args = infer_model_args(state, name)
    describes = arch is None or config.get("architecture") in (name, name.removesuffix("_deconv"))
    if describes:
        # The config.json describes these weights (not when --arch names another architecture).
        recorded = dict(config.get("model_args") or {})
        recorded.update({k: config[k] for k in ("num_classes", "in_chans") if k in config})
        args.update({k: v for k, v in recorded.items() if v is not None})
    args.update(model_args or {})
    try:
        model = zoo.create_model(name, pretrained=False, **args)
        if describes:  # ndeconv convert-bn's output: the BatchNorm architecture with its recorded deconvolve() call
            from ndeconv.convert.batchnorm import rebuild_converted

            model = rebuild_converted(model, config)
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build {name} with {args}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UsageError(f"{path} does not fit {name} ({detail}); check --arch and the model's settings, or put "
                         "the training config.json beside it") from err
    return LoadedCheckpoint(model.eval(), name, args, config)


def _segmentation_models() -> dict[str, Any]:
    """The segmentation builders by zoo name (torchvision-style, not timm models: timm cannot create them)."""
    from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

    return SEGMENTATION_MODELS


def _segmentation_baseline(name: str) -> str | None:
    """The zoo builder of an authors' BatchNorm segmentation name (``fcn_resnet50`` -> ``fcn_resnet50_deconv``, built
    with ``deconv=False``); None for any other name. (``zoo.resolve_model_name`` does not take these names: plain
    ``resnet50`` there means the CIFAR deconvolution model.)"""
    from ndeconv.zoo._names import SEGMENTATION_BASELINE_ARCHS

    return SEGMENTATION_BASELINE_ARCHS.get(name)


def _load_segmentation_checkpoint(path: Path, name: str, state: dict[str, torch.Tensor], config: dict[str, Any],
                                  arch: str | None, model_args: dict[str, Any] | None) -> LoadedCheckpoint:
    """A segmentation state_dict (what ``ndeconv convert-reference`` writes for ``fcn_resnet50d`` ...) in its builder:
    the shape from the state_dict (form, classes, aux head, block), then the config.json beside it, then the caller."""
    from ndeconv.convert.reference import _segmentation_args

    try:
        args = _segmentation_args(name, state)
    except NdeconvError as err:
        raise UsageError(f"{path}: {err}; check --arch") from err
    if arch is None or config.get("architecture") == name:
        recorded = dict(config.get("model_args") or {})
        recorded.update({k: config[k] for k in ("num_classes", "in_chans") if k in config})
        args.update({k: v for k, v in recorded.items() if v is not None})
    args.update(model_args or {})
    try:
        model = _segmentation_models()[name](**args)
        model.pretrained_cfg = {"architecture": name}  # what `ndeconv fold` records, as for a timm model
    except (TypeError, ValueError) as err:
        raise UsageError(f"cannot build {name} with {args}: {err}") from err
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise UsageError(f"{path} does not fit {name} ({detail}); check --arch") from err
    return LoadedCheckpoint(model.eval(), name, args, config)


# -- models named by MODEL[.TAG], hf-hub:ORG/NAME or local-dir:FOLDER ------------------------------------------

HUB_PREFIX, LOCAL_DIR_PREFIX = "hf-hub:", "local-dir:"
# The one line for a segmentation model named without --random-init (the authors released no segmentation weights).
_NO_SEGMENTATION_WEIGHTS = ("no pretrained weights exist for the segmentation models; build it untrained with "
                            "--random-init, or load your own with --checkpoint FILE --arch NAME")


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
    arch = _segmentation_baseline(arch) or zoo.resolve_model_name(arch)
    if arch in _segmentation_models():
        if tag:
            raise UsageError(f"{arch} has no pretrained tag {tag!r}: {_NO_SEGMENTATION_WEIGHTS}")
        return arch
    tags = registered_tags(arch)
    if tag and tag not in tags:
        raise UsageError(f"{arch} has no pretrained tag {tag!r}; known: {', '.join(tags) or 'none'}")
    return f"{arch}.{tag}" if tag else arch


def create_pretrained_model(spec: str, model_args: dict[str, Any] | None = None, run_dirs: bool = False) -> nn.Module:
    """``timm.create_model(spec, pretrained=True)`` (``ndeconv.zoo.create_model``: the zoo models timm does not know
    too) for a name ``pretrained_model_name`` accepts, with one clear error for every failure: a name that names
    nothing (also a Hub repo that is not there or not cached while offline) is a UsageError, weights that do not
    load an NdeconvError."""
    import ndeconv.zoo as zoo
    from ndeconv.zoo._hub_errors import hub_lookup_failure
    from ndeconv.zoo._pretrained import weights_in_chans

    name = pretrained_model_name(spec, run_dirs)
    args = dict(model_args or {})
    if "in_chans" not in args:
        # The weights' own stem (gray for Fashion-MNIST), not timm's default 3-channel model: the commands feed
        # the images the weights were trained on, and fold, export and draw the stem they have.
        chans = weights_in_chans(name)
        if chans is not None:
            args["in_chans"] = chans
    try:
        return zoo.create_model(name, pretrained=True, **args)
    except NdeconvError:
        raise
    except Exception as err:  # noqa: BLE001 - timm, huggingface_hub and torch raise many kinds; each is one line
        missing = hub_lookup_failure(err)
        if missing is not None:
            raise UsageError(f"{spec}: {missing}") from err
        if not isinstance(err, (RuntimeError, OSError, ValueError, TypeError, *UNPICKLE_ERRORS)):
            raise
        raise NdeconvError(f"{spec}: cannot load its weights: {error_summary(err)}") from err


# -- any source ------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """An eval-mode model and what is known of it: ``description`` is what a command records of its source
    (in a folded file's or an export's config), ``dataset``/``label_names`` what it was trained on."""

    model: nn.Module
    kind: str  # "pretrained", "random-init", "run", "weights" or "folded"
    description: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # a run's or the weights' config.json, if any
    dataset: str | None = None
    label_names: list[str] | None = None

    @property
    def folded(self) -> bool:
        return self.kind == "folded"


def _is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_model(
    source: str | Path,
    *,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
    random_init: bool = False,
    weights_file: bool = False,
) -> LoadedModel:
    """The eval-mode model ``source`` names (see the module docstring for every kind of source).

    ``arch`` names the architecture of a weights file that carries no config.json and no ``arch`` of its own;
    ``model_args`` override what is recorded (``num_classes``, ``in_chans``, deconvolution settings);
    ``random_init`` builds a zoo name untrained, to try the tooling; ``weights_file`` says ``source`` was given as
    a weights file (``--checkpoint``), so anything else there is named as what it is. Every failure is one UsageError or
    NdeconvError that names the source and the fix."""
    from ndeconv.zoo._pretrained import tag_dataset

    path = Path(source)
    text = str(source)
    if _is_run_dir(path) and not weights_file and not text.startswith((HUB_PREFIX, LOCAL_DIR_PREFIX)):
        if arch is not None or random_init:
            raise UsageError(f"{source} is a run directory: its config.json names the model; drop "
                             f"{'--arch' if arch is not None else '--random-init'}")
        from .training.run_files import load_run_model, read_run_config
        from .training.segmentation import is_seg_run_dir, load_seg_run_model

        if is_seg_run_dir(path):  # `ndeconv train-seg`'s: a segmentation builder, not a timm model
            config = read_json(path / "config.json")
            return LoadedModel(load_seg_run_model(path), "run", {"run": text}, config, config.get("dataset"),
                               config.get("label_names"))
        config = read_run_config(path)
        return LoadedModel(load_run_model(path), "run", {"run": text}, config,
                           config["train"].get("dataset"), config.get("label_names"))
    if path.is_file() or weights_file:
        if random_init:
            raise UsageError("--random-init builds an untrained zoo model; a weights file is loaded as it is")
        loaded = load_checkpoint_model(path, arch, model_args)
        if loaded.folded:
            return LoadedModel(loaded.model, "folded", {"checkpoint": text, "folded": True})
        train = loaded.config.get("train") or {}
        return LoadedModel(loaded.model, "weights",
                           {"checkpoint": text, "architecture": loaded.architecture, "model_args": loaded.model_args},
                           loaded.config, train.get("dataset"), loaded.config.get("label_names"))
    if arch is not None:
        raise UsageError("--arch describes a weights file (--checkpoint); with a model name, drop it")
    name = pretrained_model_name(text, run_dirs=True)  # a name that names nothing fails here, before anything else
    if name in _segmentation_models():  # a torchvision-style builder, not a timm model
        if not random_init:
            raise UsageError(f"{source}: {_NO_SEGMENTATION_WEIGHTS}")
        args = dict(model_args or {})
        if _segmentation_baseline(text.partition(".")[0]) is not None:
            args.setdefault("deconv", False)  # the authors' BatchNorm name (fcn_resnet50), unless deconv is given
        model = _segmentation_models()[name](**args)
        model.pretrained_cfg = {"architecture": name}  # what `ndeconv fold` records, as for a timm model
        return LoadedModel(model.eval(), "random-init", {"model": name, "weights": "random init"})
    if random_init:
        import ndeconv.zoo as zoo

        if ":" in name:  # timm's own sources (hf-hub:/local-dir:) name weights
            raise UsageError(f"--random-init builds an untrained zoo model; {source} names weights: drop one of them")
        base, _, tag = name.partition(".")
        if tag:
            raise UsageError(f"--random-init builds an untrained {base}; drop the tag .{tag} or the flag")
        return LoadedModel(zoo.create_model(base, pretrained=False, **(model_args or {})).eval(), "random-init",
                           {"model": base, "weights": "random init"})
    net = create_pretrained_model(name, model_args, run_dirs=True)
    cfg = getattr(net, "pretrained_cfg", None) or {}
    # Zoo tags name the data the weights were trained on (fashion_mnist), also when the default tag was taken.
    dataset = tag_dataset(cfg.get("tag"))
    return LoadedModel(net.eval(), "pretrained", {"model": name}, {}, dataset, cfg.get("label_names"))


def load_eval_model(
    model: str | None = None,
    checkpoint: str | Path | None = None,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``ndeconv eval``'s and ``viz``'s form of ``load_model``: MODEL (a name or a run directory) or
    ``--checkpoint FILE``, exactly one; returns the model and what is known of its training."""
    if (model is None) == (checkpoint is None):
        raise UsageError("give either MODEL (a zoo name with a tag, or a run directory) or --checkpoint FILE")
    if model is not None and Path(model).is_file():
        raise UsageError(f"{model} is a file, not a model name; pass weights files as --checkpoint {model}")
    loaded = load_model(model if model is not None else checkpoint, arch=arch, model_args=model_args,
                        weights_file=checkpoint is not None)
    return loaded.model, {"dataset": loaded.dataset, "config": loaded.config, "label_names": loaded.label_names,
                          "architecture": (getattr(loaded.model, "pretrained_cfg", None) or {}).get("architecture")}
