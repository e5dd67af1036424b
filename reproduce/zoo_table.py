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


def rows() -> list[str]:
    import timm

    lines = [
        "| model | parameters | Fashion-MNIST top-1 | epochs | weights | load |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in sorted(ZOO_MODELS):
        folder = WEIGHTS_DIR / f"{name}.fashion_mnist"
        config_path = folder / "config.json"
        if config_path.is_file():
            config = json.loads(config_path.read_text())
            weights = config["weights"]
            size_mb = (folder / "model.safetensors").stat().st_size / 1e6
            epochs = config["train"]["epochs"]
            lines.append(
                f"| {name} | {weights['params'] / 1e6:.2f}M | {weights['test_top1']:.2f}% | {epochs} | "
                f"{size_mb:.1f} MB {weights['dtype']} | `timm.create_model('{name}', pretrained=True)` |"
            )
        else:
            params = sum(p.numel() for p in timm.create_model(name, in_chans=1, pretrained=False).parameters())
            lines.append(f"| {name} | {params / 1e6:.2f}M | not yet shipped | – | – | `pretrained=False` |")
    return lines


def main() -> int:
    table = "\n".join(rows()) + "\n"
    write_readme_block("zoo-table", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
