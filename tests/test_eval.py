"""``ndeconv eval``: top-1/top-5/loss of a weights file, an authors'-style checkpoint or a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import default_tag
from safetensors.torch import save_file
from test_data import write_cifar10, write_imagefolder  # tests/ is on sys.path (pytest rootdir, no package)

from ndeconv.cli import main
from ndeconv.datasets import FASHION_MNIST_DIR, load_split

needs_fashion = pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(),
                                   reason="Debian's dataset-fashion-mnist is not installed (scripts/test.sh)")


def _model(in_chans: int = 1, deconv: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("pnasnet_a_deconv", deconv=deconv, in_chans=in_chans, num_classes=10).eval()


def _expected(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = model(images)
    top5 = logits.topk(5, dim=1).indices
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "top1": 100.0 * float((top5[:, 0] == labels).float().mean()),
        "top5": 100.0 * float((top5 == labels[:, None]).any(1).float().mean()),
    }


def _eval_json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@needs_fashion
def test_eval_weights_file_matches_direct_computation(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _model()
    path = tmp_path / "w.safetensors"
    save_file(model.state_dict(), str(path))
    got = _eval_json(capsys, ["--checkpoint", str(path), "--arch", "pnasnet_a", "--deconv", "false",
                              "--dataset", "fashion_mnist", "--test-subset", "16", "--batch-size", "8"])
    test = load_split("fashion_mnist", "test")
    idx = torch.arange(16)
    want = _expected(model, test.batch(idx).float() / 255, test.labels[idx])  # the reference's ToTensor()
    assert got["count"] == 16 and got["dataset"] == "fashion_mnist"
    assert got["top1"] == pytest.approx(want["top1"]) and got["top5"] == pytest.approx(want["top5"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_eval_authors_checkpoint_on_cifar(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The authors' main.py saves ``{'state_dict': DataParallel keys, 'epoch', ...}``: read weights-only."""
    data = write_cifar10(tmp_path / "cifar")
    model = _model(in_chans=3, deconv=True)
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3,
                "arch": "pnasnetA", "best_acc": 10.0}, ckpt)
    got = _eval_json(capsys, ["--checkpoint", str(ckpt), "--arch", "pnasnet_a_deconv", "--dataset", "cifar10",
                              "--data-dir", str(tmp_path / "cifar")])
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    images = (torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255 - mean) / std
    want = _expected(model, images, torch.arange(6))
    assert got["count"] == 6 and got["top1"] == pytest.approx(want["top1"])
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@needs_fashion
def test_eval_run_directory_reproduces_its_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert main(["train", "--arch", "pnasnet_a", "--deconv", "false", "--train-subset", "8", "--test-subset", "12",
                 "--batch-size", "4", "--max-steps", "1", "--out", str(run)]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    for argv in ([str(run)], ["--checkpoint", str(run / "model.safetensors")]):
        got = _eval_json(capsys, [*argv, "--test-subset", "12"])  # dataset and model read from config.json
        assert got["dataset"] == "fashion_mnist"
        assert (got["top1"], got["top5"]) == (last["test_top1"], last["test_top5"])
        assert got["loss"] == pytest.approx(last["test_loss"], rel=1e-6)
    capsys.readouterr()
    assert main(["eval", str(run), "--test-subset", "12"]) == 0
    assert "top-1" in capsys.readouterr().out


@pytest.mark.parametrize("form", [
    dict(deconv=False, delinear=False, block_fc=16),  # the authors' --deconv False --block-fc N: BN + ChannelDeconv
    dict(bias=False),
    dict(block=32),
], ids=["bn-channel-deconv", "nd-nobias", "nd-block32"])
def test_eval_infers_every_form_from_the_weights(tmp_path: Path, capsys: pytest.CaptureFixture, form: dict) -> None:
    """Only --arch given: the form, bias, block and head come from the tensors, as convert-reference infers them."""
    data = write_cifar10(tmp_path / "cifar")
    torch.manual_seed(0)
    model = timm.create_model("pnasnet_a_deconv", in_chans=3, **form).eval()
    ckpt = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    got = _eval_json(capsys, ["--checkpoint", str(ckpt), "--arch", "pnasnetA", "--dataset", "cifar10",
                              "--data-dir", str(tmp_path / "cifar")])
    mean = torch.tensor((0.4914, 0.4822, 0.4465)).view(1, 3, 1, 1)
    std = torch.tensor((0.2023, 0.1994, 0.2010)).view(1, 3, 1, 1)
    images = (torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255 - mean) / std
    assert got["loss"] == pytest.approx(_expected(model, images, torch.arange(6))["loss"], rel=1e-5)


def test_eval_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def fails(argv: list[str], text: str, status: int = 2) -> None:
        capsys.readouterr()
        assert main(["eval", *argv]) == status
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, err

    fails([], "give either MODEL")
    fails(["--checkpoint", str(tmp_path / "none.safetensors"), "--arch", "pnasnet_a", "--dataset", "mnist"],
          "no such file")
    weights = tmp_path / "w.safetensors"
    save_file(_model(in_chans=3).state_dict(), str(weights))
    fails(["--checkpoint", str(weights), "--dataset", "cifar10"], "no config.json beside it")
    fails(["--checkpoint", str(weights), "--arch", "resnet18", "--deconv", "false", "--dataset", "cifar10"],
          "does not fit resnet18_deconv")
    fails(["no_such_model_deconv", "--dataset", "cifar10"], "unknown model 'no_such_model_deconv'")
    fails(["resnet18_deconv.no_such_tag"], "resnet18_deconv has no pretrained tag 'no_such_tag'")
    fails(["pnasnet_a_deconv", "--dataset", "svhn"], "unknown dataset 'svhn'")
    fails(["pnasnet_a_deconv", "--dataset", "fashion_mnist", "--batch-size", "0"], "batch size must be >= 1")
    for count in ("0", "-1"):  # -1 used to drop the last image silently, 0 to print nan%
        fails(["pnasnet_a_deconv", "--dataset", "fashion_mnist", "--test-subset", count], "test subset must be >= 1")


def test_eval_infers_the_form_and_takes_folded_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """With only --arch, the weights say the rest (deconvolution buffers, classes, channels); a file written by
    ``ndeconv fold`` evaluates as the plain network it is, to the same numbers."""
    write_cifar10(tmp_path / "cifar")
    model = _model(in_chans=3, deconv=True)
    weights, folded = tmp_path / "w.safetensors", tmp_path / "folded.safetensors"
    save_file(model.state_dict(), str(weights))
    data = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")]
    unfolded = _eval_json(capsys, ["--checkpoint", str(weights), "--arch", "pnasnet_a", *data])
    assert main(["fold", "--checkpoint", str(weights), "--arch", "pnasnet_a", "-o", str(folded)]) == 0
    plain = _eval_json(capsys, ["--checkpoint", str(folded), *data])
    assert plain["count"] == unfolded["count"] == 6
    assert plain["top1"] == unfolded["top1"] and plain["loss"] == pytest.approx(unfolded["loss"], rel=1e-5)


@needs_fashion
def test_eval_takes_every_spelling_of_a_zoo_name(capsys: pytest.CaptureFixture) -> None:
    # As the other commands: the zoo name, the name without _deconv, the authors' --arch; the tag may be left
    # to its default, whose data is then the dataset (never timm's own ImageNet resnet18).
    tagged = _eval_json(capsys, ["resnet18_deconv.fashion_mnist", "--test-subset", "8"])
    default = _eval_json(capsys, [f"resnet18_deconv.{default_tag('resnet18_deconv')}", "--test-subset", "8"])
    spellings = {"resnet18.fashion_mnist": tagged, "resnet.fashion_mnist": tagged, "resnet18_deconv": default,
                 "resnet18": default}
    for spelling, want in spellings.items():
        got = _eval_json(capsys, [spelling, "--test-subset", "8"])
        assert got["dataset"] == "fashion_mnist" and got["loss"] == want["loss"], spelling


def test_eval_run_directory_uses_its_image_size(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_imagefolder(tmp_path / "data", {"cat": 2, "dog": 2}, size=20)
    run = tmp_path / "run"
    assert main(["train", "--arch", "pnasnet_a", "--deconv", "false", "--dataset", "imagefolder", "--data-dir",
                 str(tmp_path / "data"), "--img-size", "16", "--batch-size", "2", "--max-steps", "1",
                 "--out", str(run)]) == 0
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    got = _eval_json(capsys, [str(run), "--data-dir", str(tmp_path / "data")])
    assert got["loss"] == pytest.approx(last["test_loss"], rel=1e-6)  # at the run's 16x16, not the default 32
    other = _eval_json(capsys, [str(run), "--data-dir", str(tmp_path / "data"), "--img-size", "32"])
    assert other["loss"] != pytest.approx(last["test_loss"], rel=1e-6)
