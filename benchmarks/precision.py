"""Numerical cost of computing the whitening in reduced precision, per layer, on real activations.

For every FastDeconv layer of the shipped ``resnet18_deconv.fashion_mnist`` (native 1-channel stem), the
inputs it sees on a batch of Fashion-MNIST training images are captured, rounded to the autocast dtype as
they would arrive under ``torch.autocast`` (the previous layer's output), and the layer's training-mode
whitening is computed several ways against a float64 computation on the *same* rounded input:

- ``fp32``: what the layers do today under autocast: statistics, Newton–Schulz and the fold ``W·D`` in
  float32, the convolution in the autocast dtype (autocast casts input and folded weight);
- ``gram``: the sampled-patch Gram matrix as a reduced-precision product with float32 accumulation
  (centred patches rounded to the autocast dtype, products summed in float32), the rest as ``fp32``;
- ``gram+fold``: also the fold ``W·D`` as a reduced-precision product (``W`` and ``D`` rounded, float32 sum);
- ``kernels`` (bf16 only): the kernels ``ndeconv.set_bf16_whitening`` runs, not an emulation: patches gathered and
  centred in bfloat16, the Gram matrix as float32 sums of bfloat16 partial products of 512 rows (a CPU bfloat16
  product returns bfloat16), the fold ``W·D`` as a bfloat16 product; for the layers it takes (ungrouped, at least
  ``BF16_WHITENING_MIN_FEATURES`` features: the others keep the ``fp32`` whitening, and their cells stay empty).

A reduced-precision product with float32 accumulation is emulated exactly here: the product of two bf16
(8-bit significand) or fp16 (11-bit) numbers is exact in float32 (24 bits), so rounding the operands and
multiplying in float32 computes what a bf16/fp16 GEMM with float32 accumulation computes, up to the order
of the sums. (See docs/layers.md, Mixed precision.)

Reported per layer: relative Frobenius error of the whitening matrix ``D`` and of the layer output,
against float64; for bf16 also of the gradients a training step takes through the layer (input and weight,
for a fixed random upstream gradient rounded to bf16), the layer run as it trains: under bf16 autocast with
the float32 whitening, with ``set_bf16_whitening``'s kernels (their backward included), and in float32 without
autocast. Run from the project root::

    python benchmarks/precision.py            # -> benchmarks/results/precision.json and precision.md
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ndeconv  # noqa: E402,F401  (registers the zoo)
from benchmarks import _common as C  # noqa: E402
from ndeconv import FastDeconv  # noqa: E402
from ndeconv.datasets import get_spec, load_split  # noqa: E402
from ndeconv.layers._patch_stats import patch_statistics, reduced_patch_statistics  # noqa: E402
from ndeconv.layers.fast_deconv import BF16_WHITENING_MIN_FEATURES, takes_bf16_whitening  # noqa: E402
from ndeconv.layers.isqrt import isqrt_newton_schulz  # noqa: E402
from ndeconv.training.data import Preprocess  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).to(t.dtype)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


def _capture_inputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, m in model.named_modules() if isinstance(m, FastDeconv)]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return inputs


def _reduced_gram_stats(layer: FastDeconv, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (float32) and Cov^{-1/2} from a Gram matrix of centred patches rounded to ``dtype``."""
    sampler = layer._sampler()
    rows = sampler.gather(x.float())
    mean = rows.mean(0)
    rows = _round(rows - mean, dtype)
    n, d = rows.shape
    cov = rows.mT @ rows / n + layer.eps * torch.eye(d)
    return mean, isqrt_newton_schulz(cov, layer.n_iter)


def _conv(layer: FastDeconv, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None):
    """The layer's convolution; with ``dtype`` as autocast runs it (operands rounded, float32 sums, rounded out)."""
    if dtype is None:
        return F.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
    out = F.conv2d(_round(x.float(), dtype), _round(w.float(), dtype), _round(b.float(), dtype),
                   layer.stride, layer.padding, layer.dilation, layer.groups)
    return _round(out, dtype)


def _upstream(shape: torch.Size) -> torch.Tensor:
    """The fixed upstream gradient of every training run: seeded, rounded to bf16 (as autocast delivers it)."""
    return _round(torch.randn(shape, generator=torch.Generator().manual_seed(0)), torch.bfloat16)


def _training_grads(layer: FastDeconv, x: torch.Tensor, dtype: torch.dtype, autocast: bool = False,
                    bf16_whitening: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Input and weight gradient of ``sum(layer(x) * _upstream)`` on a training-mode copy of the layer in ``dtype``
    (batch statistics; the layer itself and its running statistics are left alone)."""
    twin = copy.deepcopy(layer).train().to(dtype)
    twin.bf16_whitening = bf16_whitening
    # Under autocast the input arrives in bf16 (the previous layer's output) and its gradient accumulates in bf16.
    x = x.detach().to(torch.bfloat16 if autocast else dtype).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = twin(x)
    (out.to(dtype) * _upstream(out.shape).to(dtype)).sum().backward()
    return x.grad, twin.weight.grad


def gradient_errors(layer: FastDeconv, x: torch.Tensor) -> dict[str, float]:
    """bf16 only: the training gradients under bf16 autocast (float32 whitening, and the bf16 kernels) and in
    float32 without autocast, against float64; ``x`` as the layer receives it under autocast."""
    want_x, want_w = _training_grads(layer, x, torch.float64)
    row = {}
    runs = (("fp32", True, False), ("kernels", True, True), ("float32_no_autocast", False, False))
    for key, autocast, kernels in runs:
        if kernels and not _takes_bf16_kernels(layer):
            continue
        got_x, got_w = _training_grads(layer, x, torch.float32, autocast, kernels)
        row[f"{key}_grad_x"], row[f"{key}_grad_w"] = _rel(got_x, want_x), _rel(got_w, want_w)
    return row


def _takes_bf16_kernels(layer: FastDeconv) -> bool:
    """Whether ``ndeconv.set_bf16_whitening`` runs this layer's whitening in bf16 (``FastDeconv._reduced``)."""
    return takes_bf16_whitening(layer.groups > 1, layer.num_features)


def layer_errors(layer: FastDeconv, x: torch.Tensor, dtype: torch.dtype) -> dict[str, float]:
    x = _round(x.float(), dtype)  # as the layer receives it under autocast
    sampler = layer._sampler()
    mean64, cov64 = patch_statistics(x.double(), sampler, layer.eps, layer.groups)
    d64 = isqrt_newton_schulz(cov64, layer.n_iter)
    w64, b64 = _fold(layer, mean64, d64, torch.float64)
    out64 = _conv(layer, x.double(), w64, b64, None)

    row: dict[str, float] = {}
    mean32, cov32 = patch_statistics(x.float(), sampler, layer.eps, layer.groups)
    d32 = isqrt_newton_schulz(cov32, layer.n_iter)
    w, b = _fold(layer, mean32, d32, torch.float32)
    row["fp32_D"], row["fp32_out"] = _rel(d32, d64), _rel(_conv(layer, x, w, b, dtype), out64)

    mean_g, d_g = _reduced_gram_stats(layer, x, dtype)
    w, b = _fold(layer, mean_g, d_g, torch.float32)
    row["gram_D"], row["gram_out"] = _rel(d_g, d64), _rel(_conv(layer, x, w, b, dtype), out64)

    w, b = _fold(layer, mean_g, d_g, torch.float32, round_to=dtype)
    row["gram_fold_out"] = _rel(_conv(layer, x, w, b, dtype), out64)
    row["float32_no_autocast_out"] = _rel(_conv(layer, x.float(), *_fold(layer, mean32, d32, torch.float32), None),
                                          out64)
    if dtype == torch.bfloat16 and _takes_bf16_kernels(layer):  # what ndeconv.set_bf16_whitening runs
        mean_k, cov_k = reduced_patch_statistics(x, sampler, layer.eps)
        d_k = isqrt_newton_schulz(cov_k, layer.n_iter)
        with torch.no_grad():
            w, b = layer.folded_weight_bias(mean_k, d_k, reduced=True)
        row["kernels_D"], row["kernels_out"] = _rel(d_k, d64), _rel(_conv(layer, x, w.float(), b, dtype), out64)
    if dtype == torch.bfloat16:
        row.update(gradient_errors(layer, x))
    return row


def _fold(layer: FastDeconv, mean: torch.Tensor, deconv: torch.Tensor, dtype: torch.dtype,
          round_to: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's own fold in ``dtype``; ``round_to`` rounds ``W`` and ``D`` first (a reduced-precision W·D)."""
    saved = layer.weight.data
    try:
        weight = saved.to(dtype)
        if round_to is not None:
            weight, deconv = _round(weight, round_to), _round(deconv.to(dtype), round_to)
        layer.weight.data = weight
        bias = None if layer.bias is None else layer.bias.data
        if bias is not None:
            layer.bias.data = bias.to(dtype)
        with torch.no_grad():
            return layer.folded_weight_bias(mean.to(dtype), deconv.to(dtype))
    finally:
        layer.weight.data = saved
        if layer.bias is not None:
            layer.bias.data = bias


def run(batch: int, dtypes: list[str]) -> dict:
    torch.manual_seed(0)
    model = timm.create_model("resnet18_deconv", pretrained=True, in_chans=1)
    spec = get_spec("fashion_mnist")
    source = load_split("fashion_mnist", "train")
    images = source.batch(torch.arange(batch))
    x = Preprocess(spec.mean, spec.std)(images)
    inputs = _capture_inputs(model, x)
    layers = dict(model.named_modules())
    results = {}
    for key in dtypes:
        rows = []
        for name, inp in inputs.items():
            layer = layers[name]
            row = {"layer": name, "features": layer.num_features, "input": list(inp.shape[1:])}
            row.update({k: float(f"{v:.3e}") for k, v in layer_errors(layer, inp, DTYPES[key]).items()})
            rows.append(row)
            print(key, _line(row), flush=True)
        results[key] = rows
    return results


def _line(row: dict) -> str:
    kernels = f" kernels {row['kernels_out']:.1e}" if "kernels_out" in row else ""
    return (f"{row['layer']:24s} nf {row['features']:4d}  D: fp32 {row['fp32_D']:.1e} gram {row['gram_D']:.1e}  "
            f"out: fp32 {row['fp32_out']:.1e} gram {row['gram_out']:.1e} gram+fold {row['gram_fold_out']:.1e}"
            f"{kernels}")


def _cell(row: dict, key: str) -> str:
    return f"{row[key]:.1e}" if key in row else "–"


def markdown(payload: dict) -> str:
    lines = [f"Command: `{payload['command']}` (batch {payload['batch']} of Fashion-MNIST training images, "
             "shipped resnet18_deconv.fashion_mnist, native 1-channel stem). Relative Frobenius error against "
             "float64 on the same autocast-rounded input; `fp32`: the whitening in float32 as today (the conv "
             "in the autocast dtype); `gram`: the patch Gram matrix as a reduced-precision product with float32 "
             "accumulation; `+fold`: the fold W·D too; `kernels`: what `ndeconv.set_bf16_whitening` runs (bf16 "
             f"partial Grams of 512 rows summed in float32, a bf16 fold; layers under {BF16_WHITENING_MIN_FEATURES} "
             "features keep the fp32 "
             "whitening, so their kernels cells are empty). Last column: the layer with no autocast at "
             "all.", ""]
    for key, rows in payload["results"].items():
        lines += [f"**{key}**", "",
                  "| layer | nf | D fp32 | D gram | D kernels | out fp32 | out gram | out gram+fold | out kernels | "
                  "out float32, no autocast |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(f"| {r['layer']} | {r['features']} | {r['fp32_D']:.1e} | {r['gram_D']:.1e} | "
                         f"{_cell(r, 'kernels_D')} | {r['fp32_out']:.1e} | {r['gram_out']:.1e} | "
                         f"{r['gram_fold_out']:.1e} | {_cell(r, 'kernels_out')} | "
                         f"{r['float32_no_autocast_out']:.1e} |")
        lines.append("")
        if any(GRAD_COLUMNS[0][0] in r for r in rows):
            lines += [f"**{key}, training gradients** (input x, weight w)", "",
                      "| layer | nf | " + " | ".join(c[1] for c in GRAD_COLUMNS) + " |",
                      "|---|---:|" + "---:|" * len(GRAD_COLUMNS)]
            lines += [f"| {r['layer']} | {r['features']} | " + " | ".join(_cell(r, c) for c, _ in GRAD_COLUMNS) + " |"
                      for r in rows]
            lines.append("")
    return "\n".join(lines)


GRAD_COLUMNS = [("fp32_grad_x", "x, fp32 whitening"), ("kernels_grad_x", "x, bf16 kernels"),
                ("float32_no_autocast_grad_x", "x, no autocast"), ("fp32_grad_w", "w, fp32 whitening"),
                ("kernels_grad_w", "w, bf16 kernels"), ("float32_no_autocast_grad_w", "w, no autocast")]


def summary(payload: dict) -> str:
    """The docs table (docs/layers.md): per autocast dtype, the median and the worst layer of each column."""
    cols = [("fp32_D", "D, fp32 (today)"), ("gram_D", "D, reduced Gram"), ("kernels_D", "D, bf16 kernels"),
            ("fp32_out", "output, fp32 (today)"),
            ("gram_out", "output, reduced Gram"), ("gram_fold_out", "output, reduced Gram + fold"),
            ("kernels_out", "output, bf16 kernels"), ("float32_no_autocast_out", "output, no autocast")]
    lines = [f"`{payload['command']}` (per layer: `benchmarks/results/precision.md`). Relative error against "
             f"float64 over the {len(next(iter(payload['results'].values())))} FastDeconv layers of the shipped "
             "ResNet-18, a batch of Fashion-MNIST training images, median (worst layer):", "",
             "| autocast | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key, rows in payload["results"].items():
        lines.append(f"| {key} | " + " | ".join(_median_worst(rows, col) for col, _ in cols) + " |")
    grads = {key: rows for key, rows in payload["results"].items() if any(GRAD_COLUMNS[0][0] in r for r in rows)}
    if grads:
        lines += ["", "The gradients of a training step through each layer (input x, weight w), against float64, "
                  "median (worst layer):", "",
                  "| autocast | " + " | ".join(c[1] for c in GRAD_COLUMNS) + " |",
                  "|---|" + "---:|" * len(GRAD_COLUMNS)]
        for key, rows in grads.items():
            lines.append(f"| {key} | " + " | ".join(_median_worst(rows, col) for col, _ in GRAD_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _median_worst(rows: list[dict], col: str) -> str:
    values = sorted(r[col] for r in rows if col in r)
    return f"{values[len(values) // 2]:.1e} ({values[-1]:.1e})" if values else "–"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), default=["bf16", "fp16"])
    p.add_argument("--name", default="precision")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True,
                   help="write the summary table into its docs page (default: on)")
    args = p.parse_args(argv)
    payload = {"command": C.command_line(), "machine": C.machine_info(), "batch": args.batch,
               "method": __doc__.split("\n\n")[1], "results": run(args.batch, args.dtype)}
    path = C.write_result(args.name, payload)
    (path.parent / f"{args.name}.md").write_text(markdown(payload) + "\n")
    if args.readme:
        from reproduce.readme_block import write_readme_block

        write_readme_block("precision", summary(payload))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
