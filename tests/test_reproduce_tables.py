"""The scripts that turn runs into README tables and shipped weights: the hybrid table's sources and the
hybrid's shipping tag, on run directories the tests write (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "reproduce"))

import hybrid  # noqa: E402
from ship import run_tag, train_command  # noqa: E402


def _run(folder: Path, top1: float, seconds: float = 600.0) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": top1, "seconds": seconds}) + "\n")
    return folder


def _paper_claim(path: Path) -> Path:
    rows = [{"arch": "resnet18", "bn": {"test_top1": 87.68, "seconds": 1800.0}, "nd": {"test_top1": 92.59}},
            {"arch": "vgg16", "bn": {"test_top1": 36.23}, "nd": {"test_top1": 92.22}},
            {"arch": "preact_resnet18", "bn": {"diverged_at_step": 47, "diverged_loss": "nan"},
             "nd": {"test_top1": 92.81}}]
    path.write_text(json.dumps({"command": "python reproduce/paper_claim.py", "rows": rows}))
    return path


def test_hybrid_table_takes_bn_and_nd_from_the_paper_claim_and_a_rerun_first(tmp_path: Path) -> None:
    runs = tmp_path / "hybrid"
    _run(runs / "resnet18-stem", 89.10)
    _run(runs / "vgg16-stem", 61.34)
    _run(runs / "vgg16-bn", 36.12)  # a BN rerun in the hybrid's queue: the same code and machine
    _run(runs / "preact_resnet18-stem", 68.07)
    table = {row["arch"]: row for row in hybrid.collect(runs, _paper_claim(tmp_path / "paper_claim.json"),
                                                        previous=tmp_path / "none.json")}
    assert table["resnet18"]["bn_source"] == "paper_claim"
    resnet18 = table["resnet18"]
    assert round(resnet18["hybrid_minus_bn"], 2) == 1.42 and round(resnet18["hybrid_minus_nd"], 2) == -3.49
    assert table["vgg16"]["bn_source"] == "rerun" and round(table["vgg16"]["hybrid_minus_bn"], 2) == 25.22
    assert table["densenet121"]["hybrid"] is None and table["densenet121"]["hybrid_minus_bn"] is None
    text = hybrid.markdown(list(table.values()))
    assert "| resnet18 | 87.68 | 89.10 | 92.59 | +1.42 | -3.49 | 10 min |" in text
    assert "| vgg16 | 36.12\\* | 61.34 | 92.22 | +25.22 | -30.88 | 10 min |" in text
    assert "| densenet121 | pending | pending | pending | – | – | – |" in text
    assert "| preact_resnet18 | diverged (step 47) | 68.07 | 92.81 | – | -24.74 | 10 min |" in text
    assert "Measured hybrids: 3 of 10. Times are each run's wall clock" in text
    assert "The hybrid trains where BN diverged: preact_resnet18." in text
    assert "\\* BN rerun in the hybrid queue" in text


def test_hybrid_table_keeps_the_recorded_rows_of_runs_not_on_this_machine(tmp_path: Path) -> None:
    claim = _paper_claim(tmp_path / "paper_claim.json")
    first = tmp_path / "first"
    _run(first / "resnet18-stem", 89.10)
    _run(first / "vgg16-bn", 36.12)
    results = tmp_path / "hybrid.json"
    results.write_text(json.dumps({"rows": hybrid.collect(first, claim, previous=results)}))
    later = tmp_path / "later"  # another machine: only a new run, none of the first ones
    _run(later / "vgg16-stem", 61.34)
    table = {row["arch"]: row for row in hybrid.collect(later, claim, previous=results)}
    assert table["resnet18"]["hybrid"]["test_top1"] == 89.10 and table["vgg16"]["hybrid"]["test_top1"] == 61.34
    assert table["vgg16"]["bn_source"] == "rerun" and table["vgg16"]["bn"]["test_top1"] == 36.12


def test_hybrid_runs_ship_under_a_tag_of_their_own() -> None:
    train = dict(arch="resnet18", deconv="stem", dataset="fashion_mnist", epochs=1, seed=0, optimizer="sgd",
                 lr=0.1, momentum=0.9, lr_scheduler="cosine", wd=1e-3, batch_size=128, block=64, block_fc=None,
                 deconv_iter=5, eps=1e-5, stride=3)
    assert run_tag(train) == "fashion_mnist_stem" and run_tag(dict(train, deconv=True)) == "fashion_mnist"
    # The hybrid's head is the BatchNorm form's Linear: block_fc 0, as `--deconv stem` defaults it.
    assert "--deconv stem" in train_command(train) and "--block-fc 0" in train_command(train)
    assert "--block-fc 512" in train_command(dict(train, deconv=True))
