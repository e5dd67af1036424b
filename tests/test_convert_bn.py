"""Exact conversion of a trained BatchNorm network into deconvolution (``deconvolve(model, calibrate=batches)``,
``ndeconv convert-bn``): the converted network's eval outputs are the BatchNorm network's on held-out data (1e-9
relative in float64, 1e-4 in float32) for every zoo BatchNorm form, timm's resnet18/resnet50/efficientnet_b0/
mobilenetv3_large_100/convnext_atto and torchvision's resnet18; its statistics are the limit of the running
averages on the calibration batches; it folds, exports, saves and reloads."""

from __future__ import annotations

import copy
import gzip
import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ndeconv
from ndeconv.cli import main
from ndeconv.convert import export_onnx, fold, output_difference
from ndeconv.layers import FastDeconv, isqrt_newton_schulz
from ndeconv.layers._conv import plain_conv_type
from ndeconv.layers._patch_stats import patch_statistics
from ndeconv.layers.calibrate import CalibrationError

pytestmark = pytest.mark.usefixtures("one_thread")

# Whitening block of the sweep: 16 keeps the per-layer eigendecompositions small (144 x 144 for a 3x3 conv) on two
# CPU cores; the conversion's layout code is the same for any block, and timm's resnet18 runs the default 64.
SWEEP_BLOCK = 16


def correlated(batch: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Pixel- and channel-correlated images with an offset: whitening far from the identity, a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool2d(torch.randn(batch, channels, size + 2, size + 2, generator=g), 3, 1)
    mix = torch.randn(channels, channels, generator=g) + 1.5
    return torch.einsum("dc,nchw->ndhw", mix, x) + 0.5


def trained_bn(model: nn.Module, channels: int = 3, size: int = 32) -> nn.Module:
    """``model`` with random BatchNorm affines (timm zero-inits some gammas, which would hide their branches) and
    running statistics set by a few train-mode batches; returned in eval mode."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
        model.train()
        for seed in (10, 11):
            model(correlated(4, channels, size, seed))
    return model.eval()


def timm_model(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **kwargs)

    return build


def torchvision_resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10)


def zoo_bn(name: str) -> Callable[[], nn.Module]:
    return timm_model(name, deconv=False)


def convert_exactly(model: nn.Module, dtype: torch.dtype, block: int) -> tuple[nn.Module, float]:
    """A converted copy of ``model`` in ``dtype`` and its worst relative eval-output error on held-out images."""
    reference = copy.deepcopy(model).to(dtype).eval()
    converted = copy.deepcopy(reference)
    calibration = [correlated(2, seed=1).to(dtype)]  # averaging over batches: test_calibration_is_the_limit_...
    ndeconv.deconvolve(converted, calibrate=calibration, block=block)
    held_out = correlated(3, seed=99).to(dtype)
    with torch.no_grad():
        _, rel = output_difference(reference(held_out), converted(held_out))
    return converted, rel


def check_conversion(build: Callable[[], nn.Module], block: int, batchnorms_left: int = 0) -> tuple[float, float]:
    model = trained_bn(build())
    convs = sum(plain_conv_type(m) is nn.Conv2d for m in model.modules())
    norms = [type(m) for m in model.modules() if isinstance(m, nn.LayerNorm)]
    errors = []
    for dtype, bound in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        converted, rel = convert_exactly(model, dtype, block)
        errors.append(rel)
        assert rel <= bound, f"{dtype}: converted vs BatchNorm network relative error {rel:.3g} > {bound:g}"
        assert not any(plain_conv_type(m) for m in converted.modules())
        assert sum(isinstance(m, FastDeconv) for m in converted.modules()) == convs
        left = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(left) == batchnorms_left  # only BatchNorms that do not follow a conv stay
        assert [type(m) for m in converted.modules() if isinstance(m, nn.LayerNorm)] == norms
    # Not a trivial identity: the calibrated whitening is far from I, so the weights had to be solved for.
    stem = next(m for m in converted.modules() if isinstance(m, FastDeconv))
    eye = torch.eye(stem.num_features, dtype=stem.running_deconv.dtype)
    assert (stem.running_deconv - eye).abs().max() > 0.1
    return errors[0], errors[1]


MODELS = {
    "timm:resnet18": (timm_model("resnet18", num_classes=10), 64, 0),
    "timm:resnet50": (timm_model("resnet50", num_classes=10), SWEEP_BLOCK, 0),
    "timm:efficientnet_b0": (timm_model("efficientnet_b0", num_classes=10), SWEEP_BLOCK, 0),
    "timm:mobilenetv3_large_100": (timm_model("mobilenetv3_large_100", num_classes=10), SWEEP_BLOCK, 0),
    # No BatchNorm at all: every conv converts with its own weight and bias, the LayerNorms stay.
    "timm:convnext_atto": (timm_model("convnext_atto", num_classes=10), SWEEP_BLOCK, 0),
    "torchvision:resnet18": (torchvision_resnet18, SWEEP_BLOCK, 0),
    "zoo:efficientnet_b0_deconv": (zoo_bn("efficientnet_b0_deconv"), SWEEP_BLOCK, 0),
    "zoo:mobilenetv2_deconv": (zoo_bn("mobilenetv2_deconv"), SWEEP_BLOCK, 0),
    "zoo:pnasnet_a_deconv": (zoo_bn("pnasnet_a_deconv"), SWEEP_BLOCK, 0),
    # Pre-activation blocks: the BatchNorm before a block's first conv stays (it follows a residual sum).
    "zoo:preact_resnet18_deconv": (zoo_bn("preact_resnet18_deconv"), SWEEP_BLOCK, 8),
    "zoo:resnet18_deconv": (zoo_bn("resnet18_deconv"), SWEEP_BLOCK, 0),
    "zoo:senet18_deconv": (zoo_bn("senet18_deconv"), SWEEP_BLOCK, 8),
    "zoo:vgg16_deconv": (zoo_bn("vgg16_deconv"), SWEEP_BLOCK, 0),
}
HEAVY = {
    "zoo:densenet121_deconv": (zoo_bn("densenet121_deconv"), SWEEP_BLOCK, 62),
    "zoo:dpn92_deconv": (zoo_bn("dpn92_deconv"), SWEEP_BLOCK, 0),
    "zoo:resnext29_32x4d_deconv": (zoo_bn("resnext29_32x4d_deconv"), SWEEP_BLOCK, 0),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_network_computes_the_batchnorm_networks_eval_function(name: str) -> None:
    build, block, left = MODELS[name]
    check_conversion(build, block, left)


@pytest.mark.slow
def test_heavy_zoo_architectures_convert_exactly() -> None:
    for build, block, left in HEAVY.values():
        check_conversion(build, block, left)


def test_stem_only_converts_the_first_conv_exactly() -> None:
    model = trained_bn(zoo_bn("resnet18_deconv")()).double()
    converted = copy.deepcopy(model)
    ndeconv.deconvolve(converted, which="stem", calibrate=[correlated(4, seed=1).double()], block=SWEEP_BLOCK)
    assert isinstance(converted.conv1, FastDeconv) and isinstance(converted.bn1, nn.Identity)
    assert sum(isinstance(m, FastDeconv) for m in converted.modules()) == 1
    assert type(converted.layer1[0].conv1) is nn.Conv2d and isinstance(converted.layer1[0].bn1, nn.BatchNorm2d)
    x = correlated(3, seed=99).double()
    with torch.no_grad():
        assert output_difference(model(x), converted(x))[1] <= 1e-9


# -- the statistics: the limit of the running averages ---------------------------------------------------------

LAYERS = {
    "3x3, two channel blocks": dict(in_channels=8, out_channels=6, kernel_size=3, padding=1, block=4),
    "3x3 depthwise, stride 2": dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, padding=1, groups=6),
    "1x1": dict(in_channels=8, out_channels=4, kernel_size=1, block=8),
}


def _fresh(like: FastDeconv, momentum: float) -> FastDeconv:
    """A new FastDeconv with ``like``'s geometry and settings, to train."""
    return FastDeconv(like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding,
                      like.dilation, like.groups, block=like.block, eps=like.eps, n_iter=like.n_iter,
                      momentum=momentum, sampling_stride=like.sampling_stride // like.stride[0],
                      dtype=torch.float64).train()


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", list(LAYERS))
def test_calibration_is_the_limit_of_a_training_runs_running_averages(name: str) -> None:
    spec = dict(LAYERS[name])
    block = spec.pop("block", 64)
    channels = spec["in_channels"]
    net = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                        nn.Conv2d(**spec, bias=False), nn.BatchNorm2d(spec["out_channels"]))
    net = trained_bn(net, channels, 12).double()
    # Batches of different spread: their whitening matrices differ, so averaging them is not whitening their pool.
    batches = [correlated(3, channels, 12, seed=s).double() * scale for s, scale in ((1, 1.0), (2, 3.0), (3, 0.5))]
    converted = ndeconv.deconvolve(copy.deepcopy(net), calibrate=batches, block=block)
    with torch.no_grad():  # what the second conv reads: the first block's eval output (the function is unchanged)
        inputs = [[x, net[:3](x)] for x in batches]
    for index, layer in ((0, converted[0]), (1, converted[3])):
        seen = [pair[index] for pair in inputs]
        # A cumulative average (momentum 1/(k+1) at step k): the running averages of a long run, exactly.
        cumulative = _fresh(layer, 1.0)
        with torch.no_grad():
            for k, x in enumerate(seen):
                cumulative.momentum = 1.0 / (k + 1)
                cumulative(x)
        assert _close(cumulative.running_mean, layer.running_mean) <= 1e-12
        assert _close(cumulative.running_deconv, layer.running_deconv) <= 1e-12
        # The paper's constant momentum cycling over the same batches: once the start is forgotten (0.9**270), the
        # running values over one cycle average to the calibration (sum R' = (1 - m) sum R + m sum S on the cycle).
        running = _fresh(layer, 0.1)
        cycle = []
        with torch.no_grad():
            for step in range(90):
                for x in seen:
                    running(x)
                    if step == 89:
                        cycle.append((running.running_mean.clone(), running.running_deconv.clone()))
        assert _close(sum(c[0] for c in cycle) / 3, layer.running_mean) <= 1e-10
        assert _close(sum(c[1] for c in cycle) / 3, layer.running_deconv) <= 1e-10
    # Not the whitening of the pooled covariance: training averages D, not the covariance.
    layer = converted[0]
    _, pooled = patch_statistics(torch.cat(batches), layer._sampler(), layer.eps, layer.groups)
    pooled_deconv = isqrt_newton_schulz(pooled, layer.n_iter) if layer.groups == 1 else None
    if pooled_deconv is not None:
        assert _close(pooled_deconv, layer.running_deconv) > 1e-2


def test_one_dimensional_networks_convert_exactly() -> None:
    # deconvolve() turns Conv1d (+ BatchNorm1d) into FastDeconv1d; its statistics come from the layer's own
    # (N, C, 1, L) view, which for a 1-tap kernel is the sampled signal itself.
    layer_1d = pytest.importorskip("ndeconv.layers.fast_deconv1d")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(4, 8, 1, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Conv1d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Conv1d(8, 6, 5, padding=2)).double()

    def signals(seed: int) -> torch.Tensor:  # random walks: strongly correlated neighbours, a non-zero mean
        g = torch.Generator().manual_seed(seed)
        return torch.randn(3, 4, 40, generator=g, dtype=torch.float64).cumsum(-1) * 0.3 + 1.0

    with torch.no_grad():
        net.train()
        for seed in (10, 11):
            net(signals(seed))
    net.eval()
    batches = [signals(1), signals(2)]
    converted = ndeconv.deconvolve(copy.deepcopy(net), calibrate=batches, block=4)
    assert all(isinstance(converted[i], layer_1d.FastDeconv1d) for i in (0, 3, 6))
    x = signals(99)
    with torch.no_grad():
        assert output_difference(net(x), converted(x))[1] <= 1e-9
    stem = converted[0]
    cumulative = layer_1d.FastDeconv1d(4, 8, 1, bias=False, block=4, dtype=torch.float64).train()
    with torch.no_grad():
        for k, x in enumerate(batches):
            cumulative.momentum = 1.0 / (k + 1)
            cumulative(x)
    assert _close(cumulative.running_deconv, stem.running_deconv) <= 1e-12
    assert _close(cumulative.running_mean, stem.running_mean) <= 1e-12


# -- what cannot be converted exactly: refused, the model unchanged -------------------------------------------


class _NormBeforeConv(nn.Module):
    """A conv and a BatchNorm registered in that order, but the norm runs first."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class _ConvReadTwice(nn.Module):
    """The conv's output goes to the BatchNorm and around it: removing the norm changes the second path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("case", ["no running stats", "bias=False", "no batches", "norm before conv", "read twice"])
def test_inexact_conversions_are_refused_and_leave_the_model_alone(case: str) -> None:
    kwargs: dict = {}
    batches = [correlated(2, seed=1)]
    if case == "no running stats":
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
        match = "no running statistics"
    elif case == "bias=False":
        model, kwargs, match = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), {"bias": False}, "needs a bias"
    elif case == "no batches":
        model, batches, match = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), [], "no batches"
    elif case == "norm before conv":
        model, match = _NormBeforeConv(), "does not read its output"
    else:
        model, match = _ConvReadTwice(), "the model was restored"
    model = trained_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    with pytest.raises(CalibrationError, match=match):
        ndeconv.deconvolve(model, calibrate=batches, **kwargs)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_batchnorm_the_forward_never_calls_is_not_folded() -> None:
    # PreAct-ResNet's BatchNorm form registers a stem norm (conv1, bn1) its forward skips: folding its initial
    # statistics (1 / sqrt(1 + eps)) would scale the stem by 1 - 5e-6.
    model = trained_bn(zoo_bn("preact_resnet18_deconv")()).double()
    converted = ndeconv.deconvolve(copy.deepcopy(model), calibrate=[correlated(2, seed=1).double()],
                                   block=SWEEP_BLOCK)
    w, b = converted.conv1.folded_weight_bias(converted.conv1.running_mean, converted.conv1.running_deconv)
    assert _close(w, model.conv1.weight) <= 1e-12 and b.abs().max() <= 1e-12


# -- folding, export, the command ------------------------------------------------------------------------------


@pytest.mark.slow  # a converted ResNet-18 folded and exported: about 7 s
def test_converted_model_folds_and_exports_like_any_other(tmp_path: Path) -> None:
    model = trained_bn(zoo_bn("resnet18_deconv")())
    converted = ndeconv.deconvolve(copy.deepcopy(model), calibrate=[correlated(8, seed=1)], block=SWEEP_BLOCK)
    x = correlated(3, seed=99)
    folded = fold(converted)  # fold's own check: the folded outputs against the converted ones
    assert not any(isinstance(m, FastDeconv) for m in folded.modules())
    with torch.no_grad():
        assert output_difference(model(x), folded(x))[1] <= 1e-4
    result = export_onnx(converted, tmp_path / "converted.onnx", verify=True)
    assert result.verification is not None and result.verification.max_rel <= 1e-4


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(f"{path}.gz", "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(folder: Path, n: int = 24) -> None:
    """Smooth 28x28 images (a blurred random field: correlated pixels, as real ones) in the IDX layout."""
    g = torch.Generator().manual_seed(5)
    images = F.avg_pool2d(torch.rand(2 * n, 1, 32, 32, generator=g), 5, 1)[:, 0] * 255
    folder.mkdir()
    for split, part in (("train", images[:n]), ("t10k", images[n:])):
        _write_idx(folder / f"{split}-images-idx3-ubyte", part.numpy())
        _write_idx(folder / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)


def write_bn_source(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """A fake Fashion-MNIST folder and a BatchNorm ResNet-18 (gray stem, running statistics set) saved as a
    weights file with its config.json: what `ndeconv convert-bn` reads. Returns (data folder, weights file,
    the model)."""
    import timm
    from safetensors.torch import save_file

    data = tmp_path / "fashion"
    _fake_fashion_mnist(data)
    torch.manual_seed(0)
    bn = trained_bn(timm.create_model("resnet18_deconv", deconv=False, in_chans=1), channels=1)
    source = tmp_path / "bn" / "model.safetensors"
    source.parent.mkdir()
    save_file(bn.state_dict(), str(source))
    (source.parent / "config.json").write_text(json.dumps(
        {"architecture": "resnet18_deconv", "model_args": {"deconv": False, "in_chans": 1, "num_classes": 10}}))
    return data, source, bn


def test_convert_bn_command_writes_weights_that_reload_as_the_same_function(tmp_path: Path, capsys) -> None:

    from ndeconv.loading import load_model

    data, source, bn = write_bn_source(tmp_path)
    out = tmp_path / "out" / "converted.safetensors"
    argv = ["convert-bn", str(source), "--calibrate-data", "fashion_mnist", "--data-dir", str(data),
            "--calibrate-images", "16", "--batch-size", "8", "--check-images", "8", "--block", str(SWEEP_BLOCK),
            "-o", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "20 convs -> FastDeconv, 20 BatchNorms folded" in printed
    assert "calibrated on 16 images in 2 batches" in printed
    config = json.loads((out.parent / "config.json").read_text())
    assert config["deconvolve"] == {"bias": True, "which": "all", "block": SWEEP_BLOCK, "eps": 1e-5, "n_iter": 5,
                                    "sampling_stride": 3}
    assert config["conversion"]["check_rel"] <= 1e-4

    loaded = load_model(str(out)).model
    assert sum(isinstance(m, FastDeconv) for m in loaded.modules()) == 20
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert output_difference(bn(x), loaded(x))[1] <= 1e-4
        assert output_difference(bn(x), fold(loaded)(x))[1] <= 1e-4

    assert main(argv) != 0  # an existing output is kept without --force
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--force"]) == 0
