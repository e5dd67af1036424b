"""Fast mode's cost, measured: Fashion-MNIST accuracy after one epoch against exact mode, beside its speed.

Reads the exact ResNet-18 ND run (``reproduce/paper_claim.sh``: runs/paper_claim/resnet18-nd), the fast-mode
runs (``reproduce/fast_mode.sh``: runs/fast_mode/resnet18-nd-fast<K>, same seed and settings) and the speed
benchmark (benchmarks/results/resnet18.json), and regenerates from them alone:

- ``reproduce/results/fast_mode.json``  every number below, with the run directories it came from
- the table between the ``fast-mode`` markers (docs/layers.md)

    python reproduce/fast_mode.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from paper_claim import ROOT, read_run  # noqa: E402
from readme_block import write_readme_block  # noqa: E402

SPEED = ROOT / "benchmarks" / "results" / "resnet18.json"


def collect(exact_dir: Path, fast_root: Path) -> dict:
    exact = read_run(exact_dir)
    if exact is None:
        raise SystemExit(f"{exact_dir}: no finished exact-mode run; run reproduce/paper_claim.sh first")
    speed = json.loads(SPEED.read_text())["models"][0] if SPEED.is_file() else {}
    rows = [{"k": 1, **exact, "nd_over_bn_train": speed.get("nd_over_bn_train")}]
    for run_dir in sorted(fast_root.glob("resnet18-nd-fast*"), key=lambda p: int(p.name.rsplit("fast", 1)[1])):
        k = int(run_dir.name.rsplit("fast", 1)[1])
        run = read_run(run_dir)
        if run is not None:
            rows.append({"k": k, **run, "nd_over_bn_train": speed.get(f"fast{k}_over_bn_train"),
                         "top1_minus_exact": round(run["test_top1"] - exact["test_top1"], 2)})
    return {"arch": "resnet18", "dataset": "fashion_mnist", "epochs": 1, "speed_source": speed and
            json.loads(SPEED.read_text())["command"], "rows": rows}


def table(result: dict) -> str:
    lines = ["| mode | test top-1 (1 epoch) | vs exact | ND/BN training step | wall time |",
             "|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        mode = "exact" if r["k"] == 1 else f"fast, k={r['k']}"
        diff = "–" if r["k"] == 1 else f"{r['top1_minus_exact']:+.2f}"
        ratio = f"{r['nd_over_bn_train']:.2f}" if r.get("nd_over_bn_train") else "–"
        lines.append(f"| {mode} | {r['test_top1']:.2f} | {diff} | {ratio} | {r['seconds'] / 60:.0f} min |")
    if len(result["rows"]) == 1:
        lines.append("| fast, k=4 | pending | – | – | – |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exact", type=Path, default=ROOT / "runs" / "paper_claim" / "resnet18-nd")
    p.add_argument("--fast-runs", type=Path, default=ROOT / "runs" / "fast_mode")
    args = p.parse_args(argv)
    result = collect(args.exact, args.fast_runs)
    out = ROOT / "reproduce" / "results" / "fast_mode.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    block = table(result)
    write_readme_block("fast-mode", block)
    print(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
