"""The hand-written patch statistics (ndeconv.layers._patch_stats) against autograd through the plain formula,
``patch_statistics_reference``: unfold the sampled patches, split them into the authors' blocks, centre,
X^T X / n + eps I."""

from __future__ import annotations

import pytest
import torch

from ndeconv.layers import _patch_stats
from ndeconv.layers._patch_stats import (
    PatchSampler,
    patch_mean,
    patch_statistics,
    patch_statistics_reference,
    patch_statistics_through,
    swap_features,
)

CASES = [  # kernel, dilation, padding, sampling stride, channels per block, groups, input shape
    ((3, 3), (1, 1), (1, 1), 3, 64, 1, (4, 64, 11, 10)),  # the default: disjoint patches, one block
    ((3, 3), (1, 1), (1, 1), 3, 64, 1, (3, 128, 8, 8)),  # two interleaved blocks, 576 features (split Gram)
    ((3, 3), (1, 1), (1, 1), 6, 4, 1, (3, 16, 12, 12)),  # a stride-2 conv: sparse patches, 4 blocks
    ((3, 3), (1, 1), (0, 0), 3, 8, 1, (2, 8, 11, 10)),  # no padding, a strip of the input never sampled
    ((3, 3), (1, 1), (2, 2), 3, 4, 1, (2, 8, 10, 7)),  # padding wider than a tap
    ((3, 3), (2, 2), (1, 1), 5, 8, 1, (2, 8, 13, 11)),  # dilated, still disjoint
    ((5, 5), (1, 1), (2, 2), 3, 4, 1, (2, 8, 9, 9)),  # overlapping patches: unfold / fold
    ((7, 7), (1, 1), (3, 3), 6, 3, 1, (2, 3, 20, 20)),  # the ImageNet-style stem
    ((1, 1), (1, 1), (0, 0), 9, 8, 1, (3, 16, 7, 5)),  # 1x1: every 9th pixel of the batch
    ((3, 3), (1, 1), (1, 1), 3, 4, 4, (2, 16, 9, 9)),  # grouped: one matrix per group
    ((3, 3), (1, 1), (1, 1), 3, 1, 32, (2, 32, 8, 8)),  # depthwise
    ((7, 7), (1, 1), (3, 3), 3, 1, 6, (2, 6, 11, 10)),  # PNASNet-A's depthwise 7x7: overlapping patches
    ((3, 3), (1, 1), (1, 1), 6, 2, 4, (3, 8, 9, 9)),  # grouped, stride 2: sparse patches
    ((1, 1), (1, 1), (0, 0), 3, 2, 4, (2, 8, 5, 5)),  # grouped 1x1
]


# The disjoint ungrouped cases: the ones gathered tap-major.
TAP_MAJOR = [(k, d, p, s, b, g, shape) for k, d, p, s, b, g, shape in CASES
             if PatchSampler(k, d, p, s, k[0] * k[1] * b, g > 1).tap_major(shape[1])]


def test_disjoint_ungrouped_cases_are_gathered_tap_major() -> None:
    assert [case[6] for case in TAP_MAJOR] == [(4, 64, 11, 10), (3, 128, 8, 8), (3, 16, 12, 12), (2, 8, 11, 10),
                                               (2, 8, 10, 7), (2, 8, 13, 11)]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("kernel,dilation,padding,stride,block,groups,shape", TAP_MAJOR)
def test_tap_major_gather_is_the_authors_matrix_with_its_columns_permuted(kernel, dilation, padding, stride, block,
                                                                          groups, shape, layout) -> None:
    """Disjoint patches are gathered with each block's features tap-major and scattered back from that order: the
    same matrix and the same gradient as the authors' order, up to the column permutation ``swap_features``."""
    taps = kernel[0] * kernel[1]
    sampler = PatchSampler(kernel, dilation, padding, stride, taps * block, groups > 1)
    order = swap_features(torch.arange(taps * block), block, taps)  # tap-major column j: the authors' order[j]
    torch.manual_seed(0)
    x = torch.randn(*shape).to(memory_format=layout)
    rows = sampler.gather(x)
    assert torch.equal(sampler.gather(x, tap_major=True), rows[:, order])
    grad_rows = torch.randn_like(rows)
    want = sampler.scatter(grad_rows, x.shape, layout)
    got = sampler.scatter(grad_rows[:, order], x.shape, layout, tap_major=True)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=layout)
    cov = torch.randn(taps * block, taps * block)
    assert torch.equal(swap_features(swap_features(cov, block, taps), taps, block), cov)
    assert torch.equal(swap_features(cov, block, taps), cov[order][:, order])


@pytest.mark.parametrize("kernel,dilation,padding,stride,block,groups,shape", CASES)
def test_matches_autograd_through_the_plain_formula(kernel, dilation, padding, stride, block, groups, shape) -> None:
    torch.manual_seed(0)
    sampler = PatchSampler(kernel, dilation, padding, stride, kernel[0] * kernel[1] * block, groups > 1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want_mean, want_cov = patch_statistics_reference(x, sampler, 1e-5, groups)
    probe_mean, probe_cov = torch.randn_like(want_mean), torch.randn_like(want_cov)
    (want_grad,) = torch.autograd.grad((want_mean * probe_mean).sum() + (want_cov * probe_cov).sum(), x)

    x2 = x.detach().clone().requires_grad_()
    mean, cov = patch_statistics(x2, sampler, 1e-5, groups)
    (grad,) = torch.autograd.grad((mean * probe_mean).sum() + (cov * probe_cov).sum(), x2)
    assert torch.equal(x2.detach(), x.detach())  # the in-place centring never touches the input
    torch.testing.assert_close(mean, want_mean, rtol=1e-14, atol=1e-15)  # summation order differs: rounding
    torch.testing.assert_close(cov, want_cov, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-14)


def test_mean_only_gradient() -> None:
    """A graph that uses only the mean (the covariance gradient is None) still gets the mean's gradient."""
    sampler = PatchSampler((3, 3), (1, 1), (1, 1), 3, 36, False)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    mean, _ = patch_statistics(x, sampler, 1e-5)
    (grad,) = torch.autograd.grad(mean.sum(), x)
    want_mean, _ = patch_statistics_reference(x, sampler, 1e-5, 1)
    (want,) = torch.autograd.grad(want_mean.sum(), x)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kernel,dilation,padding,stride,block,groups,shape", CASES)
def test_patch_mean_alone(kernel, dilation, padding, stride, block, groups, shape) -> None:
    sampler = PatchSampler(kernel, dilation, padding, stride, kernel[0] * kernel[1] * block, groups > 1)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    want, _ = patch_statistics_reference(x, sampler, 1e-5, groups)
    probe = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad((want * probe).sum(), x)
    mean = patch_mean(x, sampler)  # strided sums per kernel tap, no patch matrix: summation order differs
    (grad,) = torch.autograd.grad((mean * probe).sum(), x)
    torch.testing.assert_close(mean, want, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kernel,dilation,padding,stride,block,groups,shape", CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_gradient_keeps_the_input_layout(kernel, dilation, padding, stride, block, groups, shape, layout) -> None:
    """Same statistics and gradient from an NCHW and a channels-last input, and the gradient comes back in the
    input's layout (one in the other format makes every later elementwise op slow)."""
    torch.manual_seed(0)
    sampler = PatchSampler(kernel, dilation, padding, stride, kernel[0] * kernel[1] * block, groups > 1)
    x = torch.randn(*shape, dtype=torch.float64)
    want_mean, want_cov = patch_statistics_reference(x, sampler, 1e-5, groups)
    probe_mean, probe_cov = torch.randn_like(want_mean), torch.randn_like(want_cov)
    grads = []
    for fmt in (torch.contiguous_format, layout):
        xi = x.contiguous(memory_format=fmt).requires_grad_()
        mean, cov = patch_statistics(xi, sampler, 1e-5, groups)
        torch.testing.assert_close(cov, want_cov, rtol=1e-13, atol=1e-15)
        (grad,) = torch.autograd.grad((mean * probe_mean).sum() + (cov * probe_cov).sum(), xi)
        assert grad.is_contiguous(memory_format=fmt) and grad.stride() == xi.stride()
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kernel,dilation,padding,stride,block,groups,shape", CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_patch_mean_of_a_bfloat16_input_sums_in_float32(kernel, dilation, padding, stride, block, groups, shape,
                                                        layout, monkeypatch) -> None:
    """Fast mode's mean of a bfloat16 batch (CPU bf16 autocast): summed in float32 a few rows at a time (a chunk of
    7 elements here, so every case sums in several uneven partials), as exact as float32 allows, and its gradient is
    the float64 one rounded to bfloat16, in the input's dtype."""
    monkeypatch.setattr(_patch_stats, "COLUMN_SUM_CHUNK", 7)
    torch.manual_seed(0)
    sampler = PatchSampler(kernel, dilation, padding, stride, kernel[0] * kernel[1] * block, groups > 1)
    x = torch.randn(*shape).to(torch.bfloat16).contiguous(memory_format=layout).requires_grad_()
    exact = x.detach().double().requires_grad_()
    want, _ = patch_statistics_reference(exact, sampler, 1e-5, groups)
    probe = torch.randn_like(want)
    (want_grad,) = torch.autograd.grad((want * probe).sum(), exact)
    mean = patch_mean(x, sampler)
    (grad,) = torch.autograd.grad((mean * probe.float()).sum(), x)
    assert mean.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(mean.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), want_grad.to(torch.bfloat16).double(), rtol=8e-3, atol=1e-7)


@pytest.mark.parametrize("kernel,dilation,padding,stride,block,groups,shape", CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
def test_statistics_of_a_bfloat16_input_are_the_float32_ones(kernel, dilation, padding, stride, block, groups, shape,
                                                              layout) -> None:
    """A bfloat16 batch (CPU bf16 autocast, float32 whitening) is read as it is and its patches converted as they are
    gathered: the statistics are bit for bit those of the batch converted to float32 first, and the gradient is that
    float32 gradient rounded to bfloat16, in the input's dtype and layout."""
    torch.manual_seed(0)
    sampler = PatchSampler(kernel, dilation, padding, stride, kernel[0] * kernel[1] * block, groups > 1)
    x = torch.randn(*shape).to(torch.bfloat16).contiguous(memory_format=layout).requires_grad_()
    wide = x.detach().float().contiguous(memory_format=layout).requires_grad_()
    want_mean, want_cov = patch_statistics(wide, sampler, 1e-5, groups)
    probe_mean, probe_cov = torch.randn_like(want_mean), torch.randn_like(want_cov)
    (want_grad,) = torch.autograd.grad((want_mean * probe_mean).sum() + (want_cov * probe_cov).sum(), wide)
    mean, cov = patch_statistics(x, sampler, 1e-5, groups)
    (grad,) = torch.autograd.grad((mean * probe_mean).sum() + (cov * probe_cov).sum(), x)
    assert mean.dtype == cov.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.equal(mean, want_mean) and torch.equal(cov, want_cov)
    assert torch.equal(grad, want_grad.to(torch.bfloat16)) and grad.stride() == x.stride()


@pytest.mark.parametrize("kernel,dilation,padding,stride,block,groups,shape", CASES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["float64", "bfloat16"])
def test_a_conv_of_the_passed_through_input_takes_the_patch_gradient_in_place(kernel, dilation, padding, stride,
                                                                               block, groups, shape, layout,
                                                                               dtype) -> None:
    """``patch_statistics_through``: a convolution of the passed-through input gives ``x`` the gradient it gets from
    the statistics and a convolution of ``x`` itself. Where the patches leave gaps, that gradient is the convolution's
    own input gradient with the patches' gradient added in place (no second, zero-filled input-sized gradient); in
    bfloat16 it is then rounded once instead of twice. Patches that tile the input write a fresh gradient."""
    torch.manual_seed(0)
    sampler = PatchSampler(kernel, dilation, padding, stride, kernel[0] * kernel[1] * block, groups > 1)
    x = torch.randn(*shape).to(dtype).contiguous(memory_format=layout)
    weight = torch.randn(2 * groups, shape[1] // groups, 3, 3, dtype=dtype).contiguous(memory_format=layout)

    def gradient(through: bool) -> tuple[torch.Tensor, list[int]]:
        xi = x.clone().requires_grad_()
        seen = []
        if through:
            mean, cov, passed = patch_statistics_through(xi, sampler, 1e-5, groups)
            passed.register_hook(lambda g: seen.append(g.data_ptr()))
        else:
            (mean, cov), passed = patch_statistics(xi, sampler, 1e-5, groups), xi
        out = torch.nn.functional.conv2d(passed, weight, padding=1, groups=groups)
        g = torch.Generator().manual_seed(1)
        probes = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (mean, cov, out)]
        loss = sum((t.double() * p).sum() for t, p in zip((mean, cov, out), probes, strict=True))
        (grad,) = torch.autograd.grad(loss, xi)
        return grad, seen

    want, _ = gradient(through=False)
    got, seen = gradient(through=True)
    assert got.dtype == dtype and got.stride() == x.stride()
    in_place = [got.data_ptr()] == seen  # the convolution's input gradient, added into
    assert len(seen) == 1 and in_place != sampler.tiles(x.shape)
    if dtype == torch.float64:
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got.double(), want.double(), rtol=2e-2, atol=2e-2)


def test_column_sum_in_chunks_matches_one_sum(monkeypatch) -> None:
    """``column_sum`` of a bfloat16 matrix in uneven chunks of rows: float32 sums, the float64 sum to float32
    rounding; float64 stays float64 and exact to its own rounding."""
    monkeypatch.setattr(_patch_stats, "COLUMN_SUM_CHUNK", 3 * 40)  # 3 rows per partial sum of 40 columns
    torch.manual_seed(0)
    matrix = torch.randn(50, 40).to(torch.bfloat16)
    got = _patch_stats.column_sum(matrix)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), matrix.double().sum(0), rtol=1e-6, atol=1e-6)
    wide = torch.randn(50, 40, dtype=torch.float64)
    assert _patch_stats.column_sum(wide).dtype == torch.float64
    torch.testing.assert_close(_patch_stats.column_sum(wide), wide.sum(0), rtol=1e-15, atol=1e-14)


def test_reduced_rows_gradient_adds_the_mean_gradient_before_its_one_rounding() -> None:
    """The bfloat16 rows' gradient ``rows @ M + d_mean / n`` is one product with the mean's row as its bias: each
    entry is the float32 sum rounded to bfloat16 once, so within one bfloat16 rounding (2**-8 relative) of the exact
    value of what the kernel multiplies (``M`` and the row rounded to bfloat16), also where the product and the row
    nearly cancel; the product rounded first and the row added after were off by a rounding of the product there."""
    torch.manual_seed(0)
    n, d = 400, 48
    rows = torch.randn(n, d).bfloat16()
    d_cov = torch.randn(d, d)
    m = ((d_cov + d_cov.mT) / n).bfloat16().double()
    product = rows.double() @ m
    d_mean = -(product[0] * n).float()  # the first row cancels to about zero
    got = _patch_stats._reduced_rows_grad(rows, d_mean, d_cov, n)
    assert got.dtype == torch.bfloat16 and got.shape == rows.shape
    want = product + (d_mean / n).bfloat16().double()
    scale = rows.double().abs() @ m.abs() + want.abs()
    assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 4e-6 * scale).all()  # + float32 sums
    only_mean = _patch_stats._reduced_rows_grad(rows, d_mean, None, n)
    assert torch.equal(only_mean, (d_mean / n).bfloat16().expand(n, d))
