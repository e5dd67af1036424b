"""What a run reports: top-k counts, metrics.jsonl, curves.png, TensorBoard and the progress display."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import torch

from ..io import atomic_write, finite_json

__all__ = ["Progress", "TensorBoard", "plot_curves", "topk_correct", "write_metrics"]


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[int]:
    """How many targets are among the top-k logits, for each k (k capped at the number of classes)."""
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return [int(hits[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


def write_metrics(history: list[dict[str, Any]], path: Path) -> None:
    """Rewrite metrics.jsonl from the checkpointed history, so a resumed run never duplicates an epoch.

    Strict JSON: a non-finite value (a test loss of NaN from weights that blew up in the last step) is null."""
    text = "".join(json.dumps(finite_json(row), allow_nan=False) + "\n" for row in history)
    atomic_write(path, lambda tmp: tmp.write_text(text))


def plot_curves(history: list[dict[str, Any]], path: Path, title: str,
                steps: list[dict[str, Any]] | None = None) -> None:
    """Loss and accuracy versus epoch: the training batches' running values every few steps (``steps``, so a
    one-epoch run still shows a curve) and each epoch's train and test points (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        at = [row["epoch"] for row in steps]
        ax_loss.plot(at, [row["train_loss"] for row in steps], "-", color="tab:blue", alpha=0.45, linewidth=1,
                     label="train (batches)")
        ax_acc.plot(at, [row["train_top1"] for row in steps], "-", color="tab:blue", alpha=0.45, linewidth=1,
                    label="train (batches)")
    epochs = [row["epoch"] for row in history]
    for split, style in (("train", "b-o"), ("test", "r-o")):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], style, label=f"{split} (epoch)",
                     markersize=4)
        ax_acc.plot(epochs, [row[f"{split}_top1"] for row in history], style, label=f"{split} (epoch)",
                    markersize=4)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="Accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


class TensorBoard:
    """TensorBoard events when the ``tensorboard`` package is installed; silently nothing otherwise."""

    def __init__(self, log_dir: Path, enabled: bool = True):
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                return
            self.writer = SummaryWriter(str(log_dir))

    @property
    def active(self) -> bool:
        return self.writer is not None

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar (loss, accuracy, images/s, time, ETA) on a terminal; log lines otherwise (CI logs,
    redirected output): the first steps this process runs (``FIRST_STEPS``), so a slow run shows its pace within
    minutes, then every ``log_every`` steps. Silent on ranks other than 0."""

    FIRST_STEPS = (1, 2, 5, 10)

    def __init__(self, enabled: bool, log_every: int, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.log_every = max(log_every, 1)
        self._last_draw = 0.0
        self._start = time.monotonic()
        self._steps = 0  # steps this process has run (a resumed run logs its own first steps again)

    def log(self, message: str) -> None:
        if self.enabled:
            if self.tty:
                self.stream.write("\r\033[K")
            print(message, file=self.stream, flush=True)

    def step(self, epoch: int, epochs: int, step: int, steps: int, global_step: int, loss: float, top1: float,
             images_per_s: float, eta_s: float) -> None:
        if not self.enabled:
            return
        self._steps += 1
        text = (f"epoch {epoch}/{epochs} step {step}/{steps} loss {loss:.4f} top1 {top1:.2f}% "
                f"{images_per_s:.0f} img/s time {_duration(time.monotonic() - self._start)} ETA {_duration(eta_s)}")
        if self.tty:
            now = time.monotonic()
            if now - self._last_draw > 0.2 or step == steps:
                filled = int(24 * step / max(steps, 1))
                self.stream.write(f"\r\033[K[{'#' * filled}{'.' * (24 - filled)}] {text}")
                self.stream.flush()
                self._last_draw = now
        elif self._steps in self.FIRST_STEPS or global_step % self.log_every == 0:
            print(f"step {global_step}: {text}", file=self.stream, flush=True)
