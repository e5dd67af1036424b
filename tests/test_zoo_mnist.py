"""The authors' MNIST-sized models (``main.py --arch mlp simple_v1 simple_v2``, their ``models/simple.py``): layouts
and the MLP's outputs against the authors' own models, the timm interface, fold/ONNX and training on 28x28 images.
Only ``simple_v2_deconv`` is registered with timm (the MLP and the one-conv ``simple_v1_deconv`` have no feature maps
for timm's model contract): the tests build all three with ``ndeconv.zoo.create_model``, timm's keywords.

The fixtures in ``tests/fixtures/reference_extra/`` were written from the authors' code by
``scripts/reference_mnist_models.py`` (its docstring says how): ``reference_mnist_models.json`` (layouts) and the
seeded, trained MLP in both forms with its logits in eval and train mode (float64, tolerance 1e-9 as every parity
test here).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import PROJECT_ROOT
from safetensors.torch import load_file
from torch import nn

import ndeconv.zoo
from ndeconv import ChannelDeconv, FastDeconv
from ndeconv.datasets import FASHION_MNIST_DIR
from ndeconv.layers._conv import Conv2d

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "reference_extra"
REFERENCE = FIXTURES / "reference_mnist_models.json"
# fixture case -> (main.py --arch, deconv form of ours)
CASES = {"mlp/nd": ("mlp", True), "mlp/bn": ("mlp", False), "simple_v1/plain": ("simple_v1", False),
         "simple_v2/bn": ("simple_v2", False)}
LISTED = (ChannelDeconv, nn.Linear, nn.BatchNorm1d, nn.Conv2d, Conv2d, nn.BatchNorm2d)
NAMES = ("mlp_deconv", "simple_v1_deconv", "simple_v2_deconv")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())["models"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", CASES)
def test_layout_matches_the_authors(case: str, reference: dict) -> None:
    """Parameter count, every state_dict key and shape, and the layer types under the same names."""
    arch, deconv = CASES[case]
    model = ndeconv.zoo.create_model(ndeconv.zoo.resolve_model_name(arch), deconv=deconv)
    ref = reference[case]
    assert sum(p.numel() for p in model.parameters()) == ref["params"]
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == ref["state_dict"]
    assert {n: type(m).__name__ for n, m in model.named_modules() if type(m) in LISTED} == ref["modules"]


@pytest.mark.parametrize("form", ["nd", "bn"])
def test_mlp_reproduces_the_authors_logits(form: str) -> None:
    """The authors' seeded MLP after 3 SGD steps, loaded into ours: the same logits in eval (running statistics)
    and in train mode (batch statistics), float64."""
    model = ndeconv.zoo.create_model("mlp_deconv", deconv=form == "nd").double()
    state = load_file(str(FIXTURES / f"mlp_{form}_state_dict.safetensors"))
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    io = load_file(str(FIXTURES / f"mlp_{form}_io.safetensors"))
    with torch.no_grad():
        assert rel_err(model.eval()(io["eval.x"]), io["eval.logits"]) <= 1e-9
        assert rel_err(model.train()(io["train.x"]), io["train.logits"]) <= 1e-9


def test_the_deconvolution_forms_the_authors_cannot_build_put_fastdeconv_where_deconv2d_was() -> None:
    """simple_v1/simple_v2 with deconv=True: their HEAD's DeConv2d is gone, so every conv is a FastDeconv (main.py's
    factory settings), with the BatchNorm form's conv shapes and no norms."""
    for name in ("simple_v1_deconv", "simple_v2_deconv"):
        nd, bn = ndeconv.zoo.create_model(name), ndeconv.zoo.create_model(name, deconv=False)
        convs = [m for m in nd.modules() if isinstance(m, (nn.Conv2d, FastDeconv))]
        assert convs and all(isinstance(m, FastDeconv) for m in convs)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in nd.modules())
        assert [m.weight.shape for m in convs] == [m.weight.shape for m in bn.modules() if isinstance(m, nn.Conv2d)]
        assert all(m.block == min(64, m.in_channels) and m.sampling_stride == 3 and m.eps == 1e-5 for m in convs)


@pytest.mark.parametrize("name", NAMES)
def test_timm_interface(name: str) -> None:
    """Extra models (simple_v2 registered with timm, the two without feature maps with ndeconv only),
    pretrained_cfg for 28x28 gray input and no weights, reset_classifier, the features/head split and the authors'
    names."""
    assert name in ndeconv.zoo.EXTRA_MODELS
    assert (name in timm.list_models("*_deconv")) is (name not in ndeconv.zoo.NDECONV_ONLY_MODELS)
    model = ndeconv.zoo.create_model(name)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == (1, 28, 28) and not cfg.get("hf_hub_id") and not cfg.get("file")
    x = torch.rand(4, 1, 28, 28)
    model.eval()
    out = model(x)
    assert out.shape == (4, 10)
    assert torch.equal(model.forward_head(model.forward_features(x)), out)
    # timm's pre-logits width is head_hidden_size (simple_v1: the 784 pixel values its whole-image conv reads,
    # while num_features is the unpooled map's 1 channel; the others: the same number).
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (4, model.head_hidden_size)
    model.reset_classifier(3)
    assert model(x).shape == (4, 3) and model.num_classes == 3
    assert ndeconv.zoo.create_model(name, num_classes=5, in_chans=3)(torch.rand(2, 3, 28, 28)).shape == (2, 5)


@pytest.mark.parametrize("name", NAMES)
def test_torch_hub_load_local(name: str) -> None:
    model = torch.hub.load(str(PROJECT_ROOT), name, source="local", deconv=False, num_classes=3)
    assert model.pretrained_cfg["architecture"] == name and model.num_classes == 3
    assert model.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 3)


def test_simple_v2_features_only() -> None:
    model = ndeconv.zoo.create_model("simple_v2_deconv", deconv=False, features_only=True, out_indices=(0, 10))
    maps = model(torch.rand(2, 1, 28, 28))
    assert [tuple(m.shape) for m in maps] == [(2, 4, 26, 26), (2, 44, 6, 6)]


@pytest.mark.parametrize("typed, name", [("mlp", "mlp_deconv"), ("simple_v1", "simple_v1_deconv"),
                                         ("simple_v2", "simple_v2_deconv")])
def test_the_authors_names_resolve(typed: str, name: str) -> None:
    assert ndeconv.zoo.REFERENCE_ARCHS[typed] == name
    assert ndeconv.zoo.resolve_model_name(typed) == name


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("deconv", [True, "stem"])
def test_fold_gives_the_same_eval_function_and_reloads_folded(name: str, deconv: bool | str) -> None:
    """After some training steps (running statistics away from their start), the folded model computes the same
    eval outputs and its state_dict loads into ``folded=True`` strictly."""
    from ndeconv.convert import fold

    torch.manual_seed(0)
    model = ndeconv.zoo.create_model(name, deconv=deconv).double()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 1, 28, 28, dtype=torch.float64))
    model.eval()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)
        folded = fold(model, fuse_batchnorm=False).eval()
        assert rel_err(folded(x), ref) <= 1e-9
    assert not any(isinstance(m, (FastDeconv, ChannelDeconv)) for m in folded.modules())
    plain = ndeconv.zoo.create_model(name, deconv=deconv, folded=True).double()
    plain.load_state_dict(folded.state_dict(), strict=True)


@pytest.mark.parametrize("name", NAMES)
def test_exports_verified_onnx(name: str, tmp_path) -> None:
    """Folded and exported with a dynamic batch, checked with onnxruntime against the model (batches 1 and 5)."""
    from ndeconv.convert import export_onnx, verify_onnx_for_model

    torch.manual_seed(0)
    model = ndeconv.zoo.create_model(name)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(16, 1, 28, 28))
    result = export_onnx(model.eval(), tmp_path / "model.onnx")
    verification = verify_onnx_for_model(result, batches=(1, 5))
    assert verification.max_rel <= 1e-4


def test_ndeconv_export_by_the_authors_name(tmp_path, capsys: pytest.CaptureFixture) -> None:
    from ndeconv.cli import main

    assert main(["export", "mlp", "--random-init", "-o", str(tmp_path / "mlp.onnx")]) == 0
    assert (tmp_path / "mlp.onnx").is_file()


@pytest.mark.parametrize("form", ["nd", "bn"])
def test_a_main_py_mlp_checkpoint_converts_to_the_authors_logits(form: str, tmp_path) -> None:
    """``ndeconv convert-reference`` on main.py's checkpoint of the authors' MLP (``--arch mlp``; no conv to read
    the form and input size from: they come from its Linear layers), then loaded like any converted file."""
    from ndeconv.cli import main
    from ndeconv.loading import load_model

    state = {k: v.float() for k, v in load_file(str(FIXTURES / f"mlp_{form}_state_dict.safetensors")).items()}
    ckpt = tmp_path / "ckpt.t7"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3, "arch": "mlp",
                "best_acc": 12.5}, ckpt)  # what main.py's net_util saves, under DataParallel
    out = tmp_path / "converted" / "model.safetensors"
    assert main(["convert-reference", str(ckpt), "-o", str(out)]) == 0
    config = json.loads((out.parent / "config.json").read_text())
    assert config["architecture"] == "mlp_deconv" and config["model_args"]["deconv"] is (form == "nd")
    model = load_model(str(out)).model.double().eval()
    io = load_file(str(FIXTURES / f"mlp_{form}_io.safetensors"))
    with torch.no_grad():
        assert rel_err(model(io["eval.x"]), io["eval.logits"]) <= 1e-9


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh installs it)")
def test_a_model_timm_does_not_know_trains_and_its_run_loads(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """``mlp_deconv`` is not a timm model (no feature maps), yet everything of ndeconv's takes it: ``ndeconv train
    --arch mlp_deconv``, its run directory (``load_model``, ``ndeconv eval``, ``fold``), and the run as ``local-dir:``
    through ``ndeconv.zoo.create_model`` (timm itself refuses it with its unknown-model error)."""
    from ndeconv.cli import main
    from ndeconv.convert import load_folded
    from ndeconv.loading import load_model

    run = tmp_path / "run"
    assert main(["train", "--arch", "mlp_deconv", "--train-subset", "128", "--test-subset", "32", "--epochs", "1",
                 "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "mlp_deconv"
    loaded = load_model(str(run))
    assert type(loaded.model).__name__ == "MLP" and loaded.kind == "run"
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        expected = loaded.model(x)
    capsys.readouterr()
    assert main(["eval", str(run), "--test-subset", "16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["count"] == 16

    with pytest.raises(RuntimeError, match=r"Unknown model \(mlp_deconv\)"):
        timm.create_model(f"local-dir:{run}", pretrained=True)
    local = ndeconv.zoo.create_model(f"local-dir:{run}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(local(x), expected)

    folded = tmp_path / "folded.safetensors"
    assert main(["fold", str(run), "-o", str(folded)]) == 0
    with torch.no_grad():
        assert rel_err(load_folded(folded)(x), expected) <= 1e-5


def test_ndeconv_list_says_which_are_not_timm_models(capsys: pytest.CaptureFixture) -> None:
    from ndeconv.cli import main

    assert main(["list", "--json", "--group", "extra", "*_deconv"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {n for n, r in rows.items() if not r["timm"]} == {"mlp_deconv", "simple_v1_deconv"}
    assert main(["list", "--group", "extra", "simple*"]) == 0
    out = capsys.readouterr().out
    assert "simple_v1_deconv*" in out and "simple_v2_deconv*" not in out and "* not a timm model" in out
