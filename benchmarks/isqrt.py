"""The inverse square root of one layer, forward and backward: the ways to evaluate the authors' Newton–Schulz
polynomial (5 iterations) on this CPU, at the sizes the zoo whitens, with their error against float64.

- ``eigh``: one eigendecomposition, the polynomial on the eigenvalues and the hand-written backward
  (``isqrt_newton_schulz(..., method="eigh")``, the CPU default from 97 features);
- ``eigh, 4 at once``: four same-size matrices as one ``isqrt_newton_schulz_batch`` call (what batching the
  same-size layers of a network would give), per matrix;
- ``matmul``: the coupled iterations themselves in float32, autograd through their products;
- ``matmul, bf16``: the same under CPU bf16 autocast (the products in bf16, as autocast runs them).

The matrix is a covariance with eigenvalues spaced logarithmically from 1 to 1e-4 (plus the layers' eps,
1e-5) in a random basis, the spread a sampled-patch covariance of a trained network has. Time: median of the
repeats after a warm-up; error: relative Frobenius error of the output and of the input gradient (for a random
output gradient) against ``eigh`` in float64. Run from the project root::

    python benchmarks/isqrt.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks import _common as C  # noqa: E402
from ndeconv.layers.isqrt import isqrt_newton_schulz, isqrt_newton_schulz_batch  # noqa: E402

N_ITER = 5
EPS = 1e-5
BATCHED = 4
METHODS = ("eigh", "eigh_batched", "matmul", "matmul_bf16")
LABELS = {"eigh": "eigh", "eigh_batched": f"eigh, {BATCHED} at once", "matmul": "matmul",
          "matmul_bf16": "matmul, bf16"}


def covariance(features: int, seed: int = 0) -> torch.Tensor:
    """A float64 covariance with eigenvalues from 1 to 1e-4, log-spaced, plus ``EPS``, in a random basis."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(features, features, generator=gen, dtype=torch.float64))
    spectrum = torch.logspace(0, -4, features, dtype=torch.float64) + EPS
    return (basis * spectrum) @ basis.T


def _forward_backward(method: str, cov: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and the input gradient of one method on ``cov`` (float32 copies of it)."""
    if method == "eigh_batched":
        a = cov.float().expand(BATCHED, -1, -1).clone().requires_grad_()
        out = isqrt_newton_schulz_batch(a, N_ITER, method="eigh")
        out.backward(grad.float().expand(BATCHED, -1, -1))
        return out[0].detach(), a.grad[0]
    a = cov.float().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=method == "matmul_bf16"):
        out = isqrt_newton_schulz(a, N_ITER, method="eigh" if method == "eigh" else "matmul")
    out.float().backward(grad.float())
    return out.detach().float(), a.grad


def _median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _relative(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference).norm() / reference.norm())


def measure(features: int, repeats: int) -> dict:
    """Each method's median seconds per matrix (forward + backward) and errors at one size."""
    cov = covariance(features)
    grad = torch.randn(features, features, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = cov.clone().requires_grad_()
    expected = isqrt_newton_schulz(reference, N_ITER, method="eigh")
    expected.backward(grad)
    row: dict = {"features": features}
    for method in METHODS:
        out, got_grad = _forward_backward(method, cov, grad)
        seconds = _median_seconds(lambda m=method: _forward_backward(m, cov, grad), repeats)
        row[method] = {"ms": round(1000 * seconds / (BATCHED if method == "eigh_batched" else 1), 2),
                       "output_error": float(f"{_relative(out, expected.detach()):.2e}"),
                       "grad_error": float(f"{_relative(got_grad, reference.grad):.2e}")}
    return row


def table(payload: dict) -> str:
    """The docs block: milliseconds per matrix and errors, a row per size."""
    machine = payload["machine"]
    bf16 = "with" if machine.get("native_bf16") else "without"
    lines = [f"One layer's inverse square root, forward + backward, per matrix, on {machine['torch_threads']} cores of "
             f"an {machine['cpu']} {bf16} native bf16 (`{payload['command']}`); error against float64, output / "
             "input gradient:", "",
             "| features | " + " | ".join(LABELS[m] for m in METHODS) + " |",
             "|---:|" + "---:|" * len(METHODS)]
    for row in payload["results"]:
        cells = [f"{row[m]['ms']:.1f} ms ({row[m]['output_error']:.0e} / {row[m]['grad_error']:.0e})"
                 for m in METHODS]
        lines.append(f"| {row['features']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--features", nargs="+", type=int, default=[64, 128, 256, 576])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--name", default="isqrt")
    p.add_argument("--readme", action=argparse.BooleanOptionalAction, default=True,
                   help="write the table into docs/benchmarks.md (default: on)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    payload = {"command": C.command_line(), "machine": C.machine_info(), "n_iter": N_ITER,
               "method": __doc__.split("\n\n")[1],
               "results": [measure(d, args.repeats) for d in args.features]}
    path = C.write_result(args.name, payload)
    if args.readme:
        from reproduce.readme_block import write_readme_block

        write_readme_block("isqrt", table(payload))
    print(table(payload))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
