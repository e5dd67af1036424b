"""One process or many: the device, the process group under torchrun, and agreement between ranks."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import NdeconvError, UsageError

__all__ = ["DistContext", "setup"]

T = TypeVar("T")


@dataclass
class DistContext:
    rank: int
    world: int
    device: torch.device
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only; every rank gets its result, or raises the same error when it failed.

        Used for what only rank 0 may do (check and create the run directory), so that a refusal stops all
        ranks with the same one-line message instead of leaving the others waiting.
        """
        result: Any = None
        error: tuple[str, str] | None = None
        failure: Exception | None = None
        if self.is_main:
            try:
                result = fn()
            except NdeconvError as err:
                error = (type(err).__name__, str(err))
            except Exception as err:  # noqa: BLE001 - e.g. a full disk: the other ranks must not wait forever
                failure = err
                error = ("NdeconvError", f"rank 0 failed: {type(err).__name__}: {err}")
        if self.distributed:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if failure is not None:
            raise failure  # rank 0 keeps its own traceback
        if error is not None:
            raise (UsageError if error[0] == "UsageError" else NdeconvError)(error[1])
        return result

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (each rank's running whitening saw only its own batches)."""
        if self.distributed:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def close(self) -> None:
        if self.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError(f"--device {name!r} is not a device (use cpu, cuda, cuda:N or auto)") from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup(device_name: str = "auto") -> DistContext:
    """Join torchrun's process group when its environment is set (gloo on CPU, nccl on CUDA), else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_name, local_rank)
    if world <= 1:
        return DistContext(0, 1, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        initialized_here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), device, initialized_here)
