"""Regenerate the README's zoo table from the shipped weight folders (``zoo/weights/*/config.json``).

Every zoo model is listed; its top-1, file size and load command come from its shipped card, or it is marked
not yet shipped. Nothing in the table is typed by hand:

    python reproduce/zoo_table.py
"""

from __future__ import annotations

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


def main() -> int:
    table = "\n".join(rows()) + "\n"
    write_readme_block("zoo-table", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
