"""Training and evaluation of the zoo: ``ndeconv train`` and ``ndeconv eval`` as library functions.

- ``data``: datasets from local files (IDX, CIFAR batches, image folders), batched augmentation.
- ``config``: every setting with the reference's defaults, and the model it builds.
- ``loop``: the resumable, data-parallel training run and its run directory.
- ``checkpoint``: atomic, pickle-free checkpoints with everything a bit-exact resume needs.
- ``evaluate``: test-set top-1/top-5/loss.  ``metrics``: metrics.jsonl, curves.png, TensorBoard, progress.
- ``dist``: device choice and torchrun's process group.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..datasets import DATASETS, load_split
    from .config import TrainConfig, build_model
    from .evaluate import EvalResult, evaluate
    from .loop import TrainResult, load_run_model, read_run_config, train

# Name -> module, imported on first access (PEP 562): ``ndeconv train --help`` reads TrainConfig's defaults
# through this package, and must not import torch (the data, loop and evaluation modules) to print them.
_LAZY = {
    "DATASETS": "ndeconv.datasets", "load_split": "ndeconv.datasets",
    "TrainConfig": "ndeconv.training.config", "build_model": "ndeconv.training.config",
    "EvalResult": "ndeconv.training.evaluate", "evaluate": "ndeconv.training.evaluate",
    "TrainResult": "ndeconv.training.loop", "load_run_model": "ndeconv.training.loop",
    "read_run_config": "ndeconv.training.loop", "train": "ndeconv.training.loop",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DATASETS",
    "EvalResult",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "evaluate",
    "load_run_model",
    "load_split",
    "read_run_config",
    "train",
]
