"""Strided depthwise convolutions under CPU bf16 autocast: their input gradient from oneDNN's bf16 kernel against
the float32 one ``ndeconv.layers._conv`` takes it from, per layer and per training step.

- Layers: strided depthwise convolutions of the zoo (3x3 ones of MobileNetV2 and EfficientNet-B0, PNASNet-A's 7x7
  with two outputs per channel) at their sizes for 32x32 input, batch 128, channels-last; forward + backward under
  bf16 autocast, both ways in interleaved rounds, and each way's input gradient against the exact (float64) one of
  the same bf16 values (the forward output and the weight and bias gradients are the same kernels' either way).
- Steps: a training step (forward, cross-entropy, backward, SGD) of the networks that have such layers, BatchNorm
  and deconvolution in fast mode k=8, batch 128 of 1x32x32 images, channels-last, bf16 autocast; both ways in the
  same interleaved rounds.

Run from the project root::

    python benchmarks/depthwise_bf16.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from ndeconv.layers import _conv  # noqa: E402

# (name, in channels, out channels, size, kernel): each stride 2, groups = in channels.
LAYERS = [
    ("mobilenetv2 3x3, 144 ch, 32x32", 144, 144, 32, 3),
    ("mobilenetv2 3x3, 576 ch, 8x8", 576, 576, 8, 3),
    ("efficientnet_b0 3x3, 240 ch, 8x8", 240, 240, 8, 3),
    ("pnasnet_a 7x7, 44 -> 88 ch, 32x32", 44, 88, 32, 7),
]
ARCHS = ["mobilenetv2_deconv", "efficientnet_b0_deconv", "pnasnet_a_deconv"]
BATCH = 128
WAYS = {"bf16": False, "float32": True}  # the input gradient's kernel -> whether ndeconv routes it


def _routed(routed: bool, fn: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        _conv.ROUTE_INPUT_GRADIENT = routed
        try:
            fn()
        finally:
            _conv.ROUTE_INPUT_GRADIENT = True

    return run


def _layer_step(x: torch.Tensor, weight: torch.Tensor, kernel: int, grad: torch.Tensor) -> torch.Tensor:
    x.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _conv.conv2d(x, weight, None, 2, kernel // 2, 1, x.shape[1])
    out.backward(grad)
    return x.grad


def measure_layer(name: str, cin: int, cout: int, size: int, kernel: int, warmup: int, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, cin, size, size, generator=gen).to(memory_format=torch.channels_last).requires_grad_()
    weight = (torch.randn(cout, 1, kernel, kernel, generator=gen) / kernel).requires_grad_()
    out_size = (size + 2 * (kernel // 2) - kernel) // 2 + 1
    grad = torch.randn(BATCH, cout, out_size, out_size, generator=gen).to(torch.bfloat16)
    grad = grad.to(memory_format=torch.channels_last)
    grads = {}
    for way, routed in WAYS.items():
        _conv.ROUTE_INPUT_GRADIENT = routed
        grads[way] = _layer_step(x, weight, kernel, grad).clone()
    _conv.ROUTE_INPUT_GRADIENT = True
    times = C.interleaved({way: _routed(routed, lambda: _layer_step(x, weight, kernel, grad))
                           for way, routed in WAYS.items()}, warmup, repeats)
    # The exact input gradient of the same bf16 values, in float64.
    exact = x.detach().to(torch.bfloat16).double().requires_grad_()
    F.conv2d(exact, weight.detach().to(torch.bfloat16).double(), None, 2, kernel // 2, 1, cin).backward(grad.double())
    apart = (grads["bf16"] - grads["float32"]).abs()
    return {"layer": name, **{way: C.summary(t) for way, t in times.items()},
            "speedup": round(C.summary(times["bf16"])["median_s"] / C.summary(times["float32"])["median_s"], 2),
            "input_grad_identical": bool(apart.max() == 0),
            "input_grad_max_relative": float(f"{float(apart.max() / grads['bf16'].abs().max()):.1e}"),
            "input_grad_error": {way: float(f"{float((g.double() - exact.grad).norm() / exact.grad.norm()):.1e}")
                                 for way, g in grads.items()}}


def measure_steps(arch: str, warmup: int, repeats: int) -> dict:
    import timm

    import ndeconv  # registers the zoo

    x = torch.randn(BATCH, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,), generator=torch.Generator().manual_seed(1))
    steps = {}
    for form, deconv in (("bn", False), ("nd_fast8", True)):
        torch.manual_seed(0)
        model = timm.create_model(arch, deconv=deconv, in_chans=1, num_classes=10)
        if deconv:
            ndeconv.set_fast_mode(model, 8)
        model = model.to(memory_format=torch.channels_last)
        step = C.make_train_step(model, x, y, amp=torch.bfloat16)
        for way, routed in WAYS.items():
            steps[f"{form}_{way}"] = _routed(routed, step)
    # Fast mode refreshes every 8th step: 8 turns a round time whole refresh cycles.
    times = C.interleaved(steps, warmup, repeats, turns=8)
    row: dict = {"arch": arch, **{k: C.summary(t) for k, t in times.items()}}
    for form in ("bn", "nd_fast8"):
        row[f"{form}_speedup"] = round(row[f"{form}_bf16"]["median_s"] / row[f"{form}_float32"]["median_s"], 2)
    return row


def table(payload: dict) -> str:
    machine = payload["machine"]
    lines = [f"Strided depthwise convolutions under bf16 autocast, batch {BATCH}, channels-last, on "
             f"{machine['torch_threads']} cores of an {C.cpu_label(machine)} (`{payload['command']}`); medians of "
             "interleaved rounds. The input gradient from oneDNN's bf16 kernel against the float32 one ndeconv takes "
             "it from, with each one's relative error against the exact (float64) gradient of the same bf16 values:",
             "",
             "| layer, stride 2 | forward + backward, bf16 kernel | float32 kernel | speedup | input gradient error, "
             "bf16 kernel | float32 kernel |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in payload["layers"]:
        error = row["input_grad_error"]
        lines.append(f"| {row['layer']} | {1000 * row['bf16']['median_s']:.1f} ms | "
                     f"{1000 * row['float32']['median_s']:.1f} ms | {row['speedup']:.1f}x | {error['bf16']:.1e} | "
                     f"{error['float32']:.1e} |")
    lines += ["", "| network, training step | BN, bf16 kernel | BN, float32 kernel | ND fast k=8, bf16 kernel | "
              "ND fast k=8, float32 kernel |", "|---|---:|---:|---:|---:|"]
    for row in payload["steps"]:
        cells = [f"{row[k]['median_s']:.3f} s" for k in ("bn_bf16", "bn_float32", "nd_fast8_bf16", "nd_fast8_float32")]
        lines.append(f"| {row['arch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-repeats", type=int, default=2, help="timed rounds of 8 steps per network")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--name", default="depthwise_bf16")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True,
                   help="write the tables into docs/benchmarks.md (default: on)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ndeconv.runtime import keep_freed_memory

    keep_freed_memory()  # as ndeconv train does
    payload = {"command": C.command_line(), "machine": C.machine_info(), "method": __doc__.split("\n\n")[1],
               "layers": [measure_layer(*layer, args.warmup, args.repeats) for layer in LAYERS],
               "steps": [measure_steps(arch, args.warmup, args.step_repeats) for arch in ARCHS]}
    path = C.write_result(args.name, payload)
    if args.readme:
        from reproduce.readme_block import write_readme_block
        write_readme_block("depthwise-bf16", table(payload))
    print(table(payload))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
