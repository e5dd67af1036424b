"""Eval latency per image: unfolded ND, folded ND and the BatchNorm twin with BN fused, in PyTorch and onnxruntime.

    python benchmarks/inference.py                      # ResNet-18 and MobileNetV2, batch 1 and 64 (minutes)
    python benchmarks/inference.py --quick --output /tmp/inference_quick.json   # seconds: checks the script runs

Models are random-init with running statistics moved by one train-mode forward on correlated data (speed does
not depend on the values). Rows:

- ``nd_unfolded``: our FastDeconv/Delinear in eval (they cache their folded weights between calls);
- ``nd_unfolded_recompute``: the same with the cache cleared before every call, i.e. the weights re-folded on
  every forward as the authors' implementation does;
- ``nd_folded``: ``ndeconv.convert.fold`` (plain Conv2d/Linear);
- ``bn_fused``: the ``deconv=False`` twin folded the same way (BatchNorm fused into its convs).

onnxruntime runs the exported ``nd_folded`` and ``bn_fused`` graphs (an unfolded model is folded before export),
and their int8 forms ``nd_folded_int8`` and ``bn_fused_int8`` (``ndeconv.convert.quantize.quantize_onnx``: QDQ, int8
weights per output channel, uint8 activations, calibrated on the correlated data).
Each timing is the median over ``--repeats`` calls after ``--warmup`` calls, the variants of a runtime
interleaved; results
are JSON with the command
that made them.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks._common import int8_flags, interleaved, machine_info  # noqa: E402

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "inference.json"


def _correlated(batch: int, seed: int = 0) -> torch.Tensor:
    """Smooth 3x32x32 images (neighbouring pixels correlated, as in real ones)."""
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(batch, 3, 34, 34, generator=g), 3, 1) + 0.5


def _moved_stats(name: str, deconv: bool) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, deconv=deconv)
    x = _correlated(8)
    with torch.no_grad():
        model.train()(x)
    return model.eval()


def _clear_fold_caches(model: nn.Module) -> Callable[[], None]:
    caches = [m._fold_cache for m in model.modules() if hasattr(m, "_fold_cache")]
    return lambda: [c.clear() for c in caches]


def bench_arch(name: str, batches: list[int], warmup: int, repeats: int, threads: int, tmp: Path) -> list[dict]:
    import onnxruntime as ort

    from ndeconv.convert import export_onnx, fold
    from ndeconv.convert.quantize import quantize_onnx

    nd = _moved_stats(name, True)
    bn = _moved_stats(name, False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BN-kept notes etc. are not the point here
        # fold() fuses BatchNorms only when asked: the BatchNorm twin's row is its fused form.
        variants: dict[str, nn.Module] = {"nd_unfolded": nd, "nd_folded": fold(nd),
                                          "bn_fused": fold(bn, fuse_batchnorm=True)}
        sessions = {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # Interleaved sessions would otherwise spin-wait on each other's cores after every run.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        calibration = _correlated(64, seed=1).numpy()
        for key in ("nd_folded", "bn_fused"):
            path = export_onnx(variants[key], tmp / f"{name}_{key}.onnx", force=True).path
            sessions[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            int8_path = tmp / f"{name}_{key}_int8.onnx"
            quantize_onnx(path, int8_path, calibration, force=True)
            sessions[f"{key}_int8"] = ort.InferenceSession(str(int8_path), options,
                                                           providers=["CPUExecutionProvider"])

    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        clear = _clear_fold_caches(nd)
        feed = {"input": x.numpy()}
        calls: dict[tuple[str, str], Callable[[], object]] = {
            ("pytorch", key): (lambda m=model, x=x: m(x)) for key, model in variants.items()
        }
        calls[("pytorch", "nd_unfolded_recompute")] = lambda c=clear, x=x: (c(), nd(x))
        calls.update({("onnxruntime", key): (lambda s=session, f=feed: s.run(None, f))
                      for key, session in sessions.items()})
        # Round-robin over the variants of one runtime at a time (benchmarks._common.interleaved), so drifting
        # load hits them alike; the runtimes run apart, as onnxruntime's spinning threads would slow torch's.
        timings = {}
        for runtime in ("pytorch", "onnxruntime"):
            group = {key: fn for key, fn in calls.items() if key[0] == runtime}
            with torch.no_grad():
                runs = interleaved(group, warmup, repeats)
            timings.update({key: statistics.median(times) for key, times in runs.items()})
        for (runtime, key), seconds in timings.items():
            rows.append(dict(arch=name, runtime=runtime, variant=key, batch=batch,
                             ms_per_image=round(1000 * seconds / batch, 4)))
        print(f"{name} batch {batch}: " + ", ".join(f"{r}/{k} {1000 * s / batch:.3f} ms/img"
                                                   for (r, k), s in timings.items()), flush=True)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Folded ND over fused BN (should be 1.00 +- 0.05), unfolded over folded ND, and (onnxruntime) int8 over
    float32 of each, per arch/runtime/batch."""
    index = {(r["arch"], r["runtime"], r["variant"], r["batch"]): r["ms_per_image"] for r in rows}
    out = []
    for arch, runtime, _variant, batch in sorted({k for k in index if k[2] == "nd_folded"}):
        folded = index[(arch, runtime, "nd_folded", batch)]
        entry = dict(arch=arch, runtime=runtime, batch=batch,
                     nd_folded_over_bn_fused=round(folded / index[(arch, runtime, "bn_fused", batch)], 3))
        for unfolded in ("nd_unfolded", "nd_unfolded_recompute"):
            if (arch, runtime, unfolded, batch) in index:
                entry[f"{unfolded}_over_nd_folded"] = round(index[(arch, runtime, unfolded, batch)] / folded, 3)
        for variant in ("nd_folded", "bn_fused"):
            if (arch, runtime, f"{variant}_int8", batch) in index:
                entry[f"{variant}_int8_over_float32"] = round(
                    index[(arch, runtime, f"{variant}_int8", batch)] / index[(arch, runtime, variant, batch)], 3)
        out.append(entry)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18_deconv", "mobilenetv2_deconv"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and onnxruntime threads")
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script: batch 1 and 4, 1 repeat")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"results JSON (default: {DEFAULT_OUTPUT})")
    parser.add_argument("--force", action="store_true", help="overwrite --output")
    args = parser.parse_args(argv)

    import ndeconv  # noqa: F401 - registers the zoo
    from ndeconv.io import check_output_path, save_json_atomic

    if args.quick:
        args.batches, args.warmup, args.repeats = [1, 4], 1, 1
    output = check_output_path(args.output, args.force)
    torch.set_num_threads(args.threads)
    import onnxruntime

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="ndeconv-bench-") as tmp:
        for name in args.archs:
            rows.extend(bench_arch(name, args.batches, args.warmup, args.repeats, args.threads, Path(tmp)))
    result = {
        "command": shlex.join(["python", "benchmarks/inference.py", *(sys.argv[1:] if argv is None else argv)]),
        "about": "Eval latency per image (ms), median of repeats; 3x32x32 inputs, 10 classes. nd_folded_over_bn_fused "
                 "is the deployment claim (1.00 +- 0.05); *_over_nd_folded is how much slower unfolded inference is; "
                 "*_int8_over_float32 is the int8 file's time over the float32 file's in onnxruntime.",
        "quick": args.quick,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "onnxruntime": onnxruntime.__version__, "threads": args.threads,
                        "machine": platform.machine(), "cpu": machine_info()["cpu"], "cpu_flags": int8_flags()},
        "settings": {"batches": args.batches, "warmup": args.warmup, "repeats": args.repeats},
        "summary": summarise(rows),
        "results": rows,
    }
    save_json_atomic(result, output)
    for entry in result["summary"]:
        print(entry)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
