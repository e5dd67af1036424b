"""Folded files: one safetensors file whose metadata names the folded architecture, reloaded with a strict
state_dict.

A file records the architecture and its ``model_args`` (with ``folded=True``) and the BatchNorm pairs the opt-in
pass fused; ``load_folded`` is ``timm.create_model(architecture, **model_args)``, those pairs fused, and
``load_state_dict(strict=True)``. Files of format 1 (the per-layer spec, tests/fixtures/folded_v1) still load,
to the numbers the ndeconv that wrote them gave, or say in one line how to fold the source again.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import ndeconv  # noqa: F401 - registers the zoo
from ndeconv import ChannelDeconv, Delinear, FastDeconv
from ndeconv.convert import (
    FoldWarning,
    fold,
    fold_with_report,
    is_folded_file,
    load_folded,
    output_difference,
    read_folded_config,
    save_folded,
)
from ndeconv.convert.folded_io import METADATA_KEY
from ndeconv.errors import NdeconvError, UsageError
from ndeconv.io import save_safetensors_atomic

pytestmark = pytest.mark.usefixtures("one_thread")

FOLDED_V1 = Path(__file__).resolve().parent / "fixtures" / "folded_v1"
V1_CASES = ["pnasnet_a_nd", "pnasnet_a_bn_channel_deconv"]


def moved(model: nn.Module) -> nn.Module:
    """One train-mode forward on offset data: running statistics off their initial values (cheap for PNASNet)."""
    torch.manual_seed(0)
    with torch.no_grad():
        model.train()(torch.randn(4, model.conv1.in_channels, 32, 32) * 2 + 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def quiet_fold(model: nn.Module, **kwargs) -> tuple[nn.Module, object]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FoldWarning)
        return fold_with_report(model, check=False, **kwargs)


@pytest.mark.parametrize("kwargs,fuse_bn", [
    (dict(), False),
    (dict(deconv=False), True),
    (dict(deconv=False), False),
    (dict(delinear=False, block_fc=16), False),
], ids=["nd", "bn-fused", "bn-kept", "channel-deconv"])
def test_folded_file_is_the_folded_architecture(tmp_path, kwargs, fuse_bn) -> None:
    model = moved(timm.create_model("pnasnet_a_deconv", in_chans=1, num_classes=5, **kwargs))
    folded, report = quiet_fold(model, fuse_batchnorm=fuse_bn)
    weights = save_folded(folded, tmp_path / "model.safetensors", source={"model": "pnasnet_a_deconv"})
    config = read_folded_config(weights)
    assert config["format_version"] == 2 and "layers" not in config  # no per-layer spec any more
    assert config["model_args"] == {**folded.deconv_settings.to_dict(), "num_classes": 5, "in_chans": 1,
                                    "global_pool": "avg"} and config["model_args"]["folded"] is True
    assert config["fused_batchnorms"] == report.bn_fused and bool(report.bn_fused) == fuse_bn
    assert config["fold"]["summary"] == report.summary()  # the report fold left on the model

    x = torch.randn(2, 1, 32, 32)
    loaded = load_folded(weights)
    assert not {type(m) for m in loaded.modules()} & {FastDeconv, Delinear, ChannelDeconv}
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))
    # A model file that does not pass its ChannelDeconv's channel count yet (settings.channel_deconv(C)) loads
    # through load_folded alone, which sizes the plain layer from its weights.
    sized = getattr(model, "deconv1", None) is None or model.deconv1.num_channels is not None
    if not fuse_bn and sized:
        # Nothing but timm: the recorded name and model_args, and a strict state_dict.
        built = timm.create_model(config["architecture"], **config["model_args"])
        built.load_state_dict(load_file(str(weights)), strict=True)
        with torch.no_grad():
            assert torch.equal(built.eval()(x), folded(x))


def test_reparameterized_model_saves_as_folded(tmp_path) -> None:
    """timm's reparameterize_model gives the same network as fold: it saves and loads the same way."""
    from timm.models import reparameterize_model

    model = moved(timm.create_model("pnasnet_a_deconv", in_chans=1))
    plain = reparameterize_model(model)
    assert not plain.deconv_settings.folded  # timm's walk leaves the settings: save_folded records the folded ones
    path = save_folded(plain, tmp_path / "m.safetensors")
    assert read_folded_config(path)["model_args"]["folded"] is True
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_folded(path)(x), fold(model, check=False)(x))


@pytest.mark.parametrize("which", ["all", "stem"])
def test_deconvolved_batchnorm_model_saves_as_folded(tmp_path, which) -> None:
    """A BatchNorm zoo model with deconvolution put in by deconvolve() (what `ndeconv convert-bn` does) has its
    BatchNorms removed the way the pass fuses them: the file records those pairs, whoever removed them."""
    from ndeconv import deconvolve

    model = timm.create_model("pnasnet_a_deconv", in_chans=1, deconv=False)
    deconvolve(model, which=which)
    folded = fold(moved(model), check=False)  # the default fold: no BatchNorm pass
    path = save_folded(folded, tmp_path / "m.safetensors")
    fused = read_folded_config(path)["fused_batchnorms"]
    assert fused == ({"bn1": "conv1"} if which == "stem" else fused) and len(fused) == (1 if which == "stem" else 23)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_folded(path)(x), folded(x))


def test_save_refuses_what_it_could_not_load(tmp_path) -> None:
    """A folded model changed beyond what its architecture can rebuild (a BatchNorm dropped, its conv left
    bias-free) is refused before any file is written, in one line naming the difference."""
    folded = quiet_fold(moved(timm.create_model("pnasnet_a_deconv", in_chans=1, deconv=False)))[0]
    folded.layer1[0].sep_conv1.bn1 = nn.Identity()
    with pytest.raises(NdeconvError, match=r"cannot save folded weights: .*missing layer1\.0\.sep_conv1\.conv1"
                                           r"\.bias"):
        save_folded(folded, tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())


def test_save_refuses_a_model_without_zoo_settings(tmp_path) -> None:
    folded = fold(moved(timm.create_model("pnasnet_a_deconv", in_chans=1)), check=False)
    del folded.deconv_settings
    with pytest.raises(UsageError, match="only zoo models"):
        save_folded(folded, tmp_path / "m.safetensors")


# -- format version 1 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V1_CASES)
def test_version_1_file_loads_to_the_numbers_it_gave(case) -> None:
    """Files written by ndeconv 9fe6000 (per-layer spec): that ndeconv's loader's logits, to float32 rounding (a
    convolution's sum order follows the thread count, so not bit for bit across machines)."""
    io = load_file(str(FOLDED_V1 / "io.safetensors"))
    path = FOLDED_V1 / case / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY])["format_version"] == 1
    assert is_folded_file(path)
    model = load_folded(path)
    with torch.no_grad():
        logits = model(io["x"])
    assert output_difference(io[f"{case}.logits"], logits)[1] <= 1e-6
    assert output_difference(io[f"{case}.unfolded_logits"], logits)[1] <= 1e-5


def _rewrite_v1(tmp_path: Path, case: str, edit) -> Path:
    """A copy of a version-1 fixture whose config (embedded and beside it) ``edit`` changed."""
    folder = tmp_path / case
    shutil.copytree(FOLDED_V1 / case, folder)
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
    edit(config)
    text = json.dumps(config)
    save_safetensors_atomic(load_file(str(path)), path, metadata={METADATA_KEY: text, "format": "pt"})
    (folder / "config.json").write_text(text)
    return path


@pytest.mark.parametrize("case", V1_CASES)
def test_an_older_file_whose_metadata_lost_its_config_loads_by_the_config_json_beside_it(tmp_path, case) -> None:
    """ndeconv fold once wrote a config.json beside the file too: a copy of such a file without the metadata (a
    tool that rewrote the safetensors) still loads by that config.json, to the same numbers."""
    folder = tmp_path / case
    shutil.copytree(FOLDED_V1 / case, folder)
    path = folder / "model.safetensors"
    save_safetensors_atomic(load_file(str(path)), path, metadata={"format": "pt"})
    with safe_open(str(path), framework="pt") as f:
        assert METADATA_KEY not in f.metadata()
    assert is_folded_file(path) and read_folded_config(path)["format_version"] == 1
    io = load_file(str(FOLDED_V1 / "io.safetensors"))
    with torch.no_grad():
        assert output_difference(io[f"{case}.logits"], load_folded(path)(io["x"]))[1] <= 1e-6
    (folder / "config.json").unlink()
    assert not is_folded_file(path)
    with pytest.raises(UsageError, match="no folded config"):
        read_folded_config(path)


def test_version_1_file_that_does_not_rebuild_says_how_to_refold(tmp_path) -> None:
    def widen(config: dict) -> None:
        config["layers"]["conv1"]["padding"] = [2, 2]  # a layer the folded architecture does not build

    path = _rewrite_v1(tmp_path, "pnasnet_a_nd", widen)
    with pytest.raises(NdeconvError) as caught:
        load_folded(path)
    message = str(caught.value)
    assert len(message.splitlines()) == 1 and "folded format 1" in message and "layer conv1 differs" in message
    assert message.endswith(f"fold the source again: ndeconv fold pnasnet_a_deconv -o {path} --force")


def test_version_1_file_without_settings_says_how_to_refold(tmp_path) -> None:
    def forget(config: dict) -> None:
        config["folded_from"] = {"checkpoint": "runs/x/model.safetensors"}

    path = _rewrite_v1(tmp_path, "pnasnet_a_bn_channel_deconv", forget)
    with pytest.raises(NdeconvError, match="records no deconvolution settings.*ndeconv fold --checkpoint "
                                           "runs/x/model.safetensors --arch pnasnet_a_deconv -o"):
        load_folded(path)


def test_version_1_file_saved_without_its_report_loads(tmp_path) -> None:
    """save_folded(folded) without a report wrote no BatchNorm pairs: the pass finds them on the rebuilt
    architecture again, and the layer spec confirms it."""
    io = load_file(str(FOLDED_V1 / "io.safetensors"))
    path = _rewrite_v1(tmp_path / "nd", "pnasnet_a_nd", lambda config: config.update(fold=None))
    with torch.no_grad():
        assert output_difference(io["pnasnet_a_nd.logits"], load_folded(path)(io["x"]))[1] <= 1e-6
    path = _rewrite_v1(tmp_path, "pnasnet_a_bn_channel_deconv", lambda config: config.update(fold=None))
    if timm.create_model("pnasnet_a_deconv", delinear=False, block_fc=16).deconv1.num_channels is None:
        # A model file that does not size its ChannelDeconv cannot build the plain layer, and without the
        # report nothing says which layer the ChannelDeconv was: one clear line.
        with pytest.raises(NdeconvError, match="ChannelDeconv but the folded config does not name it"):
            load_folded(path)
    else:
        key = "pnasnet_a_bn_channel_deconv.logits"
        with torch.no_grad():
            assert output_difference(io[key], load_folded(path)(io["x"]))[1] <= 1e-6


def test_newer_format_is_refused(tmp_path) -> None:
    folded = fold(moved(timm.create_model("pnasnet_a_deconv", in_chans=1)), check=False)
    path = save_folded(folded, tmp_path / "m.safetensors")
    config = read_folded_config(path)
    config["format_version"] = 3
    save_safetensors_atomic(load_file(str(path)), path, metadata={METADATA_KEY: json.dumps(config), "format": "pt"})
    with pytest.raises(NdeconvError, match="folded format version 3 is newer than this ndeconv reads"):
        load_folded(path)


def test_folded_file_loads_on_its_dtype(tmp_path) -> None:
    folded = fold(copy.deepcopy(moved(timm.create_model("pnasnet_a_deconv", in_chans=1))).double(), check=False)
    path = save_folded(folded, tmp_path / "m.safetensors")
    loaded = load_folded(path)
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded(x), folded(x))


def _with_metadata(path: Path, out: Path, text: str) -> Path:
    """A copy of the folded file at ``path`` whose folded config (safetensors metadata) is ``text``."""
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    out.mkdir()
    save_file(load_file(str(path)), str(out / "m.safetensors"), metadata={**metadata, METADATA_KEY: text})
    return out / "m.safetensors"


@pytest.fixture(scope="module")
def folded_file(tmp_path_factory) -> Path:
    model = moved(timm.create_model("pnasnet_a_deconv", in_chans=1))
    path = save_folded(fold(model.eval(), check=False), tmp_path_factory.mktemp("folded") / "m.safetensors")
    return path


@pytest.mark.parametrize("change, said", [
    (lambda config: "{not json", "not JSON"),
    (lambda config: json.dumps([1, 2]), "a JSON list, not an object"),
    (lambda config: json.dumps({**config, "dtype": "load"}), "dtype 'load' is not a floating-point torch dtype"),
    (lambda config: json.dumps({**config, "dtype": "int8"}), "dtype 'int8' is not a floating-point torch dtype"),
    (lambda config: json.dumps({**config, "format_version": "2"}), "format_version '2' is not a version number"),
    (lambda config: json.dumps({**config, "architecture": 3}), "architecture 3 is not a model name"),
], ids=["not-json", "list", "dtype-load", "dtype-int8", "version-str", "architecture-int"])
def test_damaged_folded_metadata_is_one_line(folded_file: Path, tmp_path: Path, capsys, change, said) -> None:
    from ndeconv.cli import main

    with safe_open(str(folded_file), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
    damaged = _with_metadata(folded_file, tmp_path / "damaged", change(config))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(damaged), "--dataset", "fashion_mnist", "--test-subset", "8"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and said in err and METADATA_KEY in err, err


def test_a_float16_folded_file_evaluates_in_float16(folded_file: Path, tmp_path: Path, capsys) -> None:
    from ndeconv.cli import main

    with safe_open(str(folded_file), framework="pt") as f:
        config = json.loads(f.metadata()[METADATA_KEY])
    half = _with_metadata(folded_file, tmp_path / "half", json.dumps({**config, "dtype": "float16"}))
    assert next(load_folded(half).parameters()).dtype == torch.float16
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(half), "--dataset", "fashion_mnist", "--test-subset", "8"]) == 0
