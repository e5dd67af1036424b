"""FastDeconv1d (issue 22, 1-D deconvolution): the 2-D layer on height-1 signals, the plain whitening formula,
``fuse()`` to ``nn.Conv1d``, ``deconvolve()`` of Conv1d + BatchNorm1d, and a small 1-D ResNet trained, folded and
exported to ONNX."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from ndeconv.layers import (
    Delinear,
    FastDeconv,
    FastDeconv1d,
    deconvolve,
    isqrt_newton_schulz,
    isqrt_newton_schulz_batch,
    set_fast_mode,
)
from ndeconv.layers.grad_checkpoint import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# (in, out, kernel, stride, padding, dilation, groups, block, sampling_stride): the patch sampler's paths: disjoint
# samples (sampling stride >= kernel span) and overlapping ones, several blocks, grouped and depthwise convs,
# dilation, a strided conv (its stride multiplies the sampling stride), and the 1-tap kernel.
CONFIGS = {
    "k3-blocks": (8, 6, 3, 1, 1, 1, 1, 4, 3),
    "k3-overlap": (8, 6, 3, 1, 1, 1, 1, 4, 1),
    "k3-s2-d2": (6, 5, 3, 2, 2, 2, 1, 3, 1),
    "k5-grouped": (8, 4, 5, 1, 2, 1, 2, 4, 1),
    "k3-depthwise": (6, 6, 3, 1, 1, 1, 6, 64, 3),
    "k1": (8, 5, 1, 1, 0, 1, 1, 4, 1),
}
# Only for the formula: the 1-tap kernel with a total sampling stride above 1 and padding, where this layer keeps
# the unfold rule and the 2-D layer's 1x1 shortcut would not (module docstring).
FORMULA_ONLY = {
    "k1-s2-sampled": (8, 5, 1, 2, 1, 1, 1, 8, 3),
}


def _pair_of_layers(cfg: tuple[int, ...], **kwargs) -> tuple[FastDeconv1d, FastDeconv]:
    cin, cout, k, s, p, d, g, block, ss = cfg
    torch.manual_seed(0)
    one = FastDeconv1d(cin, cout, k, s, p, d, g, block=block, sampling_stride=ss, dtype=torch.float64, **kwargs)
    two = FastDeconv(cin, cout, (1, k), s, (0, p), (1, d), g, block=block, sampling_stride=ss, dtype=torch.float64,
                     **kwargs)
    with torch.no_grad():
        two.weight.copy_(one.weight.unsqueeze(2))
        two.bias.copy_(one.bias)
    return one, two


def _signal(n: int, c: int, length: int, seed: int = 1) -> torch.Tensor:
    # Correlated channels and neighbouring samples (a smoothed random walk), so the whitening is far from identity.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64)
    x = x + 0.8 * torch.roll(x, 1, 2) + 0.5 * x[:, :1]
    return 2.0 * x + 0.3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_2d_layer_on_height_one(name: str) -> None:
    """Forward, backward and running statistics equal FastDeconv's on the (N, C, 1, L) view, over training steps,
    in exact and fast mode, and in eval."""
    cfg = CONFIGS[name]
    one, two = _pair_of_layers(cfg)
    for fast in (False, True):
        if fast:  # a refresh step, then two steps reusing its whitening matrix
            assert set_fast_mode(one, 3) == set_fast_mode(two, 3) == 1
        for step in range(3):
            x1 = _signal(5, cfg[0], 23, seed=10 * fast + step).requires_grad_()
            x2 = x1.detach().unsqueeze(2).requires_grad_()
            y1, y2 = one(x1), two(x2)
            assert y1.shape == y2.shape[:2] + y2.shape[3:]
            assert (y1 - y2.squeeze(2)).abs().max() <= 1e-12
            grad = torch.randn(y1.shape, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            y1.backward(grad)
            y2.backward(grad.unsqueeze(2))
            assert (x1.grad - x2.grad.squeeze(2)).abs().max() <= 1e-12
            assert (one.weight.grad - two.weight.grad.squeeze(2)).abs().max() <= 1e-12
            assert (one.bias.grad - two.bias.grad).abs().max() <= 1e-12
            one.zero_grad(), two.zero_grad()
            assert (one.running_mean - two.running_mean).abs().max() <= 1e-12
            assert (one.running_deconv - two.running_deconv).abs().max() <= 1e-12
    assert not torch.allclose(one.running_deconv, torch.eye(one.num_features, dtype=torch.float64).expand_as(
        one.running_deconv)), "the statistics never moved: the comparison would be vacuous"
    one.eval(), two.eval()
    x = _signal(3, cfg[0], 17, seed=99)
    with torch.no_grad():
        assert (one(x) - two(x.unsqueeze(2)).squeeze(2)).abs().max() <= 1e-12


def test_freeze_equals_2d_layer() -> None:
    """``freeze=True``: the same steps update the statistics, then train on the running ones, as the 2-D layer."""
    one, two = _pair_of_layers(CONFIGS["k3-blocks"], freeze=True, freeze_iter=2)
    for step in range(5):
        x = _signal(4, 8, 19, seed=step)
        before = one.running_deconv.clone()
        assert (one(x) - two(x.unsqueeze(2)).squeeze(2)).abs().max() <= 1e-12
        assert one.counter == two.counter == step + 1
        assert torch.equal(one.running_deconv, two.running_deconv)
        assert torch.equal(one.running_deconv, before) == (step >= 3)  # frozen once counter > freeze_iter


def _patches(x: torch.Tensor, k: int, step: int, padding: int, dilation: int) -> torch.Tensor:
    """im2col of a 1-D signal: one row per window position ``0, step, 2 step, ...`` of the zero-padded signal,
    element ``c * k + j`` = channel c at tap j (nn.Conv1d's weight order); (N * positions, C * k)."""
    padded = F.pad(x, (padding, padding))
    cols = padded.unfold(2, dilation * (k - 1) + 1, step)[..., ::dilation]  # (N, C, positions, k)
    return cols.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * k)


def _eigh_isqrt(cov: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(cov)
    return vectors @ torch.diag_embed(values.rsqrt()) @ vectors.mT


def _newton_schulz(cov: torch.Tensor) -> torch.Tensor:
    # The layer's own inverse square root (5 iterations): then the patches, centring and fold alone are compared.
    return isqrt_newton_schulz(cov, 5) if cov.dim() == 2 else isqrt_newton_schulz_batch(cov, 5)


def _formula(x: torch.Tensor, layer: FastDeconv1d, isqrt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's training output by the definition: sample the patches, centre, ``D = (Cov + eps I)^{-1/2}``,
    whiten every conv window with D, multiply by the weight. Returns (output, mean, D).

    Ungrouped, a patch of ``C*k`` elements is split into ``C / block`` interleaved blocks (feature f of block g is
    element ``f * blocks + g``) sharing one mean and one D; grouped, each group's ``C/groups * k`` elements have
    their own mean and D."""
    (k,), (s,), (p,), (d,) = layer.kernel_size, layer.stride, layer.padding, layer.dilation
    n, c, _ = x.shape
    nf, g = layer.num_features, layer.groups
    sampled = _patches(x, k, layer.sampling_stride, p, d)
    windows = _patches(x, k, s, p, d)
    eye = torch.eye(nf, dtype=x.dtype)
    if g == 1:
        blocks = c * k // nf
        rows = sampled.reshape(-1, nf, blocks).transpose(1, 2).reshape(-1, nf)
        mean = rows.mean(0)
        centred = rows - mean
        deconv = isqrt(centred.mT @ centred / centred.shape[0] + layer.eps * eye)
        per_block = windows.reshape(-1, nf, blocks).transpose(1, 2)  # (windows, blocks, nf)
        white = ((per_block - mean) @ deconv.mT).transpose(1, 2).reshape(windows.shape)
        out = white @ layer.weight.reshape(layer.out_channels, -1).mT
    else:
        rows = sampled.view(-1, g, nf)
        mean = rows.mean(0)  # (groups, nf)
        centred = (rows - mean).transpose(0, 1)  # (groups, samples, nf)
        deconv = isqrt(centred.mT @ centred / centred.shape[1] + layer.eps * eye)
        white = torch.einsum("gij,wgj->wgi", deconv, windows.view(-1, g, nf) - mean)
        weight = layer.weight.reshape(g, layer.out_channels // g, nf)
        out = torch.einsum("goj,wgj->wgo", weight, white).reshape(windows.shape[0], -1)
    out = out + layer.bias
    return out.view(n, -1, layer.out_channels).transpose(1, 2), mean.reshape(-1), deconv


@pytest.mark.parametrize("name", list(CONFIGS) + list(FORMULA_ONLY))
def test_equals_unfold_centre_gram_formula(name: str) -> None:
    """One training step against the formula: with the layer's own Newton–Schulz, forward, gradients and the
    statistics to 1e-12; with the exact inverse square root (eigh) and enough iterations to converge, to 1e-10."""
    cin, cout, k, s, p, d, g, block, ss = {**CONFIGS, **FORMULA_ONLY}[name]
    torch.manual_seed(0)
    x = _signal(6, cin, 29).requires_grad_()
    grad = torch.randn(6, cout, (29 + 2 * p - d * (k - 1) - 1) // s + 1, dtype=torch.float64)
    for n_iter, isqrt, tol in ((5, _newton_schulz, 1e-12), (60, _eigh_isqrt, 1e-10)):
        layer = FastDeconv1d(cin, cout, k, s, p, d, g, block=block, sampling_stride=ss, n_iter=n_iter, momentum=1.0,
                             dtype=torch.float64)
        y = layer(x)
        expected, mean, deconv = _formula(x, layer, isqrt)
        assert y.shape == expected.shape
        scale = expected.abs().max()
        assert (y - expected).abs().max() <= tol * scale
        # momentum=1: the running statistics are this batch's
        assert (layer.running_mean - mean).abs().max() <= tol * mean.abs().max()
        assert (layer.running_deconv - deconv).abs().max() <= tol * deconv.abs().max()
        if n_iter == 5:
            got = torch.autograd.grad(y, [x, layer.weight, layer.bias], grad)
            want = torch.autograd.grad(expected, [x, layer.weight, layer.bias], grad)
            for a, b in zip(got, want, strict=True):
                assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_fuse_gives_the_eval_conv1d() -> None:
    """After training steps, eval equals ``fuse()``'s nn.Conv1d (plain state_dict: weight (out, in/groups, k),
    bias), for a dense and a grouped layer; the layer's own state_dict has the Conv1d weight layout too."""
    for groups in (1, 2):
        torch.manual_seed(0)
        layer = FastDeconv1d(6, 4, 3, stride=2, padding=1, groups=groups, block=3, dtype=torch.float64)
        assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
            "weight": (4, 6 // groups, 3), "bias": (4,), "running_mean": (9,) if groups == 1 else (18,),
            "running_deconv": (9, 9) if groups == 1 else (2, 9, 9)}
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        for step in range(4):
            opt.zero_grad()
            layer(_signal(4, 6, 20, seed=step)).square().mean().backward()
            opt.step()
        layer.eval()
        conv = layer.fuse()
        assert type(conv) is nn.Conv1d
        assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((3,), (2,), (1,), groups)
        assert {k: tuple(v.shape) for k, v in conv.state_dict().items()} == {"weight": (4, 6 // groups, 3),
                                                                             "bias": (4,)}
        x = _signal(3, 6, 31, seed=7)
        with torch.no_grad():
            expected, got = layer(x), conv(x)
        assert (expected - got).abs().max() <= 1e-9 * expected.abs().max()
        # A real fold: the trained whitening changes the output against the bare weights.
        plain = F.conv1d(x, layer.weight, layer.bias, 2, 1, 1, groups)
        assert (plain - got).abs().max() > 1e-3 * expected.abs().max()


def test_rejects_what_conv1d_would_not_take() -> None:
    layer = FastDeconv1d(4, 4, 5)
    with pytest.raises(ValueError, match=r"expected a 3-D input \(N, C, L\)"):
        layer(torch.randn(2, 4, 1, 9))
    with pytest.raises(ValueError, match="shorter than the kernel's span of 5"):
        layer(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="FastDeconv1d.*kernel_size must be an int or a 1-tuple"):
        FastDeconv1d(4, 4, (3, 3))
    with pytest.raises(ValueError, match="FastDeconv1d.*padding must be an int"):
        FastDeconv1d(4, 4, 3, padding="same")


def test_deconvolve_replaces_conv1d_and_its_batchnorm1d() -> None:
    """deconvolve() turns each Conv1d into a FastDeconv1d carrying its weights and geometry and drops the
    BatchNorm1d right after it; a BatchNorm1d after a Linear stays, as do 2-D convs' rules in a mixed model."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(3, 8, 5, padding=2, bias=False), nn.BatchNorm1d(8), nn.ReLU(),
        nn.Conv1d(8, 8, 3, stride=2, dilation=2, groups=2), nn.BatchNorm1d(8), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 4), nn.BatchNorm1d(4),
    ).double()
    convs = [copy.deepcopy(model[0]), copy.deepcopy(model[3])]
    deconvolve(model, block=4)
    assert [type(m).__name__ for m in model] == [
        "FastDeconv1d", "Identity", "ReLU", "FastDeconv1d", "Identity", "ReLU", "AdaptiveAvgPool1d", "Flatten",
        "Linear", "BatchNorm1d"]
    x = _signal(2, 3, 16)
    for layer, conv in zip((model[0], model[3]), convs, strict=True):
        assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups) == (
            conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        assert torch.equal(layer.weight, conv.weight) and layer.bias is not None
        # Untrained (identity whitening, zero mean), the layer in eval is the conv it replaced (the removed norm's
        # place taken by a zero bias, or the conv's own).
        layer.eval()
        with torch.no_grad():
            want = conv(x) if conv.bias is not None else F.conv1d(x, conv.weight, None, conv.stride, conv.padding,
                                                                  conv.dilation, conv.groups)
            assert (layer(x) - want).abs().max() <= 1e-12
        x = F.relu(want)

    stem_only = deconvolve(nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.Conv1d(4, 4, 3)), which="stem")
    assert [type(m).__name__ for m in stem_only] == ["FastDeconv1d", "Identity", "Conv1d"]
    mixed = deconvolve(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(2), nn.Conv1d(4, 4, 3),
                                     nn.BatchNorm1d(4)))
    # In an image network a Conv1d is no image convolution (timm's ECA gates convolve the pooled channels): only
    # the network's own dimensionality is deconvolved.
    assert [type(m).__name__ for m in mixed] == ["FastDeconv", "Identity", "Flatten", "Conv1d", "BatchNorm1d"]
    eca = timm.create_model("ecaresnet26t", pretrained=False)
    gates = [m for m in eca.modules() if type(m) is nn.Conv1d]
    deconvolve(eca)
    assert gates and [m for m in eca.modules() if type(m) is nn.Conv1d] == gates


def test_checkpointed_step_equals_plain_step() -> None:
    """Under ndeconv's gradient checkpointing the recompute changes no state: gradients and statistics equal a
    plain step's."""
    torch.manual_seed(0)
    plain = nn.Sequential(FastDeconv1d(4, 6, 3, padding=1, block=2), nn.ReLU(), FastDeconv1d(6, 4, 1)).double()
    assert_checkpointed_step_is_plain(plain, _signal(3, 4, 15))


def assert_checkpointed_step_is_plain(plain: nn.Module, x: torch.Tensor) -> None:
    """A checkpointed training step of a copy of ``plain`` leaves the state and gradients of a plain step."""
    ckpt = copy.deepcopy(plain)
    plain(x).square().sum().backward()
    checkpoint(ckpt, x).square().sum().backward()
    for a, b in zip(plain.state_dict().values(), ckpt.state_dict().values(), strict=True):
        assert (a - b).abs().max() <= 1e-12
    for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max() <= 1e-12


# -- a small 1-D ResNet: trained, folded, exported ------------------------------------------------------------------


class BasicBlock1d(nn.Module):
    """ResNet's basic block in 1-D deconvolution form: FastDeconv1d convs, no norm, a FastDeconv1d 1-tap projection
    shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = FastDeconv1d(cin, cout, 3, stride, 1)
        self.conv2 = FastDeconv1d(cout, cout, 3, 1, 1)
        self.shortcut = FastDeconv1d(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class ResNet1d(nn.Module):
    """Stem, two basic blocks (the second downsampling), global average pool, Delinear head: Fashion-MNIST images
    read as 28-channel signals of 28 samples (each image row a channel)."""

    def __init__(self, channels: int = 28, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = FastDeconv1d(channels, width, 3, padding=1)
        self.layer1 = BasicBlock1d(width, width, 1)
        self.layer2 = BasicBlock1d(width, 2 * width, 2)
        self.head = Delinear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(F.relu(self.stem(x))))
        return self.head(x.mean(2))


def _rows_batch(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST test images as (count, 28 rows, 28 pixels) in [0, 1]; where the dataset is not installed, a
    seeded synthetic task of the same shape (class-dependent frequencies in noise) takes its place."""
    from ndeconv.datasets import FASHION_MNIST_DIR, load_split

    if Path(FASHION_MNIST_DIR).is_dir():
        source = load_split("fashion_mnist", "test")
        images = source.batch(torch.arange(count))[:, 0, 2:30, 2:30]  # load_split centres 28x28 in 32x32
        return images.float() / 255, source.labels[:count]
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (count,), generator=g)
    t = torch.arange(28.0)
    phase = torch.rand(count, 28, 1, generator=g) * 6.28
    signal = torch.sin((1 + labels.view(-1, 1, 1)) * 0.2 * t + phase)
    return signal + 0.3 * torch.randn(count, 28, 28, generator=g), labels


def train_lowers_the_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """``steps`` SGD steps over three batches of 32 of ``(x, y)``: everything stays finite and the loss on all of
    ``x`` ends below the first step's. Leaves the model in eval mode."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        batch = slice(32 * (step % 3), 32 * (step % 3 + 1))
        opt.zero_grad()
        loss = F.cross_entropy(model(x[batch]), y[batch])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(t).all() for t in (*model.parameters(), *model.buffers()))
    assert torch.isfinite(torch.tensor(losses)).all()
    with torch.no_grad():
        trained = F.cross_entropy(model(x), y).item()
    assert trained < losses[0], f"{steps} SGD steps did not lower the training loss: {losses}, then {trained}"
    model.eval()


def assert_folds_alike(model: nn.Module, probe: torch.Tensor, conv_type: type[nn.Module]) -> nn.Module:
    """timm's walk and ndeconv.convert.fold give the same plain network (``conv_type``, Linear), equal to the
    unfolded eval model in float64 to rounding of the fold; returns ndeconv's."""
    from timm.utils.model import reparameterize_model

    from ndeconv.convert import fold

    wide, probe = copy.deepcopy(model).double(), probe.double()
    with torch.no_grad():
        expected = wide(probe)
    by_timm = reparameterize_model(copy.deepcopy(wide))
    by_ndeconv = fold(wide, example_input=probe)
    for plain in (by_timm, by_ndeconv):
        kinds = {type(m) for m in plain.modules()}
        assert conv_type in kinds and not any(issubclass(k, (FastDeconv, Delinear)) for k in kinds)
        with torch.no_grad():
            assert (plain(probe) - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert dict(by_timm.state_dict().items()).keys() == dict(by_ndeconv.state_dict().items()).keys()
    return by_ndeconv


def test_resnet1d_trains_folds_and_exports_verified_onnx(tmp_path: Path) -> None:
    from ndeconv.convert import fold
    from ndeconv.convert.export import verify_onnx

    x, y = _rows_batch(96)
    torch.manual_seed(0)
    model = ResNet1d()
    train_lowers_the_loss(model, x, y, steps=6)
    assert_folds_alike(model, x[:8], nn.Conv1d)

    # ONNX: the folded float32 network, dynamic batch, verified by onnxruntime (onnx.checker, plain ops with stored
    # weights only, outputs to 1e-4 relative) against the unfolded PyTorch model.
    folded = fold(model, example_input=x[:8])
    path = tmp_path / "resnet1d.onnx"
    torch.onnx.export(folded, (x[:2],), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: "batch"},))
    result = verify_onnx(path, model, {"rows": x[:16], "one": x[16:17]}, rtol=1e-4)
    assert result.ops.get("Conv") == 6 and {"Gemm", "MatMul"} & result.ops.keys()
    assert result.max_rel <= 1e-4
