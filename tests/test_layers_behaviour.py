"""Behaviour the reference gets wrong or leaves unchecked: bias=False, autocast, channels_last,
torch.compile, clear errors on bad input, the NaN guard, extra_repr, the eval fold cache, deconvolve()."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import ndeconv
from ndeconv import Delinear, FastDeconv, deconvolve


def _correlated(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    """Inputs with neighbouring-pixel and channel correlation, so whitening is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    if x.dim() == 4:
        x = x + 0.7 * x.roll(1, dims=3) + 0.5 * x.roll(1, dims=1)
    return x + 0.3


def _train_step(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    layer.train()
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad


class _Net(nn.Module):
    """A small all-deconvolution network: stem, strided conv, 1x1, grouped conv, Delinear head."""

    def __init__(self, small: bool = False) -> None:
        super().__init__()
        layers = [FastDeconv(3, 32, 3, stride=2, padding=1), nn.ReLU()]
        if not small:
            layers += [FastDeconv(32, 32, 1), nn.ReLU()]
        layers += [FastDeconv(32, 32, 3, padding=1, groups=4), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = Delinear(32, 10, block=16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


# -- bias=False, no deprecation warnings, no prints ---------------------------------------------


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=3, groups=4)])
def test_fast_deconv_without_bias_trains_and_folds(kwargs, capsys):
    torch.manual_seed(0)
    layer = FastDeconv(8, 12, bias=False, **kwargs).double()
    assert layer.bias is None
    x = _correlated(4, 8, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's deprecated addmm/baddbmm overloads
        y, grad_x = _train_step(layer, x)
        assert torch.isfinite(grad_x).all() and layer.weight.grad is not None
        layer.eval()
        with torch.no_grad():
            y_eval = layer(x)
    fused = layer.fuse()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), y_eval, rtol=1e-10, atol=1e-10)
    assert capsys.readouterr().out == ""


def test_delinear_without_bias_trains_and_folds(capsys):
    torch.manual_seed(0)
    layer = Delinear(16, 5, bias=False, block=8).double()
    x = _correlated(32, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train_step(layer, x)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer.fuse()(x), layer(x), rtol=1e-10, atol=1e-10)
    assert capsys.readouterr().out == ""


# -- precision and memory format ----------------------------------------------------------------


@pytest.mark.parametrize("layer_cls", ["fast_deconv", "delinear"])
def test_autocast_bf16_keeps_statistics_in_float32(layer_cls):
    torch.manual_seed(0)
    if layer_cls == "fast_deconv":
        layer, x = FastDeconv(8, 16, 3, padding=1), _correlated(8, 8, 12, 12, dtype=torch.float32)
    else:
        layer, x = Delinear(32, 10, block=16), _correlated(64, 32, dtype=torch.float32)
    ref = _clone_layer(layer)
    ref.train()(x)
    layer.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # the conv/linear itself does run in reduced precision
    assert layer.running_deconv.dtype == torch.float32
    # Covariance and Newton–Schulz in bf16 would be off by ~1e-2; in float32 they match the float32 run.
    torch.testing.assert_close(layer.running_deconv, ref.running_deconv, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)


def test_bf16_input_gets_float32_statistics():
    torch.manual_seed(0)
    layer = FastDeconv(8, 16, 3, padding=1)
    x = _correlated(8, 8, 12, 12, dtype=torch.float32).bfloat16()
    ref = _clone_layer(layer)
    ref.train()(x.float())
    layer.bfloat16().train()
    layer(x)
    # Statistics from the bf16-rounded input, computed in float32, stored in the layer's bf16 buffers.
    torch.testing.assert_close(layer.running_deconv.float(), ref.running_deconv, rtol=2e-2, atol=2e-3)


def _clone_layer(layer: nn.Module) -> nn.Module:
    return copy.deepcopy(layer)


@pytest.mark.parametrize(
    "kwargs",
    [dict(kernel_size=3, padding=1), dict(kernel_size=1), dict(kernel_size=1, stride=2), dict(kernel_size=3, groups=8),
     dict(kernel_size=3, padding=1, block=8)],
)
def test_channels_last_input_gives_the_same_result(kwargs):
    """Same numbers in either memory format, and the layer keeps the format it is given, as nn.Conv2d does (a
    one-block 1x1 layer used to switch an NCHW model to channels-last, slowing every mixed-format op after it)."""
    torch.manual_seed(0)
    a = FastDeconv(16, 16, **kwargs).double()
    b = _clone_layer(a).to(memory_format=torch.channels_last)
    x = _correlated(4, 16, 10, 10)
    y_a, gx_a = _train_step(a, x)
    y_b, gx_b = _train_step(b, x.to(memory_format=torch.channels_last))
    assert y_a.is_contiguous() and gx_a.is_contiguous()
    assert y_b.is_contiguous(memory_format=torch.channels_last) and not y_b.is_contiguous()
    assert gx_b.is_contiguous(memory_format=torch.channels_last) and not gx_b.is_contiguous()
    torch.testing.assert_close(y_b, y_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx_b, gx_a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.weight.grad, a.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.running_deconv, a.running_deconv, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "backend",
    [
        # dynamo capture + AOT autograd (where graph breaks and functionalisation would bite): about 70 s here;
        pytest.param("aot_eager", marks=pytest.mark.slow),
        # the default backend generates and compiles C++: a minute or more on 2 cores
        pytest.param("inductor", marks=pytest.mark.slow),
    ],
)
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    # Inductor compiles C++ for every kernel of the unrolled Newton-Schulz iterations (minutes on 2 cores for the
    # whole net): it gets one FastDeconv, the layer whose sampling, statistics and fold graph-break most easily;
    # aot_eager checks the whole net (Delinear included) and its eval graph.
    eager = _Net(small=True) if backend != "inductor" else nn.Sequential(FastDeconv(3, 16, 3, stride=2, padding=1))
    compiled_net = _clone_layer(eager)
    compiled = torch.compile(compiled_net, backend=backend)
    x = _correlated(8, 3, 12, 12, dtype=torch.float32)
    y_e, gx_e = _train_step(eager, x)
    y_c, gx_c = _train_step(compiled, x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-4)
    if backend == "inductor":
        torch.testing.assert_close(compiled_net[0].running_deconv, eager[0].running_deconv, rtol=1e-4, atol=1e-5)
        return  # the eval graph is another whole compile: the aot_eager case checks it
    torch.testing.assert_close(compiled_net.head.running_deconv, eager.head.running_deconv, rtol=1e-4, atol=1e-5)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)


def test_extra_repr_shows_the_whitening_settings():
    text = repr(FastDeconv(16, 32, 3, block=8, eps=1e-3, n_iter=7, sampling_stride=2, stride=2))
    for part in ("block=8", "eps=0.001", "n_iter=7", "sampling_stride=4"):
        assert part in text, f"{part} missing from {text}"
    text = repr(Delinear(64, 10, block=32, eps=1e-3, n_iter=3))
    for part in ("block=32", "eps=0.001", "n_iter=3"):
        assert part in text


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(block=0), ["block", "positive"]),
        (dict(block=-4), ["block"]),
        (dict(n_iter=0), ["n_iter"]),
        (dict(eps=0.0), ["eps"]),
        (dict(eps=-1e-5), ["eps"]),
        (dict(eps=float("nan")), ["eps"]),
        (dict(momentum=1.5), ["momentum"]),
        (dict(sampling_stride=0), ["sampling_stride"]),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, words):
    with pytest.raises(ValueError, match="FastDeconv") as info:
        FastDeconv(8, 8, 3, **kwargs)
    assert all(w in str(info.value) for w in words), str(info.value)
    if "sampling_stride" not in kwargs:
        with pytest.raises(ValueError, match="Delinear"):
            Delinear(8, 4, **kwargs)


def test_wrong_input_gets_a_clear_error():
    layer = FastDeconv(8, 16, 3, padding=1)
    with pytest.raises(ValueError, match=r"FastDeconv.*3 channels.*in_channels=3"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"FastDeconv.*4-D input"):
        layer(torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match=r"Delinear.*in_features=12"):
        Delinear(16, 4)(torch.randn(4, 12))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_input_smaller_than_the_kernel_is_named(training):
    """A 2x2 image under an unpadded 3x3 kernel: training failed with "cannot reshape tensor of 0 elements"."""
    layer = FastDeconv(3, 8, 3, padding=0).train(training)
    with pytest.raises(ValueError, match=r"FastDeconv\(3, 8.*2x2 pixels is smaller than the kernel's 3x3"):
        layer(torch.randn(2, 3, 2, 2))
    dilated = FastDeconv(3, 8, 3, padding=1, dilation=3).train(training)
    with pytest.raises(ValueError, match=r"4x4 pixels \(6x6 padded\) is smaller than the \(dilated\) kernel's 7x7"):
        dilated(torch.randn(2, 3, 4, 4))
    assert dilated(torch.randn(1, 3, 5, 5)).shape == (1, 8, 1, 1)  # exactly the kernel's span: fine


@pytest.mark.parametrize("layer_cls", ["fast_deconv", "delinear", "channel_deconv", "channel_deconv_no_pixels"])
def test_empty_training_batch_is_named(layer_cls):
    """No samples to take statistics from: one error naming the layer (was a reshape error or ZeroDivisionError),
    the running statistics untouched; in eval an empty batch passes through as in nn.Conv2d."""
    if layer_cls == "fast_deconv":
        layer, x = FastDeconv(3, 8, 3, padding=1), torch.randn(0, 3, 8, 8)
    elif layer_cls == "delinear":
        layer, x = Delinear(8, 4), torch.randn(0, 8)
    else:
        layer = ndeconv.ChannelDeconv(4)
        x = torch.randn(0, 8, 4, 4) if layer_cls == "channel_deconv" else torch.randn(2, 8, 0, 4)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=rf"{type(layer).__name__}\(.*batch .*skip empty batches"):
        layer.train()(x)
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())
    assert layer.eval()(x).shape[0] == x.shape[0]


@pytest.mark.parametrize("layer_cls", ["fast_deconv", "delinear"])
def test_wrong_input_dtype_is_refused_before_any_state_changes(layer_cls):
    """fp16 into a float32 layer, outside autocast: the conv/linear fails, but it used to fail after the running
    statistics (and the freeze counter, and fast mode's step) had moved. Under torch.autocast, reduced-precision
    activations are what a float32 layer is meant to get."""
    torch.manual_seed(0)
    if layer_cls == "delinear":
        layer, x = Delinear(16, 4, block=8), _correlated(32, 16, dtype=torch.float32)
    else:
        layer, x = FastDeconv(8, 8, 3, padding=1, freeze=True, freeze_iter=5), _correlated(4, 8, 8, 8,
                                                                                           dtype=torch.float32)
        ndeconv.set_fast_mode(layer, 2)
    layer.train()(x)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    plain = {k: getattr(layer, k) for k in ("counter", "_fast_step") if hasattr(layer, k)}
    for bad in (x.half(), x.double()):
        with pytest.raises(TypeError, match=rf"{type(layer).__name__}\(.*input is {bad.dtype} but the layer's "
                                            r"weights are torch.float32.*torch.autocast") as info:
            layer(bad)
        assert "\n" not in str(info.value)
        for key, value in layer.state_dict().items():
            assert torch.equal(value, state[key]), f"{key} changed by a refused input"
        assert {k: getattr(layer, k) for k in plain} == plain
    with pytest.raises(TypeError, match="floating-point input"):
        layer(x.to(torch.int32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and not torch.equal(layer.running_mean, state["running_mean"])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("layer_cls", ["fast_deconv", "fast_deconv_grouped", "delinear"])
def test_non_finite_batch_raises_and_leaves_running_statistics(layer_cls, bad):
    torch.manual_seed(0)
    if layer_cls == "delinear":
        layer, x = Delinear(16, 4, block=8).double(), _correlated(32, 16)
    else:
        groups = 4 if layer_cls == "fast_deconv_grouped" else 1
        layer, x = FastDeconv(8, 8, 3, padding=1, groups=groups).double(), _correlated(4, 8, 8, 8)
    _train_step(layer, x)  # running statistics away from their initial values
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    poisoned = x.clone()
    poisoned.view(-1)[5] = bad
    with pytest.raises(FloatingPointError, match="non-finite"):
        _train_step(layer, poisoned)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} changed by a rejected batch"


# -- eval fold cache ----------------------------------------------------------------------------


def test_fold_cached_under_inference_mode_does_not_break_a_later_input_gradient():
    """A frozen eval model: one forward under inference_mode, then a saliency-style input gradient (as nn.Conv2d)."""
    torch.manual_seed(0)
    layer = FastDeconv(3, 4, 3, padding=1)
    layer.train()(torch.randn(4, 3, 8, 8))
    layer.eval().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        expected = layer(x)
    x.requires_grad_(True)
    y = layer(x)
    y.sum().backward()
    assert torch.equal(y.detach(), expected) and x.grad is not None


@pytest.mark.parametrize("layer_cls", ["fast_deconv", "delinear"])
def test_eval_fold_cache_reuses_and_invalidates(layer_cls, monkeypatch):
    torch.manual_seed(0)
    if layer_cls == "delinear":
        layer, x = Delinear(16, 4, block=8).double(), _correlated(32, 16)
    else:
        layer, x = FastDeconv(8, 8, 3, padding=1).double(), _correlated(4, 8, 8, 8)
    _train_step(layer, x)
    layer.eval()
    calls = []
    original = type(layer).folded_weight_bias

    def counting(self, mean, deconv):
        calls.append(1)
        return original(self, mean, deconv)

    monkeypatch.setattr(type(layer), "folded_weight_bias", counting)
    with torch.no_grad():
        y1 = layer(x)
        y2 = layer(x)
        assert len(calls) == 1, "eval rebuilt the folded weights although nothing changed"
        assert torch.equal(y1, y2)

        def fresh() -> torch.Tensor:
            w, b = original(layer, layer.running_mean, layer.running_deconv)
            return _apply(layer, x, w, b)

        layer.weight.mul_(1.5)  # in place: same storage, bumped version
        y3 = layer(x)
        assert len(calls) == 2 and not torch.allclose(y3, y1)
        torch.testing.assert_close(y3, fresh(), rtol=0, atol=0)
        layer.running_deconv.mul_(0.5)
        y4 = layer(x)
        assert len(calls) == 3
        torch.testing.assert_close(y4, fresh(), rtol=0, atol=0)
        if layer.bias is not None:
            layer.bias.add_(1.0)
            assert not torch.equal(layer(x), y4)
            assert len(calls) == 4
        layer.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()})
        layer(x)
        assert len(calls) == 5
        # An edit through .data bumps no version counter (autograd cannot see it either); setting the mode
        # again, as model.eval() does, drops the cache.
        layer.weight.data.mul_(2.0)
        layer.eval()
        torch.testing.assert_close(layer(x), fresh(), rtol=0, atol=0)
        assert len(calls) == 6
    # With gradients wanted the fold must stay differentiable: no cache.
    y = layer(x)
    assert y.requires_grad


@pytest.mark.parametrize("layer_cls", ["fast_deconv", "fast_deconv_1x1", "delinear"])
def test_eval_fold_cache_sees_reassigned_parameters(layer_cls):
    """``layer.weight = nn.Parameter(...)``: after two such reassignments the allocator hands the first weight's
    storage to the third, whose version counter is 0 again. A key of address and version matched, and eval
    returned the first weight's output; the cache must tell the tensors apart, however often they are replaced."""
    torch.manual_seed(0)
    if layer_cls == "delinear":
        layer, x = Delinear(64, 32, block=16).double(), _correlated(32, 64)
    elif layer_cls == "fast_deconv_1x1":
        layer, x = FastDeconv(16, 16, 1).double(), _correlated(4, 16, 8, 8)
    else:
        layer, x = FastDeconv(8, 16, 3, padding=1).double(), _correlated(4, 8, 8, 8)
    _train_step(layer, x)
    layer.eval()
    stale = 0
    with torch.no_grad():
        for _ in range(8):  # where the allocator puts each weight varies: many tries, all must be fresh
            for times in (1, 2, 3, 4):
                for _ in range(times):
                    layer.weight = nn.Parameter(torch.randn(layer.weight.shape, dtype=torch.float64))
                    if layer.bias is not None and times == 3:
                        layer.bias = nn.Parameter(torch.randn(layer.bias.shape, dtype=torch.float64))
                y = layer(x)
                w, b = layer.folded_weight_bias(layer.running_mean, layer.running_deconv)
                stale += not torch.equal(y, _apply(layer, x, w, b))
    assert stale == 0, f"eval returned a replaced weight's output {stale} times in 32"
    # Nor does the cache keep a replaced weight alive.
    import weakref

    old = weakref.ref(layer.weight)
    with torch.no_grad():
        layer(x)
        layer.weight = nn.Parameter(torch.randn(layer.weight.shape, dtype=torch.float64))
    assert old() is None


def test_channel_deconv_eval_follows_reassigned_buffers():
    """ChannelDeconv keeps no fold cache: its eval output always comes from the buffers it holds now."""
    torch.manual_seed(0)
    layer = ndeconv.ChannelDeconv(4).double()
    x = _correlated(4, 8, 6, 6)
    layer.train()(x)
    layer.eval()
    with torch.no_grad():
        before = layer(x)
        layer.running_deconv = 2 * layer.running_deconv
        after = layer(x)
    weight, bias = layer.affine(8)
    expected = torch.einsum("oc,nchw->nohw", weight, x) + bias.view(1, -1, 1, 1)
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=1e-12)


def _apply(layer: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if isinstance(layer, Delinear):
        return torch.nn.functional.linear(x, w, b)
    return torch.nn.functional.conv2d(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


# -- deconvolve ---------------------------------------------------------------------------------


def _timm_resnet18() -> nn.Module:
    import timm

    return timm.create_model("resnet18", pretrained=False, num_classes=10)


def _torchvision_resnet18() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


@pytest.mark.parametrize("build", [_timm_resnet18, _torchvision_resnet18], ids=["timm", "torchvision"])
def test_deconvolve_resnet18(build):
    torch.manual_seed(0)
    model = build()
    convs = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
    stem_weight = model.conv1.weight.detach().clone()
    deconvolve(model, block=16)  # small whitening blocks keep the test quick; kwargs reach every layer
    converted = [n for n, m in model.named_modules() if isinstance(m, FastDeconv)]
    assert converted == convs
    assert all(m.block == min(16, m.in_channels) for m in model.modules() if isinstance(m, FastDeconv))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "a conv's BatchNorm survived"
    assert torch.equal(model.conv1.weight, stem_weight), "the conv's weights were not carried over"

    x = _correlated(4, 3, 32, 32, dtype=torch.float32)
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.arange(4))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())

    model.eval()
    with torch.no_grad():
        expected = model(x)
    clone = deconvolve(build(), block=16)
    clone.load_state_dict(model.state_dict())  # strict: same keys, same shapes
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)


def test_deconvolve_stem_only_and_errors():
    model = deconvolve(_torchvision_resnet18(), which="stem", block=3)
    deconvs = [m for m in model.modules() if isinstance(m, FastDeconv)]
    assert len(deconvs) == 1 and model.conv1 is deconvs[0] and isinstance(model.bn1, nn.Identity)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    with pytest.raises(ValueError, match="which"):
        deconvolve(_torchvision_resnet18(), which="head")
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        deconvolve(nn.Sequential(nn.Linear(3, 3)))


def test_deconvolve_keeps_the_activation_of_a_norm_act_layer():
    # timm's BatchNormAct2d is a BatchNorm2d carrying its activation: removing the norm must keep the ReLU.
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU))
    deconvolve(model, block=3)
    assert isinstance(model[0], FastDeconv) and isinstance(model[1], nn.ReLU)
    assert model(_correlated(2, 3, 8, 8, dtype=torch.float32)).min() >= 0


def test_deconvolve_gives_a_bias_where_the_norm_went():
    model = deconvolve(_torchvision_resnet18(), block=16)
    assert torch.equal(model.conv1.bias, torch.zeros(64))  # the shift BatchNorm's beta gave, starting at zero
    assert all(m.bias is not None for m in model.modules() if isinstance(m, FastDeconv))
    model = deconvolve(_torchvision_resnet18(), block=16, bias=False)  # the caller's choice wins
    assert all(m.bias is None for m in model.modules() if isinstance(m, FastDeconv))


def test_deconvolve_changes_nothing_when_a_conv_cannot_convert():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match=r"cannot convert 2 .*nothing was changed"):
        deconvolve(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]
    # FastDeconv's own refusal (a non-square stride) comes after the first conv was planned: still unchanged
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, stride=(1, 2)))
    with pytest.raises(ValueError, match="only square strides"):
        deconvolve(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d]


def test_public_api():
    for name in ("FastDeconv", "Delinear", "ChannelDeconv", "deconvolve"):
        assert hasattr(ndeconv, name)


@pytest.mark.parametrize("calibrate", [False, True], ids=["plain", "calibrated"])
def test_deconvolve_refuses_a_shared_conv_the_same_on_both_paths(calibrate: bool) -> None:
    """One conv module registered twice would become two FastDeconvs with their own weights (twice the
    parameters), silently: refused, with the model unchanged."""
    from ndeconv import deconvolve

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.again = self.conv

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.again(torch.relu(self.conv(x)))

    model = Shared()
    with pytest.raises(ValueError, match="conv and again are one conv module used twice"):
        deconvolve(model, calibrate=[torch.randn(2, 3, 8, 8)] if calibrate else None)
    assert type(model.conv) is nn.Conv2d and model.conv is model.again
