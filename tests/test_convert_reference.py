"""``ndeconv convert-reference`` and ``ndeconv.convert.reference``: the authors' checkpoints become zoo weights.

The oracle: ``{pnasnet_a,mobilenetv2}_nd_state_dict.safetensors`` are real state_dicts of the authors' models
(trained 3 steps, stored as float16) and ``*_nd_io.safetensors`` the logits the authors' code gives for them,
in eval mode and in train mode (batch statistics). Saved in the form ``main.py`` writes, converted and loaded
into our zoo models, they must give the same logits: relative error <= 1e-9 in float64, <= 2e-4 in float32.
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import ndeconv  # noqa: F401  (registers the zoo)
from ndeconv.cli import main
from ndeconv.convert.reference import convert_reference, convert_reference_checkpoint, infer_model_args
from ndeconv.errors import NdeconvError, UsageError

# Two cores shared by several jobs: torch on one thread is the fast setting (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref).abs().max() / ref.abs().max()).item()


def save_reference_checkpoint(path, state_dict, arch, prefix=""):
    """What the authors' net_util.eval_net saves (a DataParallel model's keys carry ``module.``)."""
    torch.save({
        "state_dict": {prefix + k: v for k, v in state_dict.items()},
        "epoch": 3, "arch": arch, "best_acc": 12.5, "train_losses": [2.31, 2.29, 2.27], "acc": (12.5,),
        "optimizer": {"state": {0: {"momentum_buffer": torch.zeros(3)}},
                      "param_groups": [{"lr": 0.1, "momentum": 0.9, "params": [0]}]},
    }, path)
    return path


def reference_state_dict(reference_dir, name):
    # float16 on disk; the authors' logits were computed from exactly these values.
    return {k: v.float() for k, v in load_file(str(reference_dir / f"{name}_nd_state_dict.safetensors")).items()}


def check_logits(converted, io):
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        model = copy.deepcopy(converted).to(dtype).eval()  # a train-mode forward updates the running buffers
        with torch.no_grad():
            assert rel_err(model(io["eval.x"].to(dtype)), io["eval.logits"]) <= tol
            # train mode: batch statistics (the frozen stem is still within its first freeze_iter steps)
            assert rel_err(model.train()(io["train.x"].to(dtype)), io["train.logits"]) <= tol


def test_pnasnet_checkpoint_reproduces_reference_logits(reference_dir, tmp_path):
    """module.-prefixed checkpoint, arch from its own field, loaded back through timm's local-dir: path."""
    ckpt = save_reference_checkpoint(tmp_path / "checkpoint.pth.tar", reference_state_dict(reference_dir, "pnasnet_a"),
                                     "pnasnetA", prefix="module.")
    out = tmp_path / "converted" / "model.safetensors"
    assert main(["convert-reference", str(ckpt), "-o", str(out)]) == 0

    config = json.loads((out.parent / "config.json").read_text())
    assert config["architecture"] == "pnasnet_a_deconv"
    expected = dict(deconv=True, block=64, block_fc=512, delinear=True, in_chans=3, num_classes=10)
    assert {k: config["model_args"][k] for k in expected} == expected
    assert config["converted_from"] == dict(file="checkpoint.pth.tar", arch="pnasnetA", epoch=3, best_acc=12.5)
    assert all(not k.startswith("module.") for k in load_file(str(out)))

    model = timm.create_model(f"local-dir:{out.parent}", pretrained=True)
    assert type(model).__name__ == "PNASNet"
    check_logits(model, load_file(str(reference_dir / "pnasnet_a_nd_io.safetensors")))


def test_mobilenetv2_checkpoint_reproduces_reference_logits(reference_dir, tmp_path):
    """Unprefixed checkpoint, arch named on the command line by its zoo name, weights loaded by hand."""
    ckpt = save_reference_checkpoint(tmp_path / "ckpt.pth", reference_state_dict(reference_dir, "mobilenetv2"),
                                     "mobilev2")
    out = tmp_path / "mbv2.safetensors"
    assert main(["convert-reference", str(ckpt), "--arch", "mobilenetv2_deconv", "-o", str(out)]) == 0
    config = json.loads((tmp_path / "config.json").read_text())
    model = timm.create_model(config["architecture"], **config["model_args"])
    model.load_state_dict(load_file(str(out)))
    check_logits(model, load_file(str(reference_dir / "mobilenetv2_nd_io.safetensors")))


def test_prefix_and_arch_spelling_do_not_matter(reference_dir, tmp_path):
    sd = reference_state_dict(reference_dir, "pnasnet_a")
    plain = save_reference_checkpoint(tmp_path / "a.pth", sd, "pnasnetA")
    prefixed = save_reference_checkpoint(tmp_path / "b.pth", sd, "something-else", prefix="module.")
    a = convert_reference_checkpoint(plain).model.state_dict()
    b = convert_reference_checkpoint(prefixed, arch="pnasnet_a_deconv").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], v) for k, v in sd.items())


@pytest.mark.parametrize("model_args", [
    dict(deconv=False),
    dict(deconv=False, block_fc=64),
    dict(block=32, block_fc=128, in_chans=1, num_classes=7),
    dict(block=16, delinear=False, block_fc=512),
    dict(bias=False),
], ids=["bn", "bn-delinear", "nd-block32", "nd-channel-deconv", "nd-nobias"])
def test_settings_are_inferred_from_the_tensors(tmp_path, model_args):
    source = timm.create_model("pnasnet_a_deconv", **model_args)
    ckpt = save_reference_checkpoint(tmp_path / "c.pth", source.state_dict(), "pnasnetA")
    inferred = infer_model_args("pnasnet_a_deconv", torch.load(ckpt, weights_only=True)["state_dict"])
    converted = convert_reference_checkpoint(ckpt)
    for model in (timm.create_model("pnasnet_a_deconv", **inferred), converted.model):
        # Same form and flags; block sizes may be spelled differently (64 and 16 both whiten 176 channels in
        # blocks of 16) but every layer whitens in the same blocks, so the models compute the same thing.
        for flag in ("deconv", "delinear", "bias"):
            assert getattr(model.deconv_settings, flag) == getattr(source.deconv_settings, flag)
        assert layout(model) == layout(source)
    assert (inferred["in_chans"], inferred["num_classes"]) == (source.conv1.in_channels, source.num_classes)


def test_cifar100_checkpoint_records_cifar100_normalisation(tmp_path):
    """A 100-class RGB checkpoint of the authors' main.py was trained on CIFAR-100, not CIFAR-10."""
    ckpt = save_reference_checkpoint(tmp_path / "c.pth", timm.create_model("pnasnet_a_deconv", num_classes=100)
                                     .state_dict(), "pnasnetA")
    cfg = convert_reference_checkpoint(ckpt).config["pretrained_cfg"]
    assert cfg["mean"] == [0.5071, 0.4865, 0.4409] and cfg["std"] == [0.2009, 0.1984, 0.2023]
    ckpt = save_reference_checkpoint(tmp_path / "c.pth", timm.create_model("pnasnet_a_deconv").state_dict(), "pnasnetA")
    assert convert_reference_checkpoint(ckpt).config["pretrained_cfg"]["mean"] == [0.4914, 0.4822, 0.4465]


def layout(model):
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    blocks = {n: (type(m).__name__, m.block) for n, m in model.named_modules() if hasattr(m, "block")}
    return shapes, blocks


class _RunsCode:
    """A pickled object whose unpickling would run code (creates a marker file); it must never run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class TrainingArgs:
    """A custom class in a checkpoint (as a script's own args object would be)."""


def test_code_carrying_checkpoint_is_refused(reference_dir, tmp_path):
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "evil.pth"
    torch.save({"state_dict": reference_state_dict(reference_dir, "pnasnet_a"), "arch": "pnasnetA",
                "args": _RunsCode(marker)}, ckpt)
    with pytest.raises(NdeconvError, match=r"refusing to unpickle.*needs (io|builtins)\.open"):
        convert_reference(ckpt, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()

    torch.save({"state_dict": {}, "arch": "pnasnetA", "args": TrainingArgs()}, ckpt)
    with pytest.raises(NdeconvError, match=r"refusing to unpickle.*TrainingArgs"):
        convert_reference_checkpoint(ckpt)
    # The command line: one line, exit status 1.
    assert main(["convert-reference", str(ckpt), "-o", str(tmp_path / "o.safetensors")]) == 1


def test_unreadable_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(NdeconvError, match="not a readable PyTorch checkpoint"):
        convert_reference_checkpoint(junk)
    # other garbage makes the unpickler raise KeyError / IndexError: the same one-line error, not a traceback
    for data, name in ((b"hi\n", "KeyError"), (b"abc", "IndexError")):
        junk.write_bytes(data)
        with pytest.raises(NdeconvError, match=f"not a readable PyTorch checkpoint \\({name}: "):
            convert_reference_checkpoint(junk)
    with pytest.raises(UsageError, match="no such file"):
        convert_reference_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2, 3], junk)
    with pytest.raises(NdeconvError, match="expected a dict with a 'state_dict'"):
        convert_reference_checkpoint(junk)


def test_unknown_arch_is_named(reference_dir, tmp_path):
    sd = reference_state_dict(reference_dir, "pnasnet_a")
    ckpt = save_reference_checkpoint(tmp_path / "c.pth", sd, "vgg23")
    with pytest.raises(UsageError, match=r"unknown architecture 'vgg23'; did you mean vgg13"):
        convert_reference_checkpoint(ckpt)
    with pytest.raises(UsageError, match="unknown architecture 'resnet152'"):
        convert_reference(ckpt, tmp_path / "o.safetensors", arch="resnet152")
    assert main(["convert-reference", str(ckpt), "--arch", "nope", "-o", str(tmp_path / "o.safetensors")]) == 2
    torch.save(sd, tmp_path / "bare.pth")  # a bare state_dict carries no arch
    with pytest.raises(UsageError, match="names no 'arch'; pass --arch"):
        convert_reference_checkpoint(tmp_path / "bare.pth")
    assert convert_reference_checkpoint(tmp_path / "bare.pth", arch="pnasnetA").model_name == "pnasnet_a_deconv"


def test_layout_problems_are_named(reference_dir, tmp_path):
    sd = reference_state_dict(reference_dir, "pnasnet_a")
    broken = dict(sd)
    del broken["layer3.2.sep_conv1.conv1.weight"]
    broken["layer9.extra"] = torch.zeros(3)
    broken["layer5.1.sep_conv1.conv1.bias"] = torch.zeros(5)
    ckpt = save_reference_checkpoint(tmp_path / "c.pth", broken, "pnasnetA")
    with pytest.raises(NdeconvError) as err:
        convert_reference_checkpoint(ckpt)
    message = str(err.value)
    assert "1 missing keys: layer3.2.sep_conv1.conv1.weight" in message
    assert "1 unexpected keys: layer9.extra" in message
    assert "1 shape mismatches: layer5.1.sep_conv1.conv1.bias (5,) (the model has (176,))" in message

    # A checkpoint of another architecture, forced into the wrong one, names the one it says it is.
    with pytest.raises(NdeconvError, match=r"does not fit resnet18_deconv.*own arch is 'pnasnetA'"):
        convert_reference_checkpoint(save_reference_checkpoint(tmp_path / "d.pth", sd, "pnasnetA"), arch="resnet")


def test_output_rules(reference_dir, tmp_path):
    ckpt = save_reference_checkpoint(tmp_path / "c.pth", reference_state_dict(reference_dir, "pnasnet_a"), "pnasnetA")
    out = tmp_path / "model.safetensors"
    with pytest.raises(UsageError, match=r"must be a \.safetensors file"):
        convert_reference(ckpt, tmp_path / "model.pt")
    convert_reference(ckpt, out)
    before = out.read_bytes()
    assert main(["convert-reference", str(ckpt), "-o", str(out)]) == 2  # exists: refused, untouched
    assert out.read_bytes() == before
    out.unlink()
    assert main(["convert-reference", str(ckpt), "-o", str(out)]) == 2  # its config.json is still there
    assert main(["convert-reference", str(ckpt), "-o", str(out), "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pth", "config.json", "model.safetensors"]
