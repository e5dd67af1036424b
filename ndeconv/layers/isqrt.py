"""Inverse matrix square root by coupled Newton–Schulz iterations.

For a symmetric positive definite ``A`` the coupled iteration

    Y_0 = A / ||A||_F,  Z_0 = I
    T_k = (3 I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k

drives ``Z_k`` to ``(A / ||A||_F)^{-1/2}``; the result is ``Z_n / sqrt(||A||_F)``. This is the
authors' algorithm. Every iterate is a polynomial in ``Y_0``, so ``Z_n = p(Y_0)`` for a fixed
scalar polynomial ``p`` (degree 121 for 5 iterations). Two ways to evaluate it, equal up to
rounding (about 1e-14 relative in float64, measured against the reference's fixtures):

- ``"matmul"``: the iteration itself with autograd through its products (36 matrix products
  per forward + backward for 5 iterations); best where matrix products are cheap (GPUs).
- ``"eigh"``: ``Y_0 = V diag(lambda) V^T``, then ``Z_n = V diag(p(lambda)) V^T`` with ``p`` run
  on the eigenvalues, and a hand-written backward: the adjoint of the Fréchet derivative of a
  matrix function, ``V (P ∘ (V^T G V)) V^T``, where ``P_ij`` is the divided difference
  ``[p](lambda_i, lambda_j)``. That is exactly the gradient autograd takes through the iterations
  (the iteration is ``p`` for any matrix, so their derivatives agree). The divided differences are
  propagated through the same scalar recursion with the product rule ``[fg](a, b) = [f](a, b) g(b) +
  f(a) [g](a, b)``, never as ``(p(a) - p(b)) / (a - b)``, so close eigenvalues lose no precision.
  One eigendecomposition and 5 matrix products: about 2x cheaper on CPUs.

``"auto"`` (the default) picks ``eigh`` for CPU matrices of 97 rows or more and ``matmul`` otherwise
(grouped and depthwise layers whiten many small matrices: 9x9, 49x49). In the matmul form the
products with ``Z_0 = I`` in the first iteration and the unused ``Y`` update of the last are left
out; both leave the output bit-identical.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["isqrt_newton_schulz", "isqrt_newton_schulz_batch"]

Method = Literal["auto", "eigh", "matmul"]


def _coupled_iterations(y: torch.Tensor, n_iter: int) -> torch.Tensor:
    """Run the coupled iteration on a normalised matrix (or batch); return Z_n."""
    eye = torch.eye(y.shape[-1], dtype=y.dtype, device=y.device)
    # Iteration 1 with Z_0 = I: Z_0 @ Y_0 = Y_0 and T_0 @ Z_0 = T_0 exactly.
    t = 0.5 * (3.0 * eye - y)
    z = t
    if n_iter == 1:
        return z
    y = y @ t
    for i in range(1, n_iter):
        t = 0.5 * (3.0 * eye - z @ y)
        if i < n_iter - 1:  # the last Y update is never used
            y = y @ t
        z = t @ z
    return z


_Scalar = tuple[torch.Tensor, "torch.Tensor | None"]  # values at the eigenvalues, divided differences (or None)


def _mul(f: _Scalar, g: _Scalar) -> _Scalar:
    fv, fd = f
    gv, gd = g
    dd = None if fd is None else fd * gv.unsqueeze(-2) + fv.unsqueeze(-1) * gd
    return fv * gv, dd


def _half_three_minus(f: _Scalar) -> _Scalar:
    fv, fd = f
    return 0.5 * (3.0 - fv), (None if fd is None else -0.5 * fd)


def _run_iterations(y, n_iter: int, mul, half_three_minus):
    """The coupled iteration's recursion on scalars ``y`` (values with divided differences), given their product and
    ``(3 - f) / 2``; returns Z_n. ``_coupled_iterations`` is the same on matrices."""
    t = half_three_minus(y)
    z = t
    if n_iter == 1:
        return z
    y = mul(y, t)
    for i in range(1, n_iter):
        t = half_three_minus(mul(z, y))
        if i < n_iter - 1:
            y = mul(y, t)
        z = mul(t, z)
    return z


def _scalar_iterations(lam: torch.Tensor, n_iter: int, divided_differences: bool) -> _Scalar:
    """The coupled iteration on the eigenvalues: ``p(lambda)`` and, if asked, ``[p](lambda_i, lambda_j)``."""
    ones = lam.new_ones(*lam.shape, lam.shape[-1]) if divided_differences else None
    return _run_iterations((lam, ones), n_iter, _mul, _half_three_minus)  # [identity](a, b) = 1


# Eigenvalue pairs whose values p(a), p(b) differ by more than this fraction of |p(a)| + |p(b)| take their divided
# difference straight from the values, (p(a) - p(b)) / (a - b) in float64: the subtraction loses at most 6 of
# float64's 16 digits (about 1e-10 relative); closer pairs (the diagonal, clusters, a flat stretch of p) go through
# the product-rule recursion.
DIRECT_MIN_GAP = 1e-6


def _pair_iterations(a: torch.Tensor, b: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``[p](a, b)`` for pairs given as two vectors: ``_scalar_iterations``' recursion, one entry per pair."""
    def mul(f, g):
        return f[0] * g[0], f[1] * g[1], f[2] * g[1] + f[0] * g[2]

    def half_three_minus(f):
        return 0.5 * (3.0 - f[0]), 0.5 * (3.0 - f[1]), -0.5 * f[2]

    return _run_iterations((a, b, torch.ones_like(a)), n_iter, mul, half_three_minus)[2]


def _divided_differences(lam: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``[p](lambda_i, lambda_j)`` in ``lam``'s dtype, from float64 values where the pair is well apart
    (``DIRECT_MIN_GAP``) and by the recursion on the other pairs only (the diagonal, and any cluster): the full
    recursion builds every n x n intermediate, about 40 passes over the matrix (at 576 features 1.5-3x as long)."""
    lam64 = lam.double()
    p, _ = _scalar_iterations(lam64, n_iter, divided_differences=False)
    gap = p.unsqueeze(-1) - p.unsqueeze(-2)
    dd = gap / (lam64.unsqueeze(-1) - lam64.unsqueeze(-2))  # the diagonal: 0 / 0, replaced below
    tolerance = DIRECT_MIN_GAP * p.abs()
    close = gap.abs_() <= tolerance.unsqueeze(-1) + tolerance.unsqueeze(-2)
    close.diagonal(dim1=-2, dim2=-1).fill_(False)
    dd.diagonal(dim1=-2, dim2=-1).copy_(_pair_iterations(lam64, lam64, n_iter))
    where = close.nonzero(as_tuple=True)  # (batch..., row, column) indices
    if where[0].numel():
        a, b = lam64[where[:-2] + (where[-2],)], lam64[where[:-2] + (where[-1],)]
        dd[where] = _pair_iterations(a, b, n_iter)
    return dd.to(lam.dtype)


class _EighIterations(torch.autograd.Function):
    """``Z_n = p(Y_0)`` through an eigendecomposition, with the iterations' exact gradient. ``backward_dtype``: the
    dtype of the backward's four matrix products, the divided differences then taken by ``_divided_differences``
    (float64 values, in ``y``'s dtype); without it the backward is all in ``y``'s dtype, by the recursion."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, n_iter: int,  # type: ignore[override]
                backward_dtype: torch.dtype | None = None) -> torch.Tensor:
        lam, vec = torch.linalg.eigh(y)
        p, _ = _scalar_iterations(lam, n_iter, divided_differences=False)
        ctx.save_for_backward(lam, vec)
        ctx.n_iter, ctx.backward_dtype = n_iter, backward_dtype
        return (vec * p.unsqueeze(-2)) @ vec.mT

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        lam, vec = ctx.saved_tensors
        if ctx.backward_dtype is None:
            _, dd = _scalar_iterations(lam, ctx.n_iter, divided_differences=True)
            dtype = vec.dtype
        else:
            dd, dtype = _divided_differences(lam, ctx.n_iter), ctx.backward_dtype
        v = vec.to(dtype)
        inner = (v.mT @ grad.to(dtype) @ v).to(vec.dtype)
        return (v @ (dd * inner).to(dtype) @ v.mT).to(vec.dtype), None, None


# Below this size a CPU runs the iterations' small products faster than LAPACK's eigh (measured: 2x at 49,
# even at 96, eigh ahead from 128 and 2.6x ahead at 576, forward + backward, 5 iterations).
EIGH_MIN_SIZE = 97


def _iterate(y: torch.Tensor, n_iter: int, method: Method, backward_dtype: torch.dtype | None = None) -> torch.Tensor:
    if method == "auto":
        method = "eigh" if y.device.type == "cpu" and y.shape[-1] >= EIGH_MIN_SIZE else "matmul"
    if method == "eigh":
        return _EighIterations.apply(y, n_iter, backward_dtype)
    if method == "matmul":
        return _coupled_iterations(y, n_iter)
    raise ValueError(f"isqrt: method must be 'auto', 'eigh' or 'matmul', got {method!r}")


def isqrt_newton_schulz(a: torch.Tensor, n_iter: int, method: Method = "auto",
                        backward_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``A^{-1/2}`` of one symmetric positive definite matrix ``a`` (d x d).

    ``backward_dtype`` (``"eigh"`` only; the ``"matmul"`` form ignores it): the dtype of the backward's matrix
    products, whose result comes back in ``a``'s dtype. ``torch.bfloat16`` is what ``ndeconv.set_bf16_whitening``
    runs, where the incoming gradient went through a bfloat16 fold and the outgoing one goes into a bfloat16 product
    anyway; the default is ``a``'s dtype."""
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"isqrt_newton_schulz: expected a square matrix, got shape {tuple(a.shape)}")
    if n_iter < 1:
        raise ValueError(f"isqrt_newton_schulz: n_iter must be >= 1, got {n_iter}")
    norm = a.norm()
    z = _iterate(a.div(norm), n_iter, method, backward_dtype)
    return z / torch.sqrt(norm)


def isqrt_newton_schulz_batch(a: torch.Tensor, n_iter: int, method: Method = "auto") -> torch.Tensor:
    """``A^{-1/2}`` of each matrix of a batch ``a`` (b x d x d), each normalised by its own norm."""
    if a.dim() != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"isqrt_newton_schulz_batch: expected (batch, d, d), got shape {tuple(a.shape)}")
    if n_iter < 1:
        raise ValueError(f"isqrt_newton_schulz_batch: n_iter must be >= 1, got {n_iter}")
    norm = a.reshape(a.shape[0], -1).norm(2, 1).view(-1, 1, 1)
    z = _iterate(a.div(norm), n_iter, method)
    return z / torch.sqrt(norm)
