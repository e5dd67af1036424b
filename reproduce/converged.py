"""The converged zoo's queue (reproduce/converged.sh) and its reports.

    python reproduce/converged.py report --runs ~/.cache/ndeconv/runs/converged
    python reproduce/converged.py decide-precision --runs DIR   # once per run folder: DIR/precision.json
    python reproduce/converged.py precision-args --runs DIR     # the ndeconv train flags that decision means
    python reproduce/converged.py carry-precision --runs DIR    # a new DIR: the recorded decision, where it holds
    python reproduce/converged.py recorded-finished --runs DIR  # finished runs recorded here but absent from DIR

``report`` regenerates, from the run directories (20 epochs, ND and BN of each architecture; a run absent from
--runs keeps its recorded row): reproduce/results/converged.json, the learning-curves chart
reproduce/results/converged_curves.png, and the blocks ``converged-curves`` and ``converged-claim`` of
docs/reproduction.md and ``converged-summary`` of README.md. A partial run is shown as far as it got,
each run with the CPU its epochs trained on (from its metrics rows).

The decision: bf16 autocast with channels-last where the CPU computes bf16 natively and the one-epoch ResNet-18
check (DIR/precision-check: ND, fast 8, that mode) scores within ``TOLERANCE`` points of the float32 exact
one-epoch run (reproduce/results/paper_claim.json); float32 otherwise.

The queue is one queue across machines: a new run folder (a new machine) takes the decision recorded in
reproduce/results/converged.json where this CPU can run it (bf16 needs native bf16), so an ND run and its BN pair
keep sharing a precision; and a run recorded finished there is not trained again when its directory is absent.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "reproduce")]

from paper_claim import ARCHS, read_run  # noqa: E402
from readme_block import write_readme_block  # noqa: E402

from ndeconv.io import save_json_atomic  # noqa: E402

PAPER_CLAIM = ROOT / "reproduce" / "results" / "paper_claim.json"
RESULTS = ROOT / "reproduce" / "results" / "converged.json"
CURVES = ROOT / "reproduce" / "results" / "converged_curves.png"
# Where reproduce/ship.py puts a finished ND run: its metrics.jsonl there is the run's own, copied.
SHIPPED_METRICS = ROOT / "zoo" / "weights" / "{arch}_deconv.fashion_mnist_e{epochs}" / "metrics.jsonl"
NOT_RECORDED = "not recorded"
EPOCHS = 20
FORMS = ("nd", "bn")
# The heavy three train their ND form only (the queue's order, reproduce/converged.sh).
ND_ONLY = ("resnext29_32x4d", "densenet121", "dpn92")
# The paper's Table 1, CIFAR-10 after 20 epochs (BN, ND).
PAPER_CIFAR10_20EPOCHS = {
    "vgg16": (90.07, 93.25), "resnet18": (92.64, 94.07), "preact_resnet18": (91.93, 94.10),
    "densenet121": (93.25, 94.89), "resnext29_32x4d": (93.12, 94.05), "mobilenetv2": (89.86, 92.52),
    "dpn92": (92.87, 93.74), "pnasnet_a": (75.85, 81.97), "senet18": (92.37, 94.11),
    "efficientnet_b0": (84.21, 86.78),
}
TOLERANCE = 0.3  # points of test top-1 the reduced-precision check may lose against float32 exact
BF16_ARGS = ["--amp", "bf16", "--channels-last"]


def float32_exact_top1(paper_claim: Path = PAPER_CLAIM) -> float:
    rows = {row["arch"]: row for row in json.loads(paper_claim.read_text())["rows"]}
    return float(rows["resnet18"]["nd"]["test_top1"])


def decide(runs: Path, native_bf16: bool, paper_claim: Path = PAPER_CLAIM) -> dict[str, Any]:
    """The precision record for ``runs``: float32 without native bf16, else by the check run's top-1."""
    reference = float32_exact_top1(paper_claim)
    from benchmarks._common import machine_info  # the CPU as every benchmark result names it

    record: dict[str, Any] = {"cpu": machine_info()["cpu"], "native_bf16": native_bf16, "float32_exact_top1": reference,
                              "tolerance": TOLERANCE}
    if not native_bf16:
        return {**record, "precision": "float32", "args": [],
                "reason": "the CPU has no native bf16 (bf16 would be emulated)"}
    check = read_run(runs / "precision-check")
    if check is None or "test_top1" not in check:
        raise SystemExit(f"{runs / 'precision-check'}: no finished one-epoch check run; run reproduce/converged.sh, "
                         "which trains it first")
    top1 = check["test_top1"]
    record.update(check_top1=top1, check_seconds=check["seconds"], check_minus_float32=round(top1 - reference, 2))
    if top1 >= reference - TOLERANCE:
        return {**record, "precision": "bf16", "args": BF16_ARGS,
                "reason": f"bf16 check {top1:.2f} is no more than {TOLERANCE} below float32 exact {reference:.2f}"}
    return {**record, "precision": "float32", "args": [],
            "reason": f"bf16 check {top1:.2f} is more than {TOLERANCE} below float32 exact {reference:.2f}"}


def carry_precision(native_bf16: bool, previous: Path = RESULTS) -> dict[str, Any] | None:
    """The decision recorded in ``previous`` for a new run folder, or None where there is none or this CPU cannot
    run it natively (then the queue decides afresh)."""
    recorded = _recorded(previous).get("precision")
    if not recorded or (recorded["precision"] == "bf16" and not native_bf16):
        return None
    from benchmarks._common import machine_info

    # The record keeps the CPU its check ran on; this one only has to compute the same precision natively.
    return {**recorded, "carried_over_to_cpu": machine_info()["cpu"],
            "carried_over_from": str(previous.relative_to(ROOT)) if previous.is_relative_to(ROOT) else str(previous)}


def recorded_finished(runs: Path, previous: Path = RESULTS) -> list[str]:
    """Runs that ``previous`` records as finished (all ``EPOCHS`` epochs) whose directory is not in ``runs``."""
    curves = _recorded(previous).get("curves", {})
    return [run for run, curve in curves.items()
            if _final(curve) is not None and not (runs / run / "config.json").is_file()]


def read_precision(runs: Path) -> dict[str, Any]:
    path = runs / "precision.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"{path}: missing; `python reproduce/converged.py decide-precision --runs {runs}` "
                         "writes it") from None


def cpu_spans(rows: list[dict[str, Any]]) -> list[list[Any]]:
    """``[cpu, first epoch, last epoch]`` for each stretch of epochs that trained on one CPU (a run resumed on
    another machine has several; the bf16 kernels differ between CPUs), from each epoch row's ``cpu``."""
    from benchmarks._common import cpu_name

    spans: list[list[Any]] = []
    for row in rows:
        cpu = cpu_name(row["cpu"]) if row.get("cpu") else NOT_RECORDED
        if spans and spans[-1][0] == cpu:
            spans[-1][2] = int(row["epoch"])
        else:
            spans.append([cpu, int(row["epoch"]), int(row["epoch"])])
    return spans


def _epoch_rows(metrics: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.is_file() else []
    return [r for r in rows if r.get("epoch", 0) >= 1 and not r.get("partial")]


def read_curve(run_dir: Path) -> dict[str, Any] | None:
    """A run's test top-1 per finished epoch, its step (from the checkpoint: a partial epoch counts), its
    precision, the CPUs its epochs trained on, and whether it diverged; None if the run was never started."""
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return None
    rows = _epoch_rows(run_dir / "metrics.jsonl")
    train = json.loads(config_path.read_text()).get("train", {})
    step = rows[-1]["step"] if rows else 0
    if (run_dir / "checkpoint.pt").is_file():
        from ndeconv.training.checkpoint import load_checkpoint

        step = max(step, int(load_checkpoint(run_dir)["state"].get("global_step", 0)))
    curve: dict[str, Any] = {
        "epochs": [int(r["epoch"]) for r in rows], "test_top1": [float(r["test_top1"]) for r in rows],
        "step": step, "seconds": float(sum(r.get("seconds", 0.0) for r in rows)),
        "precision": "bf16" if train.get("amp") else "float32", "fast": train.get("fast"),
        "cpus": cpu_spans(rows),
    }
    diverged = read_run(run_dir)
    if diverged and "diverged_at_step" in diverged:
        curve.update(diverged_at_step=diverged["diverged_at_step"], diverged_loss=diverged["diverged_loss"])
    return curve


def _recorded(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def collect(runs: Path, previous: Path = RESULTS) -> dict[str, Any]:
    """Every run's curve (on disk in ``runs``, else as recorded in ``previous``) and the claim table's rows."""
    before = _recorded(previous)
    old_curves = before.get("curves", {})
    precision = read_precision(runs) if (runs / "precision.json").is_file() else before.get("precision")
    curves: dict[str, Any] = {}
    for arch in ARCHS:
        for form in FORMS if arch not in ND_ONLY else ("nd",):
            run = f"{arch}-{form}"
            curve = read_curve(runs / run) or old_curves.get(run)
            if curve is not None and "cpus" not in curve:  # recorded before the CPUs were
                shipped = Path(str(SHIPPED_METRICS).format(arch=arch, epochs=EPOCHS))
                rows = _epoch_rows(shipped) if form == "nd" and _final(curve) is not None else []
                unknown = [[NOT_RECORDED, 1, curve["epochs"][-1]]] if curve["epochs"] else []
                curve = {**curve, "cpus": cpu_spans(rows) if rows else unknown}
            if curve is not None:
                curves[run] = curve
    rows = []
    for arch in ARCHS:
        final = {form: _final(curves.get(f"{arch}-{form}")) for form in FORMS}
        paper_bn, paper_nd = PAPER_CIFAR10_20EPOCHS[arch]
        both = all(isinstance(v, float) for v in final.values())
        rows.append({"arch": arch, "bn": final["bn"], "nd": final["nd"],
                     "nd_minus_bn": round(final["nd"] - final["bn"], 2) if both else None,
                     "paper_cifar10_bn": paper_bn, "paper_cifar10_nd": paper_nd})
    return {"epochs": EPOCHS, "precision": precision, "curves": curves, "rows": rows}


def _final(curve: dict[str, Any] | None) -> float | str | None:
    """The 20-epoch test top-1, "diverged", or None while the run is pending."""
    if curve is None:
        return None
    if "diverged_at_step" in curve:
        return "diverged"
    return curve["test_top1"][-1] if curve["epochs"] and curve["epochs"][-1] >= EPOCHS else None


def _cell(value: float | str | None) -> str:
    return "pending" if value is None else value if isinstance(value, str) else f"{value:.2f}"


def claim_markdown(result: dict[str, Any]) -> str:
    lines = ["| architecture | BN top-1 | ND top-1 | ND − BN | paper CIFAR-10 BN → ND |", "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        diff = "–" if row["nd_minus_bn"] is None else f"{row['nd_minus_bn']:+.2f}"
        bn = "not queued" if row["arch"] in ND_ONLY and row["bn"] is None else _cell(row["bn"])
        lines.append(f"| {row['arch']} | {bn} | {_cell(row['nd'])} | {diff} | "
                     f"{row['paper_cifar10_bn']:.2f} → {row['paper_cifar10_nd']:.2f} |")
    pairs = [r for r in result["rows"] if r["nd_minus_bn"] is not None]
    summary = f"Measured pairs: {len(pairs)} of {len(result['rows']) - len(ND_ONLY)}."
    if pairs:
        behind = [r["arch"] for r in pairs if r["nd_minus_bn"] <= 0]
        summary += (f" ND did not beat BN for: {', '.join(behind)}." if behind
                    else " ND beat BN in every measured pair.")
    return "\n".join(lines) + "\n\n" + summary + "\n"


def precision_sentence(precision: dict[str, Any] | None) -> str:
    if not precision:
        return "Precision: not decided yet (the queue decides it before its first run)."
    mode = "bf16 autocast with channels-last" if precision["precision"] == "bf16" else "float32"
    check = (f" (a one-epoch ResNet-18 in that mode and fast mode k=8 scored {precision['check_top1']:.2f}% "
             f"against float32 exact's {precision['float32_exact_top1']:.2f}%, "
             f"{precision['check_minus_float32']:+.2f} points)" if "check_top1" in precision else "")
    return f"The runs train in fast mode k=8 and {mode}{check}."


def trained_on(spans: list[list[Any]]) -> str:
    """"Intel Xeon" for one CPU; "Intel Xeon (1-10), AMD EPYC (11-20)" for a run resumed on another machine."""
    if len({cpu for cpu, _, _ in spans}) == 1:
        return spans[0][0]
    return ", ".join(f"{cpu} ({a})" if a == b else f"{cpu} ({a}-{b})" for cpu, a, b in spans)


def curves_markdown(result: dict[str, Any]) -> str:
    lines = [precision_sentence(result.get("precision")), "",
             "| run | precision | epochs | step | test top-1, last epoch | best | trained on |",
             "|---|---|---:|---:|---:|---:|---|"]
    for run, curve in result["curves"].items():
        last = f"{curve['test_top1'][-1]:.2f}" if curve["test_top1"] else "–"
        best = f"{max(curve['test_top1']):.2f}" if curve["test_top1"] else "–"
        if "diverged_at_step" in curve:
            last = f"diverged at step {curve['diverged_at_step']} (loss {curve['diverged_loss']})"
        done = curve["epochs"][-1] if curve["epochs"] else 0
        where = trained_on(curve["cpus"]) if curve["cpus"] else "–"
        lines.append(f"| {run} | {curve['precision']}, fast {curve['fast']} | {done}/{EPOCHS} | {curve['step']} | "
                     f"{last} | {best} | {where} |")
    if not result["curves"]:
        lines.append("| (no run started yet) | | | | | | |")
    chart = "\n![Test top-1 per epoch, ND and BN of each architecture](../reproduce/results/converged_curves.png)\n"
    return "\n".join(lines) + "\n" + (chart if result["curves"] else "")


def summary_markdown(result: dict[str, Any]) -> str:
    finished = sum(1 for c in result["curves"].values() if c["epochs"] and c["epochs"][-1] >= EPOCHS)
    return (f"{precision_sentence(result.get('precision'))} Finished: {finished} of "
            f"{len(ARCHS) * 2 - len(ND_ONLY)} runs; learning curves and the 20-epoch claim table: "
            "[docs/reproduction.md](docs/reproduction.md#20-epoch-runs).\n")


STYLE = {"bn": ("BatchNorm", "tab:blue"), "nd": ("deconvolution", "tab:orange")}


def curves_chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 5, figsize=(15, 6), sharex=True, sharey=True)
    for ax, arch in zip(axes.flat, ARCHS, strict=True):
        for form, (label, color) in STYLE.items():
            curve = result["curves"].get(f"{arch}-{form}")
            if curve and curve["epochs"]:
                ax.plot(curve["epochs"], curve["test_top1"], marker=".", color=color, label=label)
        ax.set_title(arch, fontsize=9)
        ax.set_xlim(0.5, EPOCHS + 0.5)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    for ax in axes[:, 0]:
        ax.set_ylabel("test top-1 (%)")
    # One legend for all panels, whichever runs have points yet.
    handles = [plt.Line2D([], [], marker=".", color=color, label=label) for label, color in STYLE.values()]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    fig.suptitle("Fashion-MNIST, 20 epochs: test top-1 per finished epoch", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(runs: Path, out: Path = RESULTS.parent, docs: Path | None = None,
           readme: Path | None = None) -> dict[str, Any]:
    """Regenerate the results file, the chart and the blocks (in ``docs``/``readme``, default the files that hold
    their markers)."""
    result = collect(runs, previous=out / RESULTS.name)
    command = f"python reproduce/converged.py report --runs {runs}".replace(str(Path.home()), "~")
    save_json_atomic({"command": command, **result}, out / RESULTS.name)
    curves_chart(result, out / CURVES.name)
    write_readme_block("converged-curves", curves_markdown(result), docs)
    write_readme_block("converged-claim", claim_markdown(result), docs)
    write_readme_block("converged-summary", summary_markdown(result), readme)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("report", "decide-precision", "precision-args", "carry-precision",
                                            "recorded-finished"))
    parser.add_argument("--runs", type=Path, default=Path.home() / ".cache" / "ndeconv" / "runs" / "converged")
    args = parser.parse_args(argv)
    if args.command == "report":
        result = report(args.runs)
        print(curves_markdown(result) + "\n" + claim_markdown(result))
    elif args.command in ("decide-precision", "carry-precision"):
        import torch

        from ndeconv.runtime import native_amp_dtype

        native_bf16 = native_amp_dtype("cpu") is torch.bfloat16
        if args.command == "carry-precision":
            record = carry_precision(native_bf16)
            if record is None:
                print(f"precision: nothing to carry over from {RESULTS.relative_to(ROOT)} to this CPU; deciding afresh")
                return 1
        else:
            record = decide(args.runs, native_bf16)
        save_json_atomic(record, args.runs / "precision.json")
        print(f"precision: {record['precision']} ({record['reason']})")
    elif args.command == "recorded-finished":
        print(" ".join(recorded_finished(args.runs)))
    else:
        print(" ".join(read_precision(args.runs)["args"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
