"""timm's feature API on every zoo model: ``forward_intermediates``, ``prune_intermediate_layers``, ``feature_info``
and both ``features_only`` wrappers (forward hooks, the default; ``feature_cls='getter'``, which prunes the model
and calls ``forward_intermediates``).

One 32x32 image in eval mode. DenseNet-121 and DPN-92 run with one block per stage (the same code paths, a
fraction of the time); the other eight at full depth.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import ndeconv.zoo as zoo

# name -> kwargs that keep the test small (fewer blocks per stage, never other layer kinds).
SMALL = {"densenet121_deconv": dict(layers=(1, 1, 1, 1)), "dpn92_deconv": dict(layers=(1, 1, 1, 1))}
ALL = sorted(zoo.ZOO_MODELS)

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)  # the same weights for every wrapper of one model
    return timm.create_model(name, **SMALL.get(name, {}), **kwargs).eval()


def _image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(1, 3, 32, 32)


def test_all_ten_are_covered():
    assert len(ALL) == 10


@pytest.mark.parametrize("name", ALL)
def test_forward_intermediates(name):
    model, x = _model(name), _image()
    info = model.feature_info
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
        torch.testing.assert_close(final, features, rtol=0, atol=0)
        # One map per feature_info entry, of its channels and reduction.
        assert [m.shape[1:] for m in maps] == [(i["num_chs"], 32 // i["reduction"], 32 // i["reduction"]) for i in info]
        assert len(maps) >= 3

        only = model.forward_intermediates(x, intermediates_only=True)
        assert len(only) == len(maps) and all(torch.equal(a, b) for a, b in zip(only, maps, strict=True))
        # timm's indices: the last n (int), or those listed, negative from the end.
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert all(torch.equal(a, b) for a, b in zip(last_two, maps[-2:], strict=True))
        picked = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        assert torch.equal(picked[0], maps[0]) and torch.equal(picked[1], maps[-1])
        # stop_early ends at the last map wanted, which is then also the final output.
        early, (first,) = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert torch.equal(first, maps[0]) and torch.equal(early, maps[0])

    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(AssertionError, match="out of range"):
        model.forward_intermediates(x, indices=[len(info)])


@pytest.mark.parametrize("name", ALL)
def test_features_only_hook_and_getter_agree(name):
    x = _image()
    hooked = _model(name, features_only=True)
    getter = _model(name, features_only=True, feature_cls="getter")
    assert type(getter).__name__ == "FeatureGetterNet" and type(hooked).__name__ == "FeatureHookNet"
    assert getter.feature_info.channels() == hooked.feature_info.channels()
    assert getter.feature_info.reduction() == hooked.feature_info.reduction()
    with torch.no_grad():
        by_getter, by_hooks = getter(x), hooked(x)
    assert len(by_getter) == len(by_hooks) == len(getter.feature_info.channels())
    for a, b in zip(by_getter, by_hooks, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # out_indices reach the getter too (timm's create_model(..., out_indices=...)).
    last = _model(name, features_only=True, feature_cls="getter", out_indices=(-1,))
    with torch.no_grad():
        (deepest,) = last(x)
    torch.testing.assert_close(deepest, by_hooks[-1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_prune_intermediate_layers(name):
    model, x = _model(name), _image()
    with torch.no_grad():
        _, maps = model.forward_intermediates(x)
    params = sum(p.numel() for p in model.parameters())

    kept = model.prune_intermediate_layers(indices=[0, 1])
    assert kept == [0, 1] and len(model.feature_info) == 2
    # The stages after the second map, the tail and the head are gone; the features end at that map.
    assert sum(p.numel() for p in model.parameters()) < params
    assert model.num_features == model.feature_info[1]["num_chs"] == maps[1].shape[1]
    assert isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        final, pruned_maps = model.forward_intermediates(x)
        assert len(pruned_maps) == 2
        for a, b in zip(pruned_maps, maps[:2], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(final, maps[1], rtol=0, atol=0)
        torch.testing.assert_close(model.forward_features(x), maps[1], rtol=0, atol=0)
        assert model(x).shape == maps[1].shape  # no pooling, no classifier
    with pytest.raises(AssertionError, match="out of range"):
        model.forward_intermediates(x, indices=[2])


def test_prune_keeping_every_map_drops_only_tail_and_head():
    # MobileNetV2's tail (1x1 conv to 1280 channels) feeds only the head: it goes with it, the stages stay.
    model, x = _model("mobilenetv2_deconv"), _image()
    with torch.no_grad():
        _, maps = model.forward_intermediates(x)
    stages = len(model.layers)
    assert model.prune_intermediate_layers(indices=None) == list(range(7))
    assert len(model.layers) == stages and isinstance(model.conv2, nn.Identity) and model.num_features == 320
    with torch.no_grad():
        final, again = model.forward_intermediates(x)
    assert all(torch.equal(a, b) for a, b in zip(again, maps, strict=True)) and torch.equal(final, maps[-1])


def test_prune_without_head_pruning_keeps_the_classifier():
    # Every map kept and prune_head=False: nothing the features need is dropped, nor the head.
    model, x = _model("resnet18_deconv", deconv=False), _image()
    with torch.no_grad():
        expected = model(x)
    assert model.prune_intermediate_layers(indices=4, prune_head=False) == [0, 1, 2, 3]
    assert model.num_features == 512 and not isinstance(model.get_classifier(), nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_forward_intermediates_under_grad_checkpointing():
    # With checkpointing each block (and each block of a tapped stage) is one checkpoint: the maps are the same.
    model, x = _model("vgg16_deconv", deconv=False), _image()
    final, maps = model.forward_intermediates(x)
    model.set_grad_checkpointing(True)
    final_ckpt, maps_ckpt = model.forward_intermediates(x.requires_grad_())
    torch.testing.assert_close(final_ckpt, final)
    for a, b in zip(maps_ckpt, maps, strict=True):
        torch.testing.assert_close(a, b)
    (final_ckpt.sum() + maps_ckpt[0].sum()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
