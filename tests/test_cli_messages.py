"""The command line's startup and messages: ``--help`` without torch (import only what a command needs when it
runs; benchmarks/cli_startup.py measures the time) and the closest names for a mistyped model name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ndeconv.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parent.parent

# Prints the help of `ndeconv ARGS...` through the CLI's own main (as the console script does), then the heavy
# modules it imported: the console script's import path, in a fresh interpreter.
_PROBE = """
import sys
from ndeconv.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = sorted(m for m in ("torch", "timm", "numpy", "ndeconv.zoo", "ndeconv.layers") if m in sys.modules)
print("HEAVY:" + ",".join(heavy))
"""


def _imported_by_help(*args: str) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _PROBE, *args, "--help"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: ndeconv" in done.stdout
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("HEAVY:"), done.stdout
    return [m for m in line.removeprefix("HEAVY:").split(",") if m]


def test_top_level_help_imports_no_torch() -> None:
    # The help is argparse's text: importing torch, timm and the zoo for it cost 3.4-4 s of CPU.
    assert _imported_by_help() == []


# Every parser reads its defaults from torch-free modules (ndeconv.dataset_specs, ndeconv.training.seg_config,
# ndeconv.onnx_defaults); benchmarks/cli_startup.py measures the time.
@pytest.mark.parametrize("command", [m.replace("_", "-") for m in COMMANDS])
def test_each_command_help_imports_no_torch(command: str) -> None:
    assert _imported_by_help(command) == []


def test_version_needs_no_torch() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "ndeconv", "--version"], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("ndeconv ")
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "timm" not in imported


def test_import_ndeconv_still_registers_the_zoo_with_timm() -> None:
    # `import ndeconv` before or after timm: the zoo is in timm's registry either way, and the layers re-exported.
    for code in ("import ndeconv, timm", "import timm, ndeconv", "import ndeconv; from timm.models import list_models"
                 " as lm; import timm"):
        probe = f"{code}; print(len(timm.list_models('*_deconv')), ndeconv.FastDeconv.__name__)"
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
        assert done.returncode == 0, done.stderr
        count, name = done.stdout.split()
        # 24: the 26 zoo classifiers but mlp_deconv and simple_v1_deconv (no feature maps: ndeconv's only).
        assert int(count) >= 24 and name == "FastDeconv", code


@pytest.mark.parametrize("typed,meant", [
    ("resnt18", "resnet18_deconv"), ("resnet18_decon", "resnet18_deconv"), ("mobilenet", "mobilenetv2_deconv"),
    ("efficientnet", "efficientnet_b0_deconv"), ("densnet121", "densenet121_deconv"),
])
def test_a_mistyped_name_suggests_the_closest(typed: str, meant: str) -> None:
    from ndeconv.errors import UsageError
    from ndeconv.zoo import resolve_model_name

    with pytest.raises(UsageError) as err:
        resolve_model_name(typed)
    text = str(err.value)
    assert f"did you mean {meant}" in text and text.count("_deconv") <= 3, text  # the closest, not all 56


def test_the_command_line_says_did_you_mean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["fold", "resnt18", "--random-init", "-o", str(tmp_path / "a.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "unknown model 'resnt18'; did you mean resnet18_deconv" in err and len(err) < 200, err
    assert not (tmp_path / "a.safetensors").exists()
