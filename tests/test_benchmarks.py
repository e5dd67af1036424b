"""The step benchmark's harness on a small network: what it writes, and fast mode timed per refresh cycle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import train_step


def test_quick_run_writes_every_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import _common

    calls = []
    real_step = _common.make_train_step

    def recording_step(model, x, y, amp=None):
        step = real_step(model, x, y, amp)
        return lambda: calls.append(model) or step()

    monkeypatch.setattr(_common, "make_train_step", recording_step)
    seen = []
    real_bench = train_step.bench_pair
    monkeypatch.setattr(train_step, "bench_pair", lambda nets, x, y, args: seen.append(nets) or
                        real_bench(nets, x, y, args))
    out = tmp_path / "quick"
    assert train_step.main(["--arch", "efficientnet_b0_deconv", "--batch", "4", "--quick", "--fast", "3",
                            "--no-layers", "--no-keep-freed-memory", "--name", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["settings"]["fast"] == [3] and data["settings"]["keep_freed_memory"] is False
    (row,) = data["models"]
    assert row["arch"] == "efficientnet_b0_deconv" and row["batch"] == 4
    for form in ("nd", "fast3", "bn"):
        assert len(row[f"{form}_train"]["all_s"]) == 2 and row[f"{form}_train"]["median_s"] > 0
    assert row["nd_over_bn_train"] > 0 and row["fast3_over_bn_train"] > 0
    assert row["whitening_gflop"] > 0 and row["flop_ratio_nd_over_bn"] > 1
    # One warm-up and two timed rounds, each three turns (fast mode's whole refresh cycle) of one step per network,
    # in turn: the fast network's rounds hold whole cycles, and the others step beside it.
    (nets,) = seen
    order = list(nets.values())
    assert len(calls) == 3 * 3 * len(order)
    assert all(model is order[i % len(order)] for i, model in enumerate(calls))


def test_interleaved_rounds_are_mean_steps_over_their_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import _common

    clock = iter(range(1000))
    monkeypatch.setattr(_common.time, "perf_counter", lambda: float(next(clock)))
    durations = {"a": [], "b": []}
    times = _common.interleaved({k: (lambda k=k: durations[k].append(1)) for k in durations}, 1, 2, turns=4)
    # Each call spans one tick of the fake clock: the mean of four one-tick calls, per round.
    assert times == {"a": [1.0, 1.0], "b": [1.0, 1.0]}
    assert len(durations["a"]) == len(durations["b"]) == (1 + 2) * 4
    with pytest.raises(ValueError, match="turns must be >= 1"):
        _common.interleaved({}, 0, 1, turns=0)


def test_float32_pair_times_nd_and_bn_without_autocast_in_the_same_rounds(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``--float32-pair``: an ND and a BN twin run in float32 beside the autocast pair, each ratio against the BN
    network of its own precision."""
    from benchmarks import _common

    amps = {}
    real_step = _common.make_train_step

    def recording_step(model, x, y, amp=None):
        amps[id(model)] = amp
        return real_step(model, x, y, amp)

    monkeypatch.setattr(_common, "make_train_step", recording_step)
    seen = []
    real_bench = train_step.bench_pair
    monkeypatch.setattr(train_step, "bench_pair", lambda nets, x, y, args: seen.append(nets) or
                        real_bench(nets, x, y, args))
    out = tmp_path / "pair"
    assert train_step.main(["--arch", "efficientnet_b0_deconv", "--batch", "4", "--quick", "--no-layers",
                            "--amp", "bf16", "--float32-pair", "--no-keep-freed-memory", "--name", str(out)]) == 0
    (nets,) = seen
    assert {k: amps[id(m)] for k, m in nets.items()} == {
        "nd": torch.bfloat16, "bn": torch.bfloat16, "nd_fp32": None, "bn_fp32": None}
    data = json.loads(out.with_suffix(".json").read_text())
    (row,) = data["models"]
    assert data["settings"]["float32_pair"] is True
    want = row["nd_fp32_train"]["median_s"] / row["bn_fp32_train"]["median_s"]
    assert row["nd_fp32_over_bn_fp32_train"] == pytest.approx(want, abs=1e-3)
    assert row["nd_over_bn_train"] == pytest.approx(row["nd_train"]["median_s"] / row["bn_train"]["median_s"],
                                                    abs=1e-3)
    assert "bn_fp32_over_bn_train" not in row and "nd_fp32_over_bn_train" not in row
    with pytest.raises(SystemExit):
        train_step.main(["--arch", "efficientnet_b0_deconv", "--float32-pair", "--name", str(tmp_path / "x")])


def test_refresh_cycle() -> None:
    assert train_step._refresh_cycle("fast4") == 4 and train_step._refresh_cycle("nd") == 1


def test_channels_last_run_converts_both_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real_bench = train_step.bench_pair
    monkeypatch.setattr(train_step, "bench_pair", lambda nets, x, y, args: seen.append((nets, x)) or
                        real_bench(nets, x, y, args))
    out = tmp_path / "cl"
    assert train_step.main(["--arch", "mobilenetv2_deconv", "--batch", "2", "--quick", "--no-layers",
                            "--channels-last", "--name", str(out)]) == 0
    (row,) = json.loads(out.with_suffix(".json").read_text())["models"]
    assert row["memory_format"] == "channels_last"
    ((nets, x),) = seen
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    for net in nets.values():
        convs = [p for p in net.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                             for p in convs)


def test_floor_adds_the_whitening_products_at_their_precision_rate_and_the_inverse_square_roots(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 whitening: ungrouped layers' products at the bf16 rate, grouped and small (under 128 features) ones' at
    float32's; one inverse square root timed per (size, matrices) and counted per layer, its backward in bf16 for the
    layers bf16 whitening takes only."""
    from benchmarks import floor

    rates = {torch.float32: 100.0, torch.bfloat16: 250.0}
    timed = []
    monkeypatch.setattr(floor, "product_rate", lambda dtype: rates[dtype])
    monkeypatch.setattr(floor, "isqrt_seconds",
                        lambda d, m, backward_dtype=None: timed.append((d, m, backward_dtype)) or d * m * 1e-4)
    layers = [{"features": 576, "matrices": 1, "grouped": False, "product_flops": 50e9},
              {"features": 576, "matrices": 1, "grouped": False, "product_flops": 25e9},
              {"features": 9, "matrices": 32, "grouped": True, "product_flops": 1e9},
              {"features": 64, "matrices": 1, "grouped": False, "product_flops": 2e9}]
    got = floor.floor(2.0, layers, bf16_whitening=True)
    assert sorted(timed, key=str) == [(576, 1, torch.bfloat16), (64, 1, None), (9, 32, None)]
    assert got["floor_products_s"] == round(75 / 250 + 3 / 100, 4)
    assert got["floor_isqrt_s"] == round(2 * 576e-4 + 9 * 32e-4 + 64e-4, 4)
    assert got["floor_s"] == round(2.0 + got["floor_products_s"] + got["floor_isqrt_s"], 4)
    assert got["floor_over_bn_train"] == round(got["floor_s"] / 2.0, 3)
    timed.clear()
    assert floor.floor(2.0, layers, bf16_whitening=False)["floor_products_s"] == round(78 / 100, 4)
    assert sorted(timed, key=str) == [(576, 1, None), (64, 1, None), (9, 32, None)]


def test_floor_times_the_real_kernels() -> None:
    from benchmarks import floor

    assert floor.product_rate(torch.float32, repeats=1) > 0
    assert 0 < floor.isqrt_seconds(49, 4, repeats=1) < 5 and 0 < floor.isqrt_seconds(128, 1, repeats=1) < 5
    assert 0 < floor.isqrt_seconds(128, 1, repeats=1, backward_dtype=torch.bfloat16) < 5


def _results(path: Path, channels_last: bool, nd: float, bn: float) -> Path:
    row = {"arch": "resnet18_deconv", "batch": 128, "nd_train": {"median_s": nd}, "bn_train": {"median_s": bn},
           "nd_over_bn_train": round(nd / bn, 3), "target_nd_over_bn_train": 1.5}
    path.write_text(json.dumps({"command": f"cmd {path.stem}", "models": [row],
                                "settings": {"keep_freed_memory": True, "channels_last": channels_last}}))
    return path


def test_report_keeps_channels_last_runs_out_of_the_nchw_table(tmp_path: Path) -> None:
    from benchmarks import report

    nchw = _results(tmp_path / "all_archs_a.json", False, 4.0, 2.0)
    cl = _results(tmp_path / "all_archs_cl.json", True, 3.0, 1.0)
    assert [report._channels_last(p) for p in (nchw, cl)] == [False, True]
    table = "\n".join(report.all_archs_table([nchw]))
    assert "**2.00**" in table and "**3.00**" not in table
    (row,) = [line for line in report.channels_last_table([cl], [nchw]) if line.startswith("| resnet18")]
    assert "4.000 -> 3.000 s (-25%)" in row and "2.000 -> 1.000 s (-50%)" in row and "2.00 -> **3.00**" in row


def _amp_results(path: Path, cpu: str, rows: list[dict]) -> Path:
    models = [{"arch": arch, "batch": 128, "bn_train": {"median_s": bn}, **ratios} for arch, bn, ratios in rows]
    path.write_text(json.dumps({"command": f"cmd {path.stem}", "models": models,
                                "machine": {"cpu": cpu, "cpu_count": 2, "native_bf16": True}}))
    return path


def test_bf16_table_pairs_each_network_with_its_float32_ratio_on_the_same_cpu(tmp_path: Path) -> None:
    from benchmarks import report

    bf16 = _amp_results(tmp_path / "bf16.json", "AMD EPYC", [
        ("resnet18_deconv", 1.1, {"nd_over_bn_train": 2.7, "nd_bf16w_over_bn_train": 2.24,
                                  "floor_over_bn_train": 1.9, "floor_isqrt_s": 0.44}),
        ("vgg16_deconv", 0.6, {"nd_over_bn_train": 2.9, "nd_bf16w_over_bn_train": 2.5})])
    fp32 = _amp_results(tmp_path / "fp32.json", "AMD EPYC", [
        ("resnet18_deconv", 2.6, {"nd_over_bn_train": 1.73}), ("vgg16_deconv", 1.2, {"nd_over_bn_train": 2.6})])
    table = report.bf16_table(bf16, fp32)
    assert "| resnet18_deconv | 128 | 1.100 s | 2.70 | **2.24** | 1.90 | 0.40 | 1.73 | **no** |" in table
    assert "| vgg16_deconv | 128 | 0.600 s | 2.90 | **2.50** | – | – | 2.60 | yes |" in table
    assert table.index("resnet18_deconv") < table.index("vgg16_deconv") and "with native bf16" in table
    # No record of its bf16 products: timed before the inverse square root's backward went to bf16, and says so.
    assert table.endswith("which left the inverse square root backward in float32.\n")
    from ndeconv.layers.fast_deconv import BF16_WHITENING_PRODUCTS

    payload = json.loads(bf16.read_text())
    payload["settings"] = {"bf16_whitening_products": list(BF16_WHITENING_PRODUCTS)}
    bf16.write_text(json.dumps(payload))
    assert "earlier version" not in report.bf16_table(bf16, fp32)
    other = _amp_results(tmp_path / "other.json", "Intel Xeon", [("resnet18_deconv", 2.0, {"nd_over_bn_train": 1.8})])
    with pytest.raises(SystemExit, match="different CPUs"):
        report.bf16_table(bf16, other)


def test_bf16_table_takes_the_float32_ratio_from_the_same_rounds_when_the_run_timed_the_pair(tmp_path: Path) -> None:
    from benchmarks import report

    bf16 = _amp_results(tmp_path / "bf16.json", "Intel Xeon", [
        ("resnet18_deconv", 1.5, {"nd_over_bn_train": 2.5, "nd_bf16w_over_bn_train": 1.9,
                                  "nd_fp32_over_bn_fp32_train": 1.95}),
        ("vgg16_deconv", 1.2, {"nd_over_bn_train": 2.1, "nd_bf16w_over_bn_train": 1.8,
                               "nd_fp32_over_bn_fp32_train": 1.7})])
    payload = json.loads(bf16.read_text())
    payload["settings"] = {"float32_pair": True}
    bf16.write_text(json.dumps(payload))
    table = report.bf16_table(bf16, tmp_path / "absent.json")  # no separate float32 run is read
    assert "| resnet18_deconv | 128 | 1.500 s | 2.50 | **1.90** | – | – | 1.95 | yes |" in table
    assert "| vgg16_deconv | 128 | 1.200 s | 2.10 | **1.80** | – | – | 1.70 | **no** |" in table
    assert "`cmd bf16`. The float32 pair (ND and BN without autocast) ran in the same interleaved rounds." in table


def test_speed_summary_reads_both_results_files(tmp_path: Path) -> None:
    from benchmarks import report

    training = tmp_path / "resnet18.json"
    training.write_text(json.dumps({"machine": {"torch_threads": 2}, "models": [
        {"arch": "resnet18_deconv", "nd_over_bn_train": 1.854, "fast8_over_bn_train": 1.152}]}))
    inference = tmp_path / "inference.json"
    inference.write_text(json.dumps({"summary": [
        {"arch": "resnet18_deconv", "nd_folded_over_bn_fused": 0.982},
        {"arch": "resnet18_deconv", "nd_folded_over_bn_fused": 1.008, "nd_folded_int8_over_float32": 0.3},
        {"arch": "mobilenetv2_deconv", "nd_folded_over_bn_fused": 1.2}, {"arch": "resnet18_deconv"}]}))
    sentence = report.speed_summary(training, inference)
    assert sentence.startswith("Speed: in exact mode a ResNet-18 training step costs 1.85x its BatchNorm twin's on 2 "
                               "CPU cores, 1.15x in fast mode k=8; folded for inference it takes 0.98-1.01x the fused")


@pytest.mark.slow  # two ResNet-18s built and folded (about 50 s on two shared cores)
def test_inference_benchmark_times_the_batchnorm_twin_fused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``bn_fused`` is the BatchNorm network with its BatchNorms fused into the convs (fold fuses them only when
    asked): the variants are built, then the run stops before any export or timing."""
    import ndeconv.convert
    from benchmarks import inference

    real_fold = ndeconv.convert.fold
    folded: list[torch.nn.Module] = []

    class Built(Exception):
        pass

    def recording_fold(model: torch.nn.Module, *args, **kwargs) -> torch.nn.Module:
        folded.append(real_fold(model, *args, **kwargs))
        if len(folded) == 2:  # nd_folded, then bn_fused: all this test looks at
            raise Built
        return folded[-1]

    monkeypatch.setattr(ndeconv.convert, "fold", recording_fold)
    with pytest.raises(Built):
        inference.bench_arch("resnet18_deconv", [1], 0, 1, 1, tmp_path)
    bn_fused = folded[1]
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in bn_fused.modules())
    assert len(bn_fused.fold_report.bn_fused) == 20


@pytest.mark.slow
def test_inference_quick_run_times_the_int8_files(tmp_path: Path) -> None:
    """onnxruntime times the int8 (QDQ) file of each float32 export beside it; the summary has their ratios and the
    results name the CPU and its int8 instruction sets."""
    import json

    from benchmarks import inference

    out = tmp_path / "inference.json"
    assert inference.main(["--archs", "resnet18_deconv", "--quick", "--threads", "1", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    variants = {(r["runtime"], r["variant"]) for r in result["results"]}
    assert {("onnxruntime", "nd_folded_int8"), ("onnxruntime", "bn_fused_int8")} <= variants
    onnx_rows = [s for s in result["summary"] if s["runtime"] == "onnxruntime"]
    assert onnx_rows and all(s["nd_folded_int8_over_float32"] > 0 and s["bn_fused_int8_over_float32"] > 0
                             for s in onnx_rows)
    assert result["environment"]["cpu"] and isinstance(result["environment"]["cpu_flags"], list)


def test_isqrt_benchmark_measures_every_method_against_float64(tmp_path: Path) -> None:
    from benchmarks import isqrt

    cov = isqrt.covariance(32)
    eigenvalues = torch.linalg.eigvalsh(cov)
    assert torch.allclose(cov, cov.T) and eigenvalues.min() > isqrt.EPS / 2 and eigenvalues.max() < 1 + 2 * isqrt.EPS
    row = isqrt.measure(32, repeats=1)
    assert set(row) == {"features", *isqrt.METHODS}
    for method in ("eigh", "eigh_batched", "matmul"):  # float32 evaluations of one polynomial
        assert row[method]["output_error"] < 1e-4 and row[method]["grad_error"] < 1e-4, method
    assert 1e-4 < row["matmul_bf16"]["output_error"] < 0.1  # bf16 products: measurably worse, still the function
    assert all(row[m]["ms"] > 0 for m in isqrt.METHODS)
    table = isqrt.table({"command": "python benchmarks/isqrt.py", "results": [row],
                         "machine": {"cpu": "AMD EPYC", "native_bf16": True, "torch_threads": 2}})
    assert "| 32 | " in table and "with native bf16" in table and table.count("\n| 32 |") == 1


def test_depthwise_benchmark_times_both_kernels_against_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import depthwise_bf16
    from ndeconv.layers import _conv

    routed = []
    real = _conv.routes_input_gradient
    monkeypatch.setattr(_conv, "routes_input_gradient", lambda *a: routed.append(real(*a)) or routed[-1])
    row = depthwise_bf16.measure_layer("small", 8, 16, 8, 3, warmup=0, repeats=1)
    assert set(routed) == {True, False} and _conv.ROUTE_INPUT_GRADIENT  # both kernels ran; the switch is back on
    assert row["bf16"]["median_s"] > 0 and row["float32"]["median_s"] > 0
    assert all(0 <= e < 2.0**-7 for e in row["input_grad_error"].values())  # a bf16 rounding of the exact gradient
    steps = {"arch": "mobilenetv2_deconv", **{k: {"median_s": 1.0} for k in
                                               ("bn_bf16", "bn_float32", "nd_fast8_bf16", "nd_fast8_float32")}}
    table = depthwise_bf16.table({"command": "python benchmarks/depthwise_bf16.py", "layers": [row], "steps": [steps],
                                  "machine": {"cpu": "AMD EPYC", "bf16_flags": ["avx512_bf16"], "torch_threads": 2}})
    assert "| small |" in table and "AMD EPYC with AVX512-BF16" in table and "| mobilenetv2_deconv | 1.000 s |" in table


def test_cpu_label_names_what_decides_the_bf16_speed() -> None:
    from benchmarks._common import cpu_label

    # A virtual Intel Xeon and an AMD EPYC come with and without native bf16; the flags say which.
    assert cpu_label({"cpu": "Intel(R) Xeon(R) Processor", "native_bf16": True,
                      "bf16_flags": ["avx512_bf16", "amx_bf16"]}) == "Intel Xeon with AMX-BF16"
    assert cpu_label({"cpu": "AMD EPYC 9R14 96-Core Processor", "native_bf16": True,
                      "bf16_flags": ["avx512_bf16"]}) == "AMD EPYC 9R14 96-Core with AVX512-BF16"
    assert cpu_label({"cpu": "AMD EPYC", "native_bf16": False, "bf16_flags": []}) == "AMD EPYC without native bf16"
    assert cpu_label({"cpu": "AMD EPYC", "native_bf16": True}) == "AMD EPYC with native bf16"  # flags not recorded


def test_precision_gradient_errors_compare_each_way_of_training_with_float64() -> None:
    """The precision table's gradient columns: each way a layer trains (bf16 autocast with the float32 whitening, the
    bf16 kernels, float32 without autocast) against float64, each on a fresh copy of the same input (a gradient
    left on a shared input would add up across the runs)."""
    from benchmarks import precision
    from ndeconv import FastDeconv

    torch.manual_seed(0)
    layer = FastDeconv(64, 32, 3, padding=1)
    x = torch.randn(8, 64, 12, 12).relu().bfloat16().float()
    row = precision.gradient_errors(layer, x)
    assert set(row) == {f"{k}_grad_{g}" for k in ("fp32", "kernels", "float32_no_autocast") for g in "xw"}
    assert all(row[f"float32_no_autocast_grad_{g}"] < 1e-5 for g in "xw")
    assert all(1e-4 < row[f"{k}_grad_{g}"] < 2e-2 for k in ("fp32", "kernels") for g in "xw")
    assert layer.training and torch.equal(layer.running_deconv, torch.eye(576))  # the layer itself left alone


def test_bf16_runs_from_before_the_strided_depthwise_change_say_which_rows_it_moved() -> None:
    from benchmarks._common import earlier_depthwise_note

    run = {"settings": {"amp": "bf16"}, "models": [{"arch": "resnet18_deconv"}, {"arch": "pnasnet_a_deconv"}]}
    note = earlier_depthwise_note(run, "AMD EPYC with AVX512-BF16")
    assert "The rows of pnasnet_a_deconv on the AMD EPYC" in note and "mobilenetv2" not in note
    assert earlier_depthwise_note({**run, "models": run["models"][:1]}, "x") == ""  # no such layer in the run
    assert earlier_depthwise_note({**run, "settings": {"strided_depthwise_input_grad": "float32"}}, "x") == ""
