"""Render the committed benchmark results (``benchmarks/results/*.json``) as the README's speed tables.

Every number comes from a results file, which records the command that made it:

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"


def training_table(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = [f"Training step (forward, cross-entropy, backward, SGD), median of repeated interleaved steps; "
             f"`{data['command']}`:", "",
             "| network | batch | ND step | BN step | ND/BN | reference ND/BN | fast mode ND/BN | ND/BN eval | "
             "peak step memory ND/BN |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in data["models"] + data.get("layers", []):
        fast = next((k for k in row if k.startswith("fast") and k.endswith("_over_bn_train")), None)
        memory = row.get("nd_over_bn_peak_memory")
        memory_text = (f"{row['nd_peak_step_mib']:.0f} / {row['bn_peak_step_mib']:.0f} MiB ({memory:.2f})"
                       if memory else "–")
        reference = row.get("reference_nd_over_bn_train_median")
        lines.append(
            f"| {row.get('arch') or 'layer ' + row['layer']} | {row['batch']} | {row['nd_train']['median_s']:.3f} s | "
            f"{row['bn_train']['median_s']:.3f} s | **{row['nd_over_bn_train']:.2f}** | "
            f"{reference if reference else '–'} | {f'{row[fast]:.2f} (k={fast[4:-14]})' if fast else '–'} | "
            f"{row['nd_over_bn_eval']:.2f} | {memory_text} |"
        )
    return lines


def inference_table(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    times = {(r["arch"], r["runtime"], r["variant"], r["batch"]): r["ms_per_image"] for r in data["results"]}
    lines = [f"Eval latency per image (ms), median; `{data['command']}`:", "",
             "| network | runtime | batch | ND unfolded (cached) | ND unfolded (refolded every call, as the "
             "reference) | ND folded | BN fused | folded ND / fused BN |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in data["summary"]:
        key = (s["arch"], s["runtime"])
        b = s["batch"]

        def ms(variant: str, key=key, b=b) -> str:
            value = times.get((*key, variant, b))
            return f"{value:.2f}" if value is not None else "–"

        lines.append(f"| {s['arch']} | {s['runtime']} | {b} | {ms('nd_unfolded')} | {ms('nd_unfolded_recompute')} | "
                     f"{ms('nd_folded')} | {ms('bn_fused')} | **{s['nd_folded_over_bn_fused']:.2f}** |")
    return lines


def main() -> int:
    parts = []
    for name, render in (("resnet18.json", training_table), ("inference.json", inference_table)):
        path = RESULTS / name
        if path.is_file():
            parts.append("\n".join(render(path)))
    block = "\n\n".join(parts) + "\n"
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{readme}: markers {MARK_START} ... {MARK_END} not found")
    readme.write_text(pattern.sub(lambda _: f"{MARK_START}\n{block}{MARK_END}", text))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
