"""Helpers shared by the deconvolution layers: argument checks, statistics precision, folding cache."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

_REDUCED = (torch.float16, torch.bfloat16)


def check_hyperparameters(owner: str, *, eps: float, n_iter: int, momentum: float, block: int) -> None:
    """Reject settings that would make the whitening meaningless, naming the layer and the fix."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"{owner}: block must be a positive int (e.g. 64), got {block!r}")
    if not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"{owner}: n_iter must be an int >= 1 (5 is the paper's), got {n_iter!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"{owner}: eps must be a finite number > 0 (e.g. 1e-5), got {eps!r}")
    if not (isinstance(momentum, (int, float)) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{owner}: momentum must lie in [0, 1] (e.g. 0.1), got {momentum!r}")


def resolve_block(block: int, channels: int, groups: int = 1) -> int:
    """The authors' block rule: capped at the channel count, else the gcd; grouped convs whiten per group."""
    if block > channels:
        block = channels
    elif channels % block != 0:
        block = math.gcd(block, channels)
    if groups > 1:
        block = channels // groups
    return block


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Covariance and Newton–Schulz need float32 at least: half precision loses the small eigenvalues."""
    return torch.float32 if dtype in _REDUCED else dtype


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off for the whitening statistics and the weight folding."""
    if torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def check_input_matches(owner: str, x: torch.Tensor, like: torch.Tensor) -> None:
    """Refuse an input the layer's own computation would reject, before the layer changes any state: a training
    forward updates the running statistics before its conv/linear finds the dtype or device wrong, so without
    this a failed step leaves the statistics moved. ``like``: the layer's weight (or a buffer, for layers
    without one). Under torch.autocast the layer's ops cast their inputs themselves: any floating dtype goes."""
    if not x.is_floating_point():
        raise TypeError(f"{owner}: expected a floating-point input, got {x.dtype}; convert it (e.g. x.float() / 255)")
    if x.device != like.device:
        raise RuntimeError(f"{owner}: input is on {x.device} but the layer is on {like.device}; move one of them "
                           f"(model.to({str(x.device)!r}) or x.to({str(like.device)!r}))")
    if x.dtype != like.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{owner}: input is {x.dtype} but the layer's weights are {like.dtype}; convert one of "
                        f"them (x.to({like.dtype}) or model.to({x.dtype})), or run under torch.autocast for mixed "
                        "precision")


def ensure_finite(owner: str, cov: torch.Tensor) -> None:
    """A NaN or Inf batch would poison the running whitening matrix for every later eval: refuse it."""
    if not bool(torch.isfinite(cov).all()):
        raise FloatingPointError(
            f"{owner}: the training batch produced a non-finite covariance (NaN or Inf in the input); "
            "running statistics were left unchanged. Check the data and the learning rate."
        )


def sync_statistics(mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average a layer's batch mean and covariance over all ranks (the deconvolution SyncBatchNorm).

    Differentiable: every rank's gradient flows through the average. A no-op without an
    initialised process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mean, cov
    from torch.distributed.nn.functional import all_reduce

    world = dist.get_world_size()
    return all_reduce(mean) / world, all_reduce(cov) / world


def update_running(buffer: torch.Tensor, value: torch.Tensor, momentum: float) -> None:
    """Exponential moving average in place, exactly as the reference orders it."""
    buffer.mul_(1 - momentum)
    buffer.add_(value.detach().to(buffer.dtype) * momentum)


class FoldCache:
    """Folded (weight, bias) of a layer in eval mode, rebuilt only when a source tensor changed.

    The key holds a weak reference to each source tensor, its storage address and its version counter. The
    reference tells a replaced tensor from its successor: after ``layer.weight = nn.Parameter(...)`` the
    allocator may hand the old storage address to the new tensor, whose version counter starts at 0 again, so
    address and version alone matched and eval returned the old weights' output. In-place edits (optimizer
    steps, ``load_state_dict``, ``with torch.no_grad(): weight.mul_(2)``, updates through ``state_dict()``
    tensors as timm's ModelEma makes them) bump the version; ``.to()`` and ``.data = ...`` change the address.
    An in-place edit *through* ``.data`` (``weight.data.mul_(2)``) is invisible to all three, as it is to
    autograd: the layers drop the cache whenever their mode is set, so call ``model.eval()`` after such an edit.
    The references are weak so that the cache never keeps a replaced tensor alive.
    """

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    @staticmethod
    def make_key(*tensors: torch.Tensor | None) -> tuple:
        # A fold made under torch.inference_mode() is an inference tensor, which a later forward that autograd
        # records (an input that needs a gradient) cannot save: such a fold serves inference mode only.
        return (torch.is_inference_mode_enabled(),) + tuple(
            None if t is None else (weakref.ref(t), t.data_ptr(), t._version, t.dtype, t.device, t.shape)
            for t in tensors
        )

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        # Compared by hand: ``==`` on weak references compares their tensors, elementwise.
        if len(a) != len(b) or a[0] != b[0]:
            return False
        for x, y in zip(a[1:], b[1:], strict=True):
            if x is None or y is None:
                if x is not y:
                    return False
                continue
            target = x[0]()
            if target is None or target is not y[0]() or x[1:] != y[1:]:
                return False
        return True

    def get(self, key: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.value if self.key is not None and self._same(key, self.key) else None

    def put(self, key: tuple, value: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.key, self.value = key, value

    def clear(self) -> None:
        self.key = self.value = None


class CachedEvalFold:
    """Mixin of FastDeconv and Delinear: their eval-mode folded weight and bias, rebuilt only on change."""

    def train(self, mode: bool = True):  # type: ignore[no-untyped-def]
        # model.eval() / .train() is where a cache goes stale unseen (edits through .data): start afresh.
        cache = getattr(self, "_fold_cache", None)
        if cache is not None:
            cache.clear()
        return super().train(mode)  # type: ignore[misc]

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        cache = getattr(self, "_fold_cache", None)
        if cache is not None:
            cache.clear()
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]

    def _eval_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not can_use_fold_cache(self.weight, self.bias):
            return self.folded_weight_bias(self.running_mean, self.running_deconv)
        key = FoldCache.make_key(self.weight, self.bias, self.running_mean, self.running_deconv)
        cached = self._fold_cache.get(key)
        if cached is None:
            cached = self.folded_weight_bias(self.running_mean, self.running_deconv)
            self._fold_cache.put(key, cached)
        return cached


def can_use_fold_cache(*params: torch.Tensor | None) -> bool:
    """Cached folded weights carry no autograd history: use them only where no gradient is wanted."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not any(p is not None and p.requires_grad for p in params)


class _ScaledGram(torch.autograd.Function):
    """``alpha * X^T X + beta * I`` for ``X`` (..., n, d), with a one-product backward.

    Autograd through ``addmm(I, X^T, X)`` takes two (n x d x d) products, one per operand; the
    Gram matrix is symmetric in its two operands, so ``dX = alpha * X (G + G^T)`` needs one.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.alpha = alpha
        d = x.shape[-1]
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        if x.dim() == 2:
            return torch.addmm(eye, x.mT, x, beta=beta, alpha=alpha)
        return torch.baddbmm(eye.expand(x.shape[0], d, d), x.mT, x, beta=beta, alpha=alpha)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return x @ ((grad + grad.mT) * ctx.alpha), None, None


def scaled_gram(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * X^T X + beta * I`` (batched over a leading dim for 3-D ``x``): the regularised covariance."""
    return _ScaledGram.apply(x, alpha, beta)
