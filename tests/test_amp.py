"""Mixed precision: the layers under torch.autocast keep float32 statistics and finite results; the stability
sweep (reproduce/amp_stability.py) and the GPU check (benchmarks/gpu_check.py, CPU mode) run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ndeconv import ChannelDeconv, Delinear, FastDeconv
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.runtime import native_amp_dtype

ROOT = Path(__file__).resolve().parents[1]

LAYERS = [
    (lambda: FastDeconv(16, 8, 3, padding=1, block=8), (4, 16, 10, 10)),
    (lambda: FastDeconv(8, 8, 3, padding=1, groups=8), (4, 8, 10, 10)),
    (lambda: FastDeconv(16, 8, 1, stride=2, block=16, sampling_stride=1), (4, 16, 10, 10)),
    (lambda: Delinear(32, 10, block=16), (64, 32)),
    (lambda: ChannelDeconv(block=4), (4, 8, 6, 6)),
]


@pytest.mark.parametrize("make, shape", LAYERS, ids=["3x3", "grouped", "1x1_s2", "delinear", "channel_deconv"])
def test_layers_train_under_bf16_autocast_with_float32_statistics(make, shape) -> None:
    torch.manual_seed(0)
    layer = make().train()
    x = torch.randn(shape, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.to(torch.bfloat16) if x.dim() == 4 else x)
    out.float().square().mean().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(x.grad).all()
    for name, buf in layer.named_buffers():
        if buf.is_floating_point():
            # The running statistics stay in the layer's own precision: a bf16 whitening matrix loses the small
            # eigenvalues (README, Mixed precision).
            assert buf.dtype == torch.float32 and torch.isfinite(buf).all(), name
    for p in layer.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_native_amp_dtype_is_none_or_a_reduced_dtype() -> None:
    assert native_amp_dtype("cpu") in (None, torch.bfloat16)
    assert native_amp_dtype("cuda") == torch.float16
    assert native_amp_dtype("meta") is None


@pytest.mark.slow  # bf16 is emulated on AVX2 CPUs: one PNASNet-A step at batch 2 takes 10-20 s here
@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_amp_stability_sweep_runs_and_reports_finite_training() -> None:
    sys.path.insert(0, str(ROOT / "reproduce"))
    from amp_stability import stability

    record = stability("pnasnet_a_deconv", steps=1, batch=2, amp=torch.bfloat16)
    assert record["failed_at_step"] is None and record["last_loss"] is not None
    assert 0 < record["max_abs_statistic"] < float("inf")
    record = stability("resnet18_deconv", steps=1, batch=2, amp=torch.bfloat16, bf16_whitening=True,
                       channels_last=True)
    assert record["failed_at_step"] is None and record["last_loss"] is not None


def test_amp_stability_sweep_resumes_only_with_the_same_settings(tmp_path: Path, monkeypatch, capsys) -> None:
    sys.path.insert(0, str(ROOT / "reproduce"))
    import amp_stability

    measured = []

    def fake(arch, steps, batch, amp, device, **kwargs) -> dict:
        measured.append(arch)
        return {"arch": arch, "failed_at_step": None, "last_loss": 1.0}

    monkeypatch.setattr(amp_stability, "stability", fake)
    out = tmp_path / "sweep.json"
    args = ["--steps", "3", "--batch", "4", "--out", str(out), "--arch"]
    assert amp_stability.main([*args, "a", "b"]) == 0
    assert amp_stability.main([*args, "a", "b", "c", "--resume"]) == 0
    assert measured == ["a", "b", "c"]  # a and b kept from the first run
    rows = json.loads(out.read_text())["rows"]
    assert [r["arch"] for r in rows] == ["a", "b", "c"] and all(r["machine"] for r in rows)
    assert amp_stability.main([*args, "a", "--resume"]) == 0 and measured == ["a", "b", "c"]
    with pytest.raises(SystemExit, match="was made with other settings"):
        amp_stability.main(["--steps", "4", "--batch", "4", "--out", str(out), "--arch", "a", "--resume"])
    assert len(json.loads(out.read_text())["rows"]) == 3  # a resumed run that measures nothing writes nothing


def test_amp_stability_block_lists_every_network_and_marks_the_pending_ones(tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT / "reproduce"))
    import amp_stability

    def fake(arch, steps, batch, amp, device, **kwargs) -> dict:
        failed = 7 if arch == "b" else None
        return {"arch": arch, "steps": steps, "failed_at_step": failed,
                "failure": "non-finite loss" if failed else None, "last_loss": None if failed else 0.25,
                "max_abs_statistic": 6.41, "seconds": 600.0}

    monkeypatch.setattr(amp_stability, "stability", fake)
    page = tmp_path / "page.md"
    page.write_text("before\n<!-- sweep:start -->\n<!-- sweep:end -->\nafter\n")
    out = tmp_path / "sweep.json"
    assert amp_stability.main(["--steps", "3", "--batch", "4", "--out", str(out), "--arch", "a", "b",
                               "--block", "sweep", "--readme", str(page)]) == 1  # b failed
    text = page.read_text()
    assert "| a | 3 | none | 0.250 | 6.41 | 10 min |" in text
    assert "| b | 3 | 7 (non-finite loss) | – | 6.41 | 10 min |" in text
    assert amp_stability.markdown([], ["a"]).endswith("| a | pending | – | – | – | – | – |\n")
    # Measured in another order (a heavy network last), the table keeps the zoo's order.
    table = amp_stability.markdown([], ["dpn92_deconv", "zzz", "resnet18_deconv", "vgg16_deconv"])
    assert [line.split(" | ")[0][2:] for line in table.splitlines()[2:]] == [
        "resnet18_deconv", "vgg16_deconv", "dpn92_deconv", "zzz"]


@pytest.mark.slow
def test_gpu_check_runs_on_cpu(tmp_path: Path) -> None:
    from benchmarks.gpu_check import main

    assert main([str(tmp_path), "--device", "cpu", "--quick"]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] and set(result["layers"]) >= {"fastdeconv_3x3", "delinear", "channel_deconv"}
    assert all(row["max_rel_error"] <= 1e-9 for row in result["layers"].values())
    assert result["timing"]["isqrt_eigh_192_fwd_bwd_s"] > 0


def test_gpu_check_without_cuda_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from benchmarks.gpu_check import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main([str(tmp_path)]) == 2
    assert "--device cpu" in capsys.readouterr().err
