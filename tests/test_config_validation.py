"""A config.json that describes weights is checked against them on every route: ``local-dir:`` and ``hf-hub:``
as ``--checkpoint`` (a ``num_classes`` that would drop the trained head, or that is no number of classes at all,
is one line naming the file and the key, never a top-1 of pooled features scored as logits)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm

from ndeconv.cli import main
from ndeconv.zoo._pretrained import WEIGHTS_DIR

SHIPPED = WEIGHTS_DIR / "efficientnet_b0_deconv.fashion_mnist"  # the smallest shipped folder


def _folder(tmp_path: Path, num_classes: object) -> Path:
    folder = tmp_path / "weights"
    shutil.copytree(SHIPPED, folder)
    (folder / "SHA256SUMS").unlink()  # the config is edited: the folder is a user's now
    config = json.loads((folder / "config.json").read_text())
    config["num_classes"] = num_classes
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("value, said", [
    (0, "num_classes 0 does not match the weights' 10-class classifier"),
    (7, "num_classes 7 does not match the weights' 10-class classifier"),
    ("ten", "num_classes 'ten' is not a number of classes"),
    (10**9, "num_classes 1000000000 is not a number of classes"),
    ([10], "num_classes [10] is not a number of classes"),
], ids=["zero", "seven", "text", "huge", "list"])
def test_a_config_that_does_not_fit_its_weights_is_one_line(tmp_path: Path, capsys, value, said) -> None:
    folder = _folder(tmp_path, value)
    capsys.readouterr()
    assert main(["eval", f"local-dir:{folder}", "--test-subset", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{folder / 'config.json'}: {said}" in err, err


def test_features_are_still_asked_for_with_num_classes_0(tmp_path: Path) -> None:
    folder = _folder(tmp_path, 10)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0)
    assert model.num_classes == 0
