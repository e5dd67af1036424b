"""ChannelDeconv: channel-wise whitening of activations (no spatial patches).

The first ``(C // block) * block`` channels are viewed, as the reference does, as
``block`` features: feature ``i`` holds channels ``i*k .. i*k+k-1`` (``k = C // block``)
over the whole batch, so the whitening mixes channels ``r, k+r, 2k+r, ...``. The
remaining ``C mod block`` channels are standardised together with one mean and variance.
Unlike FastDeconv this layer transforms activations, so in eval it is an affine map that
folds into a 1x1 convolution (see :meth:`ChannelDeconv.fuse`).
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_hyperparameters, ensure_finite, full_precision, stats_dtype, update_running
from .grad_checkpoint import is_recomputing
from .isqrt import isqrt_newton_schulz

__all__ = ["ChannelDeconv"]


class ChannelDeconv(nn.Module):
    """Channel whitening; drop-in for the reference's ``ChannelDeconv`` (input (N, C, H, W) or (N, C))."""

    def __init__(
        self,
        block: int,
        eps: float = 1e-2,
        n_iter: int = 5,
        momentum: float = 0.1,
        sampling_stride: int = 3,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_hyperparameters(f"ChannelDeconv(block={block})", eps=eps, n_iter=n_iter, momentum=momentum, block=block)
        if not isinstance(sampling_stride, int) or sampling_stride < 1:
            raise ValueError(
                f"ChannelDeconv(block={block}): sampling_stride must be an int >= 1, got {sampling_stride!r}"
            )
        factory = {"device": device, "dtype": dtype}
        self.block = block
        self.eps = eps
        self.n_iter = n_iter
        self.momentum = momentum
        self.sampling_stride = sampling_stride
        self.register_buffer("running_mean1", torch.zeros(block, 1, **factory))
        self.register_buffer("running_deconv", torch.eye(block, **factory))
        self.register_buffer("running_mean2", torch.zeros(1, 1, **factory))
        self.register_buffer("running_var", torch.ones(1, 1, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        # Channels of the last input: the block size alone does not say how many remainder channels follow,
        # and fuse() needs the full count (a plain attribute, as the reference's state_dict has no room for it).
        self.num_channels: int | None = None
        self.input_dim: int | None = None  # 2 for (N, C) input, 4 for (N, C, H, W): what fuse() must accept

    def _owner(self) -> str:
        return f"ChannelDeconv(block={self.block})"

    def _sample(self, t: torch.Tensor, height: int, width: int) -> torch.Tensor:
        s = self.sampling_stride
        return t[:, :: s * s] if s > 1 and height >= s and width >= s else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_shape = x.shape
        if x.dim() == 2:
            x = x.view(x.shape[0], x.shape[1], 1, 1)
        elif x.dim() != 4:
            raise ValueError(f"{self._owner()}: expected input (N, C, H, W) or (N, C), got shape {tuple(in_shape)}")
        n, channels, height, width = x.shape
        b = self.block
        c = (channels // b) * b
        if c == 0:
            raise ValueError(
                f"{self._owner()}: input has {channels} channels, fewer than block={b}; use block <= {channels}"
            )
        # Any floating dtype is whitened in float32 or wider (and returned in its own): only the kind and the
        # device must fit, checked before the running statistics move.
        if not x.is_floating_point():
            raise TypeError(f"{self._owner()}: expected a floating-point input, got {x.dtype}")
        if x.device != self.running_deconv.device:
            raise RuntimeError(f"{self._owner()}: input is on {x.device} but the layer is on "
                               f"{self.running_deconv.device}; move one of them")
        if self.training and n * height * width == 0:
            raise ValueError(f"{self._owner()}: a training batch of shape {tuple(in_shape)} has no samples to take "
                             "whitening statistics from; skip empty batches")
        self.num_channels = channels
        self.input_dim = len(in_shape)
        first = self.num_batches_tracked.item() == 0 if self.training else False

        with full_precision(x.device):
            work = x.to(stats_dtype(x.dtype))
            x1 = work[:, :c].permute(1, 0, 2, 3).reshape(b, -1)
            if self.training:
                x1_s = self._sample(x1, height, width)
                mean1 = x1_s.mean(-1, keepdim=True)
                # The reference whitens with the uncentred second moment of the sample.
                cov = torch.addmm(torch.eye(b, dtype=x1.dtype, device=x1.device), x1_s, x1_s.t(),
                                  beta=self.eps, alpha=1.0 / x1_s.shape[1])
                ensure_finite(self._owner(), cov)
                deconv = isqrt_newton_schulz(cov, self.n_iter)
            else:
                # Buffers may be float16/bfloat16 (model.half()); the statistics work in float32 or wider.
                mean1, deconv = self.running_mean1.to(work.dtype), self.running_deconv.to(work.dtype)
            out = (deconv @ (x1 - mean1)).view(c, n, height, width).permute(1, 0, 2, 3)

            if c != channels:
                rest = work[:, c:]
                if self.training:
                    rest_s = self._sample(rest.reshape(n, -1), height, width)
                    mean2, var = rest_s.mean(), rest_s.var()
                    ensure_finite(self._owner(), var)
                else:
                    mean2, var = self.running_mean2.to(work.dtype), self.running_var.to(work.dtype)
                out = torch.cat([out, (rest - mean2) / (var + self.eps).sqrt()], dim=1)

            if self.training and not is_recomputing():  # a checkpoint's recompute must not count twice
                with torch.no_grad():
                    if first:  # the reference starts its running statistics from the first batch
                        self.running_mean1.copy_(mean1)
                        self.running_deconv.copy_(deconv)
                        if c != channels:
                            self.running_mean2.copy_(mean2)
                            self.running_var.copy_(var)
                    update_running(self.running_mean1, mean1, self.momentum)
                    update_running(self.running_deconv, deconv, self.momentum)
                    if c != channels:
                        update_running(self.running_mean2, mean2, self.momentum)
                        update_running(self.running_var, var, self.momentum)
                    self.num_batches_tracked.add_(1)

        out = out.to(x.dtype)
        return out.reshape(in_shape) if len(in_shape) == 2 else out

    def affine(self, num_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval map as ``y = W x + b`` over channels: ``W`` (C, C), ``b`` (C,)."""
        b = self.block
        k = num_channels // b
        c = k * b
        if c == 0:
            raise ValueError(f"{self._owner()}: cannot fold for {num_channels} channels, fewer than block={b}")
        deconv = self.running_deconv
        eye_k = torch.eye(k, dtype=deconv.dtype, device=deconv.device)
        weight = torch.zeros(num_channels, num_channels, dtype=deconv.dtype, device=deconv.device)
        # channel i*k + r takes sum_j D[i, j] * (x[j*k + r] - mu[j])
        weight[:c, :c] = torch.kron(deconv, eye_k)
        bias = torch.zeros(num_channels, dtype=deconv.dtype, device=deconv.device)
        bias[:c] = -(deconv @ self.running_mean1).repeat_interleave(k)
        if c != num_channels:
            scale = 1.0 / (self.running_var + self.eps).sqrt().reshape(())
            weight[c:, c:] = torch.eye(num_channels - c, dtype=deconv.dtype, device=deconv.device) * scale
            bias[c:] = -self.running_mean2.reshape(()) * scale
        return weight, bias

    def fuse(self, num_channels: int | None = None, input_dim: int | None = None) -> nn.Conv2d | nn.Linear:
        """The layer's eval map as a plain module: a 1x1 ``nn.Conv2d`` for (N, C, H, W) input, an ``nn.Linear``
        for (N, C) input. Both default to what the last input had (the layer accepts either, and the block size
        alone does not say the channel count), so ``timm.models.reparameterize_model`` can call it bare after
        one forward pass."""
        num_channels = num_channels or self.num_channels
        input_dim = input_dim or self.input_dim or 4
        if num_channels is None:
            raise ValueError(f"{self._owner()}.fuse: the channel count is unknown (it is not in the state_dict); "
                             "pass num_channels or run one forward pass first")
        if input_dim not in (2, 4):
            raise ValueError(f"{self._owner()}.fuse: input_dim must be 2 (N, C) or 4 (N, C, H, W), got {input_dim}")
        with torch.no_grad():
            weight, bias = self.affine(num_channels)
            factory = {"device": weight.device, "dtype": weight.dtype}
            if input_dim == 2:
                plain: nn.Conv2d | nn.Linear = nn.Linear(num_channels, num_channels, bias=True, **factory)
                plain.weight.copy_(weight)
            else:
                plain = nn.Conv2d(num_channels, num_channels, 1, bias=True, **factory)
                plain.weight.copy_(weight.view(num_channels, num_channels, 1, 1))
            plain.bias.copy_(bias)
        return plain

    def extra_repr(self) -> str:
        return f"block={self.block}, eps={self.eps}, n_iter={self.n_iter}, sampling_stride={self.sampling_stride}"
