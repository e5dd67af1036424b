"""The floor of a deconvolution training step: what it would cost if the whitening were only its arithmetic.

``floor = BN step + whitening products / product rate + inverse square roots``, with

- the BN step: the BatchNorm twin's measured step (same precision, layout and batch);
- the whitening's products (benchmarks/flops.py ``whitening_layers``: the patch Gram matrix, its backward, the fold
  ``W·D`` and its backward) at the rate this CPU reaches on one large product of the whitening's shape, (15488 x
  576) @ (576 x 576), ResNet-18's first stage: in bf16 for the layers ``ndeconv.set_bf16_whitening`` takes to bf16
  (``takes_bf16_whitening``: ungrouped, at least 128 features, under bf16 autocast), in float32 for the rest;
- the inverse square roots: ``isqrt_newton_schulz`` (grouped layers: ``isqrt_newton_schulz_batch``) timed
  forward and backward at each layer's size, as the layers run them (the backward's products in bf16 for the layers
  ``set_bf16_whitening`` takes).

Nothing else a real step does is counted: gathering and scattering the patches, the mean, the elementwise work, and
grouped layers' small batched products, which run far below the large product's rate. It assumes the deconvolution
network's convolutions cost what the whole BatchNorm step costs: where BatchNorm's own layers are slow (DPN-92 under
bf16), a deconvolution step can go under it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ndeconv.layers.fast_deconv import takes_bf16_whitening
from ndeconv.layers.isqrt import isqrt_newton_schulz, isqrt_newton_schulz_batch

PRODUCT_SHAPE = (15488, 576)  # ResNet-18's first stage at batch 128: sampled rows x features


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def product_rate(dtype: torch.dtype, repeats: int = 5) -> float:
    """GFLOP/s of one (15488 x 576) @ (576 x 576) product in ``dtype`` on this CPU (best of ``repeats``)."""
    rows, d = PRODUCT_SHAPE
    a, b = torch.randn(rows, d).to(dtype), torch.randn(d, d).to(dtype)
    return 2.0 * rows * d * d / _best_seconds(lambda: a @ b, repeats) / 1e9


def isqrt_seconds(features: int, matrices: int, n_iter: int = 5, repeats: int = 5,
                  backward_dtype: torch.dtype | None = None) -> float:
    """Seconds of one layer's inverse square root, forward and backward, in float32 (``backward_dtype``: the
    backward's products in that dtype, one matrix only), best of ``repeats``."""
    torch.manual_seed(0)
    x = torch.randn(matrices, 4 * features, features)
    cov = (x.mT @ x / x.shape[1] + 1e-5 * torch.eye(features)).requires_grad_()
    grad = torch.randn(matrices, features, features)

    def run() -> None:
        z = (isqrt_newton_schulz(cov[0], n_iter, backward_dtype=backward_dtype) if matrices == 1
             else isqrt_newton_schulz_batch(cov, n_iter))
        z.backward(grad[0] if matrices == 1 else grad)

    return _best_seconds(run, repeats)


def _reduced(layer: dict, bf16_whitening: bool) -> bool:
    """Whether ``set_bf16_whitening`` takes this layer's products to bf16 (ndeconv's ``FastDeconv._reduced``)."""
    return bf16_whitening and takes_bf16_whitening(layer["grouped"], layer["features"])


def floor(bn_seconds: float, layers: list[dict], bf16_whitening: bool) -> dict:
    """The floor of one ND training step beside a BN step of ``bn_seconds``; ``layers``: ``whitening_layers``
    records; ``bf16_whitening``: the products of the layers bf16 whitening takes at the bf16 rate."""
    rates = {"float32": product_rate(torch.float32)}
    if bf16_whitening:
        rates["bf16"] = product_rate(torch.bfloat16)
    products = sum(layer["product_flops"] / 1e9 / rates["bf16" if _reduced(layer, bf16_whitening) else "float32"]
                   for layer in layers)
    sizes: dict[tuple[int, int, bool], int] = {}
    for layer in layers:
        key = (layer["features"], layer["matrices"], _reduced(layer, bf16_whitening))
        sizes[key] = sizes.get(key, 0) + 1
    isqrt = sum(count * isqrt_seconds(d, matrices, backward_dtype=torch.bfloat16 if reduced else None)
                for (d, matrices, reduced), count in sizes.items())
    total = bn_seconds + products + isqrt
    return {"floor_s": round(total, 4), "floor_over_bn_train": round(total / bn_seconds, 3),
            "floor_products_s": round(products, 4), "floor_isqrt_s": round(isqrt, 4),
            "product_gflop_per_s": {k: round(v, 1) for k, v in rates.items()}}
