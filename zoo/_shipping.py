"""Shipping weights into the zoo: ``ship_weights`` writes a ``<model>.<tag>`` folder (model.safetensors,
config.json in the Hub layout timm reads, class_map.txt, SHA256SUMS) atomically; ``verify_sha256`` checks a
shipped file before it loads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ndeconv.datasets import folder_name
from ndeconv.errors import UsageError
from ndeconv.io import (
    CHECKSUMS_FILE,
    atomic_write,
    file_sha256,
    read_json,
    save_json_atomic,
    save_safetensors_atomic,
    verify_checksums_beside,
)

from ._pretrained import TAG_DATA, WEIGHTS_DIR, WEIGHTS_FILE
from ._stem import _names, _with_channels, default_in_chans

__all__ = ["CLASS_MAP_FILE", "read_config", "ship_weights", "verify_sha256", "write_class_map"]

CLASS_MAP_FILE = "class_map.txt"

def verify_sha256(path: str | Path) -> None:
    """Check a shipped weights file against the ``SHA256SUMS`` beside it; raise NdeconvError if it does not match
    or none records it (a symlink is followed to the shipped folder first)."""
    verify_checksums_beside(path, required=True)


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
    return read_json(Path(folder) / "config.json")


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
