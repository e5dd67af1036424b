"""FastDeconv1d: network deconvolution for 1-D signals (speech, sensor channels, sequences).

The layer is FastDeconv on the signal viewed as an image of height 1: kernel ``(1, k)``, stride ``s``,
padding ``(0, p)``, dilation ``(1, d)`` on the input viewed ``(N, C, 1, L)``. With height 1 and a kernel of
height 1 the patch grid has one row whatever the vertical stride, so a square 2-D stride ``(s, s)`` (all the 2-D
layer takes) is the 1-D stride ``s``, and its sampling stride subsamples along ``L`` only. Buffers
(``running_mean`` of ``k*block`` features, ``running_deconv``), block layout, training statistics, running
averages, fast mode, freezing and the eval fold are the 2-D layer's; the weight is stored as ``nn.Conv1d``
stores it, ``(out, in/groups, k)``, and the convolution is ``F.conv1d``.

The sampled patches are, for every kernel size, those ``unfold`` takes from the zero-padded signal with the
layer's kernel and dilation every ``sampling_stride`` positions (``sampling_stride`` is multiplied by the conv
stride, as in the 2-D layer). The one departure from a literal height-1 FastDeconv is ``k == 1``: there the 2-D
layer takes the authors' 1x1 shortcut, every ``stride**2``-th pixel of the flattened batch, padding skipped
(``stride**2`` because a 2-D sample is ``stride x stride``); in 1-D that would square the sampling stride, so
this layer keeps the unfold rule (every ``stride``-th position of each padded signal). For ``k == 1`` with a
total sampling stride of 1 and no padding the two are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _single

from ._common import check_hyperparameters
from ._patch_stats import PatchSampler
from .fast_deconv import FastDeconv

__all__ = ["FastDeconv1d"]


def _one(owner: str, name: str, value: int | tuple[int, ...]) -> int:
    """An ``nn.Conv1d``-style int-or-1-tuple argument as an int."""
    values = _single(value)
    if len(values) != 1 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{owner}: {name} must be an int or a 1-tuple of ints, got {value!r}")
    return values[0]


class FastDeconv1d(FastDeconv):
    """Conv1d with implicit deconvolution: :class:`FastDeconv` on ``(N, C, L)`` signals.

    Same keywords and defaults as FastDeconv (``block``, ``eps``, ``n_iter``, ``momentum``, ``sampling_stride``,
    ``freeze``, ``freeze_iter``) with ``nn.Conv1d``'s geometry (int or 1-tuple ``kernel_size``, ``stride``,
    ``padding``, ``dilation``; zero padding only). ``fuse()`` returns the equivalent ``nn.Conv1d``; being a
    FastDeconv, the layer is folded by ``ndeconv.convert.fold``, and ``set_fast_mode``, ``sync_deconv`` and
    ``ndeconv.layers.grad_checkpoint`` apply to it. Input ``(N, C, L)``, output ``(N, out_channels, L_out)``.
    """

    plain_conv_type = nn.Conv1d  # what fuse() returns

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
        bias: bool = True,
        eps: float = 1e-5,
        n_iter: int = 5,
        momentum: float = 0.1,
        block: int = 64,
        sampling_stride: int = 3,
        freeze: bool = False,
        freeze_iter: int = 100,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        owner = f"FastDeconv1d({in_channels}, {out_channels})"
        # Checked here first so that errors name this layer, not the 2-D one it is built as.
        check_hyperparameters(owner, eps=eps, n_iter=n_iter, momentum=momentum, block=block)
        if isinstance(padding, str):
            raise ValueError(f"{owner}: padding must be an int, got {padding!r} (compute 'same' padding yourself)")
        k, s = _one(owner, "kernel_size", kernel_size), _one(owner, "stride", stride)
        p, d = _one(owner, "padding", padding), _one(owner, "dilation", dilation)
        super().__init__(
            in_channels, out_channels, (1, k), s, (0, p), (1, d), groups, bias, eps=eps, n_iter=n_iter,
            momentum=momentum, block=block, sampling_stride=sampling_stride, freeze=freeze,
            freeze_iter=freeze_iter, device=device, dtype=dtype,
        )
        # From here on the module is an nn.Conv1d to its user: 1-D geometry, (out, in/groups, k) weight. The 2-D
        # init drew the weight with fan-in in/groups * 1 * k, nn.Conv1d's, so the reshaped draw is Conv1d's init.
        self.kernel_size, self.stride, self.padding, self.dilation = (k,), (s,), (p,), (d,)
        self.output_padding = (0,)
        self._reversed_padding_repeated_twice = [p, p]
        self.weight = nn.Parameter(self.weight.detach().squeeze(2).clone())

    # -- statistics ---------------------------------------------------------------------------

    def _sampler(self) -> PatchSampler:
        (k,), (d,), (p,) = self.kernel_size, self.dilation, self.padding
        if k == 1:  # _statistics_input took the sample already: every pixel of its view is one patch
            return PatchSampler((1, 1), (1, 1), (0, 0), 1, self.num_features, self.groups > 1)
        return PatchSampler((1, k), (1, d), (0, p), self.sampling_stride, self.num_features, self.groups > 1)

    def _statistics_input(self, x: torch.Tensor) -> torch.Tensor:
        """The (N, C, 1, L') view the patch statistics are taken from (see the module docstring for ``k == 1``)."""
        if self.kernel_size[0] == 1:
            (p,), step = self.padding, self.sampling_stride
            x = (F.pad(x, (p, p)) if p else x)[:, :, ::step]
        return x.unsqueeze(2)

    # -- forward ------------------------------------------------------------------------------

    def _owner(self) -> str:
        return f"FastDeconv1d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size[0]})"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise ValueError(
                f"{self._owner()}: expected a 3-D input (N, C, L), got shape {tuple(x.shape)}; "
                "add the missing batch/channel dimension"
            )
        self._check_channels(x)
        (k,), (d,), (p,) = self.kernel_size, self.dilation, self.padding
        span, length = d * (k - 1) + 1, x.shape[2] + 2 * p
        if length < span:
            padded = f" ({length} padded)" if p else ""
            raise ValueError(
                f"{self._owner()}: a signal of {x.shape[2]} samples{padded} is shorter than the kernel's span of "
                f"{span}; give longer signals or build the layer with more padding"
            )
        if self.training and x.shape[0] == 0:
            raise ValueError(f"{self._owner()}: a training batch of 0 signals has no patches to take whitening "
                             "statistics from; skip empty batches")

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv1d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
