"""Pretrained weights through timm's own machinery, offline: shipped files (sha256-checked), a user's file,
``local-dir:``, a hand-built Hugging Face cache (``hf-hub:``), and clear errors for everything that can go wrong."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from conftest import write_hf_cache, zoo_model_without_weights
from timm.models import save_for_hf

import ndeconv.zoo._pretrained as pretrained_mod
from ndeconv import FastDeconv
from ndeconv.errors import NdeconvError
from ndeconv.io import save_safetensors_atomic
from ndeconv.zoo._shipping import ship_weights
from ndeconv.zoo._stem import expand_deconv_stem


def _trained(name: str = "resnet18_deconv", in_chans: int = 1, **kwargs) -> torch.nn.Module:
    """A small zoo model whose running statistics moved away from their initial values (two train steps)."""
    torch.manual_seed(0)
    model = timm.create_model(name, in_chans=in_chans, **kwargs)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            x = torch.randn(4, in_chans, 32, 32)
            model(x + 0.5 * x.roll(1, dims=2))  # correlated pixels, so the whitening is not an identity
    return model.eval()


@pytest.fixture(scope="module")
def gray_model():
    return _trained()


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, gray_model):
    """A folder exactly as ship_weights writes it (model.safetensors, config.json, SHA256SUMS)."""
    return ship_weights(gray_model, "fashion_mnist", root=tmp_path_factory.mktemp("weights"))


def _x(chans: int = 1, dtype=torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, chans, 32, 32, dtype=dtype)


def _same(a: torch.nn.Module, b: torch.nn.Module, chans: int = 1) -> float:
    with torch.no_grad():
        return (a.eval()(_x(chans)) - b.eval()(_x(chans))).abs().max().item()


def test_ship_weights_layout(shipped, gray_model):
    files = sorted(p.name for p in shipped.iterdir())
    assert files == ["SHA256SUMS", "class_map.txt", "config.json", "model.safetensors"]
    digest = hashlib.sha256((shipped / "model.safetensors").read_bytes()).hexdigest()
    assert (shipped / "SHA256SUMS").read_text() == f"{digest}  model.safetensors\n"
    config = json.loads((shipped / "config.json").read_text())
    assert config["architecture"] == "resnet18_deconv"
    # The default model of gray weights takes 3 channels (the registry's rule); the weights' own are the stem's.
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["model_args"]["deconv"] is True and "in_chans" not in config["model_args"]


def test_no_shipped_weights_is_one_clear_error(empty_weights_dir: Path) -> None:
    name = zoo_model_without_weights()
    with pytest.raises(NdeconvError) as err:
        timm.create_model(name, pretrained=True)
    msg = str(err.value)
    # Which weights, where they were looked for, and the two ways to get them (what a pip install, whose wheel
    # carries no weights, sees), in one line.
    looked_at = empty_weights_dir / f"{name}.fashion_mnist"
    assert msg.startswith(f"{name}.fashion_mnist: no weights in this install ({looked_at} does not exist;"), msg
    assert "NDECONV_WEIGHTS" in msg and f"hf download ndeconv/{name}.fashion_mnist" in msg
    assert "\n" not in msg


def test_registered_cfg_is_one_record_per_weight_set(monkeypatch, tmp_path):
    # The registry holds the weight set's facts (its Hub repo, the data it was trained on), not a path: the
    # shipped file is found when a model is built, in WEIGHTS_DIR (what NDECONV_WEIGHTS names).
    cfg = timm.models.get_pretrained_cfg("resnet18_deconv.fashion_mnist")
    assert cfg.file is None and cfg.hf_hub_id == "ndeconv/resnet18_deconv.fashion_mnist"
    assert cfg.input_size == (3, 32, 32) and len(cfg.mean) == len(cfg.std) == 3
    assert cfg.label_names[0] == "t-shirt/top" and cfg.crop_pct == 32 / 28
    model = timm.create_model("resnet18_deconv.fashion_mnist", pretrained=True)
    assert Path(model.pretrained_cfg["file"]) == (pretrained_mod.WEIGHTS_DIR / "resnet18_deconv.fashion_mnist"
                                                  / "model.safetensors")
    # Another weights folder, named after import: the next build reads it.
    copy = tmp_path / "resnet18_deconv.fashion_mnist"
    shutil.copytree(pretrained_mod.WEIGHTS_DIR / "resnet18_deconv.fashion_mnist", copy)
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", tmp_path.resolve())
    model = timm.create_model("resnet18_deconv.fashion_mnist", pretrained=True)
    assert Path(model.pretrained_cfg["file"]) == copy.resolve() / "model.safetensors"


def test_shipped_file_is_sha256_checked(shipped, gray_model, monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", shipped.parent)
    file = str(shipped / "model.safetensors")
    model = timm.create_model("resnet18_deconv", pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=file))
    assert model.conv1.in_channels == 1 and _same(model, gray_model) == 0.0

    # The same bytes under another checksum: refused before anything is loaded.
    bad = tmp_path / "resnet18_deconv.fashion_mnist"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((shipped / "model.safetensors").read_bytes())
    (bad / "SHA256SUMS").write_text("0" * 64 + "  model.safetensors\n")
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(NdeconvError, match="does not match"):
        timm.create_model("resnet18_deconv", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(bad / "model.safetensors")))
    (bad / "SHA256SUMS").unlink()
    with pytest.raises(NdeconvError, match="SHA256SUMS"):
        timm.create_model("resnet18_deconv", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(bad / "model.safetensors")))


def test_user_file_sets_channels_and_classes(shipped, gray_model):
    file = str(shipped / "model.safetensors")
    model = timm.create_model("resnet18_deconv", pretrained=True, pretrained_cfg_overlay=dict(file=file))
    assert model.conv1.in_channels == 1 and model.num_classes == 10
    assert _same(model, gray_model) == 0.0
    # Another num_classes: timm drops the classifier, the rest loads.
    model = timm.create_model("resnet18_deconv", pretrained=True, num_classes=4, pretrained_cfg_overlay=dict(file=file))
    assert model.linear.weight.shape == (4, 512)
    torch.testing.assert_close(model.conv1.running_deconv, gray_model.conv1.running_deconv, rtol=0, atol=0)


def test_rgb_copy_of_gray_gives_the_gray_output_exactly(gray_model, tmp_path):
    file = tmp_path / "m.safetensors"
    save_safetensors_atomic(gray_model.state_dict(), file)
    rgb = timm.create_model("resnet18_deconv", pretrained=True, in_chans=3,
                            pretrained_cfg_overlay=dict(file=str(file))).double().eval()
    model64 = copy.deepcopy(gray_model).double()
    assert rgb.conv1.in_channels == 3 and rgb.conv1.running_deconv.shape == (27, 27)
    gray = _x(1, torch.float64)
    with torch.no_grad():
        ref, out = model64(gray), rgb(gray.repeat(1, 3, 1, 1))
    # Exact in exact arithmetic; the float32 weight / 3 of the loaded model rounds (the float64 layer test is 1e-12).
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-6


def test_expand_deconv_stem_block_diagonal_in_unfold_layout():
    torch.manual_seed(0)
    src = FastDeconv(1, 8, 3, padding=1, n_iter=15, freeze=True).double().train()
    with torch.no_grad():
        src(torch.randn(4, 1, 16, 16, dtype=torch.float64).cumsum(-1))
    dst = FastDeconv(3, 8, 3, padding=1, n_iter=15, freeze=True).double()
    sd = expand_deconv_stem(src.state_dict(), "", dst)
    D = src.running_deconv
    assert torch.equal(sd["running_deconv"], torch.block_diag(D, D, D))
    assert torch.equal(sd["running_mean"], src.running_mean.repeat(3))
    dst.load_state_dict(sd)
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dst.eval()(x.repeat(1, 3, 1, 1)), src.eval()(x), rtol=1e-12, atol=1e-12)


def test_stem_adaptation_refuses_what_is_not_exact(tmp_path):
    rgb = _trained(in_chans=3)
    file = tmp_path / "rgb.safetensors"
    save_safetensors_atomic(rgb.state_dict(), file)
    with pytest.raises(NdeconvError, match="from 3 to 1 input channels"):
        timm.create_model("resnet18_deconv", pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(file)))


def test_batchnorm_form_gray_to_rgb_uses_timm_adaptation(tmp_path):
    bn = _trained(deconv=False)
    file = tmp_path / "bn.safetensors"
    save_safetensors_atomic(bn.state_dict(), file)
    rgb = timm.create_model("resnet18_deconv", deconv=False, pretrained=True, in_chans=3,
                            pretrained_cfg_overlay=dict(file=str(file))).eval()
    with torch.no_grad():
        torch.testing.assert_close(rgb(_x(1).repeat(1, 3, 1, 1)), bn(_x(1)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_files_are_clear_errors(shipped, tmp_path, damage):
    data = (shipped / "model.safetensors").read_bytes()
    file = tmp_path / "broken.safetensors"
    damaged = {"truncated": data[: len(data) // 2], "garbage": b"\x00not safetensors" * 64, "empty": b""}
    file.write_bytes(damaged[damage])
    with pytest.raises(NdeconvError) as err:
        timm.create_model("resnet18_deconv", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    assert str(file) in str(err.value) or "broken.safetensors" in str(err.value)


def test_missing_user_file_is_clear_error(tmp_path):
    with pytest.raises(NdeconvError, match="no pretrained weights: looked for weights file"):
        timm.create_model("resnet18_deconv", pretrained=True,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.safetensors")))


@pytest.mark.parametrize("other", [dict(name="senet18_deconv"), dict(name="resnet18_deconv", deconv=False)])
def test_wrong_architecture_is_clear_error(shipped, other):
    kwargs = dict(other)
    name = kwargs.pop("name")
    with pytest.raises(NdeconvError, match="do not fit") as err:
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(shipped / "model.safetensors")),
                          **kwargs)
    assert "\n" not in str(err.value)


def test_feature_extractor_loads_without_the_head(shipped, gray_model):
    # timm's num_classes=0: the classifier and its Delinear whitening are dropped, the backbone loads exactly.
    file = str(shipped / "model.safetensors")
    model = timm.create_model("resnet18_deconv", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=file)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_x()), gray_model.forward_head(gray_model.forward_features(_x()),
                                                                         pre_logits=True), rtol=0, atol=0)


def test_head_of_another_width_is_clear_error(shipped):
    # Same classes, twice the pooled features: the classifier and its whitening cannot load, said in one line.
    with pytest.raises(NdeconvError, match=r"wrong shape: linear\.") as err:
        timm.create_model("resnet18_deconv", pretrained=True, global_pool="catavgmax",
                          pretrained_cfg_overlay=dict(file=str(shipped / "model.safetensors")))
    assert "\n" not in str(err.value)
    # A new head (other classes) on the same backbone is fine: only the head starts fresh.
    model = timm.create_model("resnet18_deconv", pretrained=True, global_pool="catavgmax", num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(shipped / "model.safetensors")))
    assert model.linear.weight.shape == (3, 1024)


def test_overlay_naming_another_source_replaces_the_shipped_file(shipped, gray_model, tmp_path, monkeypatch):
    # timm tries `file` before `hf_hub_id`: without care the registered shipped file would silently win.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    write_hf_cache(tmp_path, "someorg/mine", shipped)
    model = timm.create_model("resnet18_deconv", pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(hf_hub_id="someorg/mine"))
    assert _same(model, gray_model) == 0.0
    assert model.pretrained_cfg.get("file") is None and model.pretrained_cfg["hf_hub_id"] == "someorg/mine"


def test_user_file_takes_the_normalisation_recorded_beside_it(gray_model, tmp_path):
    file = tmp_path / "model.safetensors"
    save_safetensors_atomic(gray_model.state_dict(), file)
    model = timm.create_model("resnet18_deconv", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    assert model.pretrained_cfg["mean"] == (0.0,)  # nothing recorded: the default tag's
    # but not the default tag's identity: these are not the shipped Fashion-MNIST weights
    assert all(model.pretrained_cfg.get(k) is None for k in ("tag", "description", "label_names"))
    recorded = dict(architecture="resnet18_deconv", input_size=[1, 32, 32], mean=[0.29], std=[0.35],
                    label_names=[f"class{i}" for i in range(10)])
    (tmp_path / "config.json").write_text(json.dumps(dict(pretrained_cfg=recorded)))
    model = timm.create_model("resnet18_deconv", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    assert model.pretrained_cfg["mean"] == (0.29,) and model.pretrained_cfg["std"] == (0.35,)
    assert model.pretrained_cfg["label_names"] == tuple(recorded["label_names"])
    assert timm.data.resolve_data_config(model=model)["mean"] == (0.29,)
    rgb = timm.create_model("resnet18_deconv", pretrained=True, in_chans=3, pretrained_cfg_overlay=dict(file=str(file)))
    assert rgb.pretrained_cfg["mean"] == (0.29,) * 3 and rgb.pretrained_cfg["input_size"] == (3, 32, 32)
    # Another architecture's config says nothing about these weights.
    (tmp_path / "config.json").write_text(json.dumps(dict(pretrained_cfg={**recorded, "architecture": "vgg16_deconv"})))
    model = timm.create_model("resnet18_deconv", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
    assert model.pretrained_cfg["mean"] == (0.0,)


def test_rgb_adaptation_describes_the_model_it_built(shipped, monkeypatch, caplog):
    monkeypatch.setattr(pretrained_mod, "WEIGHTS_DIR", shipped.parent)
    with caplog.at_level("WARNING"):
        rgb = timm.create_model("resnet18_deconv", pretrained=True, in_chans=3,
                                pretrained_cfg_overlay=dict(file=str(shipped / "model.safetensors")))
    assert rgb.conv1.in_channels == 3
    assert rgb.pretrained_cfg["input_size"] == (3, 32, 32) and len(rgb.pretrained_cfg["mean"]) == 3
    assert not [r for r in caplog.records if "source channels" in r.getMessage()]


def test_pickled_user_file_is_refused_without_unpickling(gray_model, tmp_path):
    file = tmp_path / "model.pth"
    torch.save(gray_model.state_dict(), file)
    with pytest.raises(NdeconvError, match="only safetensors is loaded"):
        timm.create_model("resnet18_deconv", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))


def test_local_dir_with_damaged_pytorch_bin_is_clear_error(tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(architecture="resnet18_deconv", num_classes=10)))
    (folder / "pytorch_model.bin").write_bytes(b"abc")  # the weights-only unpickler fails with IndexError
    with pytest.raises(NdeconvError, match=r"cannot load pretrained weights from .*IndexError"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)


def test_local_dir(shipped, gray_model):
    model = timm.create_model(f"local-dir:{shipped}", pretrained=True, in_chans=1)
    assert model.pretrained_cfg["architecture"] == "resnet18_deconv"
    assert _same(model, gray_model) == 0.0


def test_save_for_hf_round_trip(gray_model, tmp_path):
    save_for_hf(gray_model, tmp_path / "hf", safe_serialization=True)
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    model = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True)
    assert _same(model, gray_model) == 0.0


def test_hf_hub_offline_cache(shipped, gray_model, tmp_path, monkeypatch):
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    write_hf_cache(tmp_path, "someorg/resnet18_deconv.fashion_mnist", shipped)
    model = timm.create_model("hf-hub:someorg/resnet18_deconv.fashion_mnist", pretrained=True)
    assert model.conv1.in_channels == 3 and model.pretrained_cfg["input_size"][0] == 3  # the default model
    model = timm.create_model("hf-hub:someorg/resnet18_deconv.fashion_mnist", pretrained=True, in_chans=1)
    assert model.conv1.in_channels == 1
    assert _same(model, gray_model) == 0.0
    # The registered hf_hub_id is the fallback when the shipped file is switched off (file='').
    write_hf_cache(tmp_path, "ndeconv/resnet18_deconv.fashion_mnist", shipped)
    model = timm.create_model("resnet18_deconv.fashion_mnist", pretrained=True, in_chans=1,
                              pretrained_cfg_overlay=dict(file=""))
    assert _same(model, gray_model) == 0.0


def test_hf_hub_cache_miss_is_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(NdeconvError, match="resnet18_deconv.fashion_mnist: cannot load pretrained weights from hf-hub"):
        timm.create_model("resnet18_deconv.fashion_mnist", pretrained=True, pretrained_cfg_overlay=dict(file=""))
