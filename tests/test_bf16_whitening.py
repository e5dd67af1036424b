"""bf16 whitening (``ndeconv.set_bf16_whitening``): under CPU bf16 autocast the whitening's heavy products run in
bfloat16 (the patch Gram matrix as float32 sums of bfloat16 partial products, its backward, the fold W·D), against
the plain formula and the float32 whitening; everything else is the float32 path, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from ndeconv import FastDeconv, FastDeconv1d, set_bf16_whitening
from ndeconv.layers._patch_stats import (
    PatchSampler,
    patch_statistics_reference,
    reduced_gram,
    reduced_patch_statistics,
)

CASES = [  # kernel, padding, sampling stride, channels per block, input shape
    ((3, 3), (1, 1), 3, 64, (4, 64, 11, 10)),  # disjoint patches, one block of 576 features
    ((3, 3), (1, 1), 3, 64, (3, 128, 8, 8)),  # two interleaved blocks
    ((1, 1), (0, 0), 9, 8, (3, 16, 7, 5)),  # 1x1: every 9th pixel of the batch
    ((5, 5), (2, 2), 3, 4, (2, 8, 9, 9)),  # overlapping patches: unfold / fold
]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("features", [130, 300])
def test_reduced_gram_sums_rounded_partials_in_float32(features: int) -> None:
    torch.manual_seed(0)
    rows = torch.randn(1300, features).bfloat16()
    eye = torch.eye(features, dtype=torch.float64)
    exact = rows.double().mT @ rows.double()
    gram = reduced_gram(rows, 0.5, 2.0, chunk=512)
    assert gram.dtype == torch.float32 and torch.equal(gram, gram.mT)
    # Three partials (512, 512, 276 rows), each rounded to bfloat16 once (8 significant bits): each entry is off by
    # at most one bfloat16 step of each partial, summed.
    partials = [rows[i:i + 512].double().mT @ rows[i:i + 512].double() for i in (0, 512, 1024)]
    bound = 0.5 * sum(p.abs() for p in partials) * 2 ** -7
    assert ((gram.double() - (0.5 * exact + 2.0 * eye)).abs() <= bound + 1e-6).all()
    assert rel(gram, 0.5 * exact + 2.0 * eye) < 2 ** -8


def test_reduced_gram_of_few_features_is_one_float32_product() -> None:
    """Below REDUCED_GRAM_MIN_FEATURES the rows are multiplied in float32: exact to float32 rounding, no bfloat16
    partials."""
    torch.manual_seed(0)
    rows = torch.randn(3000, 64).bfloat16()
    want = 0.5 * rows.double().mT @ rows.double() + 2.0 * torch.eye(64, dtype=torch.float64)
    gram = reduced_gram(rows, 0.5, 2.0, chunk=512)
    assert gram.dtype == torch.float32
    assert rel(gram, want) < 1e-6  # bfloat16 partials would be off by about 2**-9


@pytest.mark.parametrize("kernel,padding,stride,block,shape", CASES)
def test_reduced_statistics_match_the_plain_formula_on_the_rounded_input(kernel, padding, stride, block,
                                                                         shape) -> None:
    """Against float64 on the same bfloat16 input."""
    torch.manual_seed(0)
    sampler = PatchSampler(kernel, (1, 1), padding, stride, kernel[0] * kernel[1] * block, False)
    x = torch.randn(*shape).relu().bfloat16()
    x64 = x.double().requires_grad_()
    want_mean, want_cov = patch_statistics_reference(x64, sampler, 1e-5)
    probe_mean, probe_cov = torch.randn_like(want_mean), torch.randn_like(want_cov)
    (want_grad,) = torch.autograd.grad((want_mean * probe_mean).sum() + (want_cov * probe_cov).sum(), x64)

    xr = x.clone().requires_grad_()
    mean, cov = reduced_patch_statistics(xr, sampler, 1e-5)
    assert mean.dtype == cov.dtype == torch.float32
    (grad,) = torch.autograd.grad((mean * probe_mean.float()).sum() + (cov * probe_cov.float()).sum(), xr)
    assert grad.dtype == torch.bfloat16 and grad.shape == x.shape
    assert rel(mean, want_mean) < 1e-6  # the mean is summed in float32 from exact bfloat16 values
    assert rel(cov, want_cov) < 8e-3 and rel(grad, want_grad) < 8e-3  # measured 2.6e-3 and 3.5e-3


def _twins(make) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = make()
    reduced = copy.deepcopy(plain)
    assert set_bf16_whitening(reduced) == 1
    return plain, reduced


def _step(layer: torch.nn.Module, x: torch.Tensor, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("make,shape", [
    (lambda: FastDeconv(64, 32, 3, padding=1), (8, 64, 12, 12)),
    (lambda: FastDeconv(128, 64, 1, stride=2, block=128), (8, 128, 10, 10)),
    (lambda: FastDeconv1d(64, 16, 3, padding=1), (8, 64, 40)),
])
def test_layer_under_bf16_autocast_is_close_to_the_float32_whitening(make, shape, monkeypatch) -> None:
    import ndeconv.layers._patch_stats as patch_stats

    plain, reduced = _twins(make)
    x = torch.randn(*shape).relu().bfloat16()
    y_plain, dx_plain = _step(plain, x, autocast=True)
    grams = []
    monkeypatch.setattr(patch_stats, "reduced_gram", lambda *a, **k: grams.append(1) or reduced_gram(*a, **k))
    y, dx = _step(reduced, x, autocast=True)
    assert grams == [1] and not torch.equal(y, y_plain)  # the bfloat16 products ran
    assert y.dtype == torch.bfloat16 and dx.dtype == torch.bfloat16
    # The conv under bf16 autocast rounds to about 3e-3 already; the reduced whitening adds about as much (measured
    # 4-5e-3 for output, input gradient and weight gradient, 2-5e-4 for the running whitening matrix).
    assert rel(y, y_plain) < 1.5e-2 and rel(dx, dx_plain) < 1.5e-2
    assert rel(reduced.weight.grad, plain.weight.grad) < 1.5e-2
    assert reduced.running_deconv.dtype == torch.float32
    assert rel(reduced.running_deconv, plain.running_deconv) < 2e-3
    assert torch.equal(reduced.running_mean, plain.running_mean)  # the mean is float32 on both paths


@pytest.mark.parametrize("autocast", [False, True])
def test_everything_else_is_the_float32_path_bit_for_bit(autocast: bool) -> None:
    # No autocast: float32 training. Under autocast: a grouped conv (many small matrices stay float32), a layer
    # whitening fewer than BF16_WHITENING_MIN_FEATURES features (too small for bfloat16 to pay), and eval.
    cases = [(lambda: FastDeconv(16, 16, 3, padding=1, groups=4 if autocast else 1, block=4), (4, 16, 9, 9)),
             (lambda: FastDeconv(128, 32, 1, block=64), (4, 128, 9, 9))]
    for make, shape in cases:
        plain, reduced = _twins(make)
        x = torch.randn(*shape)
        y_plain, dx_plain = _step(plain, x, autocast)
        y, dx = _step(reduced, x, autocast)
        assert torch.equal(y, y_plain) and torch.equal(dx, dx_plain)
        assert torch.equal(reduced.weight.grad, plain.weight.grad)
        assert torch.equal(reduced.running_deconv, plain.running_deconv)
        plain.eval(), reduced.eval()
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            assert torch.equal(reduced(x), plain(x))


def test_set_bf16_whitening_counts_and_switches_off() -> None:
    model = torch.nn.Sequential(FastDeconv(3, 8, 3), torch.nn.ReLU(), FastDeconv(8, 8, 3))
    assert set_bf16_whitening(model) == 2 and all(m.bf16_whitening for m in model if isinstance(m, FastDeconv))
    assert set_bf16_whitening(model, False) == 2 and not any(getattr(m, "bf16_whitening", False) for m in model)
    assert "bf16_whitening" not in str(model.state_dict().keys())  # a plain attribute: checkpoints are unchanged


def test_fast_mode_reuse_steps_take_the_mean_of_the_bf16_input_in_float32() -> None:
    from ndeconv import set_fast_mode

    plain, reduced = _twins(lambda: FastDeconv(64, 32, 3, padding=1))
    for layer in (plain, reduced):
        set_fast_mode(layer, 4)
    for step in range(3):  # a refresh, then two steps that reuse the kept matrix
        x = torch.randn(8, 64, 12, 12, generator=torch.Generator().manual_seed(step)).relu().bfloat16()
        y_plain, dx_plain = _step(plain, x, autocast=True)
        y, dx = _step(reduced, x, autocast=True)
        assert rel(y, y_plain) < 1.5e-2 and rel(dx, dx_plain) < 1.5e-2
        # The same batch means on both paths (float32 sums of the same bfloat16 values), up to summation order.
        assert rel(reduced.running_mean, plain.running_mean) < 1e-6


@pytest.mark.parametrize("spectrum", ["spread", "cluster", "repeated", "batch"])
def test_divided_differences_from_values_match_the_recursion_in_float64(spectrum: str) -> None:
    """The bf16 backward's divided differences ``[p](a, b)``: straight from float64 values where a pair is well
    apart, by the recursion elsewhere; against the recursion run in float64, to float32 rounding (the float32
    recursion itself is off by about 5e-7)."""
    from ndeconv.layers.isqrt import _divided_differences, _scalar_iterations

    torch.manual_seed(0)
    lam = {
        "spread": torch.logspace(-9, 0, 200, dtype=torch.float64),
        "cluster": torch.cat([1e-7 + 1e-13 * torch.rand(40, dtype=torch.float64),
                              torch.rand(160, dtype=torch.float64)]),
        "repeated": torch.rand(100, dtype=torch.float64).repeat(2),
        "batch": torch.rand(3, 150, dtype=torch.float64),
    }[spectrum].sort(-1).values.float()
    _, want = _scalar_iterations(lam.double(), 5, divided_differences=True)
    got = _divided_differences(lam, 5)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert ((got.double() - want).abs() <= 2e-7 * want.abs()).all()


def test_bf16_isqrt_backward_is_close_to_float64_and_leaves_the_forward_alone() -> None:
    """``isqrt_newton_schulz(..., backward_dtype=torch.bfloat16)``: the same forward, bit for bit, and a gradient
    within bfloat16 rounding of the float64 iterations' own (autograd through the matrix products)."""
    from ndeconv.layers.isqrt import isqrt_newton_schulz

    torch.manual_seed(0)
    rows = torch.randn(2000, 150) @ torch.randn(150, 150)  # a spread spectrum, as a patch covariance has
    cov = rows.mT @ rows / 2000 + 1e-5 * torch.eye(150)
    probe = torch.randn(150, 150)
    a64 = cov.double().requires_grad_()
    (want,) = torch.autograd.grad((isqrt_newton_schulz(a64, 5, method="matmul") * probe.double()).sum(), a64)
    a = cov.clone().requires_grad_()
    out = isqrt_newton_schulz(a, 5, backward_dtype=torch.bfloat16)
    assert torch.equal(out, isqrt_newton_schulz(cov, 5))
    (got,) = torch.autograd.grad((out * probe).sum(), a)
    assert got.dtype == torch.float32
    assert rel(got, want) < 1.5e-2  # bfloat16 products: measured 5e-3; float32: 1.5e-6
