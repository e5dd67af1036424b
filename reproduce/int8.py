"""Does a folded deconvolution network quantize to int8 as well as a BatchNorm one? Measured on the shipped weights.

For each shipped Fashion-MNIST model (the ten deconvolution networks, ``fashion_mnist``, and the BatchNorm networks
with a deconvolution stem, ``fashion_mnist_stem``: every layer after the stem is a conv with BatchNorm fused into
it), as ``ndeconv export --int8`` makes it: fold, export float32, calibrate on 512 training images, quantize
statically with onnxruntime (QDQ, uint8 activations), then score the float32 and int8 files with onnxruntime on the
10,000 test images. The int8 variants (``VARIANTS``): int8 weights per tensor and per output channel with minmax
calibration, per channel with percentile calibration, per channel with ``auto`` calibration (minmax or percentile,
whichever agrees better with the float32 file on the 1,000 training images drawn after the calibration ones), and,
to tell weight from activation error apart, int8 weights with 16-bit activations (opset 21's 16-bit
QuantizeLinear; not what ``--int8`` writes). Beside the scores, each conv/linear layer's weight range,
max |w| / std(w), before folding (the trained weights) and after (the weights the int8 file stores: whitening, or
BatchNorm, folded in):

    python reproduce/int8.py                                       # every shipped model, docs block
    python reproduce/int8.py --variants per_channel_auto           # one variant more, into the recorded rows
    python reproduce/int8.py --models resnet18_deconv.fashion_mnist --limit 1000 --no-docs   # a quick look

Results go to ``reproduce/results/int8.json`` (a run of some models or variants adds to those recorded) and,
unless ``--no-docs`` or ``--limit``, the ``int8-accuracy`` block of docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ndeconv.onnx_defaults import (  # noqa: E402
    CALIBRATION_METHODS,
    DEFAULT_CALIBRATION_IMAGES,
    DEFAULT_SELECTION_IMAGES,
)
from reproduce.readme_block import write_readme_block  # noqa: E402

RESULTS = ROOT / "reproduce" / "results" / "int8.json"
TAGS = {"fashion_mnist": "deconvolution", "fashion_mnist_stem": "BatchNorm (deconvolution stem)"}
# What ``ndeconv export --int8 --calibrate-data fashion_mnist`` uses by default (the method: each variant's own).
CALIBRATION = dict(dataset="fashion_mnist", images=DEFAULT_CALIBRATION_IMAGES, method=CALIBRATION_METHODS[0], seed=0,
                   held_out_images=DEFAULT_SELECTION_IMAGES)
# Variant -> (weights per output channel, calibration method, activation bits), in the table's column order.
VARIANTS: dict[str, tuple[bool, str, int]] = {
    "per_tensor": (False, "minmax", 8),
    "per_channel": (True, "minmax", 8),
    "per_channel_percentile": (True, "percentile", 8),
    "per_channel_auto": (True, "auto", 8),
    "activations_16bit": (True, "minmax", 16),
}
HEADERS = {"per_tensor": "int8 per-tensor", "per_channel": "int8 per-channel",
           "per_channel_percentile": "int8 per-channel, percentile", "per_channel_auto": "int8 per-channel, auto",
           "activations_16bit": "int8 weights, 16-bit activations"}


def shipped_models() -> list[str]:
    from ndeconv.zoo._pretrained import WEIGHTS_DIR

    return sorted(p.name for p in WEIGHTS_DIR.iterdir()
                  if p.suffix.lstrip(".") in TAGS and (p / "model.safetensors").is_file())


def weight_range(weight: torch.Tensor) -> float:
    """max |w| / std(w) over the whole tensor: how many standard deviations int8's 127 steps must span per tensor."""
    w = weight.detach().double().flatten()
    return float(w.abs().max() / w.std()) if w.numel() > 1 and w.std() > 0 else float("nan")


def channel_range(weight: torch.Tensor) -> float:
    """The largest max |w_c| / std(w_c) over output channels c: the same for per-channel scales."""
    w = weight.detach().double().flatten(1)
    if w.shape[1] < 2:
        return float("nan")
    std = w.std(dim=1)
    keep = std > 0
    return float((w.abs().amax(dim=1)[keep] / std[keep]).max()) if keep.any() else float("nan")


def layer_ranges(model: nn.Module, folded: nn.Module) -> list[dict]:
    """Each conv/linear of ``folded`` (its name in the unfolded model too) with its weight range before and after."""
    before = {name: m for name, m in model.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}
    rows = []
    for name, module in folded.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        source = before.get(name)
        row = {"layer": name, "after": round(weight_range(module.weight), 2),
               "after_per_channel": round(channel_range(module.weight), 2)}
        if source is not None and source.weight.shape == module.weight.shape:
            row["before"] = round(weight_range(source.weight), 2)
            row["before_per_channel"] = round(channel_range(source.weight), 2)
        rows.append(row)
    return rows


def quantize_variant(float_path: Path, path: Path, images, held_out, variant: str) -> dict:  # noqa: ANN001 - arrays
    """``float_path`` quantized as ``variant`` says, into ``path`` (8-bit activations: as ``ndeconv export --int8``,
    checked as it checks); returns the settings recorded in the file."""
    from ndeconv.convert.quantize import check_int8_graph, quantize_onnx

    per_channel, method, bits = VARIANTS[variant]
    settings = quantize_onnx(float_path, path, images, per_channel=per_channel, method=method, force=True,
                             activation_bits=bits, held_out=held_out if method == "auto" else None)
    if bits == 8:
        check = check_int8_graph(path)
        if check.quantized_layers != check.weighted_layers:
            raise SystemExit(f"{path}: {check.quantized_layers} of {check.weighted_layers} layers hold int8 weights")
    return settings


def measure(name: str, tmp: Path, limit: int | None, threads: int | None = None,
            variants: list[str] | None = None) -> dict:
    from ndeconv.convert import fold
    from ndeconv.convert.export import export_onnx, weights_config
    from ndeconv.convert.quantize import calibration_images, held_out_images, onnx_top1
    from ndeconv.loading import load_model

    started = time.monotonic()
    loaded = load_model(name)
    model = loaded.model.eval()
    config = weights_config((getattr(model, "pretrained_cfg", None) or {}).get("file"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fold notes (BatchNorms kept or fused) are not the point here
        folded = fold(model, fuse_batchnorm=True)
        exported = export_onnx(model, tmp / f"{name}.onnx", force=True, verify=True, config=config,
                               source={"model": name})
    metadata = exported.metadata
    drawn = dict(input_size=json.loads(metadata["input_size"]), mean=json.loads(metadata["mean"]),
                 std=json.loads(metadata["std"]), crop_pct=float(metadata["crop_pct"]), seed=CALIBRATION["seed"])
    images = calibration_images(CALIBRATION["dataset"], CALIBRATION["images"], **drawn)
    variants = variants or list(VARIANTS)
    held_out = (held_out_images(CALIBRATION["dataset"], CALIBRATION["held_out_images"], after=CALIBRATION["images"],
                                **drawn) if any(VARIANTS[v][1] == "auto" for v in variants) else None)
    top1, count = onnx_top1(exported.path, CALIBRATION["dataset"], count=limit, threads=threads)
    row = {"model": name, "form": TAGS[name.rsplit(".", 1)[1]], "test_images": count, "float32": round(top1, 2)}
    for variant in variants:
        path = tmp / f"{name}.{variant}.onnx"
        settings = quantize_variant(exported.path, path, images, held_out, variant)
        score, _ = onnx_top1(path, CALIBRATION["dataset"], count=limit, threads=threads)
        row[f"int8_{variant}"] = round(score, 2)
        row[f"drop_{variant}"] = round(top1 - score, 2)
        kept = ""
        if "calibration_choice" in settings:  # auto: which method it kept, and how each candidate agreed
            row[f"calibration_{variant}"] = settings["calibration"]
            row[f"choice_{variant}"] = settings["calibration_choice"]["candidates"]
            kept = f", kept {settings['calibration']}"
        print(f"{name}: {HEADERS[variant]} {score:.2f}% (float32 {top1:.2f}%, {count} images{kept})", flush=True)
    layers = layer_ranges(model, folded)
    after = [r["after"] for r in layers]
    before = [r["before"] for r in layers if "before" in r]
    row.update({
        "range_before_median": round(statistics.median(before), 2) if before else None,
        "range_before_max": round(max(before), 2) if before else None,
        "range_after_median": round(statistics.median(after), 2),
        "range_after_max": round(max(after), 2),
        "worst_layer_after": max(layers, key=lambda r: r["after"])["layer"],
        "layers": layers,
    })
    print(f"{name}: weight range median {row['range_before_median']} -> {row['range_after_median']}, max "
          f"{row['range_before_max']} -> {row['range_after_max']} ({time.monotonic() - started:.0f} s)", flush=True)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | form | float32 | " + " | ".join(HEADERS.values())
             + " | weight range before → after folding (median; max) |",
             "|---|---|---:|" + "---:|" * len(HEADERS) + "---|"]
    for r in rows:
        before = (f"{r['range_before_median']:.1f}; {r['range_before_max']:.1f}" if r["range_before_max"] is not None
                  else "–")
        scores = [f"{r[f'int8_{v}']:.2f}% ({0.0 - r[f'drop_{v}']:+.2f}"
                  + (f", {r[f'calibration_{v}']}" if f"calibration_{v}" in r else "") + ")"
                  if f"int8_{v}" in r else "–" for v in HEADERS]
        lines.append(f"| {r['model']} | {r['form']} | {r['float32']:.2f}% | " + " | ".join(scores)
                     + f" | {before} → {r['range_after_median']:.1f}; {r['range_after_max']:.1f} |")
    return "\n".join(lines) + "\n"


def cpu_description() -> dict:
    from benchmarks._common import int8_flags, machine_info

    info = machine_info()
    return {"cpu": info["cpu"], "int8_flags": int8_flags(), "cpu_count": info["cpu_count"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="MODEL.TAG names (default: every shipped fashion_mnist and "
                        "fashion_mnist_stem model)")
    parser.add_argument("--limit", type=int, help="first N test images only (a quick look; nothing recorded)")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads (default: 1)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        help="measure only these (default: all); the recorded rows keep the others")
    parser.add_argument("--no-docs", action="store_true", help="print only; leave the docs and results alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime

    import ndeconv  # noqa: F401 - registers the zoo

    models = args.models or shipped_models()
    record = not args.no_docs and args.limit is None
    command = " ".join(["python reproduce/int8.py", *(sys.argv[1:] if argv is None else argv)])
    rows = []
    with tempfile.TemporaryDirectory(prefix="ndeconv-int8-") as tmp:
        for name in models:
            rows.append(measure(name, Path(tmp), args.limit, args.threads, args.variants))
            if record:  # each model as it is measured: a long run stopped halfway keeps what it measured
                merged = record_rows([rows[-1]], command, args.threads, onnxruntime.__version__)
    print(table(rows))
    if record:
        write_readme_block("int8-accuracy", table(merged))
    return 0


def record_rows(rows: list[dict], command: str, threads: int, ort_version: str) -> list[dict]:
    """Merge ``rows`` into reproduce/results/int8.json (a model measured again replaces its row) and return all
    rows. Runs over different models may go side by side: the read-merge-write holds a lock."""
    import fcntl

    from ndeconv.io import save_json_atomic

    with open(Path(tempfile.gettempdir()) / "ndeconv-int8-results.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recorded = json.loads(RESULTS.read_text())["results"] if RESULTS.is_file() else []
        merged = {r["model"]: r for r in recorded}
        for r in rows:  # a run of some variants keeps the row's other variants, and the commands that made them
            before = merged.get(r["model"], {})
            commands = [c for c in before.get("commands", []) if c != command]
            merged[r["model"]] = {**before, **r, "commands": [*commands, command]}
        order = {form: i for i, form in enumerate(TAGS.values())}
        merged_rows = sorted(merged.values(), key=lambda r: (order.get(r["form"], 9), r["model"]))
        variants = {v: dict(zip(("per_channel", "method", "activation_bits"), spec, strict=True))
                    for v, spec in VARIANTS.items()}
        payload = {"calibration": CALIBRATION, "variants": variants, "machine": cpu_description(), "threads": threads,
                   "onnxruntime": ort_version, "results": merged_rows}
        save_json_atomic(payload, RESULTS)
    return merged_rows


if __name__ == "__main__":
    sys.exit(main())
