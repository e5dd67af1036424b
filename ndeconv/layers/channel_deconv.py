"""ChannelDeconv: channel-wise whitening of activations (no spatial patches).

The first ``(C // block) * block`` channels are viewed, as the reference does, as
``block`` features: feature ``i`` holds channels ``i*k .. i*k+k-1`` (``k = C // block``)
over the whole batch, so the whitening mixes channels ``r, k+r, 2k+r, ...``. The
remaining ``C mod block`` channels are standardised together with one mean and variance.
Unlike FastDeconv this layer transforms activations, so in eval it is an affine map that
folds into a 1x1 convolution, or a Linear for (N, C) input (see :meth:`ChannelDeconv.fuse`).

The block size alone does not say how many channels the layer sees (the remainder channels have no buffer
of their own), so the layer takes its channel count and input rank as constructor arguments, kept as plain
attributes: the reference's state_dict layout has no room for them and stays unchanged. A layer built
without them (the reference's own constructor call) accepts any channel count, as the reference does, and
folds for the last input it saw.
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
        num_channels: int | None = None,
        input_dim: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """The reference's arguments, plus ``num_channels`` (C of the (N, C, H, W) or (N, C) input) and
        ``input_dim`` (4 or 2: which of those inputs), which let :meth:`fuse` build the plain layer without
        seeing an input; given, the forward refuses other inputs. None: any input, as in the reference."""
        super().__init__()
        owner = f"ChannelDeconv(block={block})"
        check_hyperparameters(owner, eps=eps, n_iter=n_iter, momentum=momentum, block=block)
        if not isinstance(sampling_stride, int) or sampling_stride < 1:
            raise ValueError(f"{owner}: sampling_stride must be an int >= 1, got {sampling_stride!r}")
        # Fewer channels than block builds, as the authors' layer does (their checkpoints have such layouts), and
        # fails at the forward and at fuse() with what to change.
        if num_channels is not None and (not isinstance(num_channels, int) or num_channels < 1):
            raise ValueError(f"{owner}: num_channels must be an int >= 1, got {num_channels!r}")
        if input_dim not in (None, 2, 4):
            raise ValueError(f"{owner}: input_dim must be 4 (N, C, H, W), 2 (N, C) or None (either), got {input_dim!r}")
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
        # What the layer was built for (plain attributes: the reference's state_dict has no room for them).
        self.num_channels = num_channels
        self.input_dim = input_dim
        # (channels, rank) of the last input: what fuse() folds for when the layer was built without them.
        self.last_input: tuple[int, int] | None = None

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
        # A layer built for C channels folds into a C x C map: another input would run here but not folded.
        if self.num_channels is not None and channels != self.num_channels:
            raise ValueError(f"{self._owner()}: input has {channels} channels but the layer was built for "
                             f"num_channels={self.num_channels}; build it with num_channels={channels} or fix the "
                             "input")
        if self.input_dim is not None and len(in_shape) != self.input_dim:
            raise ValueError(f"{self._owner()}: expected a {self.input_dim}-D input (the layer was built with "
                             f"input_dim={self.input_dim}), got shape {tuple(in_shape)}")
        self.last_input = (channels, len(in_shape))
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

    def affine(self, num_channels: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval map as ``y = W x + b`` over channels: ``W`` (C, C), ``b`` (C,), in the buffers' dtype;
        ``num_channels`` defaults to the layer's own (see :meth:`fuse`)."""
        num_channels = num_channels or self.num_channels or (self.last_input or (None,))[0]
        if num_channels is None:
            raise ValueError(f"{self._owner()}.affine: the channel count is unknown; pass num_channels")
        return self._affine_of(num_channels, self.running_mean1, self.running_deconv, self.running_mean2,
                               self.running_var)

    def _affine_of(
        self, num_channels: int, running_mean1: torch.Tensor, running_deconv: torch.Tensor,
        running_mean2: torch.Tensor, running_var: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.block
        k = num_channels // b
        c = k * b
        if c == 0:
            raise ValueError(f"{self._owner()}: cannot fold for {num_channels} channels, fewer than block={b}")
        deconv = running_deconv
        eye_k = torch.eye(k, dtype=deconv.dtype, device=deconv.device)
        weight = torch.zeros(num_channels, num_channels, dtype=deconv.dtype, device=deconv.device)
        # channel i*k + r takes sum_j D[i, j] * (x[j*k + r] - mu[j])
        weight[:c, :c] = torch.kron(deconv, eye_k)
        bias = torch.zeros(num_channels, dtype=deconv.dtype, device=deconv.device)
        bias[:c] = -(deconv @ running_mean1).repeat_interleave(k)
        if c != num_channels:
            scale = 1.0 / (running_var + self.eps).sqrt().reshape(())
            weight[c:, c:] = torch.eye(num_channels - c, dtype=deconv.dtype, device=deconv.device) * scale
            bias[c:] = -running_mean2.reshape(()) * scale
        return weight, bias

    def fuse(self, num_channels: int | None = None, input_dim: int | None = None) -> nn.Conv2d | nn.Linear:
        """The layer's eval map as a plain module: a 1x1 ``nn.Conv2d`` for (N, C, H, W) input, an ``nn.Linear``
        for (N, C) input (used by ``timm``'s ``reparameterize_model``, which calls it bare).

        The channel count and input rank are, in this order: the arguments, what the layer was built with, what
        its last input had; the rank defaults to 4. The map is composed in float64 and rounded once to the
        buffers' dtype."""
        seen_channels, seen_dim = self.last_input or (None, None)
        num_channels = num_channels or self.num_channels or seen_channels
        input_dim = input_dim or self.input_dim or seen_dim or 4
        if num_channels is None:
            raise ValueError(f"{self._owner()}.fuse: the channel count is unknown (the layer was built without "
                             "num_channels and has seen no input); pass num_channels, or build the layer with it")
        if input_dim not in (2, 4):
            raise ValueError(f"{self._owner()}.fuse: input_dim must be 2 (N, C) or 4 (N, C, H, W), got {input_dim}")
        dtype = self.running_deconv.dtype
        # float64 where the device has it (MPS does not): the map's bias is a product, rounded once at the end.
        work = torch.float32 if self.running_deconv.device.type == "mps" else torch.float64
        with torch.no_grad():
            exact = (self.running_mean1, self.running_deconv, self.running_mean2, self.running_var)
            weight, bias = self._affine_of(num_channels, *(t.to(work) for t in exact))
            weight, bias = weight.to(dtype), bias.to(dtype)
            factory = {"device": weight.device, "dtype": dtype}
            if input_dim == 2:
                plain: nn.Conv2d | nn.Linear = nn.Linear(num_channels, num_channels, bias=True, **factory)
                plain.weight.copy_(weight)
            else:
                plain = nn.Conv2d(num_channels, num_channels, 1, bias=True, **factory)
                plain.weight.copy_(weight.view(num_channels, num_channels, 1, 1))
            plain.bias.copy_(bias)
        return plain

    def extra_repr(self) -> str:
        s = f"block={self.block}, eps={self.eps}, n_iter={self.n_iter}, sampling_stride={self.sampling_stride}"
        if self.num_channels is not None:
            s += f", num_channels={self.num_channels}"
        if self.input_dim is not None:
            s += f", input_dim={self.input_dim}"
        return s
