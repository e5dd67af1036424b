"""Gradient checkpointing that keeps the deconvolution layers' training state right.

``torch.utils.checkpoint`` runs a segment's forward twice: once for its output, and again during backward to
rebuild the activations it did not keep. A deconvolution layer's training forward has side effects (the running
averages, FastDeconv's freeze counter and fast-mode step) and decisions that depend on that state (frozen or
not, reuse the kept whitening matrix or refresh it). Run twice blindly, a layer would update its running
statistics twice per step and, in fast mode, could rebuild its activations with another matrix than the
forward used, so the gradient would not be the gradient of the forward's output.

``checkpoint`` and ``checkpoint_seq`` here wrap torch's non-reentrant checkpoint with a context that lets the
layers record each decision in the forward and replay it, with no side effect, in the recompute. The zoo's
``set_grad_checkpointing(True)`` uses them. ``torch.utils.checkpoint`` or timm's ``checkpoint_seq`` called
directly on deconvolution layers lack that context: use these instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar, Token
from typing import Any, TypeVar

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["checkpoint", "checkpoint_seq", "is_recomputing", "record_or_replay"]

T = TypeVar("T")


class _Tape:
    """One checkpoint call's record: each layer's decisions, in the order of its calls in the segment."""

    def __init__(self) -> None:
        self.recorded: dict[int, list[Any]] = {}
        self.cursor: dict[int, int] = {}


# (tape, replaying) inside a checkpointed segment's forward (False) or its recompute (True); None outside.
_PHASE: ContextVar[tuple[_Tape, bool] | None] = ContextVar("ndeconv_checkpoint_phase", default=None)


class _Phase:
    """Context of a segment's forward (``replaying=False``) or of its recompute, which torch enters again at
    each backward (``retain_graph=True`` allows several): reusable, unlike a generator context manager.

    The recompute also holds the segment's BatchNorms still (momentum 0, their batch count restored), which
    torch's checkpoint alone would update twice per step too.
    """

    def __init__(self, tape: _Tape, replaying: bool, function: Callable[..., Any]) -> None:
        self.tape, self.replaying = tape, replaying
        self.norms = [m for m in function.modules() if isinstance(m, _BatchNorm)] if (
            replaying and isinstance(function, nn.Module)) else []
        self.saved: list[tuple[Token, list[tuple[float | None, torch.Tensor | None]]]] = []

    def __enter__(self) -> None:
        if self.replaying:
            self.tape.cursor.clear()  # each recompute replays from the segment's first call
        held = []
        for norm in self.norms:
            count = norm.num_batches_tracked
            held.append((norm.momentum, None if count is None else count.clone()))
            norm.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
        self.saved.append((_PHASE.set((self.tape, self.replaying)), held))

    def __exit__(self, *exc: object) -> None:
        token, held = self.saved.pop()
        _PHASE.reset(token)
        for norm, (momentum, count) in zip(self.norms, held, strict=True):
            norm.momentum = momentum
            if count is not None:
                norm.num_batches_tracked.copy_(count)


def _contexts(function: Callable[..., Any]) -> tuple[_Phase, _Phase]:
    tape = _Tape()
    return _Phase(tape, False, function), _Phase(tape, True, function)


def checkpoint(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``torch.utils.checkpoint.checkpoint`` (non-reentrant) for code that runs deconvolution layers.

    Pass an ``nn.Module`` as ``function`` where the segment holds BatchNorms: their running statistics are then
    updated once per step too (a plain function's are not looked for).
    """
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, context_fn=lambda: _contexts(function), **kwargs
    )


def checkpoint_seq(modules: nn.Sequential | Iterable[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Run ``modules`` in order, one checkpoint each (timm's ``checkpoint_seq`` with ``every=1``), except that an
    in-place module (``nn.ReLU(inplace=True)``) joins the segment before it: alone it would overwrite the
    previous segment's output, which that segment's recompute needs (why timm's VGG refuses checkpointing)."""
    segments: list[list[nn.Module]] = []
    for module in modules:
        if segments and getattr(module, "inplace", False) is True:
            segments[-1].append(module)
        else:
            segments.append([module])
    for segment in segments:
        x = checkpoint(segment[0] if len(segment) == 1 else nn.Sequential(*segment), x)
    return x


def is_recomputing() -> bool:
    """True while a checkpoint rebuilds activations in backward: a layer must then change no state."""
    phase = _PHASE.get()
    return phase is not None and phase[1]


def record_or_replay(layer: nn.Module, decide: Callable[[], T]) -> tuple[T, bool]:
    """``(decision, replaying)`` for one training forward of ``layer``.

    Outside a checkpoint: ``decide()``. In a checkpointed forward: ``decide()``, recorded. In its recompute: the
    recorded decision, and ``replaying=True``, where the layer must change no state.
    """
    phase = _PHASE.get()
    if phase is None:
        return decide(), False
    tape, replaying = phase
    key = id(layer)
    if not replaying:
        decision = decide()
        tape.recorded.setdefault(key, []).append(decision)
        return decision, False
    index = tape.cursor.get(key, 0)
    recorded = tape.recorded.get(key, [])
    if index >= len(recorded):
        raise RuntimeError(
            f"{type(layer).__name__}: a checkpoint recomputed more calls of this layer than its forward made; "
            "the checkpointed function must run the same layers in both passes"
        )
    tape.cursor[key] = index + 1
    return recorded[index], True
