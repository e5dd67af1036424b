"""reproduce/int8.py, the int8 accuracy table: its weight-range measure, the folded layers it reads, and a quick
run that records nothing."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from conftest import PROJECT_ROOT
from test_fold import trained
from test_quantize import needs_fashion
from torch import nn

sys.path.insert(0, str(PROJECT_ROOT))

from reproduce import int8  # noqa: E402


def test_weight_range_is_max_over_std_per_tensor_and_per_channel() -> None:
    w = torch.tensor([[1.0, -1.0, 1.0, -1.0], [10.0, -10.0, 10.0, -10.0]])
    # Each row alone: max |w| / std = 1 / std([1, -1, 1, -1]); the tensor's std mixes both rows.
    row = 1 / torch.tensor([1.0, -1.0, 1.0, -1.0]).double().std().item()
    assert int8.channel_range(w) == pytest.approx(row)
    assert int8.weight_range(w) == pytest.approx(10 / w.double().flatten().std().item())
    assert int8.weight_range(w) > 1.5 * int8.channel_range(w)  # a per-tensor scale pays for the unequal rows


def test_layer_ranges_pair_each_folded_layer_with_its_trained_weights() -> None:
    from ndeconv.convert import fold

    model = trained("resnet18_deconv", in_chans=1, num_classes=10)
    rows = int8.layer_ranges(model, fold(model))
    assert len(rows) == 21 and rows[0]["layer"] == "conv1" and rows[-1]["layer"] == "linear"
    assert all("before" in r and r["after"] > 0 and r["after_per_channel"] > 0 for r in rows)
    same = nn.Sequential(nn.Conv2d(2, 3, 3))
    (row,) = int8.layer_ranges(same, same)
    assert row["before"] == row["after"] and row["before_per_channel"] == row["after_per_channel"]


def test_table_shows_each_drop_and_range() -> None:
    row = {"model": "resnet18_deconv.fashion_mnist", "form": "deconvolution", "float32": 92.6,
           "int8_per_tensor": 92.45, "int8_per_channel": 92.63, "drop_per_tensor": 0.15, "drop_per_channel": -0.03,
           "range_before_median": 4.38, "range_before_max": 5.35, "range_after_median": 4.35, "range_after_max": 5.57}
    line = int8.table([row]).splitlines()[-1]
    assert line == ("| resnet18_deconv.fashion_mnist | deconvolution | 92.60% | 92.45% (-0.15) | 92.63% (+0.03) "
                    "| – | – | – | 4.4; 5.3 → 4.3; 5.6 |")  # variants not measured: a dash
    row.update(int8_activations_16bit=92.58, drop_activations_16bit=0.02)
    assert "| 92.63% (+0.03) | – | – | 92.58% (-0.02) |" in int8.table([row])
    # auto: the method it kept beside its score
    row.update(int8_per_channel_auto=92.63, drop_per_channel_auto=-0.03, calibration_per_channel_auto="minmax")
    assert "| 92.63% (+0.03) | – | 92.63% (+0.03, minmax) | 92.58% (-0.02) |" in int8.table([row])


@pytest.mark.slow
@needs_fashion
def test_a_quick_run_records_nothing(capsys) -> None:
    before = int8.RESULTS.read_bytes() if int8.RESULTS.is_file() else None
    assert int8.main(["--models", "pnasnet_a_deconv.fashion_mnist", "--limit", "64", "--variants", "per_channel"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"pnasnet_a_deconv\.fashion_mnist: int8 per-channel [\d.]+% \(float32 [\d.]+%, 64 images\)", out)
    assert (int8.RESULTS.read_bytes() if int8.RESULTS.is_file() else None) == before
