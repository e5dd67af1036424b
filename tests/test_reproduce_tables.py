"""The scripts that turn runs into README tables and shipped weights: the hybrid table's sources and the
hybrid's shipping tag, on run directories the tests write (no training)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT

sys.path.insert(0, str(PROJECT_ROOT / "reproduce"))

import hybrid  # noqa: E402
from ship import run_tag, train_command, training_machines  # noqa: E402


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


def test_paper_claim_keeps_recorded_rows_and_fills_missing_bn_from_the_hybrid_reruns(tmp_path: Path) -> None:
    import paper_claim

    recorded = _paper_claim(tmp_path / "paper_claim.json")
    reruns = tmp_path / "hybrid.json"
    reruns.write_text(json.dumps({"rows": [
        {"arch": "dpn92", "bn_source": "rerun", "bn": {"test_top1": 76.12, "seconds": 9000.0}},
        {"arch": "vgg16", "bn_source": "rerun", "bn": {"test_top1": 36.12, "seconds": 900.0}},
        {"arch": "senet18", "bn_source": "paper_claim", "bn": {"test_top1": 90.86, "seconds": 900.0}}]}))
    runs = tmp_path / "runs"  # this machine holds one new run only
    _run(runs / "dpn92-nd", 88.75)
    table = {row["arch"]: row for row in paper_claim.collect(runs, previous=recorded, hybrid=reruns)}
    assert table["resnet18"]["bn"]["test_top1"] == 87.68 and table["resnet18"]["nd"]["test_top1"] == 92.59
    assert table["dpn92"]["bn_source"] == "hybrid_rerun" and table["dpn92"]["nd_minus_bn"] == 88.75 - 76.12
    # A recorded BN run of the protocol itself wins over a rerun; a hybrid row without a rerun adds nothing.
    assert table["vgg16"]["bn_source"] == "paper_claim" and table["vgg16"]["bn"]["test_top1"] == 36.23
    assert table["senet18"]["bn"] is None
    assert "76.12\\*" in paper_claim.markdown(list(table.values()))


def _converged_run(folder: Path, top1: list[float], amp: str | None = "bf16", epochs: int = 20,
                   cpus: list[str] | None = None) -> Path:
    """A run directory whose epochs scored ``top1``, each trained on the CPU ``cpus`` names (rows from before runs
    recorded their CPU have none)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"amp": amp, "fast": 8, "epochs": epochs}}))
    rows = [{"epoch": i + 1, "step": 469 * (i + 1), "test_top1": v, "seconds": 60.0} for i, v in enumerate(top1)]
    for row, cpu in zip(rows, cpus or [], strict=False):
        row["cpu"] = cpu
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_converged_report_shows_partial_runs_keeps_recorded_ones_and_pairs_only_finished_runs(tmp_path: Path) -> None:
    import converged

    runs = tmp_path / "runs"
    _converged_run(runs / "resnet18-nd", [90.0 + i * 0.2 for i in range(20)])
    _converged_run(runs / "resnet18-bn", [88.0 + i * 0.2 for i in range(20)])
    _converged_run(runs / "vgg16-nd", [91.0, 92.0])  # partial: 2 of 20 epochs, and 40 steps into the third
    from ndeconv.training.checkpoint import CHECKPOINT_FILE, FORMAT, VERSION

    torch.save({"format": FORMAT, "version": VERSION, "state": {"global_step": 978}},
               runs / "vgg16-nd" / CHECKPOINT_FILE)
    _converged_run(runs / "vgg16-bn", [])
    (runs / "vgg16-bn" / "diverged.json").write_text(json.dumps({"step": 47, "loss": "nan", "seconds": 9.0}))
    out, docs, readme = tmp_path / "results", tmp_path / "reproduction.md", tmp_path / "README.md"
    out.mkdir()
    docs.write_text((PROJECT_ROOT / "docs" / "reproduction.md").read_text())
    readme.write_text("x\n<!-- converged-summary:start -->\n<!-- converged-summary:end -->\n")
    result = converged.report(runs, out=out, docs=docs, readme=readme)
    rows = {row["arch"]: row for row in result["rows"]}
    assert rows["resnet18"]["nd_minus_bn"] == 2.0 and rows["resnet18"]["nd"] == 93.8
    assert rows["vgg16"]["nd"] is None and rows["vgg16"]["bn"] == "diverged" and rows["vgg16"]["nd_minus_bn"] is None
    text = docs.read_text()
    assert "| vgg16-nd | bf16, fast 8 | 2/20 | 978 | 92.00 | 92.00 |" in text
    assert "| vgg16 | diverged | pending | – |" in text and "Measured pairs: 1 of 7." in text
    assert "Finished: 2 of 17 runs" in readme.read_text() and (out / "converged_curves.png").is_file()
    # Another machine holds only a new run: the recorded curves stay, the new one is added.
    later = tmp_path / "later"
    _converged_run(later / "senet18-nd", [92.5])
    result = converged.report(later, out=out, docs=docs, readme=readme)
    assert set(result["curves"]) == {"resnet18-nd", "resnet18-bn", "vgg16-nd", "vgg16-bn", "senet18-nd"}


def test_the_learning_curves_name_the_cpu_each_run_trained_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 kernels differ between CPUs and an ND run and its BN pair can train on different machines: the table
    names each run's CPU, with its epochs where a run was resumed on another machine, also for runs recorded
    before the CPU was (a shipped ND run's copied metrics.jsonl tells; otherwise "not recorded")."""
    import converged

    xeon, epyc = "Intel(R) Xeon(R) Processor", "AMD EPYC"
    old = tmp_path / "old"
    _converged_run(old / "efficientnet_b0-nd", [90.0 + i * 0.2 for i in range(20)])
    _converged_run(old / "efficientnet_b0-bn", [89.0 + i * 0.2 for i in range(20)])
    out, docs, readme = tmp_path / "results", tmp_path / "reproduction.md", tmp_path / "README.md"
    out.mkdir()
    docs.write_text((PROJECT_ROOT / "docs" / "reproduction.md").read_text())
    readme.write_text("x\n<!-- converged-summary:start -->\n<!-- converged-summary:end -->\n")
    converged.report(old, out=out, docs=docs, readme=readme)
    recorded = json.loads((out / "converged.json").read_text())
    for curve in recorded["curves"].values():  # as recorded before the CPUs were
        del curve["cpus"]
    (out / "converged.json").write_text(json.dumps(recorded))
    shipped = _converged_run(tmp_path / "zoo" / "efficientnet_b0_deconv.fashion_mnist_e20", [90.0] * 20,
                             cpus=[xeon] * 20)
    monkeypatch.setattr(converged, "SHIPPED_METRICS",
                        tmp_path / "zoo" / "{arch}_deconv.fashion_mnist_e{epochs}" / "metrics.jsonl")
    new = tmp_path / "new"
    _converged_run(new / "resnet18-nd", [90.0 + i * 0.2 for i in range(20)], cpus=[xeon] * 6 + [epyc] * 14)
    _converged_run(new / "resnet18-bn", [88.0, 89.0], cpus=[epyc] * 2)
    result = converged.report(new, out=out, docs=docs, readme=readme)
    text = docs.read_text()
    assert "| 93.80 | 93.80 | Intel Xeon (1-6), AMD EPYC (7-20) |" in text
    assert "| resnet18-bn | bf16, fast 8 | 2/20 | 938 | 89.00 | 89.00 | AMD EPYC |" in text
    assert "| efficientnet_b0-nd | bf16, fast 8 | 20/20 | 9380 | 93.80 | 93.80 | Intel Xeon |" in text
    assert "| efficientnet_b0-bn | bf16, fast 8 | 20/20 | 9380 | 92.80 | 92.80 | not recorded |" in text
    assert result["curves"]["efficientnet_b0-nd"]["cpus"] == [["Intel Xeon", 1, 20]]  # recorded from now on
    (shipped / "metrics.jsonl").unlink()
    assert converged.collect(tmp_path / "empty", previous=out / "converged.json")["curves"]["efficientnet_b0-nd"][
        "cpus"] == [["Intel Xeon", 1, 20]]


def test_converged_precision_is_bf16_only_with_native_bf16_and_a_check_within_the_tolerance(tmp_path: Path) -> None:
    import converged

    claim = _paper_claim(tmp_path / "paper_claim.json")  # float32 exact ResNet-18 ND: 92.59
    assert converged.decide(tmp_path, native_bf16=False, paper_claim=claim)["args"] == []
    _run(tmp_path / "precision-check", 92.30)
    record = converged.decide(tmp_path, native_bf16=True, paper_claim=claim)
    assert record["precision"] == "bf16" and record["args"] == ["--amp", "bf16", "--channels-last"]
    (tmp_path / "precision-check" / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_top1": 92.28}) + "\n")
    assert converged.decide(tmp_path, native_bf16=True, paper_claim=claim)["precision"] == "float32"


def test_a_new_converged_run_folder_keeps_the_recorded_decision_and_finished_runs(tmp_path: Path) -> None:
    """A new machine starts an empty run folder: it takes the recorded precision where its CPU can run it, and the
    runs recorded finished are not trained again (reproduce/converged.sh asks both before its first run)."""
    import converged

    claim = _paper_claim(tmp_path / "paper_claim.json")
    old = tmp_path / "old"
    _run(old / "precision-check", 92.95)
    _converged_run(old / "resnet18-nd", [90.0 + i * 0.2 for i in range(20)])
    _converged_run(old / "efficientnet_b0-bn", [87.0, 87.5])  # partial: trained again from its start
    out = tmp_path / "results"
    out.mkdir()
    (old / "precision.json").write_text(json.dumps(converged.decide(old, native_bf16=True, paper_claim=claim)))
    docs, readme = tmp_path / "reproduction.md", tmp_path / "README.md"
    docs.write_text((PROJECT_ROOT / "docs" / "reproduction.md").read_text())
    readme.write_text("x\n<!-- converged-summary:start -->\n<!-- converged-summary:end -->\n")
    converged.report(old, out=out, docs=docs, readme=readme)
    recorded = out / "converged.json"
    new = tmp_path / "new"
    new.mkdir()
    carried = converged.carry_precision(native_bf16=True, previous=recorded)
    assert carried["args"] == ["--amp", "bf16", "--channels-last"] and carried["check_top1"] == 92.95
    assert carried["carried_over_from"] == str(recorded)
    # bf16 is not carried to a CPU that would emulate it: that CPU decides afresh.
    assert converged.carry_precision(native_bf16=False, previous=recorded) is None
    assert converged.carry_precision(native_bf16=True, previous=tmp_path / "absent.json") is None
    assert converged.recorded_finished(new, previous=recorded) == ["resnet18-nd"]
    _converged_run(new / "resnet18-nd", [90.0])  # a folder of that run on this machine is its own record
    assert converged.recorded_finished(new, previous=recorded) == []


def test_converged_runs_ship_under_a_new_tag_that_must_be_registered_first() -> None:
    from ship import check_registered

    from ndeconv.zoo._pretrained import TAG_DATA, tag_dataset

    train = dict(arch="resnet18", deconv=True, dataset="fashion_mnist", epochs=20)
    # timm never changes what a tag names: the one-epoch weights keep fashion_mnist, the 20-epoch ones get their own.
    assert run_tag(train) == "fashion_mnist_e20" and run_tag(dict(train, epochs=1)) == "fashion_mnist"
    assert tag_dataset("fashion_mnist_e20") == "fashion_mnist"
    assert {k: v for k, v in TAG_DATA["fashion_mnist_e20"].items() if k != "description"} == \
        {k: v for k, v in TAG_DATA["fashion_mnist"].items() if k != "description"}
    check_registered("resnet18_deconv", "fashion_mnist")  # shipped and registered
    with pytest.raises(SystemExit, match="add it to default_cfgs in the model's zoo file first"):
        check_registered("resnet34_deconv", "fashion_mnist_e20")  # one of the authors' extra models: no weights
    with pytest.raises(SystemExit, match="no data for tag 'cifar10_e20'; add it to TAG_DATA"):
        check_registered("resnet18_deconv", "cifar10_e20")


def test_results_csv_is_timms_format_and_matches_the_shipped_cards() -> None:
    """results/results-fashion-mnist.csv is what reproduce/zoo_table.py makes of the weight folders now, in the
    columns of timm's results files (plus tag, epochs, precision)."""
    import csv

    from zoo_table import CSV_PATH, results_csv

    assert CSV_PATH.read_text() == results_csv(), "stale: run python reproduce/zoo_table.py"
    rows = list(csv.DictReader(CSV_PATH.read_text().splitlines()))
    timm_columns = {"model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                    "interpolation"}
    assert timm_columns <= set(rows[0]) and {"tag", "epochs", "precision"} <= set(rows[0])
    shipped = {p.parent.name for p in (PROJECT_ROOT / "zoo" / "weights").glob("*/config.json")}
    assert {r["model"] for r in rows} == shipped
    for r in rows:
        assert abs(float(r["top1"]) + float(r["top1_err"]) - 100) < 1e-6


def test_bf16_whitening_table_reads_the_runs_and_keeps_recorded_rows_of_runs_not_here(tmp_path: Path) -> None:
    import bf16_whitening

    runs, fp32 = tmp_path / "bf16_whitening", tmp_path / "precision-check"
    _run(runs / "resnet18-exact", 92.64)
    _run(runs / "resnet18-fast8", 92.93)
    _run(fp32, 92.65)
    first = bf16_whitening.collect(runs, fp32, recorded={})
    rows = {r["name"]: r for r in first["rows"]}
    exact = first["float32_exact_top1"]
    assert rows["bf16-whitening-exact"]["top1_minus_float32_exact"] == round(92.64 - exact, 2)
    assert "test_top1" not in rows["fp32-whitening-exact"]  # no such run: speed only
    cpus = [s["cpu"] for s in first["speed"]]
    assert len(cpus) == 2 and "AMX-BF16" in cpus[1]  # one committed benchmark per kind of native-bf16 CPU
    # every row's ratio from each committed benchmark
    assert all(len(r["nd_over_bn_train"]) == 2 and all(r["nd_over_bn_train"]) for r in first["rows"])
    text = bf16_whitening.markdown(first)
    assert f"| bf16 | fast, k=8 | 92.93 | {92.93 - exact:+.2f} |" in text
    assert "| float32 | exact | not trained | – |" in text
    assert all(f"ND/BN training step, {cpu} |" in text for cpu in cpus)
    # the machine's speed moves the ratio: each is shown with the BatchNorm step it was held against
    steps = [f"{s['cpu']}, {s['bn_step_s']:.2f} s" for s in first["speed"]]
    assert f"The BatchNorm step each ratio is held against, median of the speed run: {'; '.join(steps)}." in text
    sentence = bf16_whitening.summary(first)
    speed = {r["name"]: r["nd_over_bn_train"] for r in first["rows"]}
    exact_speed, fast_speed = speed["bf16-whitening-exact"], speed["bf16-whitening-fast8"]
    earlier = [" (an earlier version of the kernels)" if s["earlier_kernels"] else "" for s in first["speed"]]
    assert (f"at {exact_speed[0]:.2f}x a bf16 BatchNorm step ({fast_speed[0]:.2f}x in fast mode) on an {cpus[0]}"
            f"{earlier[0]} and {exact_speed[1]:.2f}x ({fast_speed[1]:.2f}x) on an {cpus[1]}{earlier[1]}, "
            "with") in sentence
    assert "92.64% (exact) and 92.93% (fast)" in sentence
    later = bf16_whitening.collect(tmp_path / "elsewhere", tmp_path / "gone", recorded=rows)  # another machine
    assert [r.get("test_top1") for r in later["rows"]] == [None, 92.65, 92.64, 92.93]


def test_bf16_whitening_table_says_which_speeds_timed_earlier_kernels(tmp_path: Path) -> None:
    """A speed benchmark records the products it ran in bf16; one that timed another set (or, from before the
    record, the earlier set) is named under the table with what it lacked."""
    import bf16_whitening

    from ndeconv.layers.fast_deconv import BF16_WHITENING_PRODUCTS

    speeds = []
    for i, path in enumerate(bf16_whitening.SPEEDS):
        payload = json.loads(path.read_text())
        if i == 0:
            payload["settings"].pop("bf16_whitening_products", None)  # written before the products were recorded
        else:
            payload["settings"]["bf16_whitening_products"] = list(BF16_WHITENING_PRODUCTS)
        speeds.append(tmp_path / path.name)
        speeds[-1].write_text(json.dumps(payload))
    result = bf16_whitening.collect(tmp_path / "none", tmp_path / "none", recorded={}, speeds=tuple(speeds))
    text = bf16_whitening.markdown(result)
    old, new = (s["cpu"] for s in result["speed"])
    assert (f"Speeds on the {old} were timed with an earlier version of the bf16 kernels, which left the inverse "
            "square root backward in float32.") in text
    assert f"Speeds on the {new}" not in text
    sentence = bf16_whitening.summary(result)
    assert f"on an {old} (an earlier version of the kernels) and" in sentence and sentence.count("earlier") == 1


def test_a_card_names_where_each_epoch_trained() -> None:
    """A 20-epoch run resumes across sessions, which may get other machines: the card's training line names the CPU
    and threads each epoch's row records, in epoch ranges, and says where rows from before that recorded none."""
    xeon, epyc = {"cpu": "Intel(R) Xeon(R) Processor", "threads": 1}, {"cpu": "AMD EPYC 9R14", "threads": 2}
    rows = [{"epoch": 1}, {"epoch": 2}, {"epoch": 3, **xeon}, {"epoch": 4, **xeon}, {"epoch": 5, **epyc},
            {"epoch": 6, **xeon}]
    assert training_machines(rows, "2.14.1+cu130") == (
        "a CPU not recorded (epochs 1-2); Intel(R) Xeon(R) Processor CPU, 1 thread (epochs 3-4); "
        "AMD EPYC 9R14 CPU, 2 threads (epoch 5); Intel(R) Xeon(R) Processor CPU, 1 thread (epoch 6) (torch 2.14.1)")
    assert training_machines(rows[2:4], "2.14.1") == "Intel(R) Xeon(R) Processor CPU, 1 thread (torch 2.14.1)"
