"""The step benchmark's harness on a small network: what it writes, and fast mode timed per refresh cycle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import train_step


def test_quick_run_writes_every_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cycles = []
    real_steps = train_step._steps
    monkeypatch.setattr(train_step, "_steps", lambda step, count: cycles.append(count) or real_steps(step, count))
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
    assert sorted(cycles) == [1, 1, 3]  # fast mode's timed unit is its whole refresh cycle


def test_refresh_cycle() -> None:
    assert train_step._refresh_cycle("fast4") == 4 and train_step._refresh_cycle("nd") == 1
