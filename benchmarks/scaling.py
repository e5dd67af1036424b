"""How deconvolution's overhead scales with batch and image size, on one ResNet-18-style stack.

    python benchmarks/scaling.py                      # batch 32/128/512 x image 32/64/128/224
    python benchmarks/scaling.py --quick              # batch 32/128 x image 32/64, 1+2 steps

The stack: a 7x7/2 stem + 3x3/2 max-pool, then ResNet-18's first two stages (64 and 128 channels),
global pool and head; ND (FastDeconv) against the same stack with BatchNorm, steps interleaved.
``deconv_share`` = 1 - BN/ND step time: the part of an ND step that the BatchNorm net does not pay.
The whitening matrices (Newton–Schulz on 576x576 / 1152x1152) are a fixed cost per step, so the
share should fall as images (and batches) grow. Writes benchmarks/results/<name>.json, a
Markdown table (<name>.md) and a plot (<name>.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks._models import build  # noqa: E402


def measure(batch: int, image: int, warmup: int, repeats: int) -> dict:
    torch.manual_seed(0)
    nets = {"nd": build("stack", deconv=True)[0], "bn": build("stack", deconv=False)[0]}
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, image, image, generator=g), torch.randint(0, 10, (batch,), generator=g)
    times = C.interleaved({k: C.make_train_step(m, x, y) for k, m in nets.items()}, warmup, repeats)
    nd, bn = C.summary(times["nd"]), C.summary(times["bn"])
    return {"batch": batch, "image": image, "nd_train": nd, "bn_train": bn,
            "nd_over_bn_train": round(nd["median_s"] / bn["median_s"], 3),
            "deconv_share": round(1 - bn["median_s"] / nd["median_s"], 3)}


def table(rows: list[dict]) -> str:
    lines = ["| batch | image | ND step (s) | BN step (s) | ND/BN | deconvolution share |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['batch']} | {r['image']} | {r['nd_train']['median_s']:.3f} | "
                     f"{r['bn_train']['median_s']:.3f} | {r['nd_over_bn_train']:.2f} | {r['deconv_share']:.0%} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in rows}):
        pts = sorted((r["image"], r["nd_over_bn_train"]) for r in rows if r["batch"] == batch)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("image size (pixels)")
    ax.set_ylabel("ND / BN training-step time")
    ax.set_title("Deconvolution overhead, ResNet-18-style stack")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", nargs="+", type=int, default=[32, 128, 512])
    p.add_argument("--image", nargs="+", type=int, default=[32, 64, 128, 224])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="batch 32/128, image 32/64, 1 warm-up, 2 timed steps")
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.image, args.warmup, args.repeats = [32, 128], [32, 64], 1, 2
    rows = []
    for batch in args.batch:
        for image in args.image:
            rows.append(measure(batch, image, args.warmup, args.repeats))
            r = rows[-1]
            print(f"batch {batch:4d} image {image:4d}: ND/BN {r['nd_over_bn_train']:.2f} "
                  f"share {r['deconv_share']:.0%}", flush=True)
    name = args.name or ("scaling_quick" if args.quick else "scaling")
    payload = {"command": C.command_line(), "machine": C.machine_info(), "method": __doc__.strip(), "rows": rows}
    out = C.write_result(name, payload)
    md = C.RESULTS / f"{name}.md"
    md.write_text(table(rows))
    plot(rows, C.RESULTS / f"{name}.png")
    print(table(rows))
    print(f"wrote {out}, {md}, {C.RESULTS / f'{name}.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
