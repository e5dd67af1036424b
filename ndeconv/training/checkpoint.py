"""Training checkpoints: everything a killed run needs to continue as if it had never stopped.

One file, ``RUN_DIR/checkpoint.pt``, written atomically (a kill during a save leaves the previous checkpoint)
with ``torch.save`` and read back with ``weights_only=True`` (tensors, numbers, strings and containers only:
loading a checkpoint never runs code). It holds the model (parameters and deconvolution buffers), the
optimizer, the LR scheduler, the AMP grad scaler, the RNG states, every FastDeconv's ``counter`` (a plain
attribute the reference keeps outside the state_dict, which drives ``freeze``) and the loop position.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NdeconvError, UsageError, error_summary
from ..io import atomic_write, load_torch_file
from ..layers.fast_deconv import FastDeconv

__all__ = ["CHECKPOINT_FILE", "TrainState", "load_checkpoint", "restore_checkpoint", "save_checkpoint"]

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT = "ndeconv-train-checkpoint"
VERSION = 1


@dataclass
class TrainState:
    """Where the loop is: completed epochs, steps into the current epoch, and the running sums of its metrics."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    # Training loss and top-1 on a grid of about 50 rows per epoch (rank 0's batches): the within-epoch curve.
    steps: list[dict[str, Any]] = field(default_factory=list)
    window: dict[str, float] = field(default_factory=dict)  # sums since the last steps row (rank 0's)
    # Sums over the current epoch's training batches so far (all ranks' together at a checkpoint).
    meter: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # training time of the current epoch so far

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def deconv_counters(model: nn.Module) -> dict[str, int]:
    return {name: int(m.counter) for name, m in model.named_modules() if isinstance(m, FastDeconv)}


def fast_mode_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each FastDeconv's place in its fast-mode cycle and the whitening matrix it reuses until the next refresh.

    Neither is in the state_dict (fast mode is a training schedule, not weights), but without them a resumed run
    would refresh at its first step where the uninterrupted run reuses: not the same run. Rank 0's, like
    every checkpointed value (with --sync-deconv all ranks keep the same matrix).
    """
    state: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FastDeconv) and m.refresh_every > 1:
            kept = m._fast_deconv
            state[name] = {"step": int(m._fast_step), "deconv": None if kept is None else kept.detach().cpu().clone()}
    return state


def _restore_fast_mode(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    for name, m in model.named_modules():
        if isinstance(m, FastDeconv) and m.refresh_every > 1 and name in state:
            kept = state[name]["deconv"]
            m._fast_step = int(state[name]["step"])
            m._fast_deconv = None if kept is None else kept.to(m.running_deconv.device)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    # random.setstate wants the nested tuples it produced; a round trip may give lists.
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(
    run_dir: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    state: TrainState,
    config: dict[str, Any],
) -> Path:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "state": state.to_dict(),
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "deconv_counters": deconv_counters(model),
        "fast_mode": fast_mode_state(model),
        "rng": _rng_state(),
    }

    def write(tmp: Path) -> None:
        # Through a Python file object: on a full disk torch's own file writer fails with only "unexpected pos"
        # (no errno), while a Python file raises OSError(ENOSPC), kept in the exception chain.
        with open(tmp, "wb") as f:
            torch.save(payload, f)

    return atomic_write(Path(run_dir) / CHECKPOINT_FILE, write)


def load_checkpoint(run_dir: Path) -> dict[str, Any]:
    """Read ``RUN_DIR/checkpoint.pt`` safely; any problem is one UsageError naming the file."""
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise UsageError(f"--resume {run_dir}: no {CHECKPOINT_FILE} there; it is not a run directory of "
                         "`ndeconv train`, or the run was killed before its first checkpoint (start it again)")
    try:
        payload = load_torch_file(path)  # weights-only, and checked against a SHA256SUMS beside it if any
    except NdeconvError as err:
        raise UsageError(f"--resume {run_dir}: cannot read it: {err}; it is corrupt or not a checkpoint of "
                         "`ndeconv train`") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise UsageError(f"--resume {run_dir}: {path} is not a checkpoint of `ndeconv train`")
    if payload.get("version") != VERSION:
        raise UsageError(f"--resume {run_dir}: checkpoint version {payload.get('version')} is not supported "
                         f"(this ndeconv reads version {VERSION})")
    return payload


def restore_checkpoint(
    payload: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
) -> TrainState:
    """Load a checkpoint into freshly built objects; a model that does not fit is a UsageError."""
    try:
        model.load_state_dict(payload["model"], strict=True)
    except (RuntimeError, KeyError, TypeError) as err:
        raise UsageError(f"the checkpoint does not fit the model the run's settings build ({error_summary(err)})"
                         ) from err
    try:
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler") is not None:
            scaler.load_state_dict(payload["scaler"])
        counters = payload.get("deconv_counters", {})
        for name, module in model.named_modules():
            if isinstance(module, FastDeconv) and name in counters:
                module.counter = int(counters[name])
        _restore_fast_mode(model, payload.get("fast_mode") or {})  # absent in checkpoints from before it was saved
        _set_rng_state(payload["rng"])
        return TrainState(**payload["state"])
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as err:
        # A file that unpickles as a checkpoint of ours but whose training state is damaged or from elsewhere.
        raise UsageError(f"the checkpoint's training state cannot be restored ({type(err).__name__}: "
                         f"{error_summary(err)}); it is damaged: start the run again with --force") from err
