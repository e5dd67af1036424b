"""Render the committed benchmark results (``benchmarks/results/*.json``) as the speed tables of docs/benchmarks.md
(float32, and all ten under bf16 autocast against float32 on the same CPU), the bf16 sentence of docs/layers.md and
the README's speed sentence (wherever their markers are).

Every number comes from a results file, which records the command that made it:

    python benchmarks/report.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def training_table(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    lines = [f"Training step (forward, cross-entropy, backward, SGD), median of repeated interleaved steps; "
             f"`{data['command']}`:", "",
             "| network | batch | ND step | BN step | ND/BN | reference ND/BN | fast mode ND/BN | ND/BN eval | "
             "peak step memory ND/BN |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in data["models"] + data.get("layers", []):
        fast = ", ".join(f"{row[k]:.2f} (k={k[4:-14]})" for k in row
                         if k.startswith("fast") and k.endswith("_over_bn_train")) or "–"
        memory = row.get("nd_over_bn_peak_memory")
        memory_text = (f"{row['nd_peak_step_mib']:.0f} / {row['bn_peak_step_mib']:.0f} MiB ({memory:.2f})"
                       if memory else "–")
        reference = row.get("reference_nd_over_bn_train_median")
        lines.append(
            f"| {row.get('arch') or 'layer ' + row['layer']} | {row['batch']} | {row['nd_train']['median_s']:.3f} s | "
            f"{row['bn_train']['median_s']:.3f} s | **{row['nd_over_bn_train']:.2f}** | "
            f"{reference if reference else '–'} | {fast} | "
            f"{row['nd_over_bn_eval']:.2f} | {memory_text} |"
        )
    return lines


def all_archs_table(paths: list[Path]) -> list[str]:
    """The ten zoo networks at each batch, from every ``all_archs*.json`` (one run may hold a subset)."""
    from benchmarks._models import ZOO_ARCHS

    rows, commands = {}, []
    for path in paths:
        data = json.loads(path.read_text())
        commands.append(f"`{data['command']}`")
        for row in data["models"]:
            rows[(row["arch"], row["batch"])] = {**row, "malloc": "kept" if _kept(data) else "glibc default"}
    lines = [f"All ten zoo networks, training step, median of interleaved steps; {', '.join(commands)}. "
             "Target: no higher than the reference's median ratio at batch 128 and than 2.0 (1.5 for ResNet-18). "
             "FLOP ratio: `1 + whitening GFLOP / convolution GFLOP` per step (benchmarks/flops.py), the "
             "floor of exact mode where convolutions are dense.", "",
             "| network | batch | ND step | BN step | ND/BN | target | met | FLOP ratio | "
             "GFLOP conv + whitening | malloc |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for (arch, batch), row in sorted(rows.items(), key=lambda kv: (ZOO_ARCHS.index(kv[0][0]), kv[0][1])):
        target = row.get("target_nd_over_bn_train")
        met = "–" if target is None else ("yes" if row["nd_over_bn_train"] <= target else "**no**")
        lines.append(f"| {arch} | {batch} | {row['nd_train']['median_s']:.3f} s | "
                     f"{row['bn_train']['median_s']:.3f} s | "
                     f"**{row['nd_over_bn_train']:.2f}** | {target if target is not None else '–'} | {met} | "
                     f"{row.get('flop_ratio_nd_over_bn', '–')} | "
                     f"{row.get('conv_gflop', '–')} + {row.get('whitening_gflop', '–')} | {row['malloc']} |")
    return lines


def _before_after_row(base: dict, row: dict) -> str:
    """One network's ND step, BN step and ratio in two runs (``base`` -> ``row``)."""
    def step(form: str) -> str:
        before, after = base[f"{form}_train"]["median_s"], row[f"{form}_train"]["median_s"]
        return f"{before:.3f} -> {after:.3f} s ({(after / before - 1) * 100:+.0f}%)"

    return (f"| {base['arch']} | {base['batch']} | {step('nd')} | {step('bn')} | "
            f"{base['nd_over_bn_train']:.2f} -> **{row['nd_over_bn_train']:.2f}** |")


def _channels_last(path: Path) -> bool:
    return bool(json.loads(path.read_text()).get("settings", {}).get("channels_last", False))


def channels_last_table(cl_paths: list[Path], nchw_paths: list[Path]) -> list[str]:
    """Both forms in channels-last memory format beside the same networks in NCHW (the rows above)."""
    nchw = {}
    for path in nchw_paths:
        nchw.update({(r["arch"], r["batch"]): r for r in json.loads(path.read_text())["models"]})
    runs = [json.loads(path.read_text()) for path in cl_paths]
    pairs = [(nchw[(r["arch"], r["batch"])], r) for data in runs for r in data["models"]
             if (r["arch"], r["batch"]) in nchw]
    if not pairs:
        return []
    commands = ", ".join(f"`{data['command']}`" for data in runs)
    lines = [f"Both forms in channels-last memory format ({commands}: the model through "
             "`model.to(memory_format=torch.channels_last)`, the input likewise) beside the NCHW rows above:", "",
             "| network | batch | ND step NCHW -> channels-last | BN step NCHW -> channels-last | "
             "ND/BN NCHW -> channels-last |",
             "|---|---:|---:|---:|---:|"]
    return lines + [_before_after_row(base, row) for base, row in pairs]


def _kept(data: dict) -> bool:
    # Results from before the setting existed ran with glibc's default malloc.
    return bool(data.get("settings", {}).get("keep_freed_memory", False))


def allocator_table(default_path: Path, kept_paths: list[Path]) -> list[str]:
    """Step times with glibc's default malloc (``--no-keep-freed-memory``) beside the same networks with freed
    memory kept, from the all-networks run(s)."""
    default = json.loads(default_path.read_text())
    kept = {}
    for path in kept_paths:
        data = json.loads(path.read_text())
        if _kept(data):
            kept.update({(r["arch"], r["batch"]): r for r in data["models"]})
    keys = [(row["arch"], row["batch"]) for row in default["models"]]
    pairs = [(row, kept[key]) for row, key in zip(default["models"], keys, strict=True) if key in kept]
    if not pairs:
        return []
    lines = [f"Training step with glibc's default malloc (`{default['command']}`) and with freed memory kept "
             "(`ndeconv.keep_freed_memory`, what `ndeconv train` and the rows above use), two runs minutes apart "
             "on the same quiet machine:", "",
             "| network | batch | ND step default -> kept | BN step default -> kept | ND/BN default -> kept |",
             "|---|---:|---:|---:|---:|"]
    return lines + [_before_after_row(base, row) for base, row in pairs]


def scaling_section(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    table = (path.with_suffix(".md")).read_text().rstrip("\n")
    return [f"Scaling: one ResNet-18-style stack (7x7/2 stem, max-pool, ResNet-18's first two stages), training "
            f"step, ND against BN; `{data['command']}`:", "", table, "",
            f"![ND/BN step time against image size](../benchmarks/results/{path.with_suffix('.png').name})"]


def inference_table(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    times = {(r["arch"], r["runtime"], r["variant"], r["batch"]): r["ms_per_image"] for r in data["results"]}
    int8 = any(r["variant"].endswith("_int8") for r in data["results"])
    cpu = (data.get("environment") or {}).get("cpu")
    on = f" on {data['environment']['threads']} threads of an {cpu}" if cpu else ""
    lines = [f"Eval latency per image (ms), median{on}; `{data['command']}`"
             + (" (int8: the float32 file quantized by `ndeconv.convert.quantize.quantize_onnx`, QDQ, run by "
                "onnxruntime)" if int8 else "") + ":", "",
             "| network | runtime | batch | ND unfolded (cached) | ND unfolded (refolded every call, as the "
             "reference) | ND folded | BN fused | folded ND / fused BN |"
             + (" ND folded int8 | BN fused int8 | int8 / float32 (ND; BN) |" if int8 else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if int8 else "")]
    for s in data["summary"]:
        key = (s["arch"], s["runtime"])
        b = s["batch"]

        def ms(variant: str, key=key, b=b) -> str:
            value = times.get((*key, variant, b))
            return f"{value:.2f}" if value is not None else "–"

        row = (f"| {s['arch']} | {s['runtime']} | {b} | {ms('nd_unfolded')} | {ms('nd_unfolded_recompute')} | "
               f"{ms('nd_folded')} | {ms('bn_fused')} | **{s['nd_folded_over_bn_fused']:.2f}** |")
        if int8:
            ratios = (f"**{s['nd_folded_int8_over_float32']:.2f}**; {s['bn_fused_int8_over_float32']:.2f}"
                      if "nd_folded_int8_over_float32" in s else "–")
            row += f" {ms('nd_folded_int8')} | {ms('bn_fused_int8')} | {ratios} |"
        lines.append(row)
    return lines


def amp_speed_block(bf16: Path, fp32: Path) -> str:
    """The bf16-vs-float32 sentence (docs/layers.md, Mixed precision), from the two quick ResNet-18 runs."""
    runs = {k: json.loads(p.read_text()) for k, p in (("bf16", bf16), ("fp32", fp32))}
    row = {k: r["models"][0] for k, r in runs.items()}
    fastest = {(k, form): row[k][f"{form}_train"]["min_s"] for k in row for form in ("nd", "bn")}
    cpu = runs["bf16"]["machine"].get("cpu", "an unrecorded CPU")
    return (f"Measured on {runs['bf16']['machine'].get('cpu_count', '?')} cores of an {cpu} "
            f"(`{runs['bf16']['command']}`, and the same without `--amp` as `{fp32.stem}`): the BatchNorm "
            f"ResNet-18's fastest training step at batch {row['bf16']['batch']} took {fastest['bf16', 'bn']:.1f} s "
            f"under bf16 autocast against {fastest['fp32', 'bn']:.1f} s in float32 "
            f"({fastest['bf16', 'bn'] / fastest['fp32', 'bn']:.1f}x slower), the deconvolution one "
            f"{fastest['bf16', 'nd']:.1f} s against {fastest['fp32', 'nd']:.1f} s.\n")


def speed_summary(training: Path, inference: Path) -> str:
    """The README's float32 speed sentence: ResNet-18's training-step ratios (exact and fast mode k=8) from the
    training run, and the folded network's inference time against the fused BatchNorm one from the inference run."""
    data = json.loads(training.read_text())
    row = next(r for r in data["models"] if r["arch"] == "resnet18_deconv")
    folded = [s["nd_folded_over_bn_fused"] for s in json.loads(inference.read_text())["summary"]
              if s["arch"] == "resnet18_deconv" and "nd_folded_over_bn_fused" in s]
    fast = f", {row['fast8_over_bn_train']:.2f}x in fast mode k=8" if "fast8_over_bn_train" in row else ""
    spread = f"{min(folded):.2f}-{max(folded):.2f}x" if min(folded) != max(folded) else f"{folded[0]:.2f}x"
    return (f"Speed: in exact mode a ResNet-18 training step costs {row['nd_over_bn_train']:.2f}x its BatchNorm "
            f"twin's on {data['machine'].get('torch_threads', '?')} CPU cores{fast}; folded for inference it takes "
            f"{spread} the fused BatchNorm network's time ([docs/benchmarks.md](docs/benchmarks.md)).\n")


# The all-ten bf16 table, once per kind of native-bf16 CPU: (block, bf16 results, float32 results on the same CPU).
BF16_TABLES = tuple((f"bench-bf16{suffix.replace('_', '-')}", RESULTS / f"amp_bf16_all_archs{suffix}.json",
                     RESULTS / f"amp_fp32_all_archs{suffix}.json") for suffix in ("", "_amx"))


def _rates(run: dict) -> str:
    """The floor's product rates as measured for the first network (the same CPU for all): "bf16 950 GFLOP/s,
    float32 237; " (empty for a results file without them)."""
    rates = next((r["product_gflop_per_s"] for r in run["models"] if "product_gflop_per_s" in r), None)
    return f"bf16 {rates['bf16']:.0f} GFLOP/s, float32 {rates['float32']:.0f}; " if rates else ""


def _float32_pair(run: dict) -> bool:
    """Whether a bf16 run also timed ND and BN in float32 in its own interleaved rounds (``--float32-pair``)."""
    return bool(run.get("settings", {}).get("float32_pair"))


def bf16_table(bf16: Path, fp32: Path) -> str:
    """All ten under bf16 autocast against float32 on the same CPU (docs/benchmarks.md, bf16 block): the ND/BN
    ratio with float32 and with bf16 whitening, the exact step's floor (benchmarks/floor.py) and the float32 ratio
    the bf16-whitening one must not exceed: from the bf16 run's own rounds where it timed the float32 pair
    (``--float32-pair``), else from the separate float32 run ``fp32``."""
    from benchmarks._common import cpu_label, earlier_depthwise_note, earlier_kernels_note
    from benchmarks._models import ZOO_ARCHS

    runs = {"bf16": json.loads(bf16.read_text())}
    paired = _float32_pair(runs["bf16"])
    if not paired:
        runs["fp32"] = json.loads(fp32.read_text())
    rows = {k: {(r["arch"], r["batch"]): r for r in run["models"]} for k, run in runs.items()}
    machines = {k: run["machine"] for k, run in runs.items()}
    if not paired and machines["bf16"].get("cpu") != machines["fp32"].get("cpu"):
        raise SystemExit(f"{bf16.name} and {fp32.name} ran on different CPUs ({machines['bf16'].get('cpu')}, "
                         f"{machines['fp32'].get('cpu')}); measure both on one machine")
    machine = machines["bf16"]
    float32 = (" The float32 pair (ND and BN without autocast) ran in the same interleaved rounds." if paired
               else f" and, in float32 on the same CPU, `{runs['fp32']['command']}`.")
    lines = [f"All ten under bf16 autocast, channels-last, on {machine.get('cpu_count', '?')} cores of an "
             f"{cpu_label(machine)}; median of interleaved steps; `{runs['bf16']['command']}`"
             f"{'.' if paired else ''}{float32} Floor: the BN step plus the "
             f"whitening's products at the measured bf16 product rate ({_rates(runs['bf16'])}float32 for grouped "
             "layers) plus the inverse square roots (benchmarks/floor.py), which are also shown alone, in BN steps. "
             "Target: the bf16-whitening ratio no higher than the float32 one.", "",
             "| network | batch | BN step (bf16) | ND/BN, float32 whitening | ND/BN, bf16 whitening | floor | "
             "of which inverse square roots | ND/BN in float32 | met |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for (arch, batch), row in sorted(rows["bf16"].items(), key=lambda kv: (ZOO_ARCHS.index(kv[0][0]), kv[0][1])):
        bf16w = row.get("nd_bf16w_over_bn_train")
        if paired:
            reference = row.get("nd_fp32_over_bn_fp32_train")
        else:
            fp32_row = rows["fp32"].get((arch, batch))
            reference = fp32_row["nd_over_bn_train"] if fp32_row else None
        met = "–" if reference is None or bf16w is None else ("yes" if bf16w <= reference else "**no**")
        cell = lambda v: f"{v:.2f}" if v is not None else "–"  # noqa: E731
        bn = row["bn_train"]["median_s"]
        isqrt = row["floor_isqrt_s"] / bn if "floor_isqrt_s" in row else None  # in BN steps, as the ratios
        lines.append(f"| {arch} | {batch} | {bn:.3f} s | {cell(row['nd_over_bn_train'])} | **{cell(bf16w)}** | "
                     f"{cell(row.get('floor_over_bn_train'))} | {cell(isqrt)} | {cell(reference)} | {met} |")
    notes = [n for n in (earlier_kernels_note(runs["bf16"], cpu_label(machine)),
                         earlier_depthwise_note(runs["bf16"], cpu_label(machine))) if n]
    return "\n".join(lines) + "\n" + (f"\n{' '.join(notes)}\n" if notes else "")


def main() -> int:
    sys.path.insert(0, str(ROOT))
    from reproduce.readme_block import write_readme_block

    amp = [RESULTS / f"resnet18_b32_channels_last_{k}_quick.json" for k in ("bf16", "fp32")]
    if all(p.is_file() for p in amp):
        write_readme_block("amp-speed", amp_speed_block(*amp))
    if (RESULTS / "resnet18.json").is_file() and (RESULTS / "inference.json").is_file():
        write_readme_block("speed-summary", speed_summary(RESULTS / "resnet18.json", RESULTS / "inference.json"))
    for block, bf16, fp32 in BF16_TABLES:
        if bf16.is_file() and (fp32.is_file() or _float32_pair(json.loads(bf16.read_text()))):
            write_readme_block(block, bf16_table(bf16, fp32))
    parts = []
    for name, render in (("resnet18.json", training_table), ("inference.json", inference_table),
                         ("scaling.json", scaling_section)):
        path = RESULTS / name
        if path.is_file():
            parts.append("\n".join(render(path)))
        all_archs = [p for p in sorted(RESULTS.glob("all_archs*.json")) if not _channels_last(p)]
        if name == "resnet18.json" and all_archs:
            parts.append("\n".join(all_archs_table(all_archs)))
            if (RESULTS / "allocator_default.json").is_file():
                parts.append("\n".join(allocator_table(RESULTS / "allocator_default.json", all_archs)))
            channels_last = [p for p in sorted(RESULTS.glob("all_archs*.json")) if _channels_last(p)]
            if channels_last:
                parts.append("\n".join(channels_last_table(channels_last, all_archs)))
    block = "\n\n".join(parts) + "\n"
    write_readme_block("bench", block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
