"""The timm model interface every zoo model shares: stem, stages, tail and head, and timm's feature API.

A zoo model builds its modules and says how they run: ``forward_stem``, the ``stage_names`` it runs in order
(with ``feature_info`` naming the stages, or blocks inside one, whose outputs are its feature maps) and
``forward_tail``; ``forward_features``, ``forward_intermediates`` and ``prune_intermediate_layers`` are written
once, here, from those.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import SelectAdaptivePool2d
from timm.models._features import feature_take_indices
from torch import nn

from ndeconv.io import check_loadable_weights
from ndeconv.layers.grad_checkpoint import checkpoint_seq

from ._layer_factory import DeconvSettings

__all__ = ["ZooClassifierMixin"]


class ZooClassifierMixin:
    """timm's model interface: ``forward_features``, ``forward_head``, ``forward``, the classifier methods and the
    feature API (``forward_intermediates``, ``prune_intermediate_layers``, ``feature_info``).

    The classifier keeps the authors' attribute name (``linear`` or ``classifier``, set by ``classifier_name``)
    so their state_dicts load unchanged. The authors pool with ``avg_pool2d(out, 4)`` on the 4x4 map a 32x32
    input gives; adaptive pooling gives the same there and works for other sizes.

    A model sets ``stage_names`` (its stages, children run in order after ``forward_stem``) and ``feature_info``
    (timm's list of feature maps; ``module`` names a stage, or a block of one: ``layers.3``), and overrides
    ``forward_stem``/``forward_tail`` where its own differ from the common ``conv1``/``bn1`` stem and optional
    ``deconv1`` ChannelDeconv; ``tail_names`` are the modules after the last stage that feed only the head.
    """

    classifier_name: str = "linear"
    grad_checkpointing: bool = False
    deconv_settings: DeconvSettings
    feature_info: list[dict[str, Any]]
    stage_names: tuple[str, ...] = ()
    tail_names: tuple[str, ...] = ("deconv1",)
    # Set by prune_intermediate_layers when it drops the tail: forward_features then ends at the last stage kept.
    tail_pruned: bool = False
    conv1: nn.Module
    bn1: nn.Module
    deconv1: nn.Module | None

    def _init_stem(self, in_chans: int, out_chs: int, kernel_size: int = 3, **deconv_overrides: Any) -> None:
        """The stem most zoo models share: a stride-1 ``conv1`` at full resolution (CIFAR topology) and ``bn1``.

        ``deconv_overrides`` go to the FastDeconv only: most of the authors' stems are ``freeze=True, n_iter=10``,
        their whitening frozen after its first steps.
        """
        settings = self.deconv_settings
        # stem_*: the hybrid (deconv="stem") whitens here, with these overrides, and norms only past the stem.
        self.conv1 = settings.stem_conv(in_chans, out_chs, kernel_size, 1, kernel_size // 2, **deconv_overrides)
        self.bn1 = settings.stem_norm(out_chs)

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

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def forward_tail(self, x: torch.Tensor) -> torch.Tensor:
        """What ``forward_features`` applies after the last stage: the reference's optional ChannelDeconv on the
        last feature map (``--delinear False --block-fc N``)."""
        return x if self.deconv1 is None else self.deconv1(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_stem(x)
        for name in self.stage_names:
            x = self.run_stage(getattr(self, name), x)
        return x if self.tail_pruned else self.forward_tail(x)

    def _feature_steps(self) -> list[tuple[str, nn.Module]]:
        """The stages as ``forward_features`` runs them, (name, module). A stage that ``feature_info`` taps inside
        (``layers.3``) is cut after each tapped block into Sequential pieces named by their last block, so its maps
        can be taken between them (and each piece checkpoints as the whole stage would: an in-place ReLU stays
        with the conv before it)."""
        taps = {info["module"] for info in self.feature_info}
        steps: list[tuple[str, nn.Module]] = []
        for name in self.stage_names:
            stage = getattr(self, name)
            children = [child for child, _ in stage.named_children()] if isinstance(stage, nn.Sequential) else []
            ends = [i + 1 for i, child in enumerate(children) if f"{name}.{child}" in taps]
            if not ends:
                steps.append((name, stage))
                continue
            if ends[-1] < len(children):
                ends.append(len(children))
            for start, end in zip([0, *ends[:-1]], ends, strict=True):
                steps.append((f"{name}.{children[end - 1]}", stage[start:end]))
        return steps

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: ``forward_features`` that also returns the ``feature_info`` maps it passes.

        ``indices``: the last n maps (int), all (None) or those listed (negative from the end), as
        ``timm.models.feature_take_indices``; ``stop_early`` stops after the last map wanted; ``norm`` has
        nothing to act on (no model here norms its feature maps) and only NCHW maps exist. Returns
        ``(final, maps)``, ``final`` being ``forward_features(x)`` when every stage ran, or only the maps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt {output_fmt!r}: the zoo's feature maps are NCHW only")
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        taken = {self.feature_info[i]["module"] for i in take_indices}
        steps = self._feature_steps()
        names = [name for name, _ in steps]
        if stop_early:
            steps = steps[: names.index(self.feature_info[max_index]["module"]) + 1]

        intermediates = []
        x = self.forward_stem(x)
        for name, module in steps:
            x = self.run_stage(module, x)
            if name in taken:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if len(steps) == len(names) and not self.tail_pruned:
            x = self.forward_tail(x)
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> list[int]:
        """Drop what the ``indices`` maps do not need (timm's feature API; ``features_only=True,
        feature_cls='getter'`` calls it): the stages and blocks after the last map kept, and ``feature_info``
        entries with them. The tail and head go with ``prune_head``, ``prune_norm`` or any stage dropped (the
        head is sized for the final features): ``num_features`` is then the last map's channels. Returns the
        indices kept, counted from the start."""
        take_indices, max_index = feature_take_indices(len(self.feature_info), indices)
        stage, _, block = self.feature_info[max_index]["module"].partition(".")
        position = self.stage_names.index(stage)
        truncated = position < len(self.stage_names) - 1
        for name in self.stage_names[position + 1:]:
            delattr(self, name)
        self.stage_names = self.stage_names[: position + 1]
        if block:
            blocks = getattr(self, stage)
            children = [child for child, _ in blocks.named_children()]
            keep = children.index(block) + 1
            truncated = truncated or keep < len(children)
            for child in children[keep:]:
                delattr(blocks, child)  # by name: ``del blocks[i:]`` renumbers named blocks (``denseblock1``)
        # Maps past the cut no longer exist: asking for them is then an index error, not a wrong map.
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_head or prune_norm or truncated:
            for name in self.tail_names:
                if getattr(self, name) is not None:
                    setattr(self, name, nn.Identity())
            self.tail_pruned = True
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
            self.reset_classifier(0, "")
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
