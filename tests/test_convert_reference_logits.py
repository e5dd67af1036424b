"""Checkpoints of the authors' ``main_imagenet.py`` and ``Segmentation/train.py``, converted by
``ndeconv convert-reference``, reproduce the authors' own models' outputs (float64, relative error <= 1e-9), in
eval mode (running statistics) and in train mode (batch statistics).

``tests/fixtures/reference_extra/reference_logits.*`` holds those outputs, written by
``scripts/reference_logits.py`` from the authors' code with ``reference_weights.py``'s seeded state; the tests
here make the same state under the authors' keys (their layouts: ``reference_imagenet_models.json``,
``reference_segmentation_models.json``), save it as each script saves checkpoints, convert, and compare.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROJECT_ROOT
from reference_weights import sampled_indices, seeded_input, seeded_state_dict
from safetensors.torch import load_file

from ndeconv.convert.reference import convert_reference_checkpoint

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "reference_extra"
CASES = json.loads((FIXTURES / "reference_logits.json").read_text())["cases"]
# The heavier conversions (ResNet-50 and DenseNet-121 backbones in float64) run in the full suite only.
QUICK = {"resnet18d/nd", "resnet18d/bn"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / "reference_logits.safetensors"))


def _layout(case: str) -> dict[str, list[int]]:
    arch = case.split("/")[0]
    name = "reference_segmentation_models.json" if arch.startswith(("fcn", "deeplab")) else \
        "reference_imagenet_models.json"
    return json.loads((FIXTURES / name).read_text())["models"][case]["state_dict"]


def _checkpoint(case: str, tmp_path) -> tuple[object, str | None]:
    """The case's seeded state saved as the authors' script saves it; and the --arch to pass, if any."""
    arch, form = case.split("/")
    state = seeded_state_dict(_layout(case))
    path = tmp_path / "checkpoint.pth.tar"
    if arch.startswith(("fcn", "deeplab")):
        # Segmentation/train.py: {'model', 'optimizer', 'epoch'}, no arch (the command names it).
        torch.save({"model": state, "optimizer": {}, "epoch": 1}, path)
        return path, arch if form.startswith("nd") else arch.removesuffix("d")
    # main_imagenet.py under DataParallel: module. keys; the baseline named by torchvision's name.
    torch.save({"epoch": 1, "arch": arch if form == "nd" else arch.removesuffix("d"),
                "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_acc1": 0.0, "optimizer": {}}, path)
    return path, None


@pytest.mark.parametrize("case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_converted_checkpoint_gives_the_authors_outputs(case: str, tmp_path, expected: dict) -> None:
    path, arch = _checkpoint(case, tmp_path)
    model = convert_reference_checkpoint(path, arch=arch).model.double()
    shapes = CASES[case]
    with torch.no_grad():
        for mode in ("eval", "train"):
            model.train(mode == "train")
            for module in model.modules():  # as the fixture was made: the heads' dropout off (its masks follow
                if isinstance(module, torch.nn.Dropout):  # memory order, and the authors' strides differ)
                    module.eval()
            out = model(seeded_input(f"{case}/{mode}", shapes[f"{mode}_input"]))
            outputs = out if isinstance(out, dict) else {"logits": out}
            keys = sorted(k.split(".", 1)[1] for k in expected if k.startswith(f"{case}/{mode}."))
            assert sorted(outputs) == keys
            for name, value in outputs.items():
                key = f"{case}/{mode}.{name}"
                got = value if name == "logits" else value.reshape(-1)[sampled_indices(key, value.numel())]
                ref = expected[key]
                assert got.shape == ref.shape
                assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-9, key
