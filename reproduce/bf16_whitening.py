"""bf16 whitening's cost, measured: Fashion-MNIST accuracy after one epoch against float32 exact, beside its speed.

Reads the one-epoch ResNet-18 runs of ``reproduce/bf16_whitening.sh`` (``--runs``: resnet18-exact and
resnet18-fast8, bf16 autocast with ``--bf16-whitening``), the same recipe under bf16 autocast with float32 whitening
(``--fp32-whitening-fast8``: the converged queue's precision check, fast mode k=8), float32 exact's top-1 from
``reproduce/results/fast_mode.json`` and the bf16 speed benchmark on each kind of CPU with native bf16
(``benchmarks/results/resnet18_b128_channels_last_bf16_whitening*.json``: AVX512-BF16, AMX), and regenerates from
them:

- ``reproduce/results/bf16_whitening.json``  every number below, with the run directories it came from
- the table between the ``bf16-whitening`` markers (docs/layers.md)
- the sentence between the ``bf16-summary`` markers (README.md)

    python reproduce/bf16_whitening.py

A run directory that is not on this machine keeps the row already recorded in the results file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_claim import ROOT, read_run  # noqa: E402

sys.path.insert(0, str(ROOT))
from readme_block import write_readme_block, write_results  # noqa: E402

from benchmarks._common import cpu_label, earlier_kernels_note  # noqa: E402

RUNS = Path.home() / ".cache" / "ndeconv" / "runs"
# One speed benchmark per kind of native-bf16 CPU: the AMD EPYC with AVX512-BF16, the Intel Xeon with AMX-BF16.
SPEEDS = tuple(ROOT / "benchmarks" / "results" / f"resnet18_b128_channels_last_bf16_whitening{suffix}.json"
               for suffix in ("", "_amx"))
FLOAT32_EXACT = ROOT / "reproduce" / "results" / "fast_mode.json"
OUT = ROOT / "reproduce" / "results"

# (row name, whitening precision, fast-mode k or 1, where the run lives, the speed benchmark's ratio key)
ROWS = (
    ("fp32-whitening-exact", "float32", 1, None, "nd_over_bn_train"),
    ("fp32-whitening-fast8", "float32", 8, "fp32_fast8", "fast8_over_bn_train"),
    ("bf16-whitening-exact", "bf16", 1, "resnet18-exact", "nd_bf16w_over_bn_train"),
    ("bf16-whitening-fast8", "bf16", 8, "resnet18-fast8", "fast8_bf16w_over_bn_train"),
)


def collect(runs: Path, fp32_fast8: Path, recorded: dict[str, dict], speeds: tuple[Path, ...] = SPEEDS) -> dict:
    """Every row's numbers: top-1 of a finished run (or the recorded row where the run is not here), its
    difference from float32 exact, and the ND/BN step ratio under bf16 autocast on each CPU of ``speeds``."""
    float32 = json.loads(FLOAT32_EXACT.read_text())["rows"][0]
    speed_files = [json.loads(p.read_text()) for p in speeds]
    models = [f["models"][0] for f in speed_files]
    rows = []
    for name, whitening, k, where, ratio in ROWS:
        # One ratio per CPU, in the order of "speed".
        row = {"name": name, "whitening": whitening, "k": k, "nd_over_bn_train": [m.get(ratio) for m in models]}
        if where is not None:
            run_dir = fp32_fast8 if where == "fp32_fast8" else runs / where
            run = read_run(run_dir)
            if run is None and name in recorded and "test_top1" in recorded[name]:
                run = {key: recorded[name][key] for key in ("test_top1", "run_dir") if key in recorded[name]}
            if run is not None and "test_top1" in run:
                row.update(test_top1=run["test_top1"], run_dir=run["run_dir"].replace(str(Path.home()), "~"),
                           top1_minus_float32_exact=round(run["test_top1"] - float32["test_top1"], 2))
        rows.append(row)
    return {"arch": "resnet18", "dataset": "fashion_mnist", "epochs": 1, "float32_exact_top1": float32["test_top1"],
            "speed": [{"cpu": cpu_label(f["machine"]), "command": f["command"],
                       "bf16_product_gflop_per_s": m.get("product_gflop_per_s", {}).get("bf16"),
                       "bn_step_s": m.get("bn_train", {}).get("median_s"),
                       "earlier_kernels": earlier_kernels_note(f, cpu_label(f["machine"]))}
                      for f, m in zip(speed_files, models, strict=True)], "rows": rows}


def markdown(result: dict) -> str:
    exact = result["float32_exact_top1"]
    cpus = [s["cpu"] for s in result["speed"]]
    lines = [f"| whitening under bf16 autocast | mode | test top-1 (1 epoch) | vs float32 exact ({exact:.2f}) | "
             + " | ".join(f"ND/BN training step, {cpu}" for cpu in cpus) + " |",
             "|---|---|---:|---:|" + "---:|" * len(cpus)]
    for r in result["rows"]:
        mode = "exact" if r["k"] == 1 else f"fast, k={r['k']}"
        top1 = f"{r['test_top1']:.2f}" if "test_top1" in r else "not trained"
        diff = f"{r['top1_minus_float32_exact']:+.2f}" if "test_top1" in r else "–"
        ratios = " | ".join(f"{v:.2f}" if v else "–" for v in r["nd_over_bn_train"])
        lines.append(f"| {r['whitening']} | {mode} | {top1} | {diff} | {ratios} |")
    rates = [f"{s['cpu']}, {s['bf16_product_gflop_per_s']:.0f} GFLOP/s" for s in result["speed"]
             if s.get("bf16_product_gflop_per_s")]
    note = f"\nbf16 product rate measured in the speed runs: {'; '.join(rates)}.\n" if rates else ""
    # The ratio moves with the machine's speed, which on a shared 2-core machine changes between runs: the slower its
    # convolutions, the less the whitening's fixed costs (eigendecompositions, the fold) weigh against them.
    steps = [f"{s['cpu']}, {s['bn_step_s']:.2f} s" for s in result["speed"] if s.get("bn_step_s")]
    if steps:
        note += (f"\nThe BatchNorm step each ratio is held against, median of the speed run: {'; '.join(steps)}. On a "
                 "machine whose convolutions run faster, the whitening's fixed costs weigh more and the ratios rise."
                 "\n")
    note += "".join(f"\n{s['earlier_kernels']}\n" for s in result["speed"] if s.get("earlier_kernels"))
    return "\n".join(lines) + "\n" + note


def summary(result: dict) -> str:
    """The README's sentence: bf16 whitening's ND/BN ratios and one-epoch top-1, exact and fast."""
    rows = {r["name"]: r for r in result["rows"]}
    exact, fast = rows["bf16-whitening-exact"], rows["bf16-whitening-fast8"]
    top1 = (f", with one-epoch top-1 of {exact['test_top1']:.2f}% (exact) and {fast['test_top1']:.2f}% (fast) against "
            f"float32 exact's {result['float32_exact_top1']:.2f}%" if "test_top1" in exact and "test_top1" in fast
            else "")
    speeds = [f"{e:.2f}x{' a bf16 BatchNorm step' if i == 0 else ''} ({f:.2f}x{' in fast mode' if i == 0 else ''}) "
              f"on an {s['cpu']}{' (an earlier version of the kernels)' if s.get('earlier_kernels') else ''}"
              for i, (e, f, s)
              in enumerate(zip(exact["nd_over_bn_train"], fast["nd_over_bn_train"], result["speed"], strict=True))]
    return (f"On a CPU that computes bf16 natively, `--amp bf16 --bf16-whitening` trains it at {' and '.join(speeds)}"
            f"{top1} ([docs/layers.md](docs/layers.md#mixed-precision)).\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=RUNS / "bf16_whitening")
    p.add_argument("--fp32-whitening-fast8", type=Path, default=RUNS / "converged" / "precision-check")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--readme", type=Path, default=None, help="the file holding the table (default: found by marker)")
    p.add_argument("--summary-readme", type=Path, default=None,
                   help="the file holding the one-sentence summary (default: found by marker)")
    args = p.parse_args(argv)
    previous = args.out / "bf16_whitening.json"
    recorded = {r["name"]: r for r in json.loads(previous.read_text())["rows"]} if previous.is_file() else {}
    result = collect(args.runs, args.fp32_whitening_fast8, recorded)
    write_results("bf16-whitening", result, markdown(result), args.out, args.readme, argv)
    write_readme_block("bf16-summary", summary(result), args.summary_readme)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
