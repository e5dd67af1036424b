"""timm's own model tests over every registered ``*_deconv`` model.

A faithful copy of the model-test functions of timm's ``tests/test_models.py`` (pytorch-image-models, read at
version 1.0.29.dev0, the same functions as in the 1.0.31 release installed here; timm's wheel does not ship its
tests): ``test_model_forward``, ``test_model_backward``, ``test_model_default_cfgs`` and
``test_model_forward_features``, with timm's input-size targets (``_get_input_size``) and limits, over
``timm.list_models('*_deconv*')`` (``include_tags=True`` where timm's test lists tags too). Only the parametrisation
differs: our names instead of timm's, and the ImageNet-topology models (224x224, up to 138M parameters) marked slow
with their measured cost. timm applies ``test_model_default_cfgs`` and ``test_model_forward_features`` to every
model outside its ``NON_STD_FILTERS`` (vit_*, *mixer_*, ...): no zoo name matches one, so all run here, and every
registered model passes every check: no expected failures. The zoo models that cannot keep this contract (no
feature maps: ``mlp_deconv``, ``simple_v1_deconv``) are not registered with timm (``ndeconv.zoo.NDECONV_ONLY_MODELS``,
``zoo/_registry.py``); the last tests here check that timm refuses them as it refuses any unknown name and that
ndeconv still builds them.
"""

from __future__ import annotations

import fnmatch
import math

import pytest
import timm
import torch
from timm import create_model, get_pretrained_cfg_value
from timm.layers import get_channel_dim, get_spatial_dim

import ndeconv  # noqa: F401  (registers the zoo with timm)

pytestmark = pytest.mark.usefixtures("one_thread")

# timm's constants (tests/test_models.py), outside GitHub Actions.
EXCLUDE_FILTERS = ["*enormous*", "*_7b_*"]
TARGET_FWD_SIZE = MAX_FWD_SIZE = 384
TARGET_BWD_SIZE = 128
MAX_BWD_SIZE = 320
MAX_FWD_OUT_SIZE = 448
TARGET_FFEAT_SIZE = 96
MAX_FFEAT_SIZE = 256
# timm's models with extra conv/linear layers after pooling (its EARLY_POOL_MODELS): the unpooled-output checks
# of test_model_default_cfgs skip them. No zoo class is one (timm.models.VGG is timm's VGG, not ours).
EARLY_POOL_MODELS = (
    timm.models.EfficientVit, timm.models.EfficientVitLarge, timm.models.FasterNet, timm.models.HighPerfGpuNet,
    timm.models.GhostNet, timm.models.MetaNeXt, timm.models.MobileNetV3, timm.models.RepGhostNet, timm.models.VGG,
)

# The ImageNet-topology models at timm's sizes (224x224 for forward and cfgs, 128 backward, 96 features) cost up
# to 9 s each per test on 2 busy cores, about 77 s together; the CIFAR and MNIST models run at 32x32 and 28x28. The
# backward passes of the five largest CIFAR models (1.7-3.9 s each) run with the slow tests too; the quick part
# (about 75 tests) took 35 s beside a training run.
SLOW_PATTERNS = ("*_imagenet_deconv*",)
SLOW_BACKWARD = ("densenet121_deconv", "dpn92_deconv", "resnet34_deconv", "resnet50_deconv", "vgg19_deconv")


def _params(names: list[str], test: str = "") -> list:
    params = []
    for n in names:
        slow = any(fnmatch.fnmatch(n, p) for p in SLOW_PATTERNS) or (test == "test_model_backward"
                                                                       and n in SLOW_BACKWARD)
        params.append(pytest.param(n, marks=[pytest.mark.slow] if slow else []))
    return params


MODELS = timm.list_models("*_deconv*", exclude_filters=EXCLUDE_FILTERS)
MODELS_WITH_TAGS = timm.list_models("*_deconv*", exclude_filters=EXCLUDE_FILTERS, include_tags=True)
MODELS_MATCHING_CFG = timm.list_models("*_deconv*", exclude_filters=EXCLUDE_FILTERS, name_matches_cfg=True)


def test_every_registered_model_is_covered() -> None:
    # The zoo's 24 timm architectures (and their tagged weight sets for the cfg test): a registration that the
    # parametrisation missed would otherwise go untested. The two without feature maps are ndeconv's only.
    import ndeconv.zoo as zoo

    assert set(zoo.NDECONV_ONLY_MODELS) == {"mlp_deconv", "simple_v1_deconv"}
    assert set(MODELS) == set(zoo.ZOO_MODELS + zoo.EXTRA_MODELS + zoo.IMAGENET_MODELS) - set(zoo.NDECONV_ONLY_MODELS)
    assert set(MODELS_MATCHING_CFG) == set(MODELS)
    assert {n.partition(".")[0] for n in MODELS_WITH_TAGS} == set(MODELS)


@pytest.mark.parametrize("model_name", ["mlp_deconv", "simple_v1_deconv"])
def test_models_without_feature_maps_are_not_timm_models(model_name: str) -> None:
    """timm does not know them (its own unknown-model error, as for any name), ndeconv builds them with timm's
    keywords, and its pretrained_cfg says what timm's registry would."""
    import ndeconv.zoo as zoo

    assert not timm.is_model(model_name) and model_name not in timm.list_models("*_deconv*", include_tags=True)
    with pytest.raises(RuntimeError, match="has no pretrained cfg registered"):  # no cfg in timm's registry either
        get_pretrained_cfg_value(model_name, "input_size")
    with pytest.raises(RuntimeError, match=rf"^Unknown model \({model_name}\)$"):
        create_model(model_name)
    model = zoo.create_model(model_name, num_classes=3, in_chans=3).eval()
    assert model.pretrained_cfg["architecture"] == model_name and model.num_classes == 3
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 28, 28)
    assert tuple(zoo.get_pretrained_cfg(model_name).input_size) == (1, 28, 28)
    assert model(torch.rand(2, 3, 28, 28)).shape == (2, 3)


def _get_input_size(model=None, model_name="", target=None):  # noqa: ANN001, ANN202 - timm's helper, verbatim
    if model is None:
        assert model_name, "One of model or model_name must be provided"
        input_size = get_pretrained_cfg_value(model_name, "input_size")
        fixed_input_size = get_pretrained_cfg_value(model_name, "fixed_input_size")
        min_input_size = get_pretrained_cfg_value(model_name, "min_input_size")
    else:
        default_cfg = model.default_cfg
        input_size = default_cfg["input_size"]
        fixed_input_size = default_cfg.get("fixed_input_size", None)
        min_input_size = default_cfg.get("min_input_size", None)
    assert input_size is not None

    if fixed_input_size:
        return input_size

    if min_input_size:
        if target and max(input_size) > target:
            input_size = min_input_size
    else:
        if target and max(input_size) > target:
            input_size = tuple([min(x, target) for x in input_size])
    return input_size


@pytest.mark.parametrize("model_name", _params(MODELS))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward(model_name: str, batch_size: int) -> None:
    """timm's test_model_forward: one forward pass, no NaNs; grad checkpointing gives the same output."""
    model = create_model(model_name, pretrained=False)
    model.eval()

    input_size = _get_input_size(model=model, target=TARGET_FWD_SIZE)
    if max(input_size) > MAX_FWD_SIZE:
        pytest.skip("Fixed input size model > limit.")
    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)

    assert outputs.shape[0] == batch_size
    assert not torch.isnan(outputs).any(), "Output included NaNs"

    try:
        model.set_grad_checkpointing()
    except Exception:  # noqa: BLE001 - timm's: throws if not supported, that's fine
        pass
    else:
        outputs2 = model(inputs)
        if isinstance(outputs, tuple):
            outputs2 = torch.cat(outputs2)
        assert torch.allclose(outputs, outputs2, rtol=1e-4, atol=1e-5), "Output does not match"


@pytest.mark.parametrize("model_name", _params(MODELS_MATCHING_CFG, "test_model_backward"))
@pytest.mark.parametrize("batch_size", [2])
def test_model_backward(model_name: str, batch_size: int) -> None:
    """timm's test_model_backward: train-mode forward and backward with 42 classes; every parameter gets a
    gradient."""
    input_size = _get_input_size(model_name=model_name, target=TARGET_BWD_SIZE)
    if max(input_size) > MAX_BWD_SIZE:
        pytest.skip("Fixed input size model > limit.")

    model = create_model(model_name, pretrained=False, num_classes=42)
    encoder_only = model.num_classes == 0
    num_params = sum([x.numel() for x in model.parameters()])
    model.train()

    inputs = torch.randn((batch_size, *input_size))
    outputs = model(inputs)
    if isinstance(outputs, tuple):
        outputs = torch.cat(outputs)
    outputs.mean().backward()
    for n, x in model.named_parameters():
        assert x.grad is not None, f"No gradient for {n}"
    num_grad = sum([x.grad.numel() for x in model.parameters() if x.grad is not None])

    if encoder_only:
        output_fmt = getattr(model, "output_fmt", "NCHW")
        feat_axis = get_channel_dim(output_fmt)
        assert outputs.shape[feat_axis] == model.num_features
    else:
        assert outputs.shape[-1] == 42
    assert num_params == num_grad, "Some parameters are missing gradients"
    assert not torch.isnan(outputs).any(), "Output included NaNs"


@pytest.mark.parametrize("model_name", _params(MODELS_WITH_TAGS, "test_model_default_cfgs"))
@pytest.mark.parametrize("batch_size", [1])
def test_model_default_cfgs(model_name: str, batch_size: int) -> None:
    """timm's test_model_default_cfgs: forward_features is unpooled at the cfg's pool_size with num_features
    channels; forward_head(pre_logits=True) and reset_classifier(0) give head_hidden_size pooled features;
    reset_classifier(0, '') and create_model(num_classes=0, global_pool='') give the unpooled map; the cfg's
    classifier and first_conv name parameters."""
    model = create_model(model_name, pretrained=False)
    model.eval()
    assert getattr(model, "num_classes") >= 0  # noqa: B009 - timm's spelling
    assert getattr(model, "num_features") > 0  # noqa: B009
    assert getattr(model, "head_hidden_size") > 0  # noqa: B009
    state_dict = model.state_dict()
    cfg = model.default_cfg

    pool_size = cfg["pool_size"]
    input_size = model.default_cfg["input_size"]
    output_fmt = getattr(model, "output_fmt", "NCHW")
    spatial_axis = get_spatial_dim(output_fmt)
    assert len(spatial_axis) == 2
    feat_axis = get_channel_dim(output_fmt)

    if all([x <= MAX_FWD_OUT_SIZE for x in input_size]) and \
            not any([fnmatch.fnmatch(model_name, x) for x in EXCLUDE_FILTERS]):
        input_size = tuple([min(x, MAX_FWD_OUT_SIZE) for x in input_size])
        input_tensor = torch.randn((batch_size, *input_size))

        # forward_features (always unpooled) & forward_head w/ pre_logits
        outputs = model.forward_features(input_tensor)
        outputs_pre = model.forward_head(outputs, pre_logits=True)
        assert outputs.shape[spatial_axis[0]] == pool_size[0], f"unpooled feature shape {outputs.shape} != config"
        assert outputs.shape[spatial_axis[1]] == pool_size[1], f"unpooled feature shape {outputs.shape} != config"
        assert outputs.shape[feat_axis] == model.num_features
        assert outputs_pre.shape[1] == model.head_hidden_size

        # forward after deleting the classifier: pooled, size(-1) == head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0
        outputs = model.forward(input_tensor)
        assert len(outputs.shape) == 2
        assert outputs.shape[1] == model.head_hidden_size
        assert outputs.shape == outputs_pre.shape

        # forward after removing pooling and classifier
        if not isinstance(model, EARLY_POOL_MODELS):
            model.reset_classifier(0, "")
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

        # classifier + global pool deletion via __init__
        if "pruned" not in model_name and not isinstance(model, EARLY_POOL_MODELS):
            model = create_model(model_name, pretrained=False, num_classes=0, global_pool="").eval()
            outputs = model.forward(input_tensor)
            assert len(outputs.shape) == 4
            assert outputs.shape[spatial_axis[0]] == pool_size[0] and outputs.shape[spatial_axis[1]] == pool_size[1]

    # classifier name matches default_cfg
    if cfg.get("num_classes", None):
        classifier = cfg["classifier"]
        if not isinstance(classifier, (tuple, list)):
            classifier = classifier,
        for c in classifier:
            assert c + ".weight" in state_dict.keys(), f"{c} not in model params"

    # first conv(s) names match default_cfg
    first_conv = cfg["first_conv"]
    if isinstance(first_conv, str):
        first_conv = (first_conv,)
    assert isinstance(first_conv, (tuple, list))
    for fc in first_conv:
        assert fc + ".weight" in state_dict.keys(), f"{fc} not in model params"


@pytest.mark.parametrize("model_name", _params(MODELS, "test_model_forward_features"))
@pytest.mark.parametrize("batch_size", [1])
def test_model_forward_features(model_name: str, batch_size: int) -> None:
    """timm's test_model_forward_features: ``features_only=True`` gives at least 3 maps, each of its
    feature_info channels and at most the size its reduction gives."""
    model = create_model(model_name, pretrained=False, features_only=True)
    model.eval()
    expected_channels = model.feature_info.channels()
    expected_reduction = model.feature_info.reduction()
    assert len(expected_channels) >= 3  # all models here should have at least 3 default feat levels

    input_size = _get_input_size(model=model, target=TARGET_FFEAT_SIZE)
    if max(input_size) > MAX_FFEAT_SIZE:
        pytest.skip("Fixed input size model > limit.")
    output_fmt = getattr(model, "output_fmt", "NCHW")
    feat_axis = get_channel_dim(output_fmt)
    spatial_axis = get_spatial_dim(output_fmt)

    outputs = model(torch.randn((batch_size, *input_size)))
    assert len(expected_channels) == len(outputs)
    spatial_size = input_size[-2:]
    for e, r, o in zip(expected_channels, expected_reduction, outputs):  # noqa: B905 - timm's
        assert e == o.shape[feat_axis]
        assert o.shape[spatial_axis[0]] <= math.ceil(spatial_size[0] / r) + 1
        assert o.shape[spatial_axis[1]] <= math.ceil(spatial_size[1] / r) + 1
        assert o.shape[0] == batch_size
        assert not torch.isnan(o).any()
