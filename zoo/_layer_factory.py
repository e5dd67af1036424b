"""What every zoo model is built from: one settings object that makes each conv, norm and head
either the deconvolution form (FastDeconv, no norm, Delinear head) or the authors' BatchNorm
baseline (bias-free Conv2d + BatchNorm2d, Linear head), so one definition builds both.

``folded=True`` builds either form as ``ndeconv.convert.fold`` leaves it, MobileOne's ``inference_mode``
pattern: every FastDeconv a Conv2d with bias, the head a Linear, a ChannelDeconv its 1x1 Conv2d (a Linear
on (N, C) features), norms as they are. ``timm.create_model(name, folded=True)`` then takes a folded
state_dict with ``strict=True``, and no deconvolution layer is ever constructed.

``deconv="stem"`` is the hybrid (the fastai port's): the stem conv a FastDeconv with the stem's own settings and no
norm after it, as the deconvolution form's; every other conv, norm and the head as the BatchNorm form's. Models
build their stem with ``stem_conv``/``stem_norm`` and ask ``body_deconv`` (never ``deconv``'s truthiness, which
"stem" has) for the form of the rest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from torch import nn

from ndeconv.errors import UsageError
from ndeconv.layers import ChannelDeconv, Delinear, FastDeconv
from ndeconv.layers._conv import Conv2d

__all__ = ["ChannelCountUnknown", "DeconvSettings", "pop_deconv_settings"]


class ChannelCountUnknown(UsageError):
    """The folded form of a ChannelDeconv was asked for without its channel count (it sizes a C x C layer)."""


@dataclass(frozen=True)
class DeconvSettings:
    """The reference ``main.py`` flags that shape a model (``--deconv``, ``--block``, ``--block-fc``, ...).

    ``block_fc=None`` means the reference's defaults for the chosen form: 512 for
    deconvolution (a Delinear head), 0 for the BatchNorm baseline (a plain Linear head).
    ``folded`` builds the chosen form as folding leaves it (see the module docstring); the other fields
    then only say what it was folded from. ``deconv="stem"``: the hybrid (module docstring); ``block_fc`` then
    defaults to the BatchNorm form's 0.
    """

    deconv: bool | Literal["stem"] = True
    block: int = 64
    block_fc: int | None = None
    deconv_iter: int = 5
    eps: float = 1e-5
    sampling_stride: int = 3
    bias: bool = True
    freeze: bool = False
    delinear: bool = True
    folded: bool = False

    def __post_init__(self) -> None:
        # A typo ("Stem", "true" from a config) would otherwise pass as a truthy deconvolution flag; 0 and 1 (an
        # int where a bool was meant) become the bool, since body_deconv asks `is True`.
        if type(self.deconv) is int and self.deconv in (0, 1):
            object.__setattr__(self, "deconv", bool(self.deconv))
        if not (isinstance(self.deconv, bool) or self.deconv == "stem"):
            raise UsageError(f"deconv must be True, False or 'stem', got {self.deconv!r}")
        if self.block_fc is None:
            object.__setattr__(self, "block_fc", 512 if self.body_deconv else 0)

    @property
    def body_deconv(self) -> bool:
        """Whether the convs, norms and head past the stem are the deconvolution form's (False for the hybrid)."""
        return self.deconv is True

    @property
    def stem_deconv(self) -> bool:
        """Whether the stem conv is a FastDeconv with no norm after it (the deconvolution form and the hybrid)."""
        return self.deconv is True or self.deconv == "stem"

    def to_dict(self) -> dict[str, Any]:
        """The fields as model kwargs; ``folded`` only when set, so the config.json of every unfolded model
        (shipped weights, runs, conversions) keeps the keys it always had."""
        fields_ = asdict(self)
        if not self.folded:
            del fields_["folded"]
        return fields_

    def conv(
        self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, padding: int = 0,
        groups: int = 1, dilation: int = 1, **deconv_overrides: Any,
    ) -> nn.Module:
        """FastDeconv (with bias, as the reference) or a bias-free Conv2d for the BN form (and the hybrid's body).

        ``deconv_overrides`` (e.g. ``n_iter=15, freeze=True`` for a stem) apply to the FastDeconv only.
        """
        if not self.body_deconv:
            # A strided depthwise conv takes its bf16 input gradient in float32 (ndeconv.layers._conv), as the
            # deconvolution form's FastDeconv does: both forms train at the same kernels' speed.
            # Folded (inference), every conv is torch's own, as fold leaves it.
            plain = Conv2d if groups == in_chs > 1 and stride > 1 and not self.folded else nn.Conv2d
            return plain(in_chs, out_chs, kernel_size, stride, padding, dilation, groups=groups, bias=False)
        return self._deconv_conv(in_chs, out_chs, kernel_size, stride, padding, groups, dilation, **deconv_overrides)

    def stem_conv(
        self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, padding: int = 0,
        groups: int = 1, dilation: int = 1, **deconv_overrides: Any,
    ) -> nn.Module:
        """The model's first conv: ``conv`` for the two plain forms, a FastDeconv (``deconv_overrides`` being the
        stem's own settings, as the deconvolution form's stem) for the hybrid."""
        if not self.stem_deconv:
            return self.conv(in_chs, out_chs, kernel_size, stride, padding, groups, dilation, **deconv_overrides)
        return self._deconv_conv(in_chs, out_chs, kernel_size, stride, padding, groups, dilation, **deconv_overrides)

    def stem_norm(self, num_features: int) -> nn.Module:
        """The norm after the stem conv: none where that conv whitens (deconvolution form, hybrid)."""
        return nn.Identity() if self.stem_deconv else nn.BatchNorm2d(num_features)

    def _deconv_conv(
        self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int, groups: int, dilation: int,
        **deconv_overrides: Any,
    ) -> nn.Module:
        if self.folded:  # what FastDeconv.fuse() gives: the whitening's mean shift needs the bias
            return nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups=groups, bias=True)
        kwargs: dict[str, Any] = dict(
            bias=self.bias, eps=self.eps, n_iter=self.deconv_iter, block=self.block,
            sampling_stride=self.sampling_stride, freeze=self.freeze,
        )
        kwargs.update(deconv_overrides)
        return FastDeconv(in_chs, out_chs, kernel_size, stride, padding, dilation, groups=groups, **kwargs)

    def norm(self, num_features: int) -> nn.Module:
        """BatchNorm2d for the BN form; nothing (Identity, no state_dict keys) for deconvolution."""
        return nn.Identity() if self.body_deconv else nn.BatchNorm2d(num_features)

    def head(self, in_features: int, num_classes: int) -> nn.Module:
        """The classifier: Delinear(block=block_fc) when block_fc > 0 and delinear, else Linear."""
        if num_classes <= 0:
            return nn.Identity()
        if self.block_fc and self.delinear and not self.folded:
            return Delinear(in_features, num_classes, eps=self.eps, n_iter=self.deconv_iter, block=self.block_fc)
        return nn.Linear(in_features, num_classes)  # folded: what Delinear.fuse() gives

    def channel_deconv(self, num_channels: int | None = None, input_dim: int = 4) -> nn.Module | None:
        """The reference's optional ChannelDeconv (``--delinear False --block-fc N``) on ``num_channels``
        channels of (N, C, H, W) input, or of (N, C) features with ``input_dim=2``; folded, the plain layer
        its ``fuse()`` gives. Unfolded, a count left out builds the reference's layer, which takes any input
        and folds for the last one it saw; folded, the count is required."""
        if not (self.block_fc and not self.delinear):
            return None
        if self.folded:
            if num_channels is None:
                raise ChannelCountUnknown(
                    "the folded form of a ChannelDeconv is a C x C layer: its model must build it with "
                    "settings.channel_deconv(num_channels)")
            if input_dim == 2:
                return nn.Linear(num_channels, num_channels)
            return nn.Conv2d(num_channels, num_channels, 1)
        return ChannelDeconv(self.block_fc, eps=self.eps, n_iter=self.deconv_iter,
                             sampling_stride=self.sampling_stride, num_channels=num_channels,
                             input_dim=None if num_channels is None else input_dim)


_SETTING_NAMES = tuple(f.name for f in fields(DeconvSettings))


def pop_deconv_settings(kwargs: dict[str, Any]) -> DeconvSettings:
    """Take the deconvolution flags out of a model's kwargs (what timm.create_model passed through)."""
    return DeconvSettings(**{name: kwargs.pop(name) for name in _SETTING_NAMES if name in kwargs})
