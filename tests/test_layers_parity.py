"""Replay the authors' seeded layer runs (tests/fixtures/reference/layers.*) and match every tensor."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REFERENCE
from safetensors.torch import load_file

import ndeconv

CASES = json.loads((REFERENCE / "layers.json").read_text())["layers"] if REFERENCE.is_dir() else []


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-300)).item()


@pytest.fixture(scope="module")
def tensors(reference_dir):
    return load_file(reference_dir / "layers.safetensors")


def _replay(case: dict, tensors: dict, dtype: torch.dtype) -> dict[str, float]:
    """Run the fixture protocol in ``dtype``; return the relative error of every recorded tensor."""
    name = case["name"]

    def ref(key: str) -> torch.Tensor:
        return tensors[f"{name}/{key}"]

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    layer = getattr(ndeconv, case["class"])(**case["kwargs"]).to(dtype)
    prefix = f"{name}/init."
    layer.load_state_dict({k[len(prefix):]: cast(v) for k, v in tensors.items() if k.startswith(prefix)})
    errors: dict[str, float] = {}
    for s in range(case["steps"]):
        layer.train()
        x = cast(ref(f"step{s}.x")).clone().requires_grad_(True)
        y = layer(x)
        (y * cast(ref(f"step{s}.upstream"))).sum().backward()
        got = {"y": y.detach(), "grad_x": x.grad}
        got.update({f"grad.{n}": p.grad for n, p in layer.named_parameters()})
        with torch.no_grad():
            for p in layer.parameters():
                p -= case["sgd_lr"] * p.grad
                p.grad = None
        got.update({f"state.{k}": v for k, v in layer.state_dict().items()})
        for key, value in got.items():
            expected = ref(f"step{s}.{key}")
            if expected.is_floating_point():
                errors[f"step{s}.{key}"] = _rel_err(value, expected)
            else:
                assert torch.equal(value, expected), f"{name} step{s}.{key}: {value} != {expected}"
    layer.eval()
    with torch.no_grad():
        errors["eval.y"] = _rel_err(layer(cast(ref("eval.x"))), ref("eval.y"))
    return errors


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_float64_matches_reference(case, tensors):
    errors = _replay(case, tensors, torch.float64)
    recorded = {
        k.split("/", 1)[1] for k, v in tensors.items()
        if k.startswith(f"{case['name']}/") and v.is_floating_point()
        and not k.endswith((".x", ".upstream")) and "/init." not in k
    }
    assert recorded == set(errors), f"not compared: {sorted(recorded - set(errors))}"
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-9, f"{case['name']}: {worst} relative error {errors[worst]:.3e}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_float32_matches_reference(case, tensors):
    errors = _replay(case, tensors, torch.float32)
    tol = max(1e-4, 2 * case["reference_float32_rel_err"])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, f"{case['name']}: {worst} relative error {errors[worst]:.3e} > {tol:.1e}"
