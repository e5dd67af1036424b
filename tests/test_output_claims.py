"""One writer per output: every command that writes a file claims it before any work (``ndeconv.file_lock``), a
second command writing the same path at once is refused in one line, and an interrupted or failed command leaves
nothing behind that looks valid (no temporary folder, no lock, no empty output folder)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ndeconv.cli import Terminated, _signals_interrupt, main
from ndeconv.errors import UsageError
from ndeconv.file_lock import claim_output

HOLD = """
import sys, time
from ndeconv.errors import UsageError
from ndeconv.file_lock import claim_output
with claim_output(sys.argv[1]):
    print("claimed", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def held(tmp_path: Path):
    """An output path another process holds the claim on."""
    path = tmp_path / "out" / "model.safetensors"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "claimed"
    yield path, holder.pid
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("argv", [
    ["fold", "efficientnet_b0_deconv.fashion_mnist", "-o", "{path}"],
    ["export", "efficientnet_b0_deconv.fashion_mnist", "-o", "{path}.onnx"],
    ["convert-bn", "efficientnet_b0_deconv.fashion_mnist", "-o", "{path}"],
    ["convert-reference", "missing.pth.tar", "-o", "{path}"],
    ["viz", "efficientnet_b0_deconv.fashion_mnist", "-o", "{path}"],
], ids=lambda argv: argv[0])
def test_a_second_writer_of_the_same_output_is_refused(held, argv: list[str], capsys) -> None:
    path, pid = held
    if argv[0] == "export":  # its own path, with its own claim
        holder = subprocess.Popen([sys.executable, "-c", HOLD, f"{path}.onnx"], stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().strip() == "claimed"
        pid = holder.pid
    try:
        capsys.readouterr()
        assert main([a.replace("{path}", str(path)) for a in argv] + ["--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"is being written by another ndeconv command (pid {pid})" in err, err
    finally:
        if argv[0] == "export":
            holder.kill()
            holder.wait()


def test_the_claim_is_reentrant_and_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "file.bin"
    with claim_output(path), claim_output(path):  # a command, then the library function it calls
        assert (path.parent / ".file.bin.lock").exists()
    assert list(path.parent.iterdir()) == []  # the lock is gone; the folders stay: the block succeeded
    with pytest.raises(RuntimeError), claim_output(tmp_path / "failed" / "file.bin"):
        raise RuntimeError("the command failed")
    assert not (tmp_path / "failed").exists()  # made for the output, removed with nothing in it


def test_a_failed_command_removes_the_output_folder_it_made(tmp_path: Path, capsys) -> None:
    out = tmp_path / "converted" / "model.safetensors"
    assert main(["convert-reference", str(tmp_path / "missing.pth.tar"), "-o", str(out)]) != 0
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # an export subprocess stopped half way: about 15 s
def test_sigterm_during_export_is_one_line_and_leaves_no_debris(tmp_path: Path) -> None:
    out = tmp_path / "model.onnx"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "ndeconv.cli", "export", "resnet18_deconv.fashion_mnist", "-o",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    # Stop it once it is writing: the claim is taken and the temporary folder of the export exists.
    while time.monotonic() < deadline and not any(p.name.startswith(".model.onnx.") and p.is_dir()
                                                  for p in tmp_path.iterdir()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "ndeconv export: terminated (SIGTERM)", err
    assert list(tmp_path.iterdir()) == []


def test_a_command_started_with_sigint_ignored_leaves_it_ignored() -> None:
    # nohup and a background job (&) start a command with SIGINT ignored: Ctrl-C at the terminal is not for it.
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _signals_interrupt("export"):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # SIGTERM still ends it cleanly
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("signum, raised", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_a_signal_during_an_import_waits_for_the_import_to_end(tmp_path: Path, monkeypatch, signum, raised) -> None:
    # A module whose import is under way when the signal comes, as torch.onnx.export's lazy import of onnx's
    # extension modules is: raised there, the exception would have to unwind through the extension's C++
    # initialiser (onnx's nanobind modules abort the process). The import completes; the command stops after it.
    (tmp_path / "slow_import_for_signal_test.py").write_text(
        f"import os, time\nos.kill(os.getpid(), {int(signum)})\ntime.sleep(0.3)\nCOMPLETE = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "slow_import_for_signal_test", raising=False)
    # Ctrl-C's handler as a foreground shell leaves it: a suite started in the background (&, nohup) inherits an
    # ignored SIGINT, which the command rightly leaves ignored.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(raised), _signals_interrupt("export"):
            import slow_import_for_signal_test  # noqa: F401
            time.sleep(10)  # the signal is delivered again here
        assert sys.modules["slow_import_for_signal_test"].COMPLETE
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, inherited)


@pytest.mark.parametrize("folder", [False, True])
def test_an_output_finished_while_waiting_for_the_claim_is_not_overwritten(tmp_path: Path, monkeypatch,
                                                                           folder: bool) -> None:
    # Checked free, then another writer finishes the same output before this one holds the claim: the check runs
    # again under the claim, so the finished output is refused, not replaced.
    import ndeconv.file_lock as file_lock

    out = tmp_path / ("images" if folder else "model.onnx")
    take = file_lock.take_lock

    def another_writer_finishes_first(lock: Path) -> int:
        if folder:
            out.mkdir()
            (out / "0.png").write_bytes(b"theirs")
        else:
            out.write_bytes(b"theirs")
        return take(lock)

    monkeypatch.setattr(file_lock, "take_lock", another_writer_finishes_first)
    with pytest.raises(UsageError, match="already exists"), claim_output(out, folder=folder):
        pytest.fail("the claim was granted over a finished output")
    assert (out / "0.png" if folder else out).read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # the lock file is gone
