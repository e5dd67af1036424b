"""Test-set evaluation: top-1, top-5 and loss of a model, used after every epoch and by ``ndeconv eval``."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import DATASETS, ImageSource
from ..errors import UsageError
from .data import Preprocess, batch_loader, eval_batches
from .dist import DistContext
from .metrics import topk_correct

__all__ = ["EvalResult", "evaluate", "evaluate_on_dataset", "load_eval_model"]


@dataclass
class EvalResult:
    loss: float
    top1: float  # percent
    top5: float  # percent
    count: int

    def to_dict(self) -> dict[str, float]:
        return {"loss": self.loss, "top1": self.top1, "top5": self.top5, "count": self.count}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    source: ImageSource,
    preprocess: Preprocess,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
    ctx: DistContext | None = None,
    num_workers: int = 0,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> EvalResult:
    """Evaluate in eval mode (deconvolution from its running statistics). Under torchrun each rank takes every
    world-th image and the sums are added, so every image counts once; pass the unwrapped model, not the DDP
    wrapper (ranks may run different numbers of batches). ``memory_format``: the input's layout (channels-last for a
    model trained with ``--channels-last``)."""
    device = torch.device(device)
    rank, world = (ctx.rank, ctx.world) if ctx is not None else (0, 1)
    was_training = model.training
    model.eval()
    loss_sum, correct1, correct5, count = 0.0, 0, 0, 0
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    try:
        for images, labels in batch_loader(source, eval_batches(len(source), batch_size, rank, world), num_workers):
            x, y = preprocess(images).to(device).contiguous(memory_format=memory_format), labels.to(device)
            with autocast:
                logits = model(x)
            logits = logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            c1, c5 = topk_correct(logits, y)
            correct1, correct5, count = correct1 + c1, correct5 + c5, count + y.numel()
    finally:
        model.train(was_training)
    if ctx is not None:
        loss_sum, correct1, correct5, count = ctx.all_reduce_sum([loss_sum, correct1, correct5, count])
    count = int(count)
    if count == 0:
        return EvalResult(float("nan"), float("nan"), float("nan"), 0)
    return EvalResult(loss_sum / count, 100.0 * correct1 / count, 100.0 * correct5 / count, count)


# -- models and data for ``ndeconv eval`` ------------------------------------------------------------------------


def load_eval_model(
    model: str | None = None,
    checkpoint: str | Path | None = None,
    arch: str | None = None,
    model_args: dict[str, Any] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """The model to evaluate and what is known of its training (``dataset``, when recorded).

    ``model`` is a run directory, a zoo name with its pretrained tag (``resnet18_deconv.fashion_mnist``) or any
    timm name with weights (``hf-hub:...``, ``local-dir:...``); ``checkpoint`` is a weights file, described by
    the config.json beside it (a run directory's) or by ``arch`` and ``model_args``.
    """
    import ndeconv.zoo  # noqa: F401 - registers the zoo with timm

    from ..loading import create_pretrained_model, load_checkpoint_model
    from .loop import load_run_model, read_run_config

    if (model is None) == (checkpoint is None):
        raise UsageError("give either MODEL (a zoo name with a tag, or a run directory) or --checkpoint FILE")
    if model is not None and Path(model).is_dir() and (Path(model) / "config.json").is_file():
        config = read_run_config(Path(model))
        return load_run_model(Path(model)), {"dataset": config["train"].get("dataset"), "config": config,
                                             "label_names": config.get("label_names")}
    if model is not None:
        # A zoo name in any of the spellings the other commands take, or hf-hub:/local-dir:; any other name is
        # one UsageError (``create_pretrained_model``).
        net = create_pretrained_model(model, model_args, run_dirs=True)
        # Zoo tags name the data the weights were trained on (fashion_mnist), also when the default tag was taken.
        cfg = getattr(net, "pretrained_cfg", None) or {}
        return net.eval(), {"dataset": cfg.get("tag") if cfg.get("tag") in DATASETS else None,
                            "label_names": cfg.get("label_names")}

    loaded = load_checkpoint_model(checkpoint, arch, model_args)
    train = loaded.config.get("train") or {}
    return loaded.model, {"dataset": train.get("dataset"), "config": loaded.config,
                          "label_names": loaded.config.get("label_names")}


def recorded_img_size(info: dict[str, Any], given: int | None = None) -> int:
    """The image size to evaluate at: ``given``, else the one the run trained at (imagefolder), else 32."""
    train = (info.get("config") or {}).get("train") or {}
    return int(given or train.get("img_size") or 32)


def evaluate_on_dataset(
    model: nn.Module,
    dataset: str,
    data_dir: str | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    subset: int | None = None,
    num_workers: int = 0,
    img_size: int = 32,
    class_names: Sequence[str] | None = None,
) -> EvalResult:
    """Top-1/top-5/loss of ``model`` on a dataset's test split, with that dataset's reference normalisation.

    ``class_names``: the label order the model was trained with (an image folder's classes by name)."""
    from ..datasets import get_spec, load_split

    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if subset is not None and subset < 1:
        raise UsageError(f"test subset must be >= 1 image, got {subset}; leave it out to evaluate every test image")
    spec = get_spec(dataset)
    num_classes = int(getattr(model, "num_classes", 0)) or None
    source = load_split(dataset, "test", data_dir, img_size, num_classes, class_names).subset(subset)
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != spec.in_chans:
        raise UsageError(f"the model takes {first.in_channels}-channel images but {spec.name} has {spec.in_chans}; "
                         "evaluate it on the dataset it was trained for")
    model = model.to(device)
    return evaluate(model, source, Preprocess(spec.mean, spec.std), batch_size, device, num_workers=num_workers)
