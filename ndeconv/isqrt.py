"""Inverse matrix square root by coupled Newton–Schulz iterations.

For a symmetric positive definite ``A`` the coupled iteration

    Y_0 = A / ||A||_F,  Z_0 = I
    T_k = (3 I - Z_k Y_k) / 2,  Y_{k+1} = Y_k T_k,  Z_{k+1} = T_k Z_k

drives ``Z_k`` to ``(A / ||A||_F)^{-1/2}``; the result is ``Z_n / sqrt(||A||_F)``.
This is the authors' algorithm, with two products that cannot change the result
left out: the products with ``Z_0 = I`` in the first iteration and the ``Y``
update of the last one, which is never read. Both leave the output bit-identical.
"""

from __future__ import annotations

import torch

__all__ = ["isqrt_newton_schulz", "isqrt_newton_schulz_batch"]


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


def isqrt_newton_schulz(a: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``A^{-1/2}`` of one symmetric positive definite matrix ``a`` (d x d)."""
    if a.dim() != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"isqrt_newton_schulz: expected a square matrix, got shape {tuple(a.shape)}")
    if n_iter < 1:
        raise ValueError(f"isqrt_newton_schulz: n_iter must be >= 1, got {n_iter}")
    norm = a.norm()
    z = _coupled_iterations(a.div(norm), n_iter)
    return z / torch.sqrt(norm)


def isqrt_newton_schulz_batch(a: torch.Tensor, n_iter: int) -> torch.Tensor:
    """``A^{-1/2}`` of each matrix of a batch ``a`` (b x d x d), each normalised by its own norm."""
    if a.dim() != 3 or a.shape[1] != a.shape[2]:
        raise ValueError(f"isqrt_newton_schulz_batch: expected (batch, d, d), got shape {tuple(a.shape)}")
    if n_iter < 1:
        raise ValueError(f"isqrt_newton_schulz_batch: n_iter must be >= 1, got {n_iter}")
    norm = a.reshape(a.shape[0], -1).norm(2, 1).view(-1, 1, 1)
    z = _coupled_iterations(a.div(norm), n_iter)
    return z / torch.sqrt(norm)
