"""FastDeconv: a 2-D convolution whose input patches are whitened (network deconvolution).

The whitening is never applied to the activations. For patches ``x`` with mean ``mu``
and whitening matrix ``D = Cov^{-1/2}``, ``w . D (x - mu) = (w D) . x - (w D) . mu``,
so the layer folds ``D`` and ``mu`` into its own weight and bias and runs one plain
convolution. In training the statistics come from a strided sample of the batch's
im2col patches; in eval (and once frozen) from their running averages.

Patch layout (the authors'): a patch vector of length ``C*kh*kw`` is split into
``C // block`` interleaved blocks of ``kh*kw*block`` features (feature ``f`` of block
``g`` is element ``f * (C // block) + g``); all blocks share one whitening matrix.
A grouped convolution whitens each group with its own matrix.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.utils import _pair

from ._common import (
    CachedEvalFold,
    FoldCache,
    check_hyperparameters,
    check_input_matches,
    ensure_finite,
    full_precision,
    resolve_block,
    stats_dtype,
    sync_statistics,
    update_running,
)
from ._conv import conv2d
from ._patch_stats import REDUCED_GRAM_MIN_FEATURES, PatchSampler, patch_mean, patch_statistics_through
from .grad_checkpoint import record_or_replay
from .isqrt import isqrt_newton_schulz, isqrt_newton_schulz_batch

__all__ = ["FastDeconv", "set_bf16_whitening", "set_fast_mode"]

# The whitening's products ``set_bf16_whitening`` takes to bfloat16, by name: speed benchmarks record them, so a
# result says which kernels it timed.
BF16_WHITENING_PRODUCTS = ("patch Gram", "patch Gram backward", "inverse square root backward", "fold W·D",
                           "fold W·D backward")
# Layers whitening fewer features keep float32 statistics under ``set_bf16_whitening``: their products are too small
# for bfloat16 to pay (the Gram product falls back to float32 there already), so bf16 would only cost precision. In
# one paired run of all ten, the networks whose ungrouped layers all whiten 64 features moved both ways with bf16
# whitening on those layers (ResNeXt-29 +10%, MobileNetV2 +5%, PNASNet-A -8%, EfficientNet-B0 -9%): within their
# run-to-run noise.
BF16_WHITENING_MIN_FEATURES = REDUCED_GRAM_MIN_FEATURES


def takes_bf16_whitening(grouped: bool, num_features: int) -> bool:
    """Whether ``set_bf16_whitening`` takes a layer's whitening to bfloat16 under CPU bf16 autocast: one whitening
    group of at least ``BF16_WHITENING_MIN_FEATURES`` features (the benchmarks' floor and precision table ask too)."""
    return not grouped and num_features >= BF16_WHITENING_MIN_FEATURES


def _like(weight: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``weight`` with the strides of ``layout`` (the layer's own weight).

    ``F.conv2d`` runs in channels-last when its input or weight looks channels-last, and the fold's reshapes
    leave strides that say so by accident: a one-block 1x1 weight came out (C, 1, C, C), so a plain NCHW
    model switched memory format after that layer, and mixed-format elementwise ops downstream ran many times
    slower (ResNeXt-29's ReLU backward, in a profile). Copying onto the layer weight's strides keeps the format the
    user chose: NCHW by default, channels-last after ``model.to(memory_format=torch.channels_last)``.
    """
    if weight.stride() == layout.stride():
        return weight
    return torch.empty_like(layout, dtype=weight.dtype).copy_(weight)


class FastDeconv(CachedEvalFold, _ConvNd):
    """Conv2d with implicit deconvolution; drop-in for the reference's ``FastDeconv``.

    Args are the reference's: ``block`` channels per whitening block (capped at
    ``in_channels``, reduced to the gcd when it does not divide them, ``in_channels //
    groups`` for grouped convs), ``n_iter`` Newton–Schulz iterations, ``eps`` added
    to the covariance diagonal, ``sampling_stride`` (multiplied by the conv stride,
    stored so) subsamples the patches, and ``freeze`` stops updating the statistics
    after ``freeze_iter`` training steps (restarting for ``freeze_iter`` steps every
    ``10 * freeze_iter``, as the reference does).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
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
        owner = f"FastDeconv({in_channels}, {out_channels})"
        check_hyperparameters(owner, eps=eps, n_iter=n_iter, momentum=momentum, block=block)
        if isinstance(padding, str):
            raise ValueError(f"{owner}: padding must be an int or a pair of ints, got {padding!r}")
        stride2 = _pair(stride)
        if stride2[0] != stride2[1]:
            raise ValueError(f"{owner}: only square strides are supported, got stride={stride!r}")
        if not isinstance(sampling_stride, int) or sampling_stride < 1:
            raise ValueError(f"{owner}: sampling_stride must be an int >= 1, got {sampling_stride!r}")
        if freeze and (not isinstance(freeze_iter, int) or freeze_iter < 1):
            raise ValueError(f"{owner}: freeze_iter must be an int >= 1 when freeze=True, got {freeze_iter!r}")
        super().__init__(
            in_channels, out_channels, _pair(kernel_size), stride2, _pair(padding), _pair(dilation),
            False, _pair(0), groups, bias, "zeros", device=device, dtype=dtype,
        )
        self.eps = eps
        self.n_iter = n_iter
        self.momentum = momentum
        self.block = resolve_block(block, in_channels, groups)
        kh, kw = self.kernel_size
        self.num_features = kh * kw * self.block
        factory = {"device": device, "dtype": dtype}
        if groups == 1:
            self.register_buffer("running_mean", torch.zeros(self.num_features, **factory))
            self.register_buffer("running_deconv", torch.eye(self.num_features, **factory))
        else:
            self.register_buffer("running_mean", torch.zeros(kh * kw * in_channels, **factory))
            eye = torch.eye(self.num_features, **factory)
            self.register_buffer("running_deconv", eye.repeat(in_channels // self.block, 1, 1))
        self.sampling_stride = sampling_stride * stride2[0]
        self.freeze = freeze
        self.freeze_iter = freeze_iter
        self.counter = 0  # training steps seen, a plain attribute as in the reference (not in the state_dict)
        self.track_running_stats = True
        self.sync_stats = False  # average mean and covariance across ranks (see ndeconv.sync_deconv)
        # Opt-in fast mode (see set_fast_mode): plain attributes, not in the state_dict.
        self.refresh_every = 1
        self._fast_step = 0
        self._fast_deconv: torch.Tensor | None = None
        # Opt-in (see set_bf16_whitening): a plain attribute, not in the state_dict.
        self.bf16_whitening = False
        self._fold_cache = FoldCache()

    # -- statistics ---------------------------------------------------------------------------

    def _sampler(self) -> PatchSampler:
        return PatchSampler(self.kernel_size, self.dilation, self.padding, self.sampling_stride, self.num_features,
                            self.groups > 1)

    def _step_plan(self, x: torch.Tensor) -> tuple[bool, torch.Tensor | None]:
        """This training step's decisions: frozen (use the running statistics), and in fast mode the kept
        whitening matrix to reuse (None: compute it from this batch, every ``refresh_every``-th step or when no
        usable matrix is kept)."""
        if self.freeze and self.counter > self.freeze_iter:
            return True, None
        kept = self._fast_deconv
        if self.refresh_every <= 1 or kept is None or self._fast_step % self.refresh_every == 0:
            return False, None
        if kept.device != x.device or kept.dtype != stats_dtype(x.dtype):
            return False, None
        return False, kept

    def _reused_statistics(self, x: torch.Tensor, kept: torch.Tensor,
                           reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast mode between refreshes: this batch's mean with the last refresh's whitening matrix (``reduced``: the
        mean of ``x`` rounded to bfloat16, as the bfloat16 statistics see it). A half-precision ``x`` is summed in
        float32 (``kept``'s dtype) without a float32 copy of it."""
        mean = patch_mean(x.to(torch.bfloat16) if reduced else x, self._sampler()).to(kept.dtype)
        ensure_finite(self._owner(), mean)
        if self.sync_stats:
            mean, _ = sync_statistics(mean, kept)
        return mean, kept

    def _reduced(self, x: torch.Tensor) -> bool:
        """Whether this forward takes its heavy whitening products in bfloat16: ``bf16_whitening`` set, under CPU
        bf16 autocast, one whitening group (grouped convs whiten many small matrices: float32 stays) of at least
        ``BF16_WHITENING_MIN_FEATURES`` features."""
        return (self.bf16_whitening and takes_bf16_whitening(self.groups > 1, self.num_features)
                and x.device.type == "cpu"
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)

    def _batch_statistics(self, x: torch.Tensor, reduced: bool = False,
                          through: bool = False) -> tuple[torch.Tensor, ...]:
        """Mean and Cov^{-1/2} of the sampled patches of ``x`` (differentiable); ``reduced``: the patch products
        and the inverse square root's backward products in bfloat16 (``reduced_patch_statistics``), mean, covariance
        and its inverse square root in float32. ``through``: also ``x`` passed through (``patch_statistics_through``),
        for the convolution to read so the patches' gradient is added into its input gradient in place."""
        mean, cov, passed = patch_statistics_through(x, self._sampler(), self.eps, self.groups, reduced)
        ensure_finite(self._owner(), cov)
        if self.sync_stats:
            mean, cov = sync_statistics(mean, cov)
        if self.groups == 1:
            deconv = isqrt_newton_schulz(cov, self.n_iter, backward_dtype=torch.bfloat16 if reduced else None)
        else:
            deconv = isqrt_newton_schulz_batch(cov, self.n_iter)
        return (mean, deconv, passed) if through else (mean, deconv)

    # -- folding ------------------------------------------------------------------------------

    def folded_weight_bias(self, mean: torch.Tensor, deconv: torch.Tensor,
                           reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``w D`` and bias ``b - (w D) mu`` of the plain conv equivalent to this layer. ``reduced``: ``w D``
        as a bfloat16 product, returned in bfloat16 (what the conv under bf16 autocast reads); the bias is summed in
        ``mean``'s dtype either way."""
        out, nf = self.out_channels, self.num_features
        product = torch.bfloat16 if reduced else deconv.dtype
        weight, deconv = self.weight.to(product), deconv.to(product)
        if self.groups == 1:
            blocks = self.in_channels // self.block
            w = weight.reshape(out, nf, blocks).transpose(1, 2).reshape(-1, nf) @ deconv
            shift = (w.to(mean.dtype) @ mean.unsqueeze(1)).view(out, -1).sum(1)
            w = w.view(out, blocks, nf).transpose(1, 2).reshape(self.weight.shape)
        else:
            w = weight.reshape(self.groups, -1, nf) @ deconv
            shift = (w.to(mean.dtype) @ mean.view(-1, nf, 1)).view(out)
            w = w.reshape(self.weight.shape)
        bias = -shift if self.bias is None else self.bias.to(shift.dtype) - shift
        return _like(w if reduced else w.to(self.weight.dtype), self.weight), bias.to(self.weight.dtype)

    # The plain convolution this layer folds into (FastDeconv1d: nn.Conv1d, FastDeconv3d: nn.Conv3d).
    plain_conv_type: type[nn.Conv2d] | type[nn.Conv1d] | type[nn.Conv3d] = nn.Conv2d

    def fuse(self) -> nn.Conv2d | nn.Conv1d | nn.Conv3d:
        """A plain ``nn.Conv2d`` (``plain_conv_type``) computing this layer's eval output (used by ``timm``'s
        ``reparameterize_model``)."""
        with torch.no_grad(), full_precision(self.weight.device):
            w, b = self.folded_weight_bias(self.running_mean, self.running_deconv)
        conv = self.plain_conv_type(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
            self.dilation, self.groups, bias=True, device=w.device, dtype=w.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(w)
            conv.bias.copy_(b)
        return conv

    # -- forward ------------------------------------------------------------------------------

    def _owner(self) -> str:
        return f"FastDeconv({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size})"

    def _check_channels(self, x: torch.Tensor) -> None:
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self._owner()}: input has {x.shape[1]} channels but the layer was built for "
                f"{self.in_channels}; build it with in_channels={x.shape[1]} or fix the input"
            )
        check_input_matches(self._owner(), x, self.weight)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(
                f"{self._owner()}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}; "
                "add the missing batch/channel dimension"
            )
        self._check_channels(x)
        (kh, kw), (dh, dw), (ph, pw) = self.kernel_size, self.dilation, self.padding
        span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
        height, width = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        if height < span_h or width < span_w:
            dilated = " (dilated)" if (dh, dw) != (1, 1) else ""
            padded = f" ({height}x{width} padded)" if (ph, pw) != (0, 0) else ""
            raise ValueError(
                f"{self._owner()}: input of {x.shape[2]}x{x.shape[3]} pixels{padded} is smaller than the{dilated} "
                f"kernel's {span_h}x{span_w}; give larger images or build the layer with more padding"
            )
        if self.training and x.shape[0] == 0:
            raise ValueError(f"{self._owner()}: a training batch of 0 images has no patches to take whitening "
                             "statistics from; skip empty batches")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        # Under ndeconv.layers.grad_checkpoint the recompute replays the forward's decisions and changes no state.
        frozen, kept, replaying = False, None, False
        if self.training:
            (frozen, kept), replaying = record_or_replay(self, lambda: self._step_plan(x))
        reduced = self.training and not frozen and self._reduced(x)  # asked before autocast is switched off
        with full_precision(x.device):
            if self.training and not frozen:
                view = self._statistics_input(x)
                if kept is not None:
                    mean, deconv = self._reused_statistics(view, kept, reduced)
                elif view is x:  # the conv reads x passed through the statistics, which add their gradient to its
                    mean, deconv, x = self._batch_statistics(x, reduced, through=True)
                else:
                    mean, deconv = self._batch_statistics(view, reduced)
                if self.refresh_every > 1 and not replaying:
                    if kept is None:
                        self._fast_deconv = deconv.detach()
                    self._fast_step += 1
                if self.track_running_stats and not replaying:
                    with torch.no_grad():
                        update_running(self.running_mean, mean, self.momentum)
                        update_running(self.running_deconv, deconv, self.momentum)
                weight, bias = self.folded_weight_bias(mean, deconv, reduced)
            elif self.training:
                weight, bias = self.folded_weight_bias(self.running_mean, self.running_deconv)
            else:
                weight, bias = self._eval_weight_bias()
        # Counted only once the batch was accepted (a rejected NaN batch leaves the layer's state alone).
        if self.training and self.track_running_stats and self.freeze and not replaying:
            self.counter = (self.counter + 1) % (self.freeze_iter * 10)
        return self._conv(x, weight, bias)

    def _statistics_input(self, x: torch.Tensor) -> torch.Tensor:
        """The tensor the patch statistics are taken from (FastDeconv1d: its signal viewed as an image)."""
        return x

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        s += f", block={self.block}, eps={self.eps}, n_iter={self.n_iter}, sampling_stride={self.sampling_stride}"
        if self.freeze:
            s += f", freeze=True, freeze_iter={self.freeze_iter}"
        if self.refresh_every > 1:
            s += f", refresh_every={self.refresh_every}"
        return s


def set_bf16_whitening(model: nn.Module, enabled: bool = True) -> int:
    """Opt-in: under CPU bf16 autocast, every ungrouped FastDeconv of ``model`` that whitens at least
    ``BF16_WHITENING_MIN_FEATURES`` (128) features takes its whitening's heavy products in bfloat16 while training:
    the sampled-patch Gram matrix (float32 sums of bfloat16 partial products, ``reduced_gram``) and its backward, the
    inverse square root's backward products, and the fold ``W·D`` and its backward. The inverse square root itself,
    the mean, the running statistics and the bias stay float32; grouped convs, smaller layers, eval, other devices and
    float32 training are unchanged. Returns the number of layers set (all of the model's FastDeconv layers, which
    decide per forward).

    What it costs in precision, per layer on real activations, is in docs/layers.md (Mixed precision).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, FastDeconv):
            module.bf16_whitening = bool(enabled)
            count += 1
    return count


def set_fast_mode(model: nn.Module, refresh_every: int = 8) -> int:
    """Opt-in fast training: every FastDeconv of ``model`` recomputes its whitening matrix (covariance,
    Newton–Schulz and their backward) only every ``refresh_every``-th training step and reuses it,
    as a constant, in between; the patch mean is still taken from every batch, and the running
    averages are still updated every step. ``refresh_every=1`` restores the exact (default) mode.

    The cost: between refreshes no gradient flows through the whitening matrix, and the matrix
    lags the weights by up to ``refresh_every - 1`` steps. Eval, folding and the state_dict are
    unchanged. Returns the number of layers set.

    The default, 8, is the measured choice (docs/layers.md, Fast mode): ResNet-18 trains at 1.15x a BatchNorm step
    on a 2-core CPU (4: 1.25x, exact: 1.85x) and scores 92.74% on Fashion-MNIST after one epoch against
    exact mode's 92.59%.
    """
    if not isinstance(refresh_every, int) or refresh_every < 1:
        raise ValueError(f"set_fast_mode: refresh_every must be an int >= 1 (1 = exact mode), got {refresh_every!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, FastDeconv):
            module.refresh_every = refresh_every
            module._fast_step = 0
            module._fast_deconv = None
            count += 1
    return count
