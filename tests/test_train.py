"""``ndeconv train`` on real Fashion-MNIST: bit-exact resume after SIGKILL, the run directory, bad input.

Kept small (PNASNet-A, 128k parameters, 16 images, batch 4, 8 steps) so the whole file takes seconds of CPU.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ndeconv.cli import build_parser, main
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.runtime import cpu_model_name
from ndeconv.training import TrainConfig, load_run_model

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)"
)

TINY = ["--arch", "pnasnet_a", "--train-subset", "16", "--test-subset", "8", "--batch-size", "4", "--epochs", "2",
        "--deconv-iter", "2", "--checkpoint-every", "2", "--log-every", "1", "--curve-rows", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ndeconv.cli", "train", *args]


def _as_if_started_by_an_older_version(run_dir: Path, setting: str) -> None:
    """Drop a setting newer than the run from its config.json and checkpoint.pt (an upgrade mid-run)."""
    config = json.loads((run_dir / "config.json").read_text())
    del config["train"][setting]
    (run_dir / "config.json").write_text(json.dumps(config))
    payload = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    del payload["config"][setting]
    torch.save(payload, run_dir / "checkpoint.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An uninterrupted run and, beside it, the same run SIGKILLed mid-epoch then resumed with --resume (by a
    version of ndeconv with a setting the killed run did not know)."""
    return _full_and_resumed(tmp_path_factory.mktemp("runs"), [], older_setting="fast")


@pytest.fixture(scope="module")
def amp_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same pair under bf16 autocast in channels-last memory format."""
    return _full_and_resumed(tmp_path_factory.mktemp("amp_runs"), ["--amp", "bf16", "--channels-last"])


def _full_and_resumed(root: Path, extra: list[str], older_setting: str | None = None) -> dict[str, Path]:
    full_dir, killed_dir = root / "full", root / "killed"
    # Both start together: two single-threaded processes on a 2-core CI machine.
    full = subprocess.Popen(_train_cmd(*TINY, *extra, "--out", str(full_dir)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    killed = subprocess.Popen(_train_cmd(*TINY, *extra, "--out", str(killed_dir)), env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in killed.stderr:
        seen.append(line)
        if "checkpoint at step 2" in line:  # mid-epoch 1 (4 steps per epoch)
            killed.send_signal(signal.SIGKILL)
            break
    killed.wait(timeout=120)
    assert killed.returncode == -signal.SIGKILL, "".join(seen)
    assert (killed_dir / "checkpoint.pt").is_file() and not (killed_dir / "model.safetensors").exists()
    if older_setting:
        _as_if_started_by_an_older_version(killed_dir, older_setting)  # e.g. before fast mode existed
    resumed = subprocess.run(_train_cmd("--resume", str(killed_dir)), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    _, full_err = full.communicate(timeout=300)
    assert full.returncode == 0, full_err
    return {"full": full_dir, "killed": killed_dir}


@pytest.mark.slow  # two training subprocesses, one killed and resumed: about 30 s
def test_resume_after_sigkill_is_bit_exact(runs: dict[str, Path]) -> None:
    full = load_file(str(runs["full"] / "model.safetensors"))
    resumed = load_file(str(runs["killed"] / "model.safetensors"))
    assert full.keys() == resumed.keys()
    assert any("running_deconv" in k for k in full)  # the deconvolution buffers are part of the weights
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    ckpt = [torch.load(runs[r] / "checkpoint.pt", weights_only=True) for r in ("full", "killed")]
    assert ckpt[0]["deconv_counters"] == ckpt[1]["deconv_counters"]
    assert ckpt[0]["deconv_counters"]["conv1"] == 8  # the frozen stem counted every one of the 8 steps
    rows = [[json.loads(line) for line in (runs[r] / "metrics.jsonl").read_text().splitlines()]
            for r in ("full", "killed")]
    assert len(rows[0]) == len(rows[1]) == 2  # no epoch written twice after the resume
    steps = [(runs[r] / "steps.jsonl").read_text() for r in ("full", "killed")]
    # The within-epoch curve survives the kill too: the resumed run's row at step 4 averages steps 1-4, two of them
    # run before the kill (--curve-rows 1: a 4-step grid whose open window is checkpointed), no row lost or doubled.
    assert steps[0] == steps[1]
    for a, b in zip(rows[0], rows[1], strict=True):
        for key in ("epoch", "step", "lr", "train_loss", "train_top1", "test_loss", "test_top1", "test_top5"):
            assert a[key] == b[key], key


@pytest.mark.slow  # two bf16 training subprocesses: about 30 s
def test_resume_is_bit_exact_under_bf16_autocast_and_channels_last(amp_runs: dict[str, Path]) -> None:
    full = load_file(str(amp_runs["full"] / "model.safetensors"))
    resumed = load_file(str(amp_runs["killed"] / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    for run in amp_runs.values():
        train = json.loads((run / "config.json").read_text())["train"]
        assert train["amp"] == "bf16" and train["channels_last"] is True
    timing = {"seconds", "images_per_s", "eval_seconds", "cpu", "threads"}  # how long and where, not what
    rows = [[{k: v for k, v in json.loads(line).items() if k not in timing}
             for line in (amp_runs[r] / "metrics.jsonl").read_text().splitlines()] for r in ("full", "killed")]
    assert len(rows[0]) == 2 and rows[0] == rows[1]


def test_bare_amp_trains_in_float32_where_bf16_is_not_native(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import ndeconv.training.loop as loop

    monkeypatch.setattr(loop, "native_amp_dtype", lambda device: None)
    out = tmp_path / "run"
    assert main(["train", *TINY, "--max-steps", "1", "--out", str(out), "--amp"]) == 0
    assert "no native reduced-precision arithmetic" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["train"]["amp"] is None
    monkeypatch.setattr(loop, "native_amp_dtype", lambda device: torch.bfloat16)
    out = tmp_path / "native"
    assert main(["train", *TINY, "--max-steps", "1", "--out", str(out), "--amp"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["amp"] == "bf16"


def test_bf16_whitening_trains_under_bf16_autocast_only(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import ndeconv.layers._patch_stats as patch_stats

    assert main(["train", *TINY, "--max-steps", "1", "--out", str(tmp_path / "f32"), "--bf16-whitening"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("--bf16-whitening runs under bf16 autocast only: add --amp bf16, or drop it")
    assert not (tmp_path / "f32").exists()
    grams = []
    original = patch_stats.reduced_gram
    monkeypatch.setattr(patch_stats, "reduced_gram", lambda *a, **k: grams.append(1) or original(*a, **k))
    out = tmp_path / "bf16"
    # ResNet-18: its 3x3 layers whiten 576 features (PNASNet-A's ungrouped layers whiten under 128: float32 stays).
    assert main(["train", *TINY, "--arch", "resnet18", "--max-steps", "1", "--out", str(out), "--amp", "bf16",
                 "--bf16-whitening"]) == 0
    assert grams  # the bf16 kernels ran
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["bf16_whitening"] is True and train["amp"] == "bf16"


@pytest.mark.slow  # the runs fixture: two training subprocesses, about 30 s
def test_run_directory(runs: dict[str, Path]) -> None:
    import timm

    run = runs["full"]
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "pnasnet_a_deconv" and config["num_classes"] == 10
    assert config["train"]["dataset"] == "fashion_mnist" and config["train"]["seed"] == 0
    assert config["train"]["lr"] == 0.1 and config["train"]["wd"] == 1e-3 and config["train"]["momentum"] == 0.9
    assert {"torch", "timm", "ndeconv"} <= set(config["run"]["versions"]) and "git_commit" in config["run"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == 8
    assert {"train_loss", "train_top1", "test_loss", "test_top1", "seconds", "images_per_s"} <= set(rows[0])
    assert rows[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine over all 8 steps, stepped every iteration
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == [4, 8]  # 4 steps per epoch, --curve-rows 1: a row every 4 steps
    assert steps[-1]["epoch"] == 2.0 and all(r["train_loss"] > 0 for r in steps)

    reference = load_run_model(run)
    x = torch.rand(3, 1, 32, 32)
    want = reference(x)
    args = {k: v for k, v in config["model_args"].items() if k != "in_chans"}
    by_file = timm.create_model("pnasnet_a_deconv", pretrained=True,
                                pretrained_cfg_overlay=dict(file=str(run / "model.safetensors")), **args).eval()
    by_dir = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(by_file(x), want) and torch.equal(by_dir(x), want)


def test_default_invocation_is_the_papers_run() -> None:
    args = build_parser().parse_args(["train"])
    given = {k: getattr(args, k) for k in args._train_fields if getattr(args, k) is not None}
    assert TrainConfig.from_dict(given) == TrainConfig()
    cfg = TrainConfig.from_dict(given).resolved()  # the defaults of main.py, the script that trains ResNet-18
    assert (cfg.model_name(), cfg.dataset, cfg.deconv, cfg.epochs, cfg.batch_size) == (
        "resnet18_deconv", "fashion_mnist", True, 20, 128)
    assert (cfg.lr, cfg.momentum, cfg.wd, cfg.lr_scheduler, cfg.block, cfg.deconv_iter) == (
        0.1, 0.9, 1e-3, "cosine", 64, 5)
    assert re.fullmatch(r"runs/resnet18-nd-fashion_mnist-\d{8}-\d{6}", cfg.default_run_dir())
    bn = TrainConfig(arch="resnet18_deconv", deconv=False)
    assert bn.default_run_dir().startswith("runs/resnet18-bn-")


def test_amp_adamw_multistep_max_steps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    status = main(["train", *TINY, "--out", str(out), "--amp", "bf16", "--optimizer", "AdamW", "--lr", "1e-3",
                   "--lr-scheduler", "multistep", "--max-steps", "2", "--deconv", "false"])
    assert status == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["step"] == 2 and rows[0]["partial"]
    # Where the epoch trained (a run resumed on another machine has rows from each; its model card names them).
    assert rows[0]["cpu"] == cpu_model_name() and rows[0]["threads"] == torch.get_num_threads()
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["amp"] == "bf16" and config["model_args"]["deconv"] is False
    assert not any("running_deconv" in k for k in load_file(str(out / "model.safetensors")))
    # --max-steps finishes the run: a larger value cannot continue it, and says so instead of "nothing to do"
    _fails(capsys, ["train", "--resume", str(out), "--max-steps", "3"], r"--max-steps 3 \(the run has 2\)")


def _fails(capsys: pytest.CaptureFixture, argv: list[str], pattern: str) -> None:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "new"
    _fails(capsys, ["train", "--arch", "lenet5", "--out", str(out)], r"unknown --arch 'lenet5'; choose one of")
    _fails(capsys, ["train", "--dataset", "svhn", "--out", str(out)], r"unknown dataset 'svhn'")
    _fails(capsys, ["train", "--block", "0", "--out", str(out)], r"--block must be a positive")
    _fails(capsys, ["train", "--momentum", "-1", "--out", str(out)], r"--momentum must be in \[0, 1\)")
    _fails(capsys, ["train", "--multistep-gamma", "0", "--out", str(out)], r"--multistep-gamma must be")
    _fails(capsys, ["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--out", str(out)],
           r"mnist: looked for train-images-idx3-ubyte.*in .*--data-dir")
    assert not out.exists()  # nothing was created by a refused run

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    _fails(capsys, ["train", *TINY, "--out", str(existing)], r"already exists.*--resume.*--force")
    assert [p.name for p in existing.iterdir()] == ["notes.txt"]
    assert (existing / "notes.txt").read_text() == "keep me"

    _fails(capsys, ["train", *TINY, "--out", str(existing), "--force"], r"--force starts over only in a run dir")
    assert (existing / "notes.txt").read_text() == "keep me"  # --force deletes nothing in a folder not a run's
    _fails(capsys, ["train", "--resume", str(existing)], r"no config\.json.*not a run directory")
    _fails(capsys, ["train", "--resume", str(tmp_path / "nope")], r"no such directory")


@pytest.mark.slow  # the runs fixture: two training subprocesses, about 30 s
def test_a_resume_that_does_not_fit_the_run_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   runs: dict[str, Path]) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in runs["full"].iterdir()}
    _fails(capsys, ["train", "--resume", str(runs["full"]), "--lr", "0.5"],
           r"--lr 0\.5 \(the run has 0\.1\).*keeps its settings")
    assert {p.name: p.stat().st_mtime_ns for p in runs["full"].iterdir()} == before

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((runs["full"] / "config.json").read_text())
    (broken / "checkpoint.pt").write_bytes(b"not a checkpoint")
    _fails(capsys, ["train", "--resume", str(broken)], r"cannot read .*checkpoint\.pt")
    assert (broken / "checkpoint.pt").read_bytes() == b"not a checkpoint"

    # A checkpoint of ours whose optimizer state is another model's: one line, the file left as it was.
    damaged = tmp_path / "damaged"
    shutil.copytree(runs["full"], damaged)
    payload = torch.load(damaged / "checkpoint.pt", weights_only=True)
    payload["optimizer"]["param_groups"].append(dict(payload["optimizer"]["param_groups"][0], params=[10**6]))
    torch.save(payload, damaged / "checkpoint.pt")
    before = (damaged / "checkpoint.pt").read_bytes()
    _fails(capsys, ["train", "--resume", str(damaged)], r"training state cannot be restored.*damaged")
    assert (damaged / "checkpoint.pt").read_bytes() == before
    # A run started by two processes continues only with two (batches and schedule follow the count).
    two = tmp_path / "two"
    shutil.copytree(runs["full"], two)
    config = json.loads((two / "config.json").read_text())
    config["run"]["world_size"] = 2
    (two / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["train", "--resume", str(two)], r"started with 2 process\(es\), this is 1")
    # Weights that are not the run's model: eval says so in one line.
    save_file({"weight": torch.zeros(2)}, str(damaged / "model.safetensors"))
    _fails(capsys, ["eval", str(damaged), "--test-subset", "4"], r"model\.safetensors does not fit the model its")


# The deconvolution case trains a FastDeconv network in a subprocess (about 10 s): the full suite only.
@pytest.mark.parametrize("deconv", ["false", pytest.param("true", marks=pytest.mark.slow)])
def test_divergence_is_recorded_and_the_checkpoint_kept(tmp_path: Path, deconv: str) -> None:
    """A loss that stops being finite ends the run with a one-line error and a diverged.json the paper-claim
    table reads (a diverged run is a result, not an interrupted one); the last checkpoint stays. With
    deconvolution the divergence shows first as a non-finite covariance in a layer: recorded the same way."""
    out = tmp_path / "run"
    done = subprocess.run(_train_cmd(*TINY, "--out", str(out), "--deconv", deconv, "--lr", "1e12"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    last = done.stderr.strip().splitlines()[-1]  # progress lines come before it
    assert done.returncode == 2, done.stderr
    assert "the loss became" in last and "lower --lr" in last and "diverged.json" in last
    record = json.loads((out / "diverged.json").read_text())
    assert record["loss"] in ("nan", "inf", "non-finite") and record["step"] >= 1 and record["epoch"] == 1
    assert record["seconds"] > 0
    assert (out / "checkpoint.pt").is_file() and not (out / "metrics.jsonl").exists()
    from reproduce.paper_claim import read_run

    assert read_run(out) == {"diverged_at_step": record["step"], "diverged_loss": record["loss"],
                             "seconds": pytest.approx(record["seconds"]), "run_dir": str(out)}


def test_queue_skips_a_diverged_run(tmp_path: Path) -> None:
    """reproduce/train_run.sh leaves a diverged run alone (resuming would repeat the same steps)."""
    run = tmp_path / "vgg16-bn"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    (run / "diverged.json").write_text('{"step": 47}')
    script = f"source reproduce/train_run.sh; NDECONV=false train_run {run} --arch vgg16"
    done = subprocess.run(["bash", "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and "diverged" in done.stdout and "skipped" in done.stdout
    (run / "diverged.json").unlink()  # without the record the same directory is resumed (and here fails)
    done = subprocess.run(["bash", "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "resuming" in done.stdout


def test_queue_trains_each_form_and_goes_on_after_a_failure(tmp_path: Path) -> None:
    """reproduce/train_run.sh's train_queue (converged.sh, paper_claim.sh): ARCH-nd / ARCH-bn become the authors'
    runs with the extra args, a finished run (at EPOCHS) is skipped, and a failed run does not stop the next."""
    fake = tmp_path / "ndeconv"  # records its arguments; fails for vgg16
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path}/calls\ncase "$*" in *vgg16*) exit 3;; esac\n')
    fake.chmod(0o755)
    (tmp_path / "q" / "senet18-bn").mkdir(parents=True)
    (tmp_path / "q" / "senet18-bn" / "metrics.jsonl").write_text('{"epoch": 20}\n')
    script = (f"source reproduce/train_run.sh; NDECONV={fake} train_queue {tmp_path}/q 20 "
              "'vgg16-bn senet18-bn\nresnet18-nd' --fast 8")
    done = subprocess.run(["bash", "-c", script], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and f"== {tmp_path}/q/senet18-bn: done" in done.stdout
    common = "--dataset fashion_mnist --epochs 20 --seed 0 --fast 8 --checkpoint-every 25"
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"train --arch vgg16 --deconv false {common} --out {tmp_path}/q/vgg16-bn --force",
        f"train --arch resnet18 --deconv true {common} --out {tmp_path}/q/resnet18-nd --force",
    ]
