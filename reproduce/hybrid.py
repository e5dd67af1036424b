"""The hybrid table (issue #22 part 2): one epoch on Fashion-MNIST with a deconvolution stem and BatchNorm
elsewhere, beside the paper-claim table's BatchNorm (BN) and deconvolution (ND) runs of the same protocol.

Reads the ``ARCH-stem`` run directories of reproduce/hybrid.sh (``--runs``) and the committed
reproduce/results/paper_claim.json (BN and ND); a BN rerun of the hybrid queue (``ARCH-bn`` in ``--runs``: the
same code and machine as the hybrid) takes the place of the paper-claim BN number, and the table says which BN
each row has. Regenerates reproduce/results/hybrid.json and the docs block ``hybrid``; a run not in ``--runs``
keeps its row of the existing hybrid.json, and one never made is "pending".

    python reproduce/hybrid.py --runs runs/hybrid
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "reproduce"))

from paper_claim import ARCHS, read_run, recorded_rows  # noqa: E402
from readme_block import write_results  # noqa: E402

PAPER_CLAIM = ROOT / "reproduce" / "results" / "paper_claim.json"
RESULTS = ROOT / "reproduce" / "results" / "hybrid.json"


def _top1(run: dict[str, Any] | None) -> float | None:
    return run.get("test_top1") if run else None


def collect(runs: Path, paper_claim: Path = PAPER_CLAIM, previous: Path = RESULTS) -> list[dict[str, Any]]:
    """The table's rows. A run directory absent from ``runs`` keeps the row ``previous`` (the committed results)
    has for it, so a machine holding some of the runs updates those and loses none of the others."""
    recorded = {row["arch"]: row for row in json.loads(paper_claim.read_text())["rows"]}
    before = recorded_rows(previous)
    table = []
    for arch in ARCHS:
        claim, old = recorded.get(arch, {}), before.get(arch, {})
        stem = read_run(runs / f"{arch}-stem") or old.get("hybrid")
        rerun = read_run(runs / f"{arch}-bn") or (old.get("bn") if old.get("bn_source") == "rerun" else None)
        bn, bn_source = (rerun, "rerun") if rerun else (claim.get("bn"), "paper_claim")
        hybrid, bn_top1, nd_top1 = _top1(stem), _top1(bn), _top1(claim.get("nd"))
        table.append(dict(
            arch=arch, hybrid=stem, bn=bn, bn_source=bn_source if bn else None, nd=claim.get("nd"),
            hybrid_minus_bn=hybrid - bn_top1 if hybrid is not None and bn_top1 is not None else None,
            hybrid_minus_nd=hybrid - nd_top1 if hybrid is not None and nd_top1 is not None else None,
        ))
    return table


def _cell(run: dict[str, Any] | None) -> str:
    if run is None:
        return "pending"
    if "diverged_at_step" in run:
        return f"diverged (step {run['diverged_at_step']})"
    return f"{run['test_top1']:.2f}"


def markdown(table: list[dict[str, Any]]) -> str:
    def diff(value: float | None) -> str:
        return "–" if value is None else f"{value:+.2f}"

    lines = ["| architecture | BN | hybrid (ND stem) | ND | hybrid − BN | hybrid − ND | hybrid time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        bn = _cell(row["bn"]) + ("\\*" if row["bn_source"] == "rerun" else "")
        seconds = row["hybrid"]["seconds"] if row["hybrid"] else None
        lines.append(f"| {row['arch']} | {bn} | {_cell(row['hybrid'])} | {_cell(row['nd'])} | "
                     f"{diff(row['hybrid_minus_bn'])} | {diff(row['hybrid_minus_nd'])} | "
                     f"{'–' if seconds is None else f'{seconds / 60:.0f} min'} |")
    measured = [r for r in table if r["hybrid_minus_bn"] is not None]
    summary = [f"Measured hybrids: {sum(1 for r in table if r['hybrid'])} of {len(table)}. Times are each run's "
               "wall clock on the shared 2-core machine, other work included."]
    if measured:
        above_bn = [r["arch"] for r in measured if r["hybrid_minus_bn"] > 0]
        above_nd = [r["arch"] for r in table if r["hybrid_minus_nd"] is not None and r["hybrid_minus_nd"] > 0]
        summary.append(f"Hybrid above BN: {', '.join(above_bn) or 'none'}; above ND: {', '.join(above_nd) or 'none'}.")
    rescued = [r["arch"] for r in table if r["hybrid"] and "test_top1" in r["hybrid"]
               and r["bn"] and "diverged_at_step" in r["bn"]]
    if rescued:
        summary.append(f"The hybrid trains where BN diverged: {', '.join(rescued)}.")
    if any(r["bn_source"] == "rerun" for r in table):
        summary.append("\\* BN rerun in the hybrid queue (same code and machine as the hybrid); the others are the "
                       "paper-claim table's runs.")
    return "\n".join(lines) + "\n\n" + " ".join(summary) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "hybrid")
    parser.add_argument("--out", type=Path, default=ROOT / "reproduce" / "results")
    parser.add_argument("--readme", type=Path, default=None,
                        help="the page to write the table into (default: the one holding its markers)")
    args = parser.parse_args(argv)
    table = collect(args.runs, previous=args.out / "hybrid.json")
    write_results("hybrid", {"rows": table}, markdown(table), args.out, args.readme, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
