"""``ndeconv fold`` and ``ndeconv export``: outputs, overwrite refusal, and one-line errors with exit statuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_fold import correlated_batch, trained

from ndeconv.cli import main
from ndeconv.convert import load_folded, output_difference, read_folded_config
from ndeconv.io import save_safetensors_atomic


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A trained-statistics PNASNet-A state_dict (1 channel, 5 classes), as `ndeconv train` writes one."""
    model = trained("pnasnet_a_deconv", in_chans=1, num_classes=5)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_safetensors_atomic({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    return path, model


def test_fold_checkpoint_then_export_folded(tmp_path, capsys, checkpoint) -> None:
    path, model = checkpoint
    out = tmp_path / "folded.safetensors"
    code, stdout, stderr = run(capsys, "fold", "--checkpoint", str(path), "--arch", "pnasnet_a", "-o", str(out))
    assert code == 0, stderr
    assert "FastDeconv -> Conv2d" in stdout and stderr == ""  # trained, eval: nothing to warn about
    assert [p.name for p in tmp_path.iterdir()] == ["folded.safetensors"]  # the one file: its config inside
    config = read_folded_config(out)
    assert config["format"] == "ndeconv-folded" and config["in_chans"] == 1 and config["num_classes"] == 5
    x = correlated_batch(2, 1)
    with torch.no_grad():
        assert output_difference(model(x), load_folded(out)(x))[1] <= 1e-5

    onnx_path = tmp_path / "m.onnx"
    code, stdout, stderr = run(capsys, "export", "--checkpoint", str(out), "-o", str(onnx_path))
    assert code == 0, stderr
    assert "onnx.checker (full): ok" in stdout and "batch 1:" in stdout and "batch 7:" in stdout
    assert onnx_path.is_file() and "verified" in stdout


def test_export_static_batch_no_verify(tmp_path, capsys, checkpoint) -> None:
    path, _ = checkpoint
    out = tmp_path / "s.onnx"
    code, stdout, _ = run(capsys, "export", "--checkpoint", str(path), "--arch", "pnasnet_a_deconv", "-o", str(out),
                          "--static-batch", "2", "--no-verify", "--opset", "18")
    assert code == 0 and "static batch 2" in stdout and "verified" not in stdout and out.is_file()


def test_fold_fuses_batchnorm_unless_asked_to_keep_it(tmp_path, capsys) -> None:
    """The command fuses BatchNorms as it always has (the library's fold asks for it explicitly); with
    --keep-batchnorm the file is timm.create_model(name, **model_args) with a strict state_dict, nothing else."""
    import timm
    from safetensors.torch import load_file

    model = trained("pnasnet_a_deconv", deconv=False, in_chans=1, num_classes=5)
    path = tmp_path / "bn.safetensors"
    save_safetensors_atomic(model.state_dict(), path)
    x = correlated_batch(2, 1)
    for flags, fused in (((), True), (("--keep-batchnorm",), False)):
        out = tmp_path / ("fused" if fused else "kept") / "folded.safetensors"
        code, stdout, stderr = run(capsys, "fold", "--checkpoint", str(path), "--arch", "pnasnet_a", "-o", str(out),
                                   *flags)
        assert code == 0, stderr
        config = read_folded_config(out)
        assert bool(config["fused_batchnorms"]) is fused
        assert ("23 BatchNorm fused into convs" in stdout) is fused
        with torch.no_grad():
            assert output_difference(model(x), load_folded(out)(x))[1] <= 1e-5
    built = timm.create_model(config["architecture"], **config["model_args"])
    built.load_state_dict(load_file(str(out)), strict=True)
    with torch.no_grad():
        assert output_difference(model(x), built.eval()(x))[1] <= 1e-5


def test_version_1_folded_file_still_exports(tmp_path, capsys) -> None:
    """A file folded by an older ndeconv (tests/fixtures/folded_v1) is a --checkpoint like any other."""
    old = Path(__file__).resolve().parent / "fixtures" / "folded_v1" / "pnasnet_a_nd" / "model.safetensors"
    code, stdout, stderr = run(capsys, "export", "--checkpoint", str(old), "-o", str(tmp_path / "m.onnx"),
                               "--no-verify")
    assert code == 0, stderr
    assert (tmp_path / "m.onnx").is_file() and "input 1x32x32" in stdout


def test_version_1_file_that_does_not_rebuild_is_one_line(tmp_path, capsys) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ndeconv.convert.folded_io import METADATA_KEY

    old = Path(__file__).resolve().parent / "fixtures" / "folded_v1" / "pnasnet_a_nd" / "model.safetensors"
    with safe_open(str(old), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
    config["layers"]["linear"]["out_features"] = 7  # not the architecture the file names
    bad = tmp_path / "old.safetensors"
    save_safetensors_atomic(load_file(str(old)), bad, metadata={METADATA_KEY: json.dumps(config), "format": "pt"})
    code, _, stderr = run(capsys, "export", "--checkpoint", str(bad), "-o", str(tmp_path / "m.onnx"))
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "layer linear differs" in stderr and f"ndeconv fold pnasnet_a_deconv -o {bad} --force" in stderr
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_overwrite_without_force(tmp_path, capsys) -> None:
    out = tmp_path / "f.safetensors"
    assert run(capsys, "fold", "pnasnet_a_deconv", "--random-init", "-o", str(out))[0] == 0
    before = out.read_bytes()
    code, _, stderr = run(capsys, "fold", "pnasnet_a_deconv", "--random-init", "-o", str(out))
    assert code == 2 and "already exists" in stderr and "--force" in stderr and len(stderr.splitlines()) == 1
    assert out.read_bytes() == before
    code, _, stderr = run(capsys, "fold", "pnasnet_a_deconv", "--random-init", "-o", str(out), "--force")
    assert code == 0 and "identity whitening" in stderr  # untrained: said so
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_fold_writes_only_the_file_it_is_pointed_at_and_prints_it(tmp_path, capsys) -> None:
    """``-o FILE`` is everything `ndeconv fold` writes (the folded config is in the file's safetensors metadata),
    and the command prints every path it wrote; what else is in the folder (another model's config.json, a run
    directory's) is none of its business, with or without --force."""
    beside = tmp_path / "config.json"
    beside.write_text('{"architecture": "resnet18_deconv", "train": {"epochs": 1}}')
    out = tmp_path / "folded.safetensors"
    for flags in ((), ("--force",)):
        code, stdout, stderr = run(capsys, "fold", "pnasnet_a_deconv", "--random-init", "--no-check", "-o", str(out),
                                   *flags)
        assert code == 0, stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "folded.safetensors"]
        assert beside.read_text() == '{"architecture": "resnet18_deconv", "train": {"epochs": 1}}'
        printed = [word for line in stdout.splitlines() if line.startswith("wrote ") for word in line.split()]
        assert str(out) in printed and str(beside) not in stdout  # the file written, and nothing it did not write
    assert type(load_folded(out)).__name__ == "PNASNet"


def test_folded_file_is_read_by_its_own_metadata(tmp_path, capsys) -> None:
    # Two folds into one folder: each file is all there is of it, and loads as itself.
    first, second = tmp_path / "pnasnet.safetensors", tmp_path / "resnet.safetensors"
    assert run(capsys, "fold", "pnasnet_a_deconv", "--random-init", "--no-check", "-o", str(first))[0] == 0
    assert run(capsys, "fold", "resnet18_deconv", "--random-init", "--no-check", "-o", str(second), "--force")[0] == 0
    assert type(load_folded(first)).__name__ == "PNASNet" and type(load_folded(second)).__name__ == "ResNet"


@pytest.mark.parametrize("argv,code,message", [
    (["fold", "nosuchnet", "-o", "{tmp}/a.safetensors"], 2, "unknown model 'nosuchnet'"),
    (["export", "resnet18_deconv.nosuchtag", "-o", "{tmp}/a.onnx"], 2, "no pretrained tag 'nosuchtag'"),
    (["export", "--checkpoint", "{tmp}/missing.safetensors", "--arch", "resnet18", "-o", "{tmp}/a.onnx"], 2,
     "no such file"),
    (["export", "--checkpoint", "{tmp}/garbage.safetensors", "--arch", "resnet18", "-o", "{tmp}/a.onnx"], 1,
     "not a readable safetensors file"),
    (["export", "--checkpoint", "{tmp}/garbage.safetensors", "-o", "{tmp}/a.onnx"], 1,
     "not a readable safetensors file"),
    (["fold", "pnasnet_a_deconv", "--random-init", "-o", "{tmp}/file.txt/a.safetensors"], 2,
     "cannot create the output folder"),
    (["export", "pnasnet_a_deconv", "--random-init", "-o", "{tmp}/a.txt"], 2, "*.onnx"),
    (["export", "pnasnet_a_deconv", "--random-init", "-o", "{tmp}/folder.onnx", "--force"], 2, "is a folder"),
    (["export", "-o", "{tmp}/a.onnx"], 2, "give either MODEL"),
    (["export", "pnasnet_a_deconv", "--arch", "resnet18", "-o", "{tmp}/a.onnx"], 2, "--arch describes"),
    (["fold", "pnasnet_a_deconv", "--random-init", "-o", "{tmp}/a.safetensors", "--no-check", "--arch", "x"], 2,
     "--arch describes"),
])
def test_clear_one_line_errors(tmp_path, capsys, argv, code, message) -> None:
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a safetensors file")
    (tmp_path / "file.txt").write_text("a file, not a folder")
    (tmp_path / "folder.onnx").mkdir()
    got, stdout, stderr = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert got == code, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "a.safetensors").exists()


def test_checkpoint_of_wrong_architecture(tmp_path, capsys, checkpoint) -> None:
    path, _ = checkpoint
    code, _, stderr = run(capsys, "export", "--checkpoint", str(path), "--arch", "resnet18", "-o",
                          str(tmp_path / "a.onnx"))
    assert code == 2 and "does not fit resnet18_deconv" in stderr and len(stderr.strip().splitlines()) == 1


def test_convert_bn_of_a_deconvolution_network_says_so_in_one_line(tmp_path, capsys) -> None:
    capsys.readouterr()
    out = tmp_path / "converted.safetensors"
    assert main(["convert-bn", "resnet18_deconv.fashion_mnist", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is already a deconvolution network" in err and "--deconv false" in err
    assert list(tmp_path.iterdir()) == []
