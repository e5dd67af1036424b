"""timm's own eval pipeline on the Fashion-MNIST test set as an image folder, for every shipped zoo model.

What ``validate.py DATA --model NAME --pretrained --class-map class_map.txt`` does, in process: the 10,000 test
images are written as 28x28 grayscale PNGs into ``<class folder>/`` folders (the names of the shipped
``class_map.txt``; ``ndeconv.image_folder.write_image_folder``), read back by ``timm.data.create_dataset`` (RGB for
a 3-channel pretrained_cfg, as validate.py chooses), transformed by ``timm.data.create_loader`` with the model's
resolved data config (its input_size, crop_pct, crop_mode, interpolation, mean, std) and scored against the card's
top-1:

    python reproduce/timm_transforms.py                              # all shipped models, docs block
    python reproduce/timm_transforms.py --models resnet18_deconv --crop-pct 1.0 --no-readme   # the old cfg

Results go to ``reproduce/results/timm_transforms.json`` (a run of some models adds to the models recorded) and,
unless ``--no-readme``, the ``timm-transforms`` block of docs/zoo.md. One model is a few minutes with one thread
(ResNet-18: about 5 on the shared 2-core machine; DPN-92 and DenseNet-121 several times that).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from timm.models import get_pretrained_cfg  # noqa: E402

import ndeconv  # noqa: E402,F401 - registers the zoo
from ndeconv.datasets import FASHION_MNIST_DIR  # noqa: E402
from ndeconv.image_folder import write_image_folder  # noqa: E402
from ndeconv.zoo._pretrained import WEIGHTS_DIR  # noqa: E402
from ndeconv.zoo._shipping import CLASS_MAP_FILE  # noqa: E402
from reproduce.readme_block import write_readme_block  # noqa: E402

RESULTS = ROOT / "reproduce" / "results" / "timm_transforms.json"


def timm_top1(name: str, folder: Path, class_map: Path, crop_pct: float | None, batch_size: int) -> dict:
    """Top-1 of ``timm.create_model(name, pretrained=True)`` through timm's dataset, transforms and loader."""
    import timm
    from timm.data import create_dataset, create_loader, resolve_data_config

    model = timm.create_model(name, pretrained=True).eval()
    overrides = {"crop_pct": crop_pct} if crop_pct is not None else {}
    config = resolve_data_config(overrides, model=model)
    mode = "RGB" if config["input_size"][0] == 3 else "L"  # validate.py's choice of input_img_mode
    dataset = create_dataset("", root=str(folder), split="", class_map=str(class_map), input_img_mode=mode)
    loader = create_loader(dataset, input_size=config["input_size"], batch_size=batch_size, use_prefetcher=False,
                           interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
                           crop_pct=config["crop_pct"], crop_mode=config["crop_mode"], num_workers=0)
    correct = total = 0
    start = time.perf_counter()
    with torch.no_grad():
        for images, targets in loader:
            correct += int((model(images).argmax(1) == targets).sum())
            total += len(targets)
    return {"model": name, "count": total, "top1": 100.0 * correct / total, "data_config": {
        k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "seconds": round(time.perf_counter() - start, 1)}


def table(results: list[dict]) -> str:
    lines = ["| model | card top-1 (ndeconv eval) | timm pipeline top-1 | difference |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} (`.{r['tag']}`) | {r['card_top1']:.2f}% | {r['top1']:.2f}% "
                     f"| {r['top1'] - r['card_top1']:+.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", help="zoo models (default: every shipped one)")
    parser.add_argument("--data-dir", default=FASHION_MNIST_DIR, help="Fashion-MNIST IDX files")
    parser.add_argument("--crop-pct", type=float, help="override the cfg's crop_pct (1.0: the cfg before the fix)")
    parser.add_argument("--limit", type=int, help="first N test images only")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--no-readme", action="store_true", help="print only; leave the docs and results alone")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = args.models or sorted({p.parent.name.split(".")[0] for p in WEIGHTS_DIR.glob("*/model.safetensors")})
    results = []
    with tempfile.TemporaryDirectory(prefix="fashion-mnist-test-") as tmp:
        # The test images as they are (28x28 'L'), in the class folders the shipped class_map.txt names.
        folder = Path(tmp) / "test"
        write_image_folder("fashion_mnist", "test", folder, data_dir=args.data_dir, limit=args.limit)
        for name in models:
            # The default tag's card: `pretrained=True` loads that tag (the 20-epoch one where it has shipped).
            tag = get_pretrained_cfg(name).tag
            weights = WEIGHTS_DIR / f"{name}.{tag}"
            card = json.loads((weights / "config.json").read_text())["weights"]["test_top1"]
            result = timm_top1(name, folder, weights / CLASS_MAP_FILE, args.crop_pct, args.batch_size)
            result.update(tag=tag, card_top1=card, threads=args.threads)
            print(f"{name}: timm pipeline {result['top1']:.2f}% on {result['count']} images, card {card:.2f}% "
                  f"({result['seconds']} s)", flush=True)
            results.append(result)
    print(table(results))
    if not args.no_readme and args.limit is None and args.crop_pct is None:
        # Runs of some models add to (or replace) the recorded ones: the table lists every model measured.
        recorded = json.loads(RESULTS.read_text())["results"] if RESULTS.is_file() else []
        merged = {r["model"]: r for r in recorded} | {r["model"]: r for r in results}
        results = [merged[name] for name in sorted(merged)]
        RESULTS.write_text(json.dumps({"results": results}, indent=2) + "\n")
        write_readme_block("timm-transforms", table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
