"""``ndeconv train`` when things go wrong around it: a second run into a busy directory, SIGTERM/SIGINT, a full
disk, orphaned temporary files, non-finite settings and numbers, and what a run logs without a terminal.

Real processes throughout (the lock and the signals are about processes), on the tiny PNASNet-A run of
test_train.py in its BatchNorm form (the quickest to start and step): 16 images, batch 4, 4 steps per epoch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ndeconv.cli import main
from ndeconv.datasets import FASHION_MNIST_DIR

pytestmark = pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)"
)

PROJECT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "pnasnet_a", "--train-subset", "16", "--test-subset", "8", "--batch-size", "4", "--epochs", "2",
        "--deconv-iter", "2", "--checkpoint-every", "0", "--curve-rows", "1", "--deconv", "false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TIMING = {"seconds", "images_per_s", "eval_seconds", "cpu", "threads"}  # how long and where, not what


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ndeconv.cli", "train", *args]


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir()) if p.is_file()}


def _in_process(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(argv)
    return status, err.getvalue()


def _read_until(proc: subprocess.Popen, prefix: str, seen: list[str]) -> bool:
    """Read the child's stderr up to a line starting with ``prefix``; False if it ended first."""
    for line in proc.stderr:
        seen.append(line)
        if line.startswith(prefix):
            return True
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=60)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run and, beside it, the same run SIGTERMed after its first step (while it ran, a second
    training was pointed at its directory), resumed, SIGINTed after a step, and resumed to the end. Records
    what happened; the tests assert on it (a fixture that asserted would hide which behaviour failed)."""
    root = tmp_path_factory.mktemp("stopped")
    full_dir, run = root / "full", root / "run"
    trace: dict = {"full": full_dir, "run": run}
    # Both start together: two single-threaded processes on a 2-core machine. --log-every 50: more than the run's
    # 8 steps, so the full run's log shows only what is logged regardless (its first steps).
    full = subprocess.Popen(_train_cmd(*TINY, "--log-every", "50", "--out", str(full_dir)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(_train_cmd(*TINY, "--log-every", "1", "--out", str(run)), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    procs = [full, first]
    try:
        seen: list[str] = []
        if _read_until(first, "step 1:", seen):
            # Frozen mid-run (still holding its directory), a second training is pointed at it.
            os.kill(first.pid, signal.SIGSTOP)
            trace["holder_pid"] = first.pid
            before = _snapshot(run)
            trace["busy"] = {
                "resume": _in_process(["train", "--resume", str(run)]),
                "force": _in_process(["train", *TINY, "--out", str(run), "--force"]),
            }
            trace["busy_unchanged"] = _snapshot(run) == before
            os.kill(first.pid, signal.SIGTERM)  # delivered when it continues
            os.kill(first.pid, signal.SIGCONT)
        rest = first.communicate(timeout=300)[1]
        trace["sigterm"] = (first.returncode, "".join(seen) + rest)
        if (run / "checkpoint.pt").is_file():
            state = torch.load(run / "checkpoint.pt", weights_only=True)["state"]
            trace["sigterm_state"] = (state["global_step"], state["step_in_epoch"])

        # Temporary files of writes a kill interrupted, beside files that are not the run's own.
        orphans = [".checkpoint.pt.a1b2c3d4.tmp", ".model.safetensors.x_9y8z7w.tmp", ".metrics.jsonl.0000aaaa.tmp"]
        for name in orphans:
            (run / name).write_bytes(b"\0" * 4096)
        foreign = [".notes.txt.a1b2c3d4.tmp", "checkpoint.pt.backup.tmp", ".checkpoint.pt.tmp"]
        for name in foreign:
            (run / name).write_bytes(b"keep")
        trace["orphans"], trace["foreign"] = orphans, foreign

        second = subprocess.Popen(_train_cmd("--resume", str(run)), env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        procs.append(second)
        seen = []
        if _read_until(second, "step ", seen):
            trace["orphans_at_first_step"] = [n for n in orphans if (run / n).exists()]
            # One more, after the resumed run's start: removed by the next checkpoint it writes.
            late = ".checkpoint.pt.late0000.tmp"
            (run / late).write_bytes(b"\0" * 4096)
            trace["late"] = late
            second.send_signal(signal.SIGINT)
        rest = second.communicate(timeout=300)[1]
        trace["sigint"] = (second.returncode, "".join(seen) + rest)

        third = subprocess.run(_train_cmd("--resume", str(run)), env=ENV, capture_output=True, text=True,
                               timeout=300)
        trace["final"] = (third.returncode, third.stderr)
        trace["full_log"] = (full.wait(timeout=300), full.stderr.read())
        return trace
    finally:
        for proc in procs:
            _stop(proc)


def _last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1] if stderr.strip() else ""


@pytest.mark.slow  # the stopped fixture: two training subprocesses, about 30 s
def test_sigterm_and_sigint_checkpoint_and_the_resumed_run_is_bit_exact(stopped: dict) -> None:
    run = stopped["run"]
    code, err = stopped["sigterm"]
    assert code == 143, err
    assert _last_line(err) == (f"ndeconv train: stopped by SIGTERM at step {stopped['sigterm_state'][0]}, "
                               f"checkpoint saved; continue with: ndeconv train --resume {run}"), err
    assert "Traceback" not in err
    step, in_epoch = stopped["sigterm_state"]
    assert 1 <= step < 4 and in_epoch == step  # a mid-epoch checkpoint, not --checkpoint-every's (0) or an epoch's
    code, err = stopped["sigint"]
    assert code == 130, err
    assert re.fullmatch(rf"ndeconv train: stopped by SIGINT at step \d+, checkpoint saved; continue with: "
                        rf"ndeconv train --resume {re.escape(str(run))}", _last_line(err)), err
    code, err = stopped["final"]
    assert code == 0 and "resuming" in err, err
    assert stopped["full_log"][0] == 0, stopped["full_log"][1]

    full = load_file(str(stopped["full"] / "model.safetensors"))
    resumed = load_file(str(run / "model.safetensors"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    rows = [[{k: v for k, v in json.loads(line).items() if k not in TIMING}
             for line in (folder / "metrics.jsonl").read_text().splitlines()] for folder in (stopped["full"], run)]
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    assert (stopped["full"] / "steps.jsonl").read_text() == (run / "steps.jsonl").read_text()


@pytest.mark.slow  # the stopped fixture
def test_a_busy_run_directory_is_refused_naming_the_holder(stopped: dict) -> None:
    """While a training runs (here frozen mid-run), --resume or --force into its directory is refused in one
    line naming its pid, and nothing in the directory changes."""
    for how, (status, err) in stopped["busy"].items():
        assert status == 2, (how, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and f"is in use by another training (pid {stopped['holder_pid']})" in lines[0], err
    assert stopped["busy_unchanged"]
    assert not (stopped["run"] / ".lock").exists()  # the run gave its lock back when it ended


@pytest.mark.slow  # the stopped fixture
def test_orphaned_temp_files_are_removed_on_resume_and_on_the_next_write(stopped: dict) -> None:
    run = stopped["run"]
    assert stopped["orphans_at_first_step"] == []  # removed as the resumed run started
    assert not (run / stopped["late"]).exists()  # removed by the next checkpoint write
    for name in stopped["foreign"]:
        assert (run / name).read_bytes() == b"keep", name


@pytest.mark.slow  # the stopped fixture
def test_first_steps_and_the_evaluation_are_logged_without_a_terminal(stopped: dict) -> None:
    code, err = stopped["full_log"]
    assert code == 0, err
    logged = [int(m.group(1)) for m in re.finditer(r"^step (\d+): ", err, re.MULTILINE)]
    assert logged == [1, 2, 5], err  # the first steps; none of the others (every 50 steps)
    assert re.search(r"^step 1: epoch 1/2 step 1/4 .* time \d+:\d\d:\d\d ETA \d+:\d\d:\d\d$", err, re.MULTILINE), err
    lines = err.splitlines()
    evaluating = [i for i, line in enumerate(lines) if line == "evaluating 8 test images"]
    epochs = [i for i, line in enumerate(lines) if line.startswith("epoch ") and ": train loss" in line]
    assert len(evaluating) == 2 and [i + 1 for i in evaluating] == epochs, err


def test_the_eta_counts_the_evaluations_still_to_come() -> None:
    from ndeconv.training.loop import _eval_seconds_left

    # Before any evaluation: 3 to come, each of 3000 test images at 3x the 100 training images/s (10 s).
    assert _eval_seconds_left([], 0, total_steps=30, steps_per_epoch=10, test_images=3000,
                              images_per_s=100.0) == pytest.approx(3 * 10.0)
    # After one: the measured time, for the evaluations left (epochs 2 and 3).
    assert _eval_seconds_left([{"eval_seconds": 7.0}], 1, 30, 10, 3000, 100.0) == pytest.approx(14.0)
    # --max-steps 15 stops inside epoch 2, which still ends with an evaluation.
    assert _eval_seconds_left([{"eval_seconds": 7.0}], 1, 15, 10, 3000, 100.0) == pytest.approx(7.0)


LOCK_HOLDER = textwrap.dedent("""
    import sys
    from ndeconv.training.lock import RunDirLock

    lock = RunDirLock(sys.argv[1])
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills this process)
    lock.release()
""")


def _hold_lock(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(folder)], env=ENV, cwd=PROJECT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = holder.stdout.readline()
    if line.strip() != "locked":
        _stop(holder)
        pytest.fail(f"the lock holder did not start: {holder.stderr.read()[-2000:]}")
    return holder


@pytest.mark.slow  # a training subprocess held mid-run: about 13 s
def test_a_new_run_into_a_folder_another_process_holds_is_refused(tmp_path: Path) -> None:
    """Two trainings started into the same new --out both pass the empty-folder check: the lock tells them
    apart. The holder is another process taking the lock with the library's own function."""
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        before = _snapshot(out)
        done = subprocess.run(_train_cmd(*TINY, "--max-steps", "1", "--out", str(out)), env=ENV,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (f"ndeconv train: error: {out} is in use by another training (pid "
                                       f"{holder.pid}); wait for it to end or stop it, or choose another --out")
        assert _snapshot(out) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not out.exists()  # the holder created the folder for its lock and removed both


def test_the_lock_of_a_dead_process_does_not_block(tmp_path: Path) -> None:
    from ndeconv.training.lock import LOCK_FILE, RunDirLock

    out = tmp_path / "run"
    holder = _hold_lock(out)
    holder.kill()  # SIGKILL: no chance to clean up
    holder.wait(timeout=60)
    assert (out / LOCK_FILE).exists()
    with RunDirLock(out) as lock:  # the kernel released the dead process's flock
        assert lock.held and (out / LOCK_FILE).read_text().split()[0] == str(os.getpid())
    from ndeconv.training.loop import _check_new_run_dir

    (out / LOCK_FILE).write_text("12345 elsewhere\n")  # a stale lock file alone is no run's: the folder is new
    _check_new_run_dir(out, force=False)


@pytest.mark.parametrize("flag, value", [("--lr", "inf"), ("--lr", "nan"), ("--wd", "inf"), ("--wd", "nan"),
                                         ("--momentum", "nan"), ("--eps", "inf"), ("--milestone", "nan"),
                                         ("--multistep-gamma", "nan"), ("--drop-rate", "nan"), ("--lr", "-1"),
                                         ("--wd", "-0.1"), ("--eps", "0"), ("--momentum", "-0.5")])
def test_non_finite_or_non_positive_settings_are_refused(tmp_path: Path, flag: str, value: str) -> None:
    out = tmp_path / "run"
    status, err = _in_process(["train", *TINY, "--max-steps", "1", "--out", str(out), flag, value])
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "must be" in lines[0], err
    assert not out.exists()


def _strict(text: str) -> object:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_the_run_directory_holds_strict_json_only(tmp_path: Path) -> None:
    """Weights blown up by the last step give a test loss of NaN: written as null, not as bare NaN (not JSON)."""
    out = tmp_path / "run"
    status, err = _in_process(["train", *TINY, "--deconv", "false", "--lr", "1e30", "--max-steps", "1",
                               "--out", str(out)])
    assert status == 0, err
    rows = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["test_loss"] is None and math.isfinite(rows[0]["train_loss"])
    for name in ("config.json", "steps.jsonl"):
        for line in [(out / name).read_text()] if name.endswith(".json") else (out / name).read_text().splitlines():
            _strict(line)

    from ndeconv.io import save_json_atomic
    from ndeconv.training.metrics import write_metrics

    write_metrics([{"loss": float("nan"), "x": [float("inf"), 1.5], "y": {"z": -float("inf")}}], tmp_path / "m")
    assert _strict((tmp_path / "m").read_text()) == {"loss": None, "x": [None, 1.5], "y": {"z": None}}
    save_json_atomic({"lr": float("inf")}, tmp_path / "d.json", finite=True)
    assert _strict((tmp_path / "d.json").read_text()) == {"lr": None}


def _mount_tmpfs(folder: Path, size: str) -> None:
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.mark.parametrize("size, then", [
    ("512k", "start the run again with --force"),  # config.json fits, the first (0.55 MB) checkpoint does not
    # The first checkpoint fits, the first epoch's weights beside it do not: the run resumes from the checkpoint.
    ("1m", "continue with `ndeconv train --resume {out}` (the last checkpoint is intact)"),
])
@pytest.mark.slow  # a training subprocess on a tiny tmpfs per case: about 10 s each
def test_a_full_disk_is_one_line(tmp_path: Path, size: str, then: str) -> None:
    """One line naming the folder instead of torch's double traceback; no temporary file left behind."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, size)
    try:
        out = disk / "run"
        done = subprocess.run(_train_cmd(*TINY, "--out", str(out)), env=ENV, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr and "inline_container" not in done.stderr, done.stderr
        assert _last_line(done.stderr) == (f"ndeconv train: error: no space left on {out}: free some space there, "
                                           f"then {then.format(out=out)}"), done.stderr
        names = sorted(p.name for p in out.iterdir())
        assert not [n for n in names if n.endswith(".tmp")] and ".lock" not in names, names
        if (out / "checkpoint.pt").exists():
            from ndeconv.training.checkpoint import load_checkpoint

            assert load_checkpoint(out)["state"]["global_step"] == 0  # the run's first checkpoint, whole
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _stub_python(folder: Path, log: Path) -> Path:
    """A ``python3`` whose ``-m venv DIR`` makes DIR/bin/python: a stub logging how it is called."""
    folder.mkdir(parents=True, exist_ok=True)
    stub = folder / "python3"
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [ "$1 $2" = "-m venv" ]; then
          mkdir -p "$3/bin"
          printf '#!/usr/bin/env bash\\necho "venv-python $*" >> {log}\\n' > "$3/bin/python"
          chmod +x "$3/bin/python"
          echo "python3 -m venv $3" >> {log}
          exit 0
        fi
        echo "system-python3 $*" >> {log}
        """))
    stub.chmod(0o755)
    return folder


def test_scripts_test_sh_runs_everything_in_a_virtual_environment(tmp_path: Path) -> None:
    """scripts/test.sh creates .venv once (python3 -m venv), then reuses it; pip, ruff and pytest all run with
    .venv/bin/python, never with whatever python is active."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(PROJECT / "scripts" / "test.sh", repo / "scripts" / "test.sh")
    log = tmp_path / "calls.log"
    bin_dir = _stub_python(tmp_path / "bin", log)
    (bin_dir / "python").write_text(f"#!/usr/bin/env bash\necho \"system-python $*\" >> {log}\n")
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    first = subprocess.run(["bash", "scripts/test.sh", "-q", "-m", "not slow"], cwd=repo, env=env,
                           capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert "creating" in first.stdout + first.stderr and ".venv" in first.stdout + first.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "python3 -m venv .venv", calls
    assert all(c.startswith("venv-python ") for c in calls[1:]), calls
    assert any("pip install" in c and "torch==2.14.1" in c for c in calls)
    assert any(c.endswith('pip install -q -e .[dev]') for c in calls), calls
    assert calls[-2:] == ["venv-python -m ruff check .", "venv-python -m pytest -q -m not slow"], calls

    log.unlink()
    again = subprocess.run(["bash", "scripts/test.sh"], cwd=repo, env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stdout + again.stderr
    calls = log.read_text().splitlines()
    assert all(c.startswith("venv-python ") for c in calls), calls  # no second venv, no system python


@pytest.mark.parametrize("command", ["train", "train-seg"])
def test_force_never_replaces_a_weights_folder(tmp_path: Path, command: str, capsys) -> None:
    """A copy of a shipped weights folder holds a run's config.json, but --force is refused there: nothing in it
    changes."""
    from ndeconv.cli import main
    from ndeconv.zoo._pretrained import WEIGHTS_DIR

    folder = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR / "efficientnet_b0_deconv.fashion_mnist", folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    argv = ["train", "--arch", "efficientnet_b0", *TINY[2:]] if command == "train" else \
        ["train-seg", "--model", "fcn_resnet50", "--dataset", "voc", "--data-dir", str(tmp_path)]
    capsys.readouterr()
    assert main([*argv, "--out", str(folder), "--force"]) == 2
    assert "is a weights folder (it has a SHA256SUMS)" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
