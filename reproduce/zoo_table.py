"""Regenerate the README's zoo table and ``results/results-fashion-mnist.csv`` from the shipped weight folders
(``zoo/weights/*/config.json``).

Every zoo model is listed: the test top-1 of its one-epoch and 20-epoch weights side by side, and the file size
and load command of its default tag (the first in its ``default_cfgs``, what ``pretrained=True`` loads), from the
shipped cards; or it is marked not yet shipped. The CSV follows timm's results files
(``results/results-imagenet.csv``: model, top1, top1_err, top5, top5_err, param_count in millions, img_size,
crop_pct, interpolation), one row per shipped weight set, plus its tag, epochs and training precision. Nothing in
either is typed by hand:

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

# The tags of a deconvolution network's own weights, by epochs: the one-epoch weights first shipped, and the
# 20-epoch (converged) ones, which become the architecture's default tag when they ship.
ONE_EPOCH_TAG, CONVERGED_TAG = "fashion_mnist", "fashion_mnist_e20"
HYBRID_TAG = "fashion_mnist_stem"


def _card(folder: Path) -> dict | None:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _top1(card: dict | None) -> str:
    return f"{card['weights']['test_top1']:.2f}%" if card else "–"


def _weights(card: dict, folder: Path) -> str:
    return f"{(folder / 'model.safetensors').stat().st_size / 1e6:.1f} MB {card['weights']['dtype']}"


def rows() -> list[str]:
    import timm
    from timm.models import get_pretrained_cfg

    lines = [
        "| model | parameters | Fashion-MNIST top-1, 1 epoch | 20 epochs | weights (default tag) | load |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in sorted(ZOO_MODELS):
        folders = {tag: WEIGHTS_DIR / f"{name}.{tag}" for tag in (ONE_EPOCH_TAG, CONVERGED_TAG, HYBRID_TAG)}
        cards = {tag: _card(folder) for tag, folder in folders.items()}
        default = get_pretrained_cfg(name).tag  # the first tag of the model's default_cfgs: what pretrained=True loads
        if cards.get(default) is None:
            params = sum(p.numel() for p in timm.create_model(name, in_chans=1, pretrained=False).parameters())
            lines.append(f"| {name} | {params / 1e6:.2f}M | not yet shipped | – | – | `pretrained=False` |")
            continue
        card = cards[default]
        lines.append(f"| {name} (`.{default}`) | {card['weights']['params'] / 1e6:.2f}M | "
                     f"{_top1(cards[ONE_EPOCH_TAG])} | {_top1(cards[CONVERGED_TAG])} | "
                     f"{_weights(card, folders[default])} | `timm.create_model('{name}', pretrained=True)` |")
        hybrid = cards[HYBRID_TAG]  # the hybrid's weights, where shipped: a row of their own
        if hybrid is not None:
            column = (_top1(hybrid), "–") if hybrid["train"]["epochs"] == 1 else ("–", _top1(hybrid))
            lines.append(f"| {name}.{HYBRID_TAG} (hybrid) | {hybrid['weights']['params'] / 1e6:.2f}M | "
                         f"{column[0]} | {column[1]} | {_weights(hybrid, folders[HYBRID_TAG])} | "
                         f"`timm.create_model('{name}.{HYBRID_TAG}', pretrained=True)` |")
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
