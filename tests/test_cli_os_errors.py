"""The file system's refusals (a name too long, a file-size limit) are one line naming the path and the fix, on
every command, instead of a traceback (ndeconv.cli's one OSError path; the trainer's for its own writes)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_train_reliability import ENV, TINY, _last_line, _train_cmd

from ndeconv.cli import main

LONG = "a" * 300  # over the 255 bytes a name may have


@pytest.mark.parametrize("argv", [
    ["eval", LONG],
    ["fold", "efficientnet_b0_deconv.fashion_mnist", "-o", "{tmp}/" + LONG + ".safetensors"],
    ["export", "efficientnet_b0_deconv.fashion_mnist", "-o", "{tmp}/" + LONG + ".onnx"],
    ["train", "--out", "{tmp}/" + LONG, "--max-steps", "1"],
    ["convert-bn", "efficientnet_b0_deconv.fashion_mnist", "-o", "{tmp}/" + LONG + ".safetensors"],
], ids=lambda argv: argv[0])
def test_a_name_too_long_is_one_line(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    status = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert status != 0 and len(err.splitlines()) == 1, err
    assert "characters): File name too long; choose a shorter name" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def _small_file_limit() -> None:
    # A file-size limit of 64 KB, with SIGXFSZ ignored so that a write past it fails with EFBIG (as under a shell
    # that ignores the signal) instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))


@pytest.mark.slow  # a training subprocess: about 10 s
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE and SIGXFSZ")
def test_a_checkpoint_past_the_file_size_limit_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = subprocess.run(_train_cmd(*TINY, "--out", str(out)), env=ENV, capture_output=True, text=True,
                          timeout=300, preexec_fn=_small_file_limit)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert _last_line(done.stderr) == (f"ndeconv train: error: cannot write into {out}: File too large; the "
                                       "file-size limit (ulimit -f) is below the file's size: raise it or write "
                                       "elsewhere, then start the run again with --force"), done.stderr
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name == ".lock"]
