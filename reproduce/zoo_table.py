"""Regenerate the README's zoo table and ``results/results-fashion-mnist.csv`` from the shipped weight folders
(``zoo/weights/*/config.json``).

Every zoo model is listed; its top-1, file size and load command come from its shipped card, or it is marked
not yet shipped. The CSV follows timm's results files (``results/results-imagenet.csv``: model, top1, top1_err,
top5, top5_err, param_count in millions, img_size, crop_pct, interpolation), one row per shipped weight set,
plus its tag, epochs and training precision. Nothing in either is typed by hand:

    python reproduce/zoo_table.py
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ndeconv  # noqa: E402,F401 - registers the zoo
from ndeconv.zoo import ZOO_MODELS  # noqa: E402
from ndeconv.zoo._pretrained import WEIGHTS_DIR  # noqa: E402
from reproduce.readme_block import write_readme_block  # noqa: E402


def _row(label: str, folder: Path, load_name: str) -> str:
    config = json.loads((folder / "config.json").read_text())
    weights = config["weights"]
    size_mb = (folder / "model.safetensors").stat().st_size / 1e6
    return (f"| {label} | {weights['params'] / 1e6:.2f}M | {weights['test_top1']:.2f}% | {config['train']['epochs']} | "
            f"{size_mb:.1f} MB {weights['dtype']} | `timm.create_model('{load_name}', pretrained=True)` |")


def rows() -> list[str]:
    import timm

    lines = [
        "| model | parameters | Fashion-MNIST top-1 | epochs | weights | load |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in sorted(ZOO_MODELS):
        folder = WEIGHTS_DIR / f"{name}.fashion_mnist"
        if not (folder / "config.json").is_file():
            params = sum(p.numel() for p in timm.create_model(name, in_chans=1, pretrained=False).parameters())
            lines.append(f"| {name} | {params / 1e6:.2f}M | not yet shipped | – | – | `pretrained=False` |")
            continue
        lines.append(_row(name, folder, name))
        hybrid = WEIGHTS_DIR / f"{name}.fashion_mnist_stem"  # the hybrid's weights, where shipped: a row of their own
        if (hybrid / "config.json").is_file():
            lines.append(_row(f"{name}.fashion_mnist_stem (hybrid)", hybrid, f"{name}.fashion_mnist_stem"))
    return lines


CSV_PATH = ROOT / "results" / "results-fashion-mnist.csv"
CSV_COLUMNS = ("model", "tag", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
               "interpolation", "epochs", "precision")


def results_csv(weights_dir: Path = WEIGHTS_DIR) -> str:
    """timm's results CSV of every shipped weight set, best top-1 first (timm's order)."""
    records = []
    for config_path in sorted(weights_dir.glob("*/config.json")):
        config = json.loads(config_path.read_text())
        weights, cfg, train = config["weights"], config["pretrained_cfg"], config["train"]
        top1, top5 = float(weights["test_top1"]), float(weights["test_top5"])
        records.append({
            "model": config_path.parent.name, "tag": cfg["tag"], "top1": f"{top1:.3f}",
            "top1_err": f"{100 - top1:.3f}", "top5": f"{top5:.3f}", "top5_err": f"{100 - top5:.3f}",
            "param_count": f"{weights['params'] / 1e6:.2f}", "img_size": cfg["input_size"][-1],
            "crop_pct": f"{cfg['crop_pct']:.3f}", "interpolation": cfg["interpolation"], "epochs": train["epochs"],
            # The training run's autocast dtype (none: float32); the stored weights' dtype is in the card.
            "precision": train.get("amp") or "float32",
        })
    records.sort(key=lambda r: (-float(r["top1"]), r["model"]))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    return out.getvalue()


def main() -> int:
    table = "\n".join(rows()) + "\n"
    write_readme_block("zoo-table", table)
    CSV_PATH.parent.mkdir(exist_ok=True)
    CSV_PATH.write_text(results_csv())
    print(table)
    print(f"wrote {CSV_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
