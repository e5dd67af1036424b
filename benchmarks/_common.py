"""Timing helpers shared by the benchmark scripts: machine info, interleaved timing, peak memory, results."""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ANCHORS = ROOT.parent / "shared" / "anchors" / "reference_speed.json"


def machine_info() -> dict:
    from ndeconv.runtime import cpu_model_name, native_amp_dtype

    return {
        "cpu": cpu_model_name(),
        # The CPU's name does not say which kind it is (an AMD EPYC comes with and without AVX512-BF16, and a
        # virtual Intel Xeon is named "Intel(R) Xeon(R) Processor" whatever its generation): its bf16 flags do.
        "native_bf16": native_amp_dtype("cpu") == torch.bfloat16,
        "bf16_flags": cpu_flags(BF16_FLAGS),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


# What a bf16-whitening speed benchmark that does not record its bf16 products ran: the kernels from before the
# inverse square root's backward went to bf16.
EARLIER_BF16_PRODUCTS = ("patch Gram", "patch Gram backward", "fold W·D", "fold W·D backward")


def earlier_kernels_note(result: dict, machine_label: str) -> str:
    """A sentence naming what a bf16-whitening benchmark ``result`` lacked of today's bf16 kernels
    (``ndeconv.layers.fast_deconv.BF16_WHITENING_PRODUCTS``), or "" when it timed them all."""
    from ndeconv.layers.fast_deconv import BF16_WHITENING_PRODUCTS

    timed = result.get("settings", {}).get("bf16_whitening_products", EARLIER_BF16_PRODUCTS)
    missing = [p for p in BF16_WHITENING_PRODUCTS if p not in timed]
    if not missing:
        return ""
    return (f"Speeds on the {machine_label} were timed with an earlier version of the bf16 kernels, which left the "
            f"{', '.join(missing)} in float32.")


# The networks with strided depthwise convolutions, whose bf16 input gradient ndeconv takes from oneDNN's float32
# kernel (ndeconv.layers._conv); a bf16 run from before that records no ``strided_depthwise_input_grad``.
STRIDED_DEPTHWISE_ARCHS = ("mobilenetv2_deconv", "efficientnet_b0_deconv", "pnasnet_a_deconv")


def earlier_depthwise_note(result: dict, machine_label: str) -> str:
    """A sentence naming the rows of a bf16 benchmark ``result`` timed before strided depthwise convolutions took
    their bf16 input gradient from the float32 kernel, or "" when it timed today's."""
    if result.get("settings", {}).get("strided_depthwise_input_grad"):
        return ""
    archs = [a for a in STRIDED_DEPTHWISE_ARCHS if any(r["arch"] == a for r in result.get("models", []))]
    if not archs:
        return ""
    return (f"The rows of {', '.join(archs)} on the {machine_label} were timed before their strided depthwise "
            "convolutions took the bf16 input gradient from the float32 kernel, in both forms ([strided depthwise "
            "convolutions](#strided-depthwise-convolutions)).")


# The instruction sets that decide onnxruntime's int8 kernels (VNNI: int8 dot products in one instruction; AMX:
# int8 tiles) and oneDNN's bf16 ones (AVX512-BF16: bf16 dot products; AMX: bf16 tiles).
INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` the CPU has, from /proc/cpuinfo's flags ([] where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in names if f in flags]
    except OSError:
        pass
    return []


def int8_flags() -> list[str]:
    return cpu_flags(INT8_FLAGS)


def cpu_name(model_name: str) -> str:
    """/proc/cpuinfo's model name without its trademark signs and filler: "Intel(R) Xeon(R) Processor" -> "Intel
    Xeon"."""
    return re.sub(r"\s+", " ", re.sub(r"\((R|TM)\)|\bProcessor\b|\bCPU\b", "", model_name)).strip()


def cpu_label(machine: dict) -> str:
    """A results file's CPU in words, with what decides its bf16 speed: "Intel Xeon with AMX-BF16",
    "AMD EPYC with native bf16" (a file from before the flags were recorded), "AMD EPYC without native bf16"."""
    name = cpu_name(machine.get("cpu") or "")
    flags = machine.get("bf16_flags")
    if flags is not None and "amx_bf16" in flags:
        kind = "with AMX-BF16"
    elif flags is not None and "avx512_bf16" in flags:
        kind = "with AVX512-BF16"
    else:
        kind = "with native bf16" if machine.get("native_bf16") else "without native bf16"
    return f"{name or 'unrecorded CPU'} {kind}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def reference_ratios() -> dict[str, float]:
    """The authors' median ND/BN training-step ratio at batch 128 per arch (keys without ``_deconv``)."""
    if not ANCHORS.is_file():
        return {}
    return json.loads(ANCHORS.read_text()).get("batch_128_nd_over_bn_train_median", {})


def autocast(x: torch.Tensor, amp: torch.dtype | None):
    """``torch.autocast`` on ``x``'s device in ``amp`` (a no-op context for ``None``: float32)."""
    return torch.autocast(x.device.type, dtype=amp, enabled=amp is not None)


def make_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    amp: torch.dtype | None = None) -> Callable[[], None]:
    """One training step: forward, cross-entropy, backward, SGD with momentum 0.9 (the authors' setting); under
    autocast in ``amp`` if given (the loss in float32, as ``ndeconv train`` takes it)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        with autocast(x, amp):
            logits = model(x)
        nn.functional.cross_entropy(logits.float(), y).backward()
        opt.step()

    return step


def make_eval_forward(model: nn.Module, x: torch.Tensor, amp: torch.dtype | None = None) -> Callable[[], None]:
    def forward() -> None:
        model.eval()
        with torch.no_grad(), autocast(x, amp):
            model(x)

    return forward


def interleaved(fns: dict[str, Callable[[], None]], warmup: int, repeats: int,
                turns: int = 1) -> dict[str, list[float]]:
    """Run the callables round-robin (a, b, a, b, ...) so that load from other processes hits all alike.

    A round is ``turns`` turns, each calling every callable once; each callable's time for a round is its mean call
    over the round (``turns > 1``: a fast-mode step's cost is its mean over whole refresh cycles, and the networks it
    is held against step beside it, turn by turn, through the same seconds of the machine). ``warmup`` untimed
    rounds first: the first deconvolution steps in a fresh process run up to 10x slow (oneDNN/allocator warm-up),
    which a plain median of few steps does not hide.
    """
    if turns < 1:
        raise ValueError(f"interleaved: turns must be >= 1, got {turns}")
    for _ in range(warmup * turns):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        spent = dict.fromkeys(fns, 0.0)
        for _ in range(turns):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                spent[name] += time.perf_counter() - t0
        for name, total in spent.items():
            times[name].append(total / turns)
    return times


def summary(times: list[float]) -> dict:
    return {"median_s": round(statistics.median(times), 5), "min_s": round(min(times), 5),
            "all_s": [round(t, 5) for t in times]}


def peak_rss_probe(argv: list[str]) -> dict:
    """Peak memory of a training step, measured in a fresh subprocess (``argv`` runs the probe).

    tracemalloc does not see torch's CPU allocations; the probe resets the kernel's peak-RSS mark, reads it
    before the first step (model, optimizer and data in memory) and after the steps: the difference is the
    step's peak working set (activations, gradients, optimizer state, temporaries).
    """
    out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0). Needed because ru_maxrss survives fork and exec:
    a probe started by a large parent would otherwise report the parent's peak and a zero step delta."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def maxrss_mib() -> float:
    """Peak resident memory of this process since the last ``reset_peak_rss`` (VmHWM), in MiB."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def profile_top_ops(fn: Callable[[], None], steps: int = 2, top: int = 15) -> list[dict]:
    """Where the time goes: torch.profiler self CPU time per op over ``steps`` calls (forward + backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    return [
        {"op": e.key, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
         "share": round(e.self_cpu_time_total / total, 4), "calls_per_step": e.count // steps}
        for e in rows[:top]
    ]


def write_result(name: str, payload: dict) -> Path:
    from ndeconv.io import save_json_atomic

    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload.setdefault("machine", machine_info())
    payload["machine"]["load_average_at_end"] = os.getloadavg()
    return save_json_atomic(payload, path)  # benchmark results are meant to be re-run and overwritten
