"""A config.json crafted to break the JSON parser (nested deeper than Python's recursion limit) is one line naming
the file, on every route that reads one, never a RecursionError traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ndeconv.cli import main
from ndeconv.zoo._pretrained import WEIGHTS_DIR

SHIPPED = WEIGHTS_DIR / "efficientnet_b0_deconv.fashion_mnist"  # the smallest shipped folder


@pytest.fixture
def nested(tmp_path: Path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(SHIPPED / "model.safetensors", folder)
    (folder / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    return folder


@pytest.mark.parametrize("argv", [
    ["eval", "--checkpoint", "{dir}/model.safetensors", "--arch", "efficientnet_b0"],
    ["eval", "{dir}"],  # as a run directory
    ["eval", "local-dir:{dir}"],
    ["fold", "--checkpoint", "{dir}/model.safetensors", "--arch", "efficientnet_b0", "-o", "{dir}/../f.safetensors"],
], ids=["checkpoint", "run-dir", "local-dir", "fold"])
def test_a_config_nested_too_deeply_is_one_line(nested: Path, argv: list[str], capsys) -> None:
    capsys.readouterr()
    status = main([a.replace("{dir}", str(nested)) for a in argv + ["--test-subset", "8"] * (argv[0] == "eval")])
    err = capsys.readouterr().err.strip()
    assert status in (1, 2) and len(err.splitlines()) == 1, err
    assert "Traceback" not in err and ("config.json" in err or "local-dir:" in err), err
    assert not (nested.parent / "f.safetensors").exists()
