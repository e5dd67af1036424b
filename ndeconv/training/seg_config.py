"""The settings of ``ndeconv train-seg``: one dataclass with the authors' ``Segmentation/train.py`` defaults. Apart
from the trainer (``segmentation.py``) and torch-free, so that option parsing (``ndeconv train-seg --help``) does
not load torch; the dataset tables are read when the settings are resolved or validated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError

__all__ = ["SegTrainConfig"]


@dataclass
class SegTrainConfig:
    """Every setting of a segmentation run, with the authors' ``Segmentation/train.py`` defaults."""

    model: str = "deeplabv3_resnet50"  # our names, with or without _deconv, or the authors' (fcn_resnet50d ...)
    dataset: str = "cityscapes"  # cityscapes or voc
    data_dir: str | None = None
    base_size: int = 520
    crop_size: int = 480
    batch_size: int = 4
    epochs: int = 30
    lr: float = 0.01
    momentum: float = 0.9
    wd: float = 1e-4
    aux_loss: bool = False
    # None: from the model's name (fcn_resnet50d / fcn_resnet50_deconv: True; torchvision's fcn_resnet50: False).
    deconv: bool | None = None
    block: int = 64
    deconv_iter: int = 5
    eps: float = 1e-5
    bias: bool = True
    stride: int = 3
    num_classes: int | None = None  # None: the dataset's (19 Cityscapes trainIds, 21 VOC classes)
    max_steps: int | None = None
    val_subset: int | None = None  # evaluate on the first N val images only
    seed: int = 0
    device: str = "auto"
    workers: int = 4
    checkpoint_every: int = 500  # steps; 0: only at epoch ends
    log_every: int = 10

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegTrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def architecture(self) -> str:
        """The zoo builder's name (``fcn_resnet50_deconv``) for any spelling of ``model``."""
        from ndeconv.zoo._names import REFERENCE_ARCHS, SEGMENTATION_BASELINE_ARCHS
        from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

        name = self.model
        name = REFERENCE_ARCHS.get(name, SEGMENTATION_BASELINE_ARCHS.get(name, name))
        if name not in SEGMENTATION_MODELS:
            bare = ", ".join(m.removesuffix("_deconv") for m in SEGMENTATION_MODELS)
            raise UsageError(f"--model {self.model!r} is not a segmentation model; choose one of {bare} (the "
                             "_deconv suffix and the authors' names such as fcn_resnet50d work too)")
        return name

    def resolved(self) -> SegTrainConfig:
        """The settings with what follows from the others filled in: the deconvolution form from the model's name
        when not given, the number of classes from the dataset."""
        out = dataclasses.replace(self)
        if out.deconv is None:
            from ndeconv.zoo._names import REFERENCE_ARCHS

            out.deconv = out.model.endswith("_deconv") or out.model in REFERENCE_ARCHS
        from .seg_data import SEG_DATASETS

        if out.num_classes is None and out.dataset in SEG_DATASETS:
            out.num_classes = len(SEG_DATASETS[out.dataset])
        return out

    def validate(self) -> None:
        from .seg_data import IGNORE_INDEX, SEG_DATASETS

        self.architecture()
        if self.dataset not in SEG_DATASETS:
            raise UsageError(f"--dataset {self.dataset!r}: choose one of {', '.join(SEG_DATASETS)}")
        if self.data_dir is None:
            raise UsageError(f"--data-dir is required: the folder of the {self.dataset} dataset")
        checks = [
            (self.base_size >= 2, "--base-size must be >= 2"),
            (self.crop_size >= 1, "--crop-size must be >= 1"),
            (self.batch_size >= 1, "--batch-size must be >= 1"),
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.momentum >= 0, "--momentum must be >= 0"),
            (self.wd >= 0, "--wd must be >= 0"),
            (self.block >= 1, "--block must be >= 1"),
            (self.deconv_iter >= 1, "--deconv-iter must be >= 1"),
            (self.eps > 0, "--eps must be > 0"),
            (self.stride >= 1, "--stride must be >= 1"),
            (self.num_classes is None or 1 <= self.num_classes < IGNORE_INDEX,
             f"--num-classes must be between 1 and {IGNORE_INDEX - 1} (255 is the ignored label)"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.val_subset is None or self.val_subset >= 1, "--val-subset must be >= 1"),
            (self.workers >= 0, "--workers must be >= 0"),
            (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0 (0: only at epoch ends)"),
            (self.log_every >= 1, "--log-every must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def model_args(self) -> dict[str, Any]:
        """The builder's kwargs (``num_classes`` included)."""
        return {"num_classes": self.num_classes, "aux_loss": bool(self.aux_loss), "deconv": bool(self.deconv),
                "block": self.block, "deconv_iter": self.deconv_iter, "eps": self.eps, "bias": self.bias,
                "sampling_stride": self.stride}
