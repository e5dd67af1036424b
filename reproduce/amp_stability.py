"""Stability of deconvolution training under mixed precision: N steps of every zoo network on Fashion-MNIST.

Each network (deconvolution form, native 1-channel stem, seed 0) trains ``--steps`` steps of the authors'
recipe (SGD lr 0.1, momentum 0.9, weight decay 1e-3, batch ``--batch``, the training images in order, random
crop + flip as ``ndeconv train``) with its forward under ``torch.autocast`` in ``--amp``. Recorded per network:
the first step whose loss, or any running statistic afterwards, is not finite (``null``: none), the last loss,
the largest magnitude of any running statistic, and the wall time. A deconvolution layer that meets a non-finite
covariance refuses the batch (FloatingPointError): that counts as the step that failed.

    python reproduce/amp_stability.py --steps 200 --batch 128     # -> reproduce/results/amp_stability.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import timm  # noqa: E402

import ndeconv  # noqa: E402,F401  (registers the zoo)
from benchmarks._models import ZOO_ARCHS  # noqa: E402
from ndeconv.datasets import get_spec, load_split  # noqa: E402
from ndeconv.training.data import Preprocess, default_crop_padding  # noqa: E402

AMP = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _statistics_finite(model: torch.nn.Module) -> tuple[bool, float]:
    """Whether every floating buffer (running means, whitening matrices, BatchNorm statistics) is finite, and
    the largest magnitude among them."""
    largest, finite = 0.0, True
    for buf in model.buffers():
        if buf.is_floating_point() and buf.numel():
            finite = finite and bool(torch.isfinite(buf).all())
            largest = max(largest, float(buf.abs().max()))
    return finite, largest


def stability(arch: str, steps: int, batch: int, amp: torch.dtype, device: str = "cpu",
              data_dir: str | None = None) -> dict:
    """Train ``arch`` for ``steps`` steps under autocast in ``amp``; the record described in the module docstring."""
    spec = get_spec("fashion_mnist")
    source = load_split("fashion_mnist", "train", data_dir)
    preprocess = Preprocess(spec.mean, spec.std, default_crop_padding(spec, 32))
    torch.manual_seed(0)
    model = timm.create_model(arch, in_chans=1, num_classes=10).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    record: dict = {"arch": arch, "steps": steps, "batch": batch, "amp": str(amp).removeprefix("torch."),
                    "failed_at_step": None, "failure": None}
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(source)
        x = preprocess(source.batch(idx), Preprocess.generator(0, 0, step, 0)).to(device)
        y = source.labels[idx].to(device)
        try:
            with torch.autocast(torch.device(device).type, dtype=amp):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
        except FloatingPointError as err:  # a layer refused a non-finite covariance
            record.update(failed_at_step=step + 1, failure=str(err).split(":")[0] + ": non-finite covariance")
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = float(loss.detach())
        finite, _ = _statistics_finite(model)
        if not math.isfinite(loss_value) or not finite:
            record.update(failed_at_step=step + 1, failure="non-finite loss" if finite else "non-finite statistic")
            break
    _, largest = _statistics_finite(model)
    record.update(last_loss=loss_value if math.isfinite(loss_value) else None, max_abs_statistic=largest,
                  seconds=round(time.perf_counter() - start, 1))
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ZOO_ARCHS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--amp", choices=sorted(AMP), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "reproduce" / "results" / "amp_stability.json")
    args = p.parse_args(argv)
    from benchmarks._common import command_line, machine_info
    from ndeconv.io import save_json_atomic

    rows = []
    for arch in args.arch:
        rows.append(stability(arch, args.steps, args.batch, AMP[args.amp], args.device))
        print(json.dumps(rows[-1]), flush=True)
        save_json_atomic({"command": command_line(), "machine": machine_info(), "rows": rows}, args.out)
    return 0 if all(r["failed_at_step"] is None for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
