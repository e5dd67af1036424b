"""Test-set evaluation: top-1, top-5 and loss of a model, used after every epoch and by ``ndeconv eval``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..datasets import ImageSource
from ..errors import UsageError
from ..io import parse_json
from .data import Preprocess, batch_loader, eval_batches
from .dist import DistContext
from .metrics import topk_correct

__all__ = ["EvalResult", "OnnxClassifier", "evaluate", "evaluate_on_dataset", "evaluate_onnx", "recorded_crop_pct",
           "recorded_img_size"]


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
    # Inputs in the model's own dtype: a folded file stored in float64 or float16 is evaluated as it was saved.
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    try:
        for images, labels in batch_loader(source, eval_batches(len(source), batch_size, rank, world), num_workers):
            x = preprocess(images).to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
            y = labels.to(device)
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


# -- data for ``ndeconv eval`` ------------------------------------------------------------------------------------


def recorded_img_size(info: dict[str, Any], given: int | None = None) -> int:
    """The image size to evaluate at: ``given``, else the one the run trained at, else 32."""
    train = (info.get("config") or {}).get("train") or {}
    return int(given or train.get("img_size") or 32)


def recorded_crop_pct(info: dict[str, Any]) -> float:
    """The eval crop of an image folder for the model: main_imagenet.py's Resize + CenterCrop (0.875) for an
    ImageNet topology, else 1.0 (resize and centre-crop)."""
    from ..datasets import IMAGENET_CROP_PCT
    from .config import is_imagenet_topology

    name = info.get("architecture") or (info.get("config") or {}).get("architecture") or ""
    return IMAGENET_CROP_PCT if is_imagenet_topology(str(name)) else 1.0


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
    crop_pct: float = 1.0,
) -> EvalResult:
    """Top-1/top-5/loss of ``model`` on a dataset's test split, with that dataset's reference normalisation.

    ``class_names``: the label order the model was trained with (an image folder's classes by name);
    ``crop_pct``: an image folder's eval crop (``recorded_crop_pct``)."""
    from ..datasets import get_spec, load_split

    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if subset is not None and subset < 1:
        raise UsageError(f"test subset must be >= 1 image, got {subset}; leave it out to evaluate every test image")
    spec = get_spec(dataset)
    num_classes = int(getattr(model, "num_classes", 0)) or None
    source = load_split(dataset, "test", data_dir, img_size, num_classes, class_names, crop_pct).subset(subset)
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if first is not None and first.in_channels != spec.in_chans:
        raise UsageError(f"the model takes {first.in_channels}-channel images but {spec.name} has {spec.in_chans}; "
                         "evaluate it on the dataset it was trained for")
    model = model.to(device)
    return evaluate(model, source, Preprocess(spec.mean, spec.std), batch_size, device, num_workers=num_workers)


# -- ONNX files through onnxruntime (``ndeconv eval FILE.onnx``) --------------------------------------------------


class OnnxClassifier(nn.Module):
    """An exported classifier run by onnxruntime (CPU), callable like the PyTorch model: float32 NCHW batch in,
    logits out. ``metadata`` is the file's metadata_props (what ``ndeconv export`` wrote: preprocessing, labels,
    dataset). A static-batch file takes any batch: it is fed in chunks of its batch, the last one zero-filled."""

    def __init__(self, path: str | Path):
        import onnxruntime as ort

        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise UsageError(f"{path}: no such ONNX file; write one with `ndeconv export MODEL -o {self.path.name}`")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
            raise UsageError(f"{path}: onnxruntime cannot load it ({type(err).__name__}: {err}); give an ONNX file "
                             "written by `ndeconv export`") from err
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        inputs = self.session.get_inputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
            raise UsageError(f"{path}: takes {len(inputs)} input(s), the first of shape {shape}; evaluation needs one "
                             "image batch input N x C x H x W with fixed C, H, W (what `ndeconv export` writes)")
        self.input_name = inputs[0].name
        self.static_batch = shape[0] if isinstance(shape[0], int) else None
        self.input_size: tuple[int, int, int] = tuple(shape[1:])
        classes = self.session.get_outputs()[0].shape
        recorded = self.metadata.get("num_classes")
        if recorded is not None and not (recorded.strip().isdigit() and int(recorded) >= 1):
            raise UsageError(f"{path}: metadata_props['num_classes'] = {recorded!r} is not a whole number of classes; "
                             "re-export the file with `ndeconv export`")
        self.num_classes = int(recorded or (classes[-1] if isinstance(classes[-1], int) else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_size:
            raise UsageError(f"{self.path} takes {'x'.join(map(str, self.input_size))} images, got "
                             f"{'x'.join(map(str, x.shape[1:]))}")
        x = x.detach().float().cpu().contiguous()
        step = self.static_batch or x.shape[0]
        outputs = []
        for chunk in x.split(step):
            count = chunk.shape[0]
            if count < step:
                chunk = torch.cat([chunk, chunk.new_zeros(step - count, *chunk.shape[1:])])
            logits = self.session.run(None, {self.input_name: chunk.numpy()})[0]
            outputs.append(torch.from_numpy(logits[:count]))
        return torch.cat(outputs)


def _metadata_list(metadata: dict[str, str], key: str, path: Path) -> list | None:
    if key not in metadata:
        return None
    try:
        value = parse_json(metadata[key])
    except ValueError as err:
        raise UsageError(f"{path}: metadata_props['{key}'] = {metadata[key]!r} is not JSON ({err}); re-export the "
                         "file with `ndeconv export`") from err
    return value if isinstance(value, list) else None


def _metadata_numbers(metadata: dict[str, str], key: str, path: Path, positive: bool = False) -> list[float] | None:
    """The list of finite numbers (``positive``: > 0) a preprocessing key holds, else one line naming the key: a
    std of 0 or NaN would otherwise score every image as NaN and report a top-1 as if nothing were wrong."""
    values = _metadata_list(metadata, key, path)
    if key in metadata and (values is None or not values or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v > 0 or not positive)
            for v in values)):
        need = "finite numbers > 0" if positive else "finite numbers"
        raise UsageError(f"{path}: metadata_props['{key}'] = {metadata[key]!r} is not a JSON list of {need}; "
                         "re-export the file with `ndeconv export`")
    return values


def evaluate_onnx(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    batch_size: int = 256,
    subset: int | None = None,
    class_names: Sequence[str] | None = None,
    num_workers: int = 0,
) -> tuple[EvalResult, dict[str, str]]:
    """Top-1/top-5/loss of an ONNX file through onnxruntime on a dataset's test split, and its metadata_props.

    The dataset (default: the one the metadata names), the normalisation (the metadata's ``mean``/``std``, else
    the dataset's) and an image folder's size and label order (the metadata's ``input_size`` and
    ``label_names``, unless ``class_names``) come from the file: an export of ``ndeconv export`` says all of it.
    The images are the ones ``ndeconv eval`` feeds the PyTorch model (Fashion-MNIST zero-padded to 32x32), so
    both give the same numbers for a faithful export."""
    from ..datasets import get_spec, load_split

    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    if subset is not None and subset < 1:
        raise UsageError(f"test subset must be >= 1 image, got {subset}; leave it out to evaluate every test image")
    model = OnnxClassifier(path)
    metadata = model.metadata
    dataset = dataset or metadata.get("dataset")
    if not dataset:
        raise UsageError(f"{path}: its metadata_props name no dataset (not written by `ndeconv export`?); pass "
                         "--dataset (fashion_mnist, mnist, cifar10, cifar100, imagefolder)")
    spec = get_spec(dataset)
    if class_names is not None and spec.kind != "imagefolder":
        raise UsageError(f"a class map orders an image folder's classes; {spec.name} has its own order: drop it or "
                         "evaluate on an image folder (--dataset imagefolder)")
    channels, height, width = model.input_size
    if channels != spec.in_chans:
        raise UsageError(f"{path} takes {channels}-channel images but {spec.name} has {spec.in_chans}; evaluate it on "
                         "the dataset it was trained for")
    mean = _metadata_numbers(metadata, "mean", model.path) or list(spec.mean)
    std = _metadata_numbers(metadata, "std", model.path, positive=True) or list(spec.std)
    if len(mean) != channels or len(std) != channels:
        raise UsageError(f"{path}: metadata_props mean {mean} / std {std} do not give {channels} values; re-export "
                         "the file with `ndeconv export`")
    labels = class_names or _metadata_list(metadata, "label_names", model.path)
    source = load_split(dataset, "test", data_dir, height, model.num_classes or None, labels).subset(subset)
    if len(source):
        got = tuple(source.batch(torch.arange(1)).shape[-2:])
        if got != (height, width):
            raise UsageError(f"{path} takes {height}x{width} images but {spec.name}'s test images are "
                             f"{got[0]}x{got[1]}; export the model at that size (ndeconv export) or evaluate it on "
                             "its own dataset")
    result = evaluate(model, source, Preprocess(mean, std), batch_size, "cpu", num_workers=num_workers)
    return result, metadata
