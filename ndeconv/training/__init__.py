"""Training and evaluation of the zoo: ``ndeconv train`` and ``ndeconv eval`` as library functions.

- ``data``: datasets from local files (IDX, CIFAR batches, image folders), batched augmentation.
- ``config``: every setting with the reference's defaults, and the model it builds.
- ``loop``: the resumable, data-parallel training run and its run directory.
- ``checkpoint``: atomic, pickle-free checkpoints with everything a bit-exact resume needs.
- ``evaluate``: test-set top-1/top-5/loss.  ``metrics``: metrics.jsonl, curves.png, TensorBoard, progress.
- ``dist``: device choice and torchrun's process group.
"""

from __future__ import annotations

from ..datasets import DATASETS, load_split
from .config import TrainConfig, build_model
from .evaluate import EvalResult, evaluate
from .loop import TrainResult, load_run_model, read_run_config, train

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
