"""Every setting of a training run, with the reference's defaults, and the model it builds."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # an annotation only: TrainConfig (ndeconv train --help) needs no torch
    from torch import nn

from ..errors import UsageError

__all__ = ["RESUMABLE_OVERRIDES", "TrainConfig", "build_model"]


@dataclass
class TrainConfig:
    """The settings of ``ndeconv train``. Defaults are the authors' ``main.py``/``arg_parser.py`` ones, on the
    paper's smallest real task: ResNet-18 with network deconvolution on Fashion-MNIST.

    ``None`` for ``img_size``, ``wd``, ``batch_size`` and ``epochs``: the default of the authors' script that trains
    the model's topology (``recipe_defaults``): ``main.py`` for the CIFAR/MNIST topologies, ``main_imagenet.py``
    for the ImageNet ones. ``resolved()`` fills them in; a run records the resolved values."""

    arch: str = "resnet18"
    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    img_size: int | None = None  # the model's input size; IDX data is zero-padded to it, CIFAR is 32x32
    num_classes: int | None = None  # the dataset's by default
    deconv: bool | Literal["stem"] = True  # "stem": the hybrid (DeconvSettings)
    block: int = 64
    block_fc: int | None = None  # 512 for deconvolution, 0 (a Linear head) for BatchNorm
    deconv_iter: int = 5
    eps: float = 1e-5
    stride: int = 3  # the deconvolution's sampling stride
    bias: bool = True
    freeze: bool = False
    delinear: bool = True
    drop_rate: float = 0.0
    optimizer: str = "SGD"
    lr: float = 0.1
    momentum: float = 0.9
    wd: float | None = None  # main.py: 1e-3, main_imagenet.py: 1e-4
    lr_scheduler: str = "cosine"  # both scripts' default; "step" is main_imagenet.py's StepLR
    scheduler_step_size: int = 30  # step: epochs between LR drops (main_imagenet.py's --scheduler-step-size)
    milestone: float = 0.4
    multistep_gamma: float = 0.1
    batch_size: int | None = None  # main.py: 128, main_imagenet.py: 256
    epochs: int | None = None  # main.py: 20, main_imagenet.py: 90
    seed: int = 0
    num_workers: int = 0  # in-memory datasets need none; an image folder decodes in workers
    train_subset: int | None = None
    test_subset: int | None = None
    max_steps: int | None = None
    checkpoint_every: int = 500
    amp: str | None = None  # None, "auto", "bf16" or "fp16"; "auto" is resolved (and recorded) when the run starts
    channels_last: bool = False  # model and batches in channels-last memory format (same math, another speed)
    device: str = "auto"
    sync_deconv: bool = False
    fast: int = 1  # opt-in fast mode: refresh the whitening matrices every `fast` steps (1: exact)
    bf16_whitening: bool = False  # opt-in: the whitening's heavy products in bf16 under bf16 autocast (CPU)
    log_every: int = 50
    keep_freed_memory: bool = True  # glibc malloc reuses freed memory (ndeconv.keep_freed_memory): speed only
    curve_rows: int = 50  # steps.jsonl rows per epoch (fixed for a run: a resumed run keeps its grid)
    # Weights to start from (timm's train.py --initial-checkpoint): a run directory or a weights file loadable by
    # ndeconv.loading.load_model, of the same architecture. ``deconvolve``: the ndeconv.deconvolve() call that
    # turns the built model into that checkpoint's layout (ndeconv convert-bn's output), taken from its config.json.
    initial_checkpoint: str | None = None
    deconvolve: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` recipe default filled in from ``recipe_defaults(model)``."""
        recipe = recipe_defaults(self.model_name())
        return dataclasses.replace(self, **{k: v for k, v in recipe.items() if getattr(self, k) is None})

    def model_name(self) -> str:
        from ndeconv.zoo import resolve_model_name

        return resolve_model_name(self.arch, "--arch")

    def default_run_dir(self) -> str:
        form = "stem" if self.deconv == "stem" else "nd" if self.deconv else "bn"
        arch = self.model_name().removesuffix("_deconv")
        return f"runs/{arch}-{form}-{self.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"

    def validate(self) -> None:
        """Reject settings that cannot train, each with the flag to fix (on a ``resolved()`` config)."""
        unresolved = [f.name for f in fields(self) if f.name in RECIPE_FIELDS and getattr(self, f.name) is None]
        if unresolved:
            raise ValueError(f"TrainConfig.validate: {', '.join(unresolved)} unset; call resolved() first")
        # NaN passes no comparison but inf passes `> 0`: --lr inf would train NaN weights and report success.
        for name in ("lr", "momentum", "wd", "eps", "milestone", "multistep_gamma", "drop_rate"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
        checks = [
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.wd >= 0, "--wd must be >= 0"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1) (e.g. 0.9), got {self.momentum}"),
            (0 < self.milestone <= 1, f"--milestone must be a fraction of the run in (0, 1], got {self.milestone}"),
            (0 < self.multistep_gamma <= 1, f"--multistep-gamma must be in (0, 1], got {self.multistep_gamma}"),
            (0 <= self.drop_rate < 1, f"--drop-rate must be in [0, 1), got {self.drop_rate}"),
            (self.block >= 1, f"--block must be a positive channel count (e.g. 64), got {self.block}"),
            (self.block_fc is None or self.block_fc >= 0, "--block-fc must be >= 0 (0: a plain Linear head)"),
            (isinstance(self.deconv, bool) or self.deconv == "stem",
             f"--deconv must be true, false or stem, got {self.deconv!r}"),
            (self.deconv_iter >= 1, "--deconv-iter must be >= 1"),
            (self.eps > 0, "--eps must be > 0"),
            (self.stride >= 1, "--stride must be >= 1"),
            (self.fast >= 1, "--fast must be >= 1 (1: exact mode)"),
            (self.curve_rows >= 1, "--curve-rows must be >= 1"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: only at epoch ends)"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.train_subset is None or self.train_subset >= 1, "--train-subset must be >= 1"),
            (self.test_subset is None or self.test_subset >= 0, "--test-subset must be >= 0"),
            (self.num_workers >= 0, "--num-workers must be >= 0"),
            (self.img_size >= 8, "--img-size must be >= 8"),
            (self.optimizer in ("SGD", "Adam", "AdamW"), "--optimizer must be SGD, Adam or AdamW"),
            (self.lr_scheduler in ("cosine", "multistep", "step"), "--lr-scheduler must be cosine, multistep or step"),
            (self.scheduler_step_size >= 1, "--scheduler-step-size must be >= 1 epoch"),
            (self.amp in (None, "auto", "bf16", "fp16"), "--amp must be bf16 or fp16"),
            (not self.bf16_whitening or self.amp in ("auto", "bf16"),
             "--bf16-whitening runs under bf16 autocast only: add --amp bf16, or drop it"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


# The fields whose default depends on the model's topology (None in TrainConfig until resolved()).
RECIPE_FIELDS = ("img_size", "wd", "batch_size", "epochs")
MAIN_PY_RECIPE = {"wd": 1e-3, "batch_size": 128, "epochs": 20}
MAIN_IMAGENET_RECIPE = {"wd": 1e-4, "batch_size": 256, "epochs": 90}


def recipe_defaults(model_name: str) -> dict[str, Any]:
    """The defaults of the authors' script that trains ``model_name``: ``main_imagenet.py``'s for the ImageNet
    topologies (``ndeconv.zoo.IMAGENET_MODELS``; they also train with its RandomResizedCrop, see
    ``ndeconv.training.data``), ``main.py``'s for the rest; ``img_size`` is the model's own input size (its
    registered pretrained_cfg: 32 for CIFAR topologies, 28 for the MNIST ones, 224 for ImageNet)."""
    from ndeconv.zoo import IMAGENET_MODELS, get_pretrained_cfg  # timm's, and the models not registered with it

    recipe = MAIN_IMAGENET_RECIPE if model_name in IMAGENET_MODELS else MAIN_PY_RECIPE
    cfg = get_pretrained_cfg(model_name)
    return {**recipe, "img_size": int(cfg.input_size[-1]) if cfg is not None else 32}


def is_imagenet_topology(model_name: str) -> bool:
    """Whether the model trains with ``main_imagenet.py``'s recipe (RandomResizedCrop, Resize + CenterCrop eval)."""
    from ndeconv.zoo import IMAGENET_MODELS

    return model_name in IMAGENET_MODELS


# Flags that may differ when resuming: they change how the run is carried out, not what it computes.
# Not --max-steps: a run it stopped is finished (its last epoch row is partial), so a larger value cannot continue it.
RESUMABLE_OVERRIDES = frozenset({"num_workers", "device", "checkpoint_every", "log_every", "data_dir",
                                 "keep_freed_memory"})


def model_kwargs(cfg: TrainConfig, num_classes: int, in_chans: int) -> dict[str, Any]:
    """The ``timm.create_model`` keywords of the run (also written to config.json as timm's model_args)."""
    return dict(
        num_classes=num_classes, in_chans=in_chans, drop_rate=cfg.drop_rate, deconv=cfg.deconv, block=cfg.block,
        block_fc=cfg.block_fc, deconv_iter=cfg.deconv_iter, eps=cfg.eps, sampling_stride=cfg.stride,
        bias=cfg.bias, freeze=cfg.freeze, delinear=cfg.delinear,
    )


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    import ndeconv.zoo as zoo

    name = cfg.model_name()
    try:
        return zoo.create_model(name, pretrained=False, **model_kwargs(cfg, num_classes, in_chans))
    except (ValueError, TypeError) as err:
        # The layers name the offending setting (e.g. a block size that cannot split the channels).
        raise UsageError(f"cannot build {name} with these settings: {err}") from err
