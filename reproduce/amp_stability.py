"""Stability of deconvolution training under mixed precision: N steps of every zoo network on Fashion-MNIST.

Each network (deconvolution form, native 1-channel stem, seed 0) trains ``--steps`` steps of the authors'
recipe (SGD lr 0.1, momentum 0.9, weight decay 1e-3, batch ``--batch``, the training images in order, random
crop + flip as ``ndeconv train``) with its forward under ``torch.autocast`` in ``--amp``. Recorded per network:
the first step whose loss, or any running statistic afterwards, is not finite (``null``: none), the last loss,
the largest magnitude of any running statistic, and the wall time. A deconvolution layer that meets a non-finite
covariance refuses the batch (FloatingPointError): that counts as the step that failed.
``--bf16-whitening`` also takes the whitening's heavy products in bf16 (``ndeconv.set_bf16_whitening``),
``--channels-last`` trains in channels-last memory format, as ``ndeconv train`` does with those flags.

    python reproduce/amp_stability.py --steps 200 --batch 128     # -> reproduce/results/amp_stability.json
    python reproduce/amp_stability.py --steps 200 --batch 128 --channels-last --bf16-whitening \
        --out reproduce/results/amp_stability_bf16_whitening.json --resume --block amp-stability

Each network's record is written as soon as it is measured; ``--resume`` keeps the records already in ``--out``
that were made with the same settings and measures only the networks they lack (a sweep of the ten takes hours).
``--block NAME`` also writes the table into the docs block of that name (docs/layers.md), at the start and after
each network.
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
from benchmarks._common import cpu_name  # noqa: E402
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
              data_dir: str | None = None, bf16_whitening: bool = False, channels_last: bool = False) -> dict:
    """Train ``arch`` for ``steps`` steps under autocast in ``amp``; the record described in the module docstring."""
    spec = get_spec("fashion_mnist")
    source = load_split("fashion_mnist", "train", data_dir)
    preprocess = Preprocess(spec.mean, spec.std, default_crop_padding(spec, 32))
    torch.manual_seed(0)
    model = timm.create_model(arch, in_chans=1, num_classes=10).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if bf16_whitening:
        ndeconv.set_bf16_whitening(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    record: dict = {"arch": arch, "steps": steps, "batch": batch, "amp": str(amp).removeprefix("torch."),
                    "failed_at_step": None, "failure": None}
    start, loss_value = time.perf_counter(), float("nan")
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(source)
        x = preprocess(source.batch(idx), Preprocess.generator(0, 0, step, 0)).to(device, memory_format=memory_format)
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


def markdown(rows: list[dict], archs: list[str]) -> str:
    """One line per network of ``archs``, the zoo's networks in the zoo's order whatever order they were measured in:
    the first failing step (or none), the last loss, the largest running statistic, the wall time and the CPU; a
    network not measured yet is pending."""
    lines = ["| network | steps | first non-finite step | last loss | largest running statistic | wall time | CPU |",
             "|---|---:|---|---:|---:|---:|---|"]
    by_arch = {r["arch"]: r for r in rows}
    for arch in sorted(archs, key=lambda a: ZOO_ARCHS.index(a) if a in ZOO_ARCHS else len(ZOO_ARCHS)):
        r = by_arch.get(arch)
        if r is None:
            lines.append(f"| {arch} | pending | – | – | – | – | – |")
            continue
        failed = "none" if r["failed_at_step"] is None else f"{r['failed_at_step']} ({r['failure']})"
        loss = "–" if r.get("last_loss") is None else f"{r['last_loss']:.3f}"
        lines.append(f"| {arch} | {r['steps']} | {failed} | {loss} | {r['max_abs_statistic']:.3g} | "
                     f"{r['seconds'] / 60:.0f} min | {cpu_name(r['machine']) if r.get('machine') else '–'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=list(ZOO_ARCHS))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--amp", choices=sorted(AMP), default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16-whitening", action="store_true", help="the whitening's heavy products in bf16 too")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--out", type=Path, default=ROOT / "reproduce" / "results" / "amp_stability.json")
    p.add_argument("--resume", action="store_true", help="keep --out's records made with the same settings; measure "
                   "only the networks they lack")
    p.add_argument("--block", help="also write the table into the README/docs block of this name after each network")
    p.add_argument("--readme", type=Path, default=None, help="the file holding --block (default: found by marker)")
    args = p.parse_args(argv)
    from benchmarks._common import command_line, machine_info
    from ndeconv.io import save_json_atomic

    sys.path.insert(0, str(ROOT / "reproduce"))
    from readme_block import write_readme_block

    settings = {"steps": args.steps, "batch": args.batch, "amp": args.amp, "device": args.device,
                "bf16_whitening": args.bf16_whitening, "channels_last": args.channels_last}
    rows = resumed_rows(args.out, settings, args.arch) if args.resume else []
    machines = [r.pop("machine", None) for r in rows]
    done = {r["arch"] for r in rows}
    if args.block:  # the kept records at once, the rest pending
        write_readme_block(args.block, markdown([{**r, "machine": m} for r, m in zip(rows, machines, strict=True)],
                                                args.arch), args.readme)
    for arch in args.arch:
        if arch in done:
            print(f"{arch}: kept from {args.out}", flush=True)
            continue
        rows.append(stability(arch, args.steps, args.batch, AMP[args.amp], args.device,
                              bf16_whitening=args.bf16_whitening, channels_last=args.channels_last))
        machines.append(machine_info()["cpu"])
        print(json.dumps(rows[-1]), flush=True)
        # Each row names the CPU it ran on: a resumed sweep may span machines.
        recorded = [{**r, "machine": m} for r, m in zip(rows, machines, strict=True)]
        save_json_atomic({"command": command_line(), "settings": settings, "machine": machine_info(),
                          "rows": recorded}, args.out)
        if args.block:
            write_readme_block(args.block, markdown(recorded, args.arch), args.readme)
    return 0 if all(r["failed_at_step"] is None for r in rows) else 1


def resumed_rows(out: Path, settings: dict, archs: list[str]) -> list[dict]:
    """The records in ``out`` of networks in ``archs`` (none without ``out``); an ``out`` made with other settings
    than ``settings`` is refused, not mixed in."""
    if not out.is_file():
        return []
    recorded = json.loads(out.read_text())
    if recorded.get("settings") != settings:
        raise SystemExit(f"{out} was made with other settings ({recorded.get('settings')}); give another --out or "
                         "drop --resume to measure again")
    return [r for r in recorded["rows"] if r["arch"] in archs]


if __name__ == "__main__":
    raise SystemExit(main())
