"""Semantic segmentation training, as the authors' ``Segmentation/train.py`` trains FCN and DeepLabV3 (with network
deconvolution or their BatchNorm baseline) on Cityscapes or VOC: ``ndeconv train-seg`` as a library function.

Their settings and defaults (``SegTrainConfig``): SGD (momentum 0.9, weight decay 1e-4, lr 0.01; the auxiliary
head at 10x the lr), the poly schedule ``(1 - it / total) ** 0.9`` stepped every iteration, cross-entropy with
255 ignored (``out + 0.5 * aux`` with ``--aux-loss``), batches of 4 crops of 480 from images resized around 520
(see ``seg_data``), 30 epochs, an evaluation (pixel accuracy, per-class and mean IoU) after each epoch.

The run directory is the classification trainer's kind (``loop.py``): ``config.json`` (the zoo builder and its
``model_args``, so ``ndeconv.loading.load_model(RUN_DIR)`` rebuilds the model; the settings under
``train_segmentation``), ``checkpoint.pt`` (``checkpoint.py``: weights-only, atomic; every ``checkpoint_every``
steps and at each epoch end), ``model.safetensors`` after each evaluation, ``metrics.jsonl`` (one row per
evaluation), and ``.lock`` held while a run trains in it.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import Interrupted, UsageError, error_summary
from ..io import read_json, save_json_atomic, save_safetensors_atomic
from ..runtime import cpu_model_name
from .checkpoint import CHECKPOINT_FILE, TrainState, load_checkpoint, restore_checkpoint, save_checkpoint
from .dist import setup
from .interrupt import StopRequests
from .lock import RunDirLock
from .metrics import write_metrics
from .run_files import check_new_run_dir, load_run_weights, refuse_resume_clashes
from .seg_config import SegTrainConfig
from .seg_data import IGNORE_INDEX, SEG_DATASETS, ConfusionMatrix, SegmentationFolder, collate

__all__ = [
    "SegEvalResult",
    "SegTrainConfig",
    "SegTrainResult",
    "evaluate_segmentation",
    "is_seg_run_dir",
    "is_segmentation_model",
    "load_seg_run_model",
    "score_segmentation",
    "train_segmentation",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
CONFIG_KEY = "train_segmentation"  # where config.json keeps the settings (``ndeconv train`` runs have "train")
_RUN_FILES = (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, CHECKPOINT_FILE)
# Settings a resumed run may change: they do not change what it computes (--max-steps only where it stops).
RESUMABLE_OVERRIDES = frozenset({"data_dir", "device", "workers", "checkpoint_every", "max_steps", "log_every"})


@dataclass
class SegTrainResult:
    run_dir: Path
    model: nn.Module
    history: list[dict[str, Any]]


# -- run directories -------------------------------------------------------------------------------------------


def _read_config(run_dir: Path) -> dict[str, Any] | None:
    try:
        data = read_json(Path(run_dir) / CONFIG_FILE)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_seg_run_dir(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a run directory of ``ndeconv train-seg`` (its config.json has the settings)."""
    config = _read_config(Path(run_dir))
    return config is not None and isinstance(config.get(CONFIG_KEY), dict)


def read_seg_run_config(run_dir: Path) -> dict[str, Any]:
    config = _read_config(run_dir)
    if config is None or not isinstance(config.get(CONFIG_KEY), dict):
        raise UsageError(f"--resume {run_dir}: no readable {CONFIG_FILE} of `ndeconv train-seg` there; it is not a "
                         "segmentation run directory")
    return config


def load_seg_run_model(run_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The eval-mode model of a run directory: its builder from config.json, its weights from model.safetensors."""
    from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

    run_dir = Path(run_dir)
    config = _read_config(run_dir) or {}
    weights = run_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise UsageError(f"{run_dir}: no {WEIGHTS_FILE}; the run has not finished an evaluation yet (continue it "
                         f"with `ndeconv train-seg --resume {run_dir}`)")
    name = config.get("architecture")
    if name not in SEGMENTATION_MODELS:
        raise UsageError(f"{run_dir}/{CONFIG_FILE}: architecture {name!r} is not a segmentation model; the run "
                         "directory is damaged")
    args = dict(config.get("model_args") or {})
    args["num_classes"] = config.get("num_classes", args.get("num_classes"))
    try:
        model = SEGMENTATION_MODELS[name](**args)
    except (TypeError, ValueError) as err:
        raise UsageError(f"{run_dir}: its config.json does not build {name} ({error_summary(err)})") from err
    load_run_weights(model, weights)
    model.pretrained_cfg = {"architecture": name}  # what `ndeconv fold` records, as for a zoo model
    return model.to(device).eval()


def _check_new_run_dir(run_dir: Path, force: bool) -> None:
    check_new_run_dir(run_dir, force, is_seg_run_dir, "ndeconv train-seg")


def _resume_config(run_dir: Path, cfg: SegTrainConfig, given: frozenset[str]) -> SegTrainConfig:
    """The run's own settings, with the given flags that do not change what it computes; others are refused."""
    saved = SegTrainConfig.from_dict(read_seg_run_config(run_dir)[CONFIG_KEY]).to_dict()
    return SegTrainConfig.from_dict(refuse_resume_clashes(run_dir, saved, cfg.to_dict(), given, RESUMABLE_OVERRIDES))


def _run_record() -> dict[str, Any]:
    import timm

    from .._version import __version__

    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": {"ndeconv": __version__, "torch": torch.__version__, "timm": timm.__version__,
                         "python": platform.python_version()},
            "platform": platform.platform()}


def _label_names(dataset: str, num_classes: int) -> list[str]:
    """The dataset's class names for the run's classes (``class_N`` past the dataset's own)."""
    names = SEG_DATASETS[dataset]
    return [names[i] if i < len(names) else f"class_{i}" for i in range(num_classes)]


def _run_config(cfg: SegTrainConfig, device: torch.device) -> dict[str, Any]:
    """config.json: what ``ndeconv.loading`` needs to rebuild the model, the labels and the settings."""
    args = cfg.model_args()
    return {
        "architecture": cfg.architecture(),
        "task": "segmentation",
        "num_classes": cfg.num_classes,
        "model_args": {k: v for k, v in args.items() if k != "num_classes"},
        "dataset": cfg.dataset,
        "label_names": _label_names(cfg.dataset, cfg.num_classes or 0),
        "ignore_index": IGNORE_INDEX,
        "input": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "base_size": cfg.base_size},
        CONFIG_KEY: cfg.to_dict(),
        "run": dict(_run_record(), device=str(device)),
    }


# -- evaluation ------------------------------------------------------------------------------------------------


def is_segmentation_model(model: nn.Module) -> bool:
    """Whether ``model`` is one of the segmentation builders' networks (torchvision's FCN / DeepLabV3 classes)."""
    from torchvision.models.segmentation import FCN, DeepLabV3

    return isinstance(model, (FCN, DeepLabV3))


@torch.no_grad()
def score_segmentation(model: nn.Module, val_set: SegmentationFolder, num_classes: int,
                       device: str | torch.device = "cpu", workers: int = 0) -> dict[str, Any]:
    """The confusion-matrix metrics (``ConfusionMatrix.compute``: pixel_acc, miou, iou, class_acc) of ``model`` over
    ``val_set``, one image at a time (each resized to the base size, so no padding enters the model). The one
    evaluation: ``train-seg`` after each epoch and ``ndeconv eval`` both call it. Leaves the model in eval mode."""
    model.eval()
    confmat = ConfusionMatrix(num_classes)
    loader = DataLoader(val_set, batch_size=1, num_workers=workers, collate_fn=collate,
                        generator=torch.Generator().manual_seed(0))
    for images, target in loader:
        output = model(images.to(device))["out"]
        confmat.update(target, output.argmax(1).cpu())
    return confmat.compute()


@dataclass
class SegEvalResult:
    """What ``evaluate_segmentation`` measured: percentages (None where a class has no pixels, see
    ``ConfusionMatrix``), per class in ``label_names`` order."""

    dataset: str
    count: int  # val images
    num_classes: int
    base_size: int
    pixel_acc: float | None
    miou: float | None
    iou: list[float | None]
    class_acc: list[float | None]
    label_names: list[str]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["split"] = "val"
        out["iou_by_class"] = dict(zip(self.label_names, self.iou, strict=True))
        return out


def evaluate_segmentation(
    model: nn.Module,
    dataset: str,
    data_dir: str | Path | None,
    base_size: int = 520,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    limit: int | None = None,
    workers: int = 0,
    label_names: list[str] | None = None,
) -> SegEvalResult:
    """Pixel accuracy, per-class and mean IoU of a segmentation ``model`` on the val split of ``dataset``
    (cityscapes or voc) in ``data_dir``, images resized to ``base_size`` on the shorter side as train-seg evaluates
    (``score_segmentation``). ``num_classes``: the model's (``model.num_classes``) by default; labels at or above it
    are ignored, as in training. ``limit``: the first N val images only."""
    if dataset not in SEG_DATASETS:
        raise UsageError(f"--dataset {dataset!r}: a segmentation model is evaluated on {' or '.join(SEG_DATASETS)}")
    if not is_segmentation_model(model):
        raise UsageError(f"{type(model).__name__} is not a segmentation model; {dataset} is a segmentation "
                         "dataset: evaluate a classifier on its own dataset (fashion_mnist, cifar10, ...)")
    if data_dir is None:
        raise UsageError(f"--data-dir is required: the folder of the {dataset} dataset")
    if base_size < 2:
        raise UsageError(f"--base-size must be >= 2, got {base_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"--test-subset must be >= 1, got {limit}")
    num_classes = int(num_classes or getattr(model, "num_classes", 0) or _head_classes(model))
    val_set = SegmentationFolder(dataset, data_dir, "val", num_classes, base_size, base_size, training=False,
                                 limit=limit)
    device = torch.device(device)
    metrics = score_segmentation(model.to(device), val_set, num_classes, device, workers)
    names = list(label_names) if label_names and len(label_names) == num_classes else _label_names(dataset,
                                                                                                      num_classes)
    return SegEvalResult(dataset, len(val_set), num_classes, base_size, metrics["pixel_acc"], metrics["miou"],
                         metrics["iou"], metrics["class_acc"], names)


def _head_classes(model: nn.Module) -> int:
    """The output channels of the main head's last conv (a model that does not record ``num_classes``)."""
    convs = [m for m in model.classifier.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


# -- the run ---------------------------------------------------------------------------------------------------


def train_segmentation(
    cfg: SegTrainConfig,
    out: str | Path | None = None,
    resume: str | Path | None = None,
    force: bool = False,
    given: frozenset[str] = frozenset(),
    stream: TextIO | None = None,
) -> SegTrainResult:
    """Train (or, with ``resume``, continue) one segmentation run into its directory; return it, the model and
    the per-evaluation metrics. ``given`` names the settings the caller chose explicitly (checked against the
    run's own when resuming: only ``RESUMABLE_OVERRIDES`` may change, e.g. a larger ``max_steps``)."""
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise UsageError("pass either --out (a new run) or --resume (an existing one), not both")
        run_dir = Path(resume)
        if not run_dir.is_dir():
            raise UsageError(f"--resume {run_dir}: no such directory")
        cfg = _resume_config(run_dir, cfg, given)
    else:
        if out is None:
            raise UsageError("--out DIR is required: the run directory to create")
        run_dir = Path(out)
        cfg = cfg.resolved()
    cfg.validate()
    ctx = setup(cfg.device)
    if ctx.distributed:
        ctx.close()
        raise UsageError("train-seg runs in one process; start it without torchrun")
    lock = RunDirLock(run_dir)
    try:
        if resume is None:
            _check_new_run_dir(run_dir, force)  # before the lock creates the folder: a refused run touches nothing
        lock.acquire()
        if resume is None:  # again under the lock: another run may have written it since the first check
            _check_new_run_dir(run_dir, force)
        with StopRequests() as stops:
            return _SegRun(cfg, ctx.device, run_dir, resume is not None, stream or sys.stderr, stops).run()
    finally:
        lock.release()


class _SegRun:
    def __init__(self, cfg: SegTrainConfig, device: torch.device, run_dir: Path, resuming: bool, stream: TextIO,
                 stops: StopRequests):
        from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

        self.cfg, self.device, self.run_dir, self.stream, self.stops = cfg, device, run_dir, stream, stops
        assert cfg.num_classes is not None and cfg.data_dir is not None
        self.train_set = SegmentationFolder(cfg.dataset, cfg.data_dir, "train", cfg.num_classes, cfg.base_size,
                                            cfg.crop_size, training=True, seed=cfg.seed)
        self.val_set = SegmentationFolder(cfg.dataset, cfg.data_dir, "val", cfg.num_classes, cfg.base_size,
                                          cfg.crop_size, training=False, limit=cfg.val_subset)
        # drop_last, as the authors' loader: every step is a full batch of crops.
        self.steps_per_epoch = len(self.train_set) // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(self.train_set)} training "
                             "images; lower it")
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        name = cfg.architecture()
        try:
            model = SEGMENTATION_MODELS[name](**cfg.model_args())
        except (TypeError, ValueError) as err:
            raise UsageError(f"cannot build {name} with {cfg.model_args()}: {error_summary(err)}") from err
        self.name, self.model = name, model.to(device)
        groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad]},
                  {"params": [p for p in model.classifier.parameters() if p.requires_grad]}]
        if model.aux_classifier is not None:  # the auxiliary head at 10x the lr, as the authors' and torchvision's
            groups.append({"params": [p for p in model.aux_classifier.parameters() if p.requires_grad],
                           "lr": cfg.lr * 10})
        self.optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd)
        self.total_iters = self.steps_per_epoch * cfg.epochs
        total = self.total_iters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda it: max(1.0 - it / total, 0.0) ** 0.9)
        if resuming:
            self.state = self._restore()
        else:
            self.state = TrainState()
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in _RUN_FILES:  # --force: nothing of an old run may mix into this one
                (run_dir / stale).unlink(missing_ok=True)
            save_json_atomic(_run_config(cfg, device), run_dir / CONFIG_FILE, finite=True)
            self.save()  # a run killed before its first --checkpoint-every still resumes (from step 0)

    def log(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def _restore(self) -> TrainState:
        if not (self.run_dir / CHECKPOINT_FILE).is_file():
            raise UsageError(f"--resume {self.run_dir}: no {CHECKPOINT_FILE} there; the run was killed before its "
                             "first checkpoint (start it again with --force)")
        payload = load_checkpoint(self.run_dir)
        recorded = SegTrainConfig.from_dict(payload.get("config") or {}).to_dict()
        now = self.cfg.to_dict()
        diff = sorted(k for k in now if k not in RESUMABLE_OVERRIDES and recorded.get(k) != now[k])
        if diff:
            raise UsageError(f"--resume {self.run_dir}: {CHECKPOINT_FILE} was written with other settings than "
                             f"{CONFIG_FILE} ({', '.join(diff)}); the run directory is mixed up")
        state = restore_checkpoint(payload, self.model, self.optimizer, self.scheduler, None)
        if state.finished and self._stopped_early(state):
            state.finished = False  # stopped by --max-steps: a larger one (or none) continues it
        return state

    def _stopped_early(self, state: TrainState) -> bool:
        return state.global_step < self.total_iters and (
            self.cfg.max_steps is None or state.global_step < self.cfg.max_steps)

    def save(self) -> None:
        save_checkpoint(self.run_dir, self.model, self.optimizer, self.scheduler, None, self.state,
                        self.cfg.to_dict())

    def run(self) -> SegTrainResult:
        cfg, state = self.cfg, self.state
        if state.finished:
            self.log(f"{self.run_dir}: the run already finished ({state.global_step} steps); nothing to do"
                     + (" (raise --max-steps to continue it)" if state.global_step < self.total_iters else ""))
            return SegTrainResult(self.run_dir, self.model, state.history)
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        form = "deconvolution" if cfg.deconv else "BatchNorm"
        self.log(f"{self.name} ({form}, {params:.2f}M parameters) on {cfg.dataset}: {len(self.train_set)} train / "
                 f"{len(self.val_set)} val images, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on "
                 f"{self.device} -> {self.run_dir}"
                 + (f" (resuming at epoch {state.epoch + 1}, step {state.global_step})" if state.global_step else ""))
        while state.epoch < cfg.epochs:
            stopped = self.train_epoch(state.epoch)
            self.finish(stopped)
            if state.finished:
                break
            if self.stops.signum is not None:  # asked to stop during the evaluation: its checkpoint continues it
                raise self.interrupted()
        self.log(f"done: {self.run_dir / WEIGHTS_FILE}")
        return SegTrainResult(self.run_dir, self.model, state.history)

    def _batches(self, epoch: int) -> list[list[int]]:
        order = torch.randperm(len(self.train_set), generator=torch.Generator().manual_seed(
            self.cfg.seed * 1_000_003 + epoch)).tolist()
        n = self.steps_per_epoch * self.cfg.batch_size
        return [order[i:i + self.cfg.batch_size] for i in range(0, n, self.cfg.batch_size)]

    def loss(self, output: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(output["out"], target, ignore_index=IGNORE_INDEX)
        if "aux" in output:
            loss = loss + 0.5 * F.cross_entropy(output["aux"], target, ignore_index=IGNORE_INDEX)
        return loss

    def train_epoch(self, epoch: int) -> bool:
        """The epoch's remaining steps; True when --max-steps (or a stop request) ended it early."""
        cfg, state = self.cfg, self.state
        self.model.train()
        self.train_set.epoch = epoch
        batches = self._batches(epoch)[state.step_in_epoch:]
        # Its own generator: the loader's worker seed is not drawn from the global RNG (dropout's, checkpointed),
        # so a resumed run draws the same dropout masks as one never stopped.
        loader = DataLoader(self.train_set, batch_sampler=batches, num_workers=cfg.workers, collate_fn=collate,
                            generator=torch.Generator().manual_seed(cfg.seed + epoch))
        tick = time.perf_counter()
        for images, target in loader:
            images, target = images.to(self.device), target.to(self.device)
            try:
                loss = self.loss(self.model(images), target)
            except FloatingPointError as err:
                raise self.diverged("non-finite") from err
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            value = float(loss.detach())
            if not math.isfinite(value):
                raise self.diverged(str(value))
            state.step_in_epoch += 1
            state.global_step += 1
            state.meter["loss_sum"] = state.meter.get("loss_sum", 0.0) + value
            state.meter["count"] = state.meter.get("count", 0.0) + 1
            now = time.perf_counter()
            state.seconds += now - tick
            tick = now
            if state.global_step <= 2 or state.global_step % cfg.log_every == 0:
                self.log(f"step {state.global_step}/{self.total_iters}: epoch {epoch + 1}/{cfg.epochs} loss "
                         f"{value:.4f} lr {self.optimizer.param_groups[0]['lr']:.6g}")
            if cfg.max_steps is not None and state.global_step >= cfg.max_steps:
                return state.step_in_epoch < self.steps_per_epoch
            if state.step_in_epoch < self.steps_per_epoch:
                if self.stops.signum is not None:
                    self.save()
                    raise self.interrupted()
                if cfg.checkpoint_every and state.global_step % cfg.checkpoint_every == 0:
                    self.save()
                    self.log(f"checkpoint at step {state.global_step}")
                    tick = time.perf_counter()
        return False

    def diverged(self, loss: str) -> UsageError:
        return UsageError(f"the loss became {loss} at step {self.state.global_step + 1}; lower --lr (now "
                          f"{self.cfg.lr}) or check the data; the last checkpoint is in {self.run_dir}")

    def interrupted(self) -> Interrupted:
        signum = self.stops.signum or signal.SIGTERM
        return Interrupted(f"stopped by {signal.Signals(signum).name} at step {self.state.global_step}, checkpoint "
                           f"saved; continue with: ndeconv train-seg --resume {shlex.quote(str(self.run_dir))}",
                           signum)

    def evaluate(self) -> dict[str, Any]:
        """The val metrics (``score_segmentation``, what ``ndeconv eval`` reports for the run's weights)."""
        metrics = score_segmentation(self.model, self.val_set, self.cfg.num_classes or 1, self.device,
                                     self.cfg.workers)
        self.model.train()
        return metrics

    def finish(self, stopped: bool) -> None:
        """Epoch end (or a --max-steps stop inside one): evaluate, record the row, write weights, metrics and the
        checkpoint, the results before the checkpoint that says they exist."""
        cfg, state = self.cfg, self.state
        self.log(f"evaluating {len(self.val_set)} val images")
        start = time.perf_counter()
        metrics = self.evaluate()
        count = max(state.meter.get("count", 0.0), 1.0)
        row: dict[str, Any] = {
            "epoch": state.epoch + 1, "step": state.global_step, "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": state.meter.get("loss_sum", 0.0) / count,
            **metrics, "seconds": state.seconds, "eval_seconds": time.perf_counter() - start,
            "cpu": cpu_model_name(), "threads": torch.get_num_threads(),  # where this epoch trained
        }
        if stopped:
            row["partial"] = True  # stopped by --max-steps inside the epoch; a resumed run continues the epoch
        else:
            state.epoch, state.step_in_epoch, state.meter, state.seconds = state.epoch + 1, 0, {}, 0.0
        state.history.append(row)
        state.finished = stopped or state.epoch >= cfg.epochs or (
            cfg.max_steps is not None and state.global_step >= cfg.max_steps)
        save_safetensors_atomic(self.model.state_dict(), self.run_dir / WEIGHTS_FILE, metadata={"format": "pt"})
        write_metrics(state.history, self.run_dir / METRICS_FILE)
        self.save()

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2f}%"

        self.log(f"epoch {row['epoch']}/{cfg.epochs} (step {state.global_step}): train loss {row['train_loss']:.4f} "
                 f"| val pixel acc {pct(metrics['pixel_acc'])} mIoU {pct(metrics['miou'])}")
