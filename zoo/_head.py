"""The timm classifier interface every zoo model shares: pooling, dropout and the (De)linear head."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from torch import nn

from ndeconv.io import check_loadable_weights
from ndeconv.layers.grad_checkpoint import checkpoint_seq

from ._layer_factory import DeconvSettings

__all__ = ["ZooClassifierMixin"]


class ZooClassifierMixin:
    """``num_features``, ``forward_head``, ``get_classifier``, ``reset_classifier`` and ``forward``.

    The classifier keeps the authors' attribute name (``linear`` or ``classifier``, set by ``classifier_name``)
    so their state_dicts load unchanged. The authors pool with ``avg_pool2d(out, 4)`` on the 4x4 map a 32x32
    input gives; adaptive pooling gives the same there and works for other sizes.
    """

    classifier_name: str = "linear"
    grad_checkpointing: bool = False
    deconv_settings: DeconvSettings

    def _init_head(self, num_features: int, num_classes: int, global_pool: str, drop_rate: float) -> None:
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = num_features
        self.drop_rate = drop_rate
        self.global_pool_type = global_pool
        self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self._set_classifier(num_classes)

    def _set_classifier(self, num_classes: int) -> None:
        # 'catavgmax' pooling doubles the features the classifier sees.
        in_features = self.num_features * self.global_pool.feat_mult()
        setattr(self, self.classifier_name, self.deconv_settings.head(in_features, num_classes))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``, refusing weights that would load but cannot be right (integer values
        where the model has floats, NaN or Inf), with one error naming the tensor. Every way weights reach a zoo
        model passes here: timm's pretrained loading, checkpoints, run directories, folded files, conversion."""
        check_loadable_weights(dict(state_dict), self.state_dict())  # type: ignore[attr-defined]
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]

    def get_classifier(self) -> nn.Module:
        return getattr(self, self.classifier_name)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool_type = global_pool
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self._set_classifier(num_classes)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's interface (``train.py --grad-checkpointing``): checkpoint each block of ``forward_features``.

        Through ``ndeconv.layers.grad_checkpoint``, so the deconvolution layers update their running statistics once per
        step and the recompute replays the forward's whitening (torch's checkpoint alone would run them twice).
        """
        self.grad_checkpointing = enable

    def run_stage(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``stage(x)``; under grad checkpointing one checkpoint per block (child of a Sequential), as timm's."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()) or torch.jit.is_scripting():
            return stage(x)
        return checkpoint_seq(stage if isinstance(stage, nn.Sequential) else [stage], x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
