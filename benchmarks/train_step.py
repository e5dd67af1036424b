"""Training-step and eval-forward time of deconvolution (ND) against the same network with BatchNorm (BN).

Examples (run from the project root; results land in benchmarks/results/<name>.json)::

    python benchmarks/train_step.py                                 # CIFAR ResNet-18, batch 128, + single layers
    python benchmarks/train_step.py --arch all --batch 64 128 --memory --name all_archs
    python benchmarks/train_step.py --quick                         # a smoke run: 1 warm-up, 2 timed steps

Method: ND and BN steps alternate (ND, BN, ND, BN, ...) after untimed warm-up rounds, so load
from other processes hits both alike; medians of the timed rounds are reported, with the ratio
beside the reference implementation's own median ratio (../shared/anchors/reference_speed.json).
A step is forward + cross-entropy + backward + SGD(momentum 0.9) on random 32x32 inputs; eval is
a no-grad forward in eval mode. A round is one step of each network, or with fast mode (``--fast K``) K turns of
one step each (the least common multiple of the K's): every network's time for the round is its mean step, so a
fast network is timed over whole refresh cycles and the others step beside it through the same seconds.
Like ``ndeconv train``, the benchmark first lets glibc's malloc reuse freed memory
(ndeconv.keep_freed_memory; ``--no-keep-freed-memory`` measures without).
``--channels-last`` puts every network and input in channels-last memory format (both forms alike);
``--amp bf16`` times both forms under ``torch.autocast`` (the loss in float32, as ``ndeconv train``);
with ``--float32-pair`` the same ND and BN networks also run in float32 in the same interleaved rounds
(``nd_fp32``, ``bn_fp32``), so the float32 ratio the autocast ratios are held against drifts with them.
``--memory`` measures each config's peak step memory in a fresh subprocess (ru_maxrss delta, see
_common.peak_rss_probe). ``--profile`` adds torch.profiler's top ops of an ND step. Each model row
also counts the step's arithmetic (benchmarks/flops.py): GFLOP of the convolutions and of the
whitening, and the ND/BN ratio that arithmetic alone implies; under ``--amp bf16`` also the exact step's floor
(benchmarks/floor.py: the BN step plus the whitening's products at this CPU's measured product rate, in bf16 with
``--bf16-whitening``, plus the inverse square roots, timed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from benchmarks._models import ZOO_ARCHS, build  # noqa: E402
from benchmarks.floor import floor  # noqa: E402
from benchmarks.flops import step_flops, whitening_layers  # noqa: E402
from ndeconv import FastDeconv, keep_freed_memory, set_bf16_whitening, set_fast_mode  # noqa: E402
from ndeconv.layers.fast_deconv import BF16_WHITENING_PRODUCTS  # noqa: E402

AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# One layer per ResNet-18 stage at its CIFAR resolution (channels, spatial size), plus the stride-2 1x1 shortcut.
LAYERS = (
    ("conv3x3_64@32", 64, 64, 3, 1, 32),
    ("conv3x3_128@16", 128, 128, 3, 1, 16),
    ("conv3x3_256@8", 256, 256, 3, 1, 8),
    ("conv3x3_512@4", 512, 512, 3, 1, 4),
    ("conv1x1_s2_128->256@16", 128, 256, 1, 2, 16),
)


def _data(batch: int, image: int, channels: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, channels, image, image, generator=g), torch.randint(0, 10, (batch,), generator=g)


class _LayerNet(nn.Module):
    """One conv (FastDeconv, or Conv2d + BatchNorm2d) with a linear read-out so a CE loss can train it."""

    def __init__(self, nd: bool, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        pad = k // 2
        if nd:
            self.body = FastDeconv(cin, cout, k, stride, pad)
        else:
            self.body = nn.Sequential(nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout))
        self.fc = nn.Linear(cout, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def _target(arch: str, ref: dict[str, float]) -> float | None:
    base = arch.removesuffix("_deconv")
    if base not in ref:
        return None
    return min(ref[base], 2.0, 1.5 if base == "resnet18" else 2.0)


def _refresh_cycle(net: str) -> int:
    """Fast mode's refresh cycle for ``net`` (``fast4``: one step that recomputes the whitening, three that reuse
    it); 1 for the others. A timed round holds whole cycles of every fast network, whose mean is its cost per step: a
    median of single steps would report the cheap reusing steps only."""
    return int(net[len("fast"):].split("_")[0]) if net.startswith("fast") else 1


FLOAT32 = "_fp32"  # suffix of the networks ``--float32-pair`` times in float32 beside the autocast ones


def _amp(net: str, args: argparse.Namespace) -> torch.dtype | None:
    return None if net.endswith(FLOAT32) else AMP[args.amp]


def _baseline(net: str) -> str:
    """The BN network ``net`` is held against: the one in its own precision."""
    return "bn" + FLOAT32 if net.endswith(FLOAT32) else "bn"


def bench_pair(nets: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict:
    """Interleaved training steps and eval forwards of ``nets``: medians, and each ND network's ratio to the BN one of
    its precision (``<net>_over_bn_train``; ``nd_fp32_over_bn_fp32_train`` for the float32 pair)."""
    train = {k: C.make_train_step(m, x, y, _amp(k, args)) for k, m in nets.items()}
    evals = {k: C.make_eval_forward(m, x, _amp(k, args)) for k, m in nets.items()}
    # Every network steps once per turn; a round is as many turns as a whole refresh cycle of every fast network, and
    # each network's time for a round is its mean step over it, so all of them are timed through the same seconds.
    turns = math.lcm(*(_refresh_cycle(k) for k in nets))
    t = C.interleaved(train, args.warmup, args.repeats, turns)  # seconds per training step, one value per round
    e = C.interleaved(evals, 1, args.eval_repeats)
    out = {f"{k}_train": C.summary(v) for k, v in t.items()}
    out.update({f"{k}_eval": C.summary(v) for k, v in e.items()})
    for k in nets:
        base = _baseline(k)
        if k != base:
            for phase in ("train", "eval"):
                out[f"{k}_over_{base}_{phase}"] = round(
                    out[f"{k}_{phase}"]["median_s"] / out[f"{base}_{phase}"]["median_s"], 3)
    return out


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _models(arch: str, fast: list[int], channels_last: bool = False, bf16_whitening: bool = False,
            float32_pair: bool = False) -> tuple[dict[str, nn.Module], str]:
    """The networks timed side by side: ``nd``, ``fast<K>`` for each K, with ``bf16_whitening`` a ``<name>_bf16w``
    twin of each (ndeconv.set_bf16_whitening), ``bn``, and with ``float32_pair`` an ``nd_fp32`` and a ``bn_fp32``
    (timed without autocast)."""
    torch.manual_seed(0)
    nd, source = build(arch, deconv=True)
    nets = {"nd": nd}
    for k in fast:
        fast_model, _ = build(arch, deconv=True)
        set_fast_mode(fast_model, k)
        nets[f"fast{k}"] = fast_model
    if bf16_whitening:
        for name in list(nets):
            twin, _ = build(arch, deconv=True)
            set_fast_mode(twin, _refresh_cycle(name))
            set_bf16_whitening(twin)
            nets[f"{name}_bf16w"] = twin
    nets["bn"], _ = build(arch, deconv=False)
    if float32_pair:
        nets["nd" + FLOAT32], _ = build(arch, deconv=True)
        nets["bn" + FLOAT32], _ = build(arch, deconv=False)
    return {k: m.to(memory_format=_layout(channels_last)) for k, m in nets.items()}, source


def run_models(args: argparse.Namespace, ref: dict[str, float]) -> list[dict]:
    archs = ZOO_ARCHS if args.arch == ["all"] else args.arch
    rows = []
    for arch in archs:
        for batch in args.batch:
            try:
                nets, source = _models(arch, args.fast, args.channels_last, args.bf16_whitening, args.float32_pair)
            except SystemExit as exc:
                print(f"skip {arch}: {exc}", flush=True)
                continue
            x, y = _data(batch, args.image)
            x = x.contiguous(memory_format=_layout(args.channels_last))
            row = {"arch": arch, "batch": batch, "image": args.image, "source": source,
                   "memory_format": "channels_last" if args.channels_last else "nchw", "amp": args.amp,
                   "bf16_whitening": args.bf16_whitening}
            row.update(bench_pair(nets, x, y, args))
            base = arch.removesuffix("_deconv")
            row["reference_nd_over_bn_train_median"] = ref.get(base)
            row["target_nd_over_bn_train"] = _target(arch, ref)
            row.update(step_flops(nets["nd"], x))  # conv vs whitening arithmetic (benchmarks/flops.py)
            if args.amp == "bf16":  # the exact step's floor under bf16 (benchmarks/floor.py)
                row.update(floor(row["bn_train"]["median_s"], whitening_layers(nets["nd"], x), args.bf16_whitening))
            if args.memory:
                for form in ("nd", "bn"):
                    row[f"{form}_peak_step_mib"] = C.peak_rss_probe(
                        [__file__, "--probe", arch, form, str(batch), str(args.image),
                         "--keep-freed-memory" if args.keep_freed_memory else "--no-keep-freed-memory",
                         "--channels-last" if args.channels_last else "--no-channels-last", "--amp", args.amp]
                    ).get("peak_step_mib")
                if row.get("nd_peak_step_mib") and row.get("bn_peak_step_mib"):
                    row["nd_over_bn_peak_memory"] = round(row["nd_peak_step_mib"] / row["bn_peak_step_mib"], 3)
            if args.profile:
                row["nd_profile_top_ops"] = C.profile_top_ops(C.make_train_step(nets["nd"], x, y, AMP[args.amp]))
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def run_layers(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, cin, cout, k, stride, size in LAYERS:
        batch = args.batch[-1]
        torch.manual_seed(0)
        nets = {"nd": _LayerNet(True, cin, cout, k, stride), "bn": _LayerNet(False, cin, cout, k, stride)}
        x, y = _data(batch, size, cin)
        row = {"layer": name, "batch": batch}
        row.update(bench_pair(nets, x, y, args))
        if args.profile:
            row["nd_profile_top_ops"] = C.profile_top_ops(C.make_train_step(nets["nd"], x, y), top=10)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    what = row.get("arch") or row.get("layer")
    parts = [f"{what:28s} b{row['batch']:<4d}"]
    for k in row:
        if k.endswith("_train") and isinstance(row[k], dict):
            parts.append(f"{k} {row[k]['median_s']:.3f}s")
    parts.append(f"ND/BN train {row['nd_over_bn_train']:.2f} eval {row['nd_over_bn_eval']:.2f}")
    if row.get(f"nd{FLOAT32}_over_bn{FLOAT32}_train"):
        parts.append(f"in float32 {row[f'nd{FLOAT32}_over_bn{FLOAT32}_train']:.2f}")
    if row.get("reference_nd_over_bn_train_median"):
        parts.append(f"(reference {row['reference_nd_over_bn_train_median']:.2f})")
    if row.get("nd_over_bn_peak_memory"):
        parts.append(f"memory ND/BN {row['nd_over_bn_peak_memory']:.2f}")
    return "  ".join(parts)


def probe(arch: str, form: str, batch: int, image: int, channels_last: bool = False, amp: str = "off") -> None:
    """Subprocess entry for --memory: peak RSS growth over two training steps of one model."""
    torch.manual_seed(0)
    model, _ = build(arch, deconv=form == "nd")
    x, y = _data(batch, image)
    model = model.to(memory_format=_layout(channels_last))
    x = x.contiguous(memory_format=_layout(channels_last))
    step = C.make_train_step(model, x, y, AMP[amp])
    C.reset_peak_rss()
    before = C.maxrss_mib()
    step()
    step()
    print(json.dumps({"peak_step_mib": round(C.maxrss_mib() - before, 1)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["resnet18_deconv"], help="zoo name(s), or 'all' for the ten")
    p.add_argument("--batch", nargs="+", type=int, default=[128])
    p.add_argument("--image", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds: a step of each network, with --fast K steps each (default 5)")
    p.add_argument("--eval-repeats", type=int, default=3)
    p.add_argument("--layers", action=argparse.BooleanOptionalAction, default=None,
                   help="also time single layers (default: on unless --arch all)")
    p.add_argument("--fast", type=int, nargs="+", default=[], metavar="K",
                   help="also time fast mode refreshing every K steps (one or more K)")
    p.add_argument("--memory", action="store_true", help="peak step memory, one subprocess per config")
    p.add_argument("--profile", action="store_true", help="torch.profiler top ops of the ND step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc malloc reuses freed memory, as `ndeconv train` does (default: on)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="networks and inputs in channels-last memory format (default: NCHW)")
    p.add_argument("--amp", choices=sorted(AMP), default="off",
                   help="time the steps under torch.autocast in this dtype (default: off, float32)")
    p.add_argument("--bf16-whitening", action="store_true",
                   help="also time each deconvolution network with ndeconv.set_bf16_whitening (with --amp bf16)")
    p.add_argument("--float32-pair", action="store_true",
                   help="with --amp: also time ND and BN in float32 in the same interleaved rounds")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up round, 2 timed steps, no layers")
    p.add_argument("--name", default=None, help="results file name (default from the arch)")
    p.add_argument("--probe", nargs=4, metavar=("ARCH", "FORM", "BATCH", "IMAGE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.probe:
        probe(args.probe[0], args.probe[1], int(args.probe[2]), int(args.probe[3]), args.channels_last, args.amp)
        return 0
    if args.float32_pair and args.amp == "off":
        p.error("--float32-pair compares autocast with float32: give --amp bf16 or --amp fp16")
    if args.quick:
        args.warmup, args.repeats, args.eval_repeats = 1, 2, 1
    if args.layers is None:
        args.layers = not args.quick and args.arch != ["all"]
    ref = C.reference_ratios()
    payload = {"command": C.command_line(), "machine": C.machine_info(),
               "method": __doc__.split("Method: ", 1)[1].strip(), "settings": {
                   k: getattr(args, k) for k in ("batch", "image", "warmup", "repeats", "eval_repeats", "fast",
                                               "keep_freed_memory", "channels_last", "amp",
                                               "bf16_whitening", "float32_pair")}}
    if args.bf16_whitening:
        payload["settings"]["bf16_whitening_products"] = list(BF16_WHITENING_PRODUCTS)
    if args.amp == "bf16":  # ndeconv.layers._conv: both forms' strided depthwise convs
        payload["settings"]["strided_depthwise_input_grad"] = "float32"
    payload["models"] = run_models(args, ref)
    if args.layers:
        payload["layers"] = run_layers(args)
    default_name = ("all_archs" if args.arch == ["all"] else "_".join(args.arch)) + ("_quick" if args.quick else "")
    name = args.name or default_name
    print(f"wrote {C.write_result(name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
