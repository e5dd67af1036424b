"""The GPU check of mixed-precision deconvolution, one JSON file of results (``benchmarks/gpu_check.sh``).

1. ``layers``: FastDeconv (dense, grouped, 1x1), Delinear and ChannelDeconv forward + backward on the device in
   float64 against the same computation on the CPU in float64 (max relative error of outputs, input gradients,
   weight gradients and running statistics; must be <= 1e-9).
2. ``amp_steps``: a few training steps of three zoo networks under autocast in fp16 (with a GradScaler) and bf16,
   random 1x32x32 inputs; every loss and running statistic must be finite.
3. ``timing``: ND/BN training-step times under autocast for ResNet-18 (interleaved, medians), and the whitening's
   inverse square root by ``matmul`` (Newton–Schulz products) against ``eigh`` on a 576x576 matrix.

Runs anywhere: ``--device cpu`` (with small sizes) is how the suite keeps it from rotting. Exit status 1 when a
check fails. ::

    benchmarks/gpu_check.sh OUT_DIR                    # on a CUDA machine, under 8 minutes on one GPU
    python benchmarks/gpu_check.py OUT_DIR --device cpu --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks._models import build  # noqa: E402
from ndeconv import ChannelDeconv, Delinear, FastDeconv  # noqa: E402
from ndeconv.layers.isqrt import isqrt_newton_schulz  # noqa: E402

TOLERANCE = 1e-9


def _layers() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    return {
        "fastdeconv_3x3": (FastDeconv(16, 8, 3, padding=1, block=8), (4, 16, 12, 12)),
        "fastdeconv_grouped": (FastDeconv(8, 8, 3, padding=1, groups=8), (4, 8, 12, 12)),
        "fastdeconv_1x1_s2": (FastDeconv(16, 8, 1, stride=2, block=16, sampling_stride=1), (4, 16, 12, 12)),
        "delinear": (Delinear(32, 10, block=16), (64, 32)),
        "channel_deconv": (ChannelDeconv(block=4), (4, 8, 6, 6)),
    }


def _run_layer(layer: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    layer.train()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)).sum().backward()
    result = {"out": out.detach(), "grad_x": x.grad}
    result.update({f"grad_{n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    result.update({f"buffer_{n}": b for n, b in layer.named_buffers() if b.is_floating_point()})
    return result


def check_layers(device: str) -> dict:
    rows = {}
    for name, (layer, shape) in _layers().items():
        torch.manual_seed(0)
        layer = layer.double()
        twin = copy.deepcopy(layer).to(device)
        x = torch.randn(shape, dtype=torch.float64)
        ref = _run_layer(layer, x)
        got = _run_layer(twin, x.to(device))
        errors = {k: float((got[k].cpu() - v).norm() / max(float(v.norm()), 1e-300)) for k, v in ref.items()}
        rows[name] = {"max_rel_error": max(errors.values()), "errors": errors}
    return rows


def check_amp_steps(device: str, models: list[str], dtypes: list[str], batch: int, steps: int) -> list[dict]:
    rows = []
    for arch in models:
        for key in dtypes:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[key]
            torch.manual_seed(0)
            model = timm.create_model(arch, in_chans=1, num_classes=10).to(device).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
            scaler = torch.amp.GradScaler(torch.device(device).type) if dtype == torch.float16 else None
            losses = []
            for _ in range(steps):
                x = torch.randn(batch, 1, 32, 32, device=device)
                y = torch.randint(0, 10, (batch,), device=device)
                with torch.autocast(torch.device(device).type, dtype=dtype):
                    loss = nn.functional.cross_entropy(model(x).float(), y)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                losses.append(float(loss.detach()))
            finite_stats = all(bool(torch.isfinite(b).all()) for b in model.buffers() if b.is_floating_point())
            rows.append({"arch": arch, "amp": key, "losses": losses,
                         "ok": all(math.isfinite(v) for v in losses) and finite_stats})
    return rows


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def check_timing(device: str, batch: int, repeats: int, dtype: torch.dtype | None,
                 arch: str = "resnet18_deconv") -> dict:
    torch.manual_seed(0)
    nets = {"nd": build(arch, deconv=True)[0], "bn": build(arch, deconv=False)[0]}
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {k: C.make_train_step(m.to(device), x, y, dtype) for k, m in nets.items()}

    def timed(fn):
        def run() -> None:
            fn()
            _sync(device)
        return run

    times = C.interleaved({k: timed(v) for k, v in steps.items()}, 1 if repeats > 1 else 0, repeats)
    out = {"arch": arch, "batch": batch, "amp": str(dtype)}
    out.update({f"{k}_train": C.summary(v) for k, v in times.items()})
    out["nd_over_bn_train"] = round(out["nd_train"]["median_s"] / out["bn_train"]["median_s"], 3)
    size = 576 if repeats > 1 else 192  # 576: a 3x3 layer of 64 channels; the quick run a smaller one
    a = torch.randn(4096, size, device=device)
    cov = a.mT @ a / 4096 + 1e-5 * torch.eye(size, device=device)
    for method in ("matmul", "eigh"):
        def isqrt(method: str = method) -> None:
            c = cov.clone().requires_grad_(True)
            isqrt_newton_schulz(c, 5, method).sum().backward()
            _sync(device)
        isqrt()
        start = time.perf_counter()
        for _ in range(repeats):
            isqrt()
        out[f"isqrt_{method}_{size}_fwd_bwd_s"] = round((time.perf_counter() - start) / repeats, 5)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small sizes (the suite's CPU run)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; pass --device cpu for the CPU run", file=sys.stderr)
        return 2
    on_cpu = torch.device(args.device).type == "cpu"
    # CPU autocast fp16 exists but is emulated on most CPUs; bf16 alone keeps the CPU run short.
    dtypes = ["bf16"] if on_cpu else ["fp16", "bf16"]
    models = ["pnasnet_a_deconv"] if args.quick else ["resnet18_deconv", "mobilenetv2_deconv", "pnasnet_a_deconv"]
    amp = torch.bfloat16 if on_cpu else torch.float16
    payload = {"command": C.command_line(), "machine": C.machine_info(), "device": args.device,
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() and not on_cpu else None}
    payload["layers"] = check_layers(args.device)
    payload["amp_steps"] = check_amp_steps(args.device, models, dtypes, 2 if args.quick else 32,
                                           1 if args.quick else 5)
    payload["timing"] = (check_timing(args.device, 2, 1, None, "pnasnet_a_deconv") if args.quick
                         else check_timing(args.device, 128, 5, amp))
    payload["ok"] = (all(r["max_rel_error"] <= TOLERANCE for r in payload["layers"].values())
                     and all(r["ok"] for r in payload["amp_steps"]))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / "gpu_check.json"
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps({"ok": payload["ok"], "wrote": str(path)}))
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
