"""The zoo as timm sees it: registry, pretrained_cfg, and timm's own model-test expectations."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import zoo_model_without_weights
from timm.models._registry import _model_to_module

import ndeconv.zoo as zoo
from ndeconv.zoo._pretrained import registered_tags, shipped_weights_path

ALL_TEN = {
    "vgg16_deconv", "resnet18_deconv", "preact_resnet18_deconv", "densenet121_deconv", "resnext29_32x4d_deconv",
    "mobilenetv2_deconv", "dpn92_deconv", "pnasnet_a_deconv", "senet18_deconv", "efficientnet_b0_deconv",
}
SMALL = [n for n in zoo.ZOO_MODELS if n != "dpn92_deconv"]  # DPN-92 (34M) is covered by the layout test



@pytest.mark.parametrize("typed,name", [
    ("resnet18_deconv", "resnet18_deconv"), ("resnet18", "resnet18_deconv"), ("resnet", "resnet18_deconv"),
    ("pnasnetA", "pnasnet_a_deconv"), ("mobilev2", "mobilenetv2_deconv"), ("efficientnet_b0", "efficientnet_b0_deconv"),
])
def test_names_users_type_resolve_to_one_zoo_model(typed: str, name: str) -> None:
    """Every command takes the zoo name, the name without ``_deconv`` or the authors' ``--arch`` value."""
    assert zoo.resolve_model_name(typed) == name


def test_an_unknown_name_lists_the_choices() -> None:
    # Nothing close to it: every choice (a near miss names only the closest: tests/test_cli_messages.py).
    from ndeconv.errors import UsageError

    with pytest.raises(UsageError, match=r"unknown --arch 'xyz'; choose one of: densenet121, .*authors'"):
        zoo.resolve_model_name("xyz", "--arch")

def test_registry_lists_the_zoo_and_shadows_nothing():
    names = set(timm.list_models("*_deconv"))
    assert set(zoo.ZOO_MODELS) == ALL_TEN and ALL_TEN <= names  # a missing zoo file fails here
    for name in names:
        # Registered from our own deconv_* file (a timm module name there would mix us into timm's listings).
        assert _model_to_module[name].startswith("deconv_")
    for module in {_model_to_module[n] for n in names}:
        # A zoo file registers only *_deconv names, which timm does not have: nothing of timm's is replaced.
        assert all(n.endswith("_deconv") for n in timm.list_models(module=module))
    # The one-epoch tag (which keeps its weights), the hybrid's (which builds the hybrid) and, once registered, the
    # 20-epoch tag, which is then the default (the weights pretrained=True loads).
    listed = set(timm.list_pretrained("resnet18_deconv*"))
    one_epoch = {"resnet18_deconv.fashion_mnist", "resnet18_deconv.fashion_mnist_stem"}
    assert listed in (one_epoch, one_epoch | {"resnet18_deconv.fashion_mnist_e20"})
    default = "fashion_mnist_e20" if "resnet18_deconv.fashion_mnist_e20" in listed else "fashion_mnist"
    assert timm.models.get_pretrained_cfg("resnet18_deconv").tag == default


def test_list_pretrained_lists_every_weight_set(empty_weights_dir, capsys):
    # timm's list_pretrained means "has a weight source" (as timm lists its own Hub weights without a download):
    # every zoo tag has one, its Hub repo, whether or not this install holds the files; `ndeconv list` says
    # which are on disk here, and pretrained=True without them says how to get them (test_pretrained_loading).
    from ndeconv.cli import main

    assert set(timm.list_pretrained("*_deconv*")) >= {f"{name}.fashion_mnist" for name in zoo.ZOO_MODELS}
    name = zoo_model_without_weights()  # every one, with the weights folder empty
    assert "fashion_mnist" in registered_tags(name)
    assert timm.list_pretrained(f"{name}.*") == [f"{name}.{tag}" for tag in registered_tags(name)]
    assert main(["list", name]) == 0
    assert "fashion_mnist (no)" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(zoo.ZOO_MODELS))
def test_pretrained_cfg(name):
    cfg = timm.models.get_pretrained_cfg(f"{name}.fashion_mnist")
    assert cfg.tag == "fashion_mnist" and cfg.architecture == name
    # timm's convention: the default model takes 3 channels; the gray weights' statistics repeat in each.
    assert cfg.input_size == (3, 32, 32) and cfg.mean == (0.0,) * 3 and cfg.std == (1.0,) * 3
    assert cfg.num_classes == 10 and len(cfg.label_names) == 10
    # One record per weight set: its Hub repo; the shipped file is found at build time (shipped_weights_path).
    assert cfg.file is None and cfg.hf_hub_id == f"ndeconv/{name}.fashion_mnist"
    assert cfg.paper_ids == "arXiv:1905.11926" and cfg.license == "mit"
    # Without weights the model is the default one, with the default tag's cfg (as any timm model).
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32) and len(model.pretrained_cfg["mean"]) == 3
    assert model.num_classes == 10
    sd = model.state_dict()
    assert f"{model.pretrained_cfg['first_conv']}.weight" in sd
    assert f"{model.pretrained_cfg['classifier']}.weight" in sd
    assert sd[f"{model.pretrained_cfg['first_conv']}.weight"].shape[1] == 3


# Every model in its deconvolution form; the BatchNorm form (same classes, same head) on a few, to stay fast.
CASES = [(n, True) for n in SMALL] + [(n, False) for n in ("resnet18_deconv", "vgg16_deconv", "senet18_deconv")]


@pytest.mark.parametrize("name,deconv", CASES, ids=[f"{n}-{'nd' if d else 'bn'}" for n, d in CASES])
def test_timm_model_expectations(name, deconv):
    """What timm's tests/test_models.py checks, on a batch of two 32x32 images."""
    torch.manual_seed(0)
    model = timm.create_model(name, deconv=deconv, num_classes=7, in_chans=1, drop_rate=0.2).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        feats = model.forward_features(x)
        assert feats.ndim == 4 and feats.shape[:2] == (2, model.num_features)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        assert model.get_classifier() is getattr(model, model.pretrained_cfg["classifier"])
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(0, "")
        assert model(x).shape == feats.shape
        model.reset_classifier(3, "avg")
        assert model(x).shape == (2, 3)
    model.set_grad_checkpointing(True)  # timm's train.py --grad-checkpointing (tests/test_checkpointing.py)
    assert model.grad_checkpointing
    with torch.no_grad():
        assert model(x).shape == (2, 3)  # no gradient wanted: runs without checkpoints


def test_drop_rate_acts_only_in_training():
    model = timm.create_model("resnet18_deconv", deconv=False, drop_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    feats = model.forward_features(x).detach()
    torch.manual_seed(1)
    a = model.forward_head(feats)
    torch.manual_seed(2)
    assert not torch.equal(a, model.forward_head(feats))


def test_default_head_and_deconv_switch():
    nd = timm.create_model("resnet18_deconv")
    bn = timm.create_model("resnet18_deconv", deconv=False)
    assert type(nd.linear).__name__ == "Delinear" and nd.linear.block == 512
    assert type(bn.linear).__name__ == "Linear" and type(bn.bn1).__name__ == "BatchNorm2d"
    assert nd.deconv_settings.deconv and not bn.deconv_settings.deconv
    assert timm.create_model("resnet18_deconv", block_fc=0).linear.__class__.__name__ == "Linear"


def test_list_command(capsys):
    from ndeconv.cli import main

    assert main(["list", "resnet18*"]) == 0
    out = capsys.readouterr().out
    on_disk = "yes" if shipped_weights_path("resnet18_deconv", "fashion_mnist").exists() else "no"
    assert "resnet18_deconv" in out and "11,169,162" in out and f"fashion_mnist ({on_disk})" in out
    assert main(["list", "--json", "vgg*", "--bn"]) == 0
    assert '"params": 14728266' in capsys.readouterr().out


def test_list_shows_every_group_with_the_authors_names(capsys):
    import json

    from ndeconv.cli import main
    from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # The paper's ten first, as the JSON always had them; then every other zoo model, each in its group.
    assert [r["name"] for r in rows[:10]] == list(zoo.ZOO_MODELS)
    assert all({"name", "params", "tags"} <= set(r) and r["group"] == "paper" for r in rows[:10])
    by_group = {g: [r["name"] for r in rows if r["group"] == g] for g in ("extra", "imagenet", "segmentation")}
    assert by_group == {"extra": zoo.EXTRA_MODELS, "imagenet": zoo.IMAGENET_MODELS,
                        "segmentation": sorted(SEGMENTATION_MODELS)}
    named = {r["name"]: r["authors_names"] for r in rows}
    assert named["resnet18_deconv"] == ["resnet"] and named["fcn_resnet50_deconv"] == ["fcn_resnet50d"]
    # Every name of REFERENCE_ARCHS is shown beside the model it resolves to.
    assert sorted(n for names in named.values() for n in names) == sorted(zoo.REFERENCE_ARCHS)
    assert all(r["tags"] == [] for r in rows[10:])
    assert main(["list", "--group", "segmentation", "fcn*"]) == 0
    out = capsys.readouterr().out
    assert "# the segmentation builders" in out and "fcn_resnet101d" in out and "resnet18_deconv" not in out
    assert main(["list", "no_such_model*"]) == 0
    assert "no zoo model matches" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(zoo.ZOO_MODELS))
def test_features_only_matches_feature_info(name):
    model = timm.create_model(name, features_only=True).eval()
    with torch.no_grad():
        features = model(torch.randn(1, 3, 32, 32))
    info = model.feature_info
    assert len(features) == len(info.channels()) >= 3
    for feature, chs, reduction in zip(features, info.channels(), info.reduction(), strict=True):
        assert feature.shape[1:] == (chs, 32 // reduction, 32 // reduction)
