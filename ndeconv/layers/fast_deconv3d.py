"""FastDeconv3d: network deconvolution for volumes and video (``(N, C, D, H, W)``, ``nn.Conv3d``'s geometry).

A 3-D patch is the 2-D layer's patch of a depth window: for a window of ``kd`` depth slices starting at depth
``z``, stack its slices as channels (channel ``c * kd + a`` is channel ``c`` at depth tap ``a``); a 2-D patch of
that stack holds element ``(c * kd + a) * kh * kw + b * kw + e``, which is the 3-D patch's element ``c * kd*kh*kw
+ a * kh*kw + b * kw + e`` in ``nn.Conv3d``'s weight order. So the layer is FastDeconv on the depth windows
viewed as images ``(N * windows, C * kd, H, W)`` with kernel ``(kh, kw)``: the block layout (``C // block``
interleaved blocks of ``kd*kh*kw*block`` features), grouped whitening (a group's channels stay contiguous in the
stack), statistics code, fast mode, freezing and the eval fold are the 2-D layer's, and nothing new computes a
covariance.

Sampling: depth windows every ``depth_sampling_stride`` slices of the zero-padded volume, then the 2-D layer's
sample of each window's stack: patches every ``sampling_stride`` pixels in height and width for a kernel wider
than 1x1 in-plane (the sampled patches are those a 3-D unfold with strides ``(depth_sampling_stride,
sampling_stride, sampling_stride)`` takes), and the authors' 1x1 rule, every ``sampling_stride**2``-th pixel of
the batch of stacks, for an in-plane 1x1 kernel (``(kd, 1, 1)`` temporal convs and ``1x1x1`` projections). As in
the 2-D layer, the ``sampling_stride`` argument is multiplied by the conv stride, per axis: ``sampling_stride``
stores it times the in-plane stride, ``depth_sampling_stride`` times the depth stride. The in-plane stride is
square, as the 2-D layer's is; the depth stride is free (video networks downsample space before time: ``(1, 2,
2)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _triple

from ._common import check_hyperparameters
from ._patch_stats import PatchSampler
from .fast_deconv import FastDeconv

__all__ = ["FastDeconv3d"]


def _three(owner: str, name: str, value: int | tuple[int, int, int]) -> tuple[int, int, int]:
    """An ``nn.Conv3d``-style int-or-3-tuple argument as a 3-tuple of ints."""
    values = _triple(value)
    if len(values) != 3 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{owner}: {name} must be an int or a 3-tuple of ints, got {value!r}")
    return values


class FastDeconv3d(FastDeconv):
    """Conv3d with implicit deconvolution: :class:`FastDeconv` on ``(N, C, D, H, W)`` volumes.

    Same keywords and defaults as FastDeconv (``block``, ``eps``, ``n_iter``, ``momentum``, ``sampling_stride``,
    ``freeze``, ``freeze_iter``) with ``nn.Conv3d``'s geometry (int or 3-tuple ``kernel_size``, ``padding``,
    ``dilation``; a ``stride`` square in-plane, ``(sd, s, s)``; zero padding only). Buffers: ``running_mean`` of
    ``kd*kh*kw*block`` features (``kd*kh*kw*in_channels`` grouped) and ``running_deconv``; the weight is
    ``nn.Conv3d``'s ``(out, in/groups, kd, kh, kw)`` and ``fuse()`` returns the equivalent ``nn.Conv3d``. Being a
    FastDeconv, the layer is folded by ``ndeconv.convert.fold`` and timm's ``reparameterize_model``, and
    ``set_fast_mode``, ``sync_deconv`` and ``ndeconv.layers.grad_checkpoint`` apply to it.
    """

    plain_conv_type = nn.Conv3d  # what fuse() returns

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
        dilation: int | tuple[int, int, int] = 1,
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
        owner = f"FastDeconv3d({in_channels}, {out_channels})"
        # Checked here first so that errors name this layer, not the 2-D one it is built as.
        check_hyperparameters(owner, eps=eps, n_iter=n_iter, momentum=momentum, block=block)
        if isinstance(padding, str):
            raise ValueError(f"{owner}: padding must be an int or a 3-tuple of ints, got {padding!r} "
                             "(compute 'same' padding yourself)")
        kernel, strides = _three(owner, "kernel_size", kernel_size), _three(owner, "stride", stride)
        pads, dilations = _three(owner, "padding", padding), _three(owner, "dilation", dilation)
        if strides[1] != strides[2]:
            raise ValueError(f"{owner}: the in-plane stride must be square, (sd, s, s), got stride={stride!r}")
        kd, kh, kw = kernel
        # Built as the 2-D layer of a (kd*kh, kw) kernel: its buffers (kd*kh*kw*block features), block rule and
        # weight init (fan-in in/groups * kd*kh*kw, nn.Conv3d's) are then the 3-D layer's; the geometry is reset below.
        super().__init__(
            in_channels, out_channels, (kd * kh, kw), strides[1], 0, 1, groups, bias, eps=eps, n_iter=n_iter,
            momentum=momentum, block=block, sampling_stride=sampling_stride, freeze=freeze,
            freeze_iter=freeze_iter, device=device, dtype=dtype,
        )
        # From here on the module is an nn.Conv3d to its user: 3-D geometry, (out, in/groups, kd, kh, kw) weight.
        self.kernel_size, self.stride, self.padding, self.dilation = kernel, strides, pads, dilations
        self.output_padding = (0, 0, 0)
        self._reversed_padding_repeated_twice = [p for p in reversed(pads) for _ in range(2)]
        # The 2-D init multiplied sampling_stride by the in-plane stride; depth windows step by the depth stride's.
        self.depth_sampling_stride = sampling_stride * strides[0]
        self.weight = nn.Parameter(self.weight.detach().reshape(out_channels, in_channels // groups, kd, kh, kw))

    # -- statistics ---------------------------------------------------------------------------

    def _sampler(self) -> PatchSampler:
        _, kh, kw = self.kernel_size
        _, dh, dw = self.dilation
        _, ph, pw = self.padding
        return PatchSampler((kh, kw), (dh, dw), (ph, pw), self.sampling_stride, self.num_features, self.groups > 1)

    def _statistics_input(self, x: torch.Tensor) -> torch.Tensor:
        """The sampled depth windows as images ``(N * windows, C * kd, H, W)``: window ``z`` of image ``n`` is
        row ``n * windows + z``, its channel ``c * kd + a`` channel ``c`` at depth ``z * depth_sampling_stride + a *
        dilation`` of the padded volume (differentiable: autograd takes the gradient back to ``x``)."""
        kd, dd, pd = self.kernel_size[0], self.dilation[0], self.padding[0]
        if pd:
            x = F.pad(x, (0, 0, 0, 0, pd, pd))
        windows = x.unfold(2, dd * (kd - 1) + 1, self.depth_sampling_stride)[..., ::dd]  # (N, C, windows, H, W, kd)
        n, c, count, h, w, _ = windows.shape
        return windows.permute(0, 2, 1, 5, 3, 4).reshape(n * count, c * kd, h, w)

    # -- forward ------------------------------------------------------------------------------

    def _owner(self) -> str:
        return f"FastDeconv3d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size})"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(
                f"{self._owner()}: expected a 5-D input (N, C, D, H, W), got shape {tuple(x.shape)}; "
                "add the missing batch/channel dimension"
            )
        self._check_channels(x)
        spans = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation, strict=True)]
        sizes = [s + 2 * p for s, p in zip(x.shape[2:], self.padding, strict=True)]
        if any(size < span for size, span in zip(sizes, spans, strict=True)):
            padded = f" ({'x'.join(map(str, sizes))} padded)" if any(self.padding) else ""
            raise ValueError(
                f"{self._owner()}: a volume of {'x'.join(map(str, x.shape[2:]))} voxels{padded} is smaller than the "
                f"kernel's span of {'x'.join(map(str, spans))}; give larger volumes or build the layer with more "
                "padding"
            )
        if self.training and x.shape[0] == 0:
            raise ValueError(f"{self._owner()}: a training batch of 0 volumes has no patches to take whitening "
                             "statistics from; skip empty batches")

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv3d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s + f", depth_sampling_stride={self.depth_sampling_stride}" if self.stride[0] != self.stride[1] else s
