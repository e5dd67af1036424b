"""Delinear: a linear layer whose input features are whitened (network deconvolution for the head).

The ``in_features`` inputs are split into consecutive blocks of ``block`` features that
share one mean and one whitening matrix; as in FastDeconv the whitening is folded into
the layer's weight and bias instead of being applied to the activations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._common import (
    CachedEvalFold,
    FoldCache,
    check_hyperparameters,
    check_input_matches,
    ensure_finite,
    full_precision,
    resolve_block,
    scaled_gram,
    stats_dtype,
    sync_statistics,
    update_running,
)
from .grad_checkpoint import is_recomputing
from .isqrt import isqrt_newton_schulz

__all__ = ["Delinear"]


class Delinear(CachedEvalFold, nn.Module):
    """Linear with implicit deconvolution; drop-in for the reference's ``Delinear``."""

    __constants__ = ["in_features", "out_features", "block"]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        eps: float = 1e-5,
        n_iter: int = 5,
        momentum: float = 0.1,
        block: int = 512,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_hyperparameters(f"Delinear({in_features}, {out_features})", eps=eps, n_iter=n_iter,
                              momentum=momentum, block=block)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self.block = resolve_block(block, in_features)
        self.eps = eps
        self.n_iter = n_iter
        self.momentum = momentum
        self.register_buffer("running_mean", torch.zeros(self.block, **factory))
        self.register_buffer("running_deconv", torch.eye(self.block, **factory))
        self.sync_stats = False  # average mean and covariance across ranks (see ndeconv.sync_deconv)
        self._fold_cache = FoldCache()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, as the reference uses."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def _owner(self) -> str:
        return f"Delinear({self.in_features}, {self.out_features})"

    def _batch_statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.to(stats_dtype(x.dtype)).reshape(-1, self.block)
        mean = rows.mean(0)
        centered = rows - mean.unsqueeze(0)
        cov = scaled_gram(centered, 1.0 / centered.shape[0], self.eps)
        ensure_finite(self._owner(), cov)
        if self.sync_stats:
            mean, cov = sync_statistics(mean, cov)
        return mean, isqrt_newton_schulz(cov, self.n_iter)

    def folded_weight_bias(self, mean: torch.Tensor, deconv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``w D`` and bias ``b - (w D) mu`` of the plain linear equivalent to this layer."""
        w = self.weight.to(deconv.dtype).reshape(-1, self.block) @ deconv
        shift = (w @ mean.unsqueeze(1)).view(self.out_features, -1).sum(1)
        bias = -shift if self.bias is None else self.bias.to(shift.dtype) - shift
        return w.view(self.weight.shape).to(self.weight.dtype), bias.to(self.weight.dtype)

    def fuse(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's eval output."""
        with torch.no_grad(), full_precision(self.weight.device):
            w, b = self.folded_weight_bias(self.running_mean, self.running_deconv)
        linear = nn.Linear(self.in_features, self.out_features, bias=True, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            linear.weight.copy_(w)
            linear.bias.copy_(b)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self._owner()}: expected input (..., {self.in_features}), got shape {tuple(x.shape)}; "
                f"flatten the features or build the layer with in_features={x.shape[-1] if x.dim() else '?'}"
            )
        check_input_matches(self._owner(), x, self.weight)
        if self.training and x.numel() == 0:
            raise ValueError(f"{self._owner()}: a training batch of 0 samples gives no whitening statistics; skip "
                             "empty batches")
        with full_precision(x.device):
            if self.training:
                mean, deconv = self._batch_statistics(x)
                if not is_recomputing():  # a checkpoint's recompute (ndeconv.checkpoint) must not count twice
                    with torch.no_grad():
                        update_running(self.running_mean, mean, self.momentum)
                        update_running(self.running_deconv, deconv, self.momentum)
                weight, bias = self.folded_weight_bias(mean, deconv)
            else:
                weight, bias = self._eval_weight_bias()
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block={self.block}, eps={self.eps}, n_iter={self.n_iter}"
        )
