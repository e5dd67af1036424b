"""The transfer-learning table: trained BatchNorm networks converted into deconvolution by ``ndeconv convert-bn``
and fine-tuned one more epoch as deconvolution vs as BatchNorm, from the run directories of
reproduce/convert_bn.sh (``--runs``). Writes reproduce/results/convert_bn.json and the docs block
``convert-bn``. An architecture whose steps are not all made yet is listed with what exists ("pending").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "reproduce"))
from readme_block import write_results  # noqa: E402

ARCHS = ("resnet18", "vgg16", "efficientnet_b0")


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _finished_top1(run: Path) -> float | None:
    """The test top-1 of a finished one-epoch run (its last metrics row, not partial)."""
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return None
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    done = [r for r in rows if r.get("epoch") == 1 and not r.get("partial")]
    return float(done[-1]["test_top1"]) if done else None


def collect(runs: Path) -> list[dict[str, Any]]:
    table = []
    for arch in ARCHS:
        bn, converted = _read_json(runs / f"{arch}-bn.eval.json"), _read_json(runs / f"{arch}-converted.eval.json")
        if bn is None and converted is None:
            continue
        table.append(dict(
            arch=arch,
            bn_top1=bn["top1"] if bn else None,
            converted_top1=converted["top1"] if converted else None,
            finetuned_nd_top1=_finished_top1(runs / f"{arch}-ft-nd"),
            finetuned_bn_top1=_finished_top1(runs / f"{arch}-ft-bn"),
        ))
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    def cell(value: float | None) -> str:
        return "pending" if value is None else f"{value:.2f}"

    lines = ["| architecture | BN (1 epoch) | converted to ND | + 1 epoch as ND | + 1 epoch as BN |",
             "|---|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['arch']} | {cell(row['bn_top1'])} | {cell(row['converted_top1'])} | "
                     f"{cell(row['finetuned_nd_top1'])} | {cell(row['finetuned_bn_top1'])} |")
    if not table:
        lines.append("| (no runs yet) | | | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "convert_bn")
    parser.add_argument("--out", type=Path, default=ROOT / "reproduce" / "results")
    parser.add_argument("--readme", type=Path, default=None,
                        help="the page to write the table into (default: the one holding its markers)")
    args = parser.parse_args(argv)
    table = collect(args.runs)
    write_results("convert-bn", {"rows": table}, markdown(table), args.out, args.readme, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
