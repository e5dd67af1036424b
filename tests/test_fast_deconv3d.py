"""FastDeconv3d (issue 22, 3-D deconvolution): the 2-D layer on depth-1 volumes, the plain 3-D unfold-centre-Gram
formula, ``fuse()`` to ``nn.Conv3d``, ``deconvolve()`` of Conv3d + BatchNorm3d (exact with calibration), and a
small 3-D network trained, folded and exported to verified ONNX."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_fast_deconv1d import (
    _eigh_isqrt,
    _newton_schulz,
    assert_checkpointed_step_is_plain,
    assert_folds_alike,
    train_lowers_the_loss,
)
from torch import nn

from ndeconv.errors import NdeconvError
from ndeconv.layers import Delinear, FastDeconv, FastDeconv3d, deconvolve

pytestmark = pytest.mark.usefixtures("one_thread")

# (in, out, kernel, stride, padding, dilation, groups, block, sampling_stride): the sampler's paths on the depth
# windows' stacks (disjoint and overlapping samples, several blocks, grouped and depthwise convs), depth dilation
# and padding, an uneven kernel with in-plane dilation, strided convs (a stride multiplies the sampling stride along
# its axis: cubic, video's (1, 2, 2) and a temporal (2, 1, 1)), the (kd, 1, 1) temporal conv and the 1x1x1
# projection (both take the 2-D layer's 1x1 rule in-plane).
CONFIGS = {
    "k3-blocks": (6, 5, 3, 1, 1, 1, 1, 3, 3),
    "k3-overlap": (6, 5, 3, 1, 1, 1, 1, 3, 1),
    "k3-s2-d2": (4, 5, (3, 3, 3), 2, (2, 1, 1), (2, 1, 1), 1, 2, 1),
    "k3-s122": (4, 5, 3, (1, 2, 2), 1, 1, 1, 2, 2),
    "k235-uneven": (4, 5, (2, 3, 5), 1, (0, 1, 2), (1, 2, 1), 1, 4, 2),
    "k311-s211": (4, 5, (3, 1, 1), (2, 1, 1), (1, 0, 0), 1, 1, 2, 1),
    "k3-grouped": (6, 4, 3, 1, 1, 1, 2, 3, 1),
    "k3-depthwise": (4, 4, 3, 1, 1, 1, 4, 64, 2),
    "k311-temporal": (6, 5, (3, 1, 1), 1, (1, 0, 0), 1, 1, 3, 2),
    "k1": (6, 5, 1, 1, 0, 1, 1, 3, 1),
}


def _volume(n: int, c: int, size: tuple[int, int, int], seed: int = 1) -> torch.Tensor:
    # Correlated channels and neighbouring voxels, so the whitening is far from identity.
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *size, generator=g, dtype=torch.float64)
    x = x + 0.8 * torch.roll(x, 1, 2) + 0.6 * torch.roll(x, 1, 4) + 0.5 * x[:, :1]
    return 2.0 * x + 0.3


def _layer(cfg: tuple, **kwargs) -> FastDeconv3d:
    cin, cout, k, s, p, d, g, block, ss = cfg
    return FastDeconv3d(cin, cout, k, s, p, d, g, block=block, sampling_stride=ss, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize("name", ["k3-blocks", "k3-overlap", "k3-grouped", "k1"])
def test_equals_2d_layer_on_depth_one(name: str) -> None:
    """A (1, kh, kw) kernel on volumes of depth 1 is the 2-D layer on the one slice: forward, gradients, running
    statistics, over training steps and in eval."""
    cin, cout, k, s, p, d, g, block, ss = CONFIGS[name]
    torch.manual_seed(0)
    three = FastDeconv3d(cin, cout, (1, k, k), s, (0, p, p), (1, d, d), g, block=block, sampling_stride=ss,
                         dtype=torch.float64)
    two = FastDeconv(cin, cout, k, s, p, d, g, block=block, sampling_stride=ss, dtype=torch.float64)
    with torch.no_grad():
        two.weight.copy_(three.weight[:, :, 0])
        two.bias.copy_(three.bias)
    for step in range(3):
        x = _volume(3, cin, (1, 11, 11), seed=step).requires_grad_()
        y3, y2 = three(x)[:, :, 0], two(x[:, :, 0])
        assert (y3 - y2).abs().max() <= 1e-12 * y2.abs().max()
        g3 = torch.autograd.grad(y3.square().sum(), [x, three.weight])
        g2 = torch.autograd.grad(y2.square().sum(), [x, two.weight])
        assert (g3[0] - g2[0]).abs().max() <= 1e-12 * g2[0].abs().max()
        assert (g3[1][:, :, 0] - g2[1]).abs().max() <= 1e-12 * g2[1].abs().max()
        assert torch.equal(three.running_mean, two.running_mean)
        assert torch.equal(three.running_deconv, two.running_deconv)
    three.eval(), two.eval()
    x = _volume(2, cin, (1, 9, 9), seed=9)
    with torch.no_grad():
        assert (three(x)[:, :, 0] - two(x[:, :, 0])).abs().max() <= 1e-12 * two(x[:, :, 0]).abs().max()


def _unfold3d(x: torch.Tensor, kernel, steps, padding, dilation) -> torch.Tensor:
    """im2col of a volume: one row per window at positions ``0, step, 2 step, ...`` of the zero-padded volume along
    each axis (``steps`` per axis), element ``((c * kd + a) * kh + b) * kw + e`` (nn.Conv3d's weight order);
    (windows, C * kd*kh*kw)."""
    (pd, ph, pw) = padding
    cols = F.pad(x, (pw, pw, ph, ph, pd, pd))
    for axis, (k, d, step) in enumerate(zip(kernel, dilation, steps, strict=True)):
        cols = cols.unfold(2 + axis, d * (k - 1) + 1, step)[..., ::d]  # appends the tap axis
    # (N, C, Z, Y, X, kd, kh, kw) -> (N, Z, Y, X, C, kd, kh, kw)
    return cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, x.shape[1] * kernel[0] * kernel[1] * kernel[2])


def _sampled_patches(x: torch.Tensor, layer: FastDeconv3d) -> torch.Tensor:
    """The patches the module docstring says are sampled: the sampling stride times the conv stride per axis (the
    layer's ``depth_sampling_stride``, ``sampling_stride``), a 3-D unfold with those steps, except an in-plane 1x1
    kernel: depth windows every depth step, then every ``step**2``-th pixel of their (window, H, W)-ordered
    batch."""
    kernel, padding, dilation = layer.kernel_size, layer.padding, layer.dilation
    sampling = layer.sampling_stride // layer.stride[1]  # the argument the layer was built with
    depth_step, step = sampling * layer.stride[0], sampling * layer.stride[1]
    if kernel[1:] != (1, 1):
        return _unfold3d(x, kernel, (depth_step, step, step), padding, dilation)
    kd, dd, pd = kernel[0], dilation[0], padding[0]
    windows = F.pad(x, (0, 0, 0, 0, pd, pd)).unfold(2, dd * (kd - 1) + 1, depth_step)[..., ::dd]  # (N, C, Z, H, W, kd)
    return windows.permute(0, 2, 3, 4, 1, 5).reshape(-1, x.shape[1] * kd)[:: step**2]


def _formula(x: torch.Tensor, layer: FastDeconv3d, isqrt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's training output by the definition (as tests/test_fast_deconv1d.py's, in 3-D): sample the patches,
    centre, ``D = (Cov + eps I)^{-1/2}`` per block layout or group, whiten every conv window, multiply by the
    weight. Returns (output, mean, D)."""
    n, c = x.shape[:2]
    nf, g, out_channels = layer.num_features, layer.groups, layer.out_channels
    sampled = _sampled_patches(x, layer)
    windows = _unfold3d(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
    eye = torch.eye(nf, dtype=x.dtype)
    if g == 1:
        blocks = windows.shape[1] // nf
        rows = sampled.reshape(-1, nf, blocks).transpose(1, 2).reshape(-1, nf)
        mean = rows.mean(0)
        centred = rows - mean
        deconv = isqrt(centred.mT @ centred / centred.shape[0] + layer.eps * eye)
        per_block = windows.reshape(-1, nf, blocks).transpose(1, 2)
        white = ((per_block - mean) @ deconv.mT).transpose(1, 2).reshape(windows.shape)
        out = white @ layer.weight.reshape(out_channels, -1).mT
    else:
        rows = sampled.view(-1, g, nf)
        mean = rows.mean(0)
        centred = (rows - mean).transpose(0, 1)
        deconv = isqrt(centred.mT @ centred / centred.shape[1] + layer.eps * eye)
        white = torch.einsum("gij,wgj->wgi", deconv, windows.view(-1, g, nf) - mean)
        weight = layer.weight.reshape(g, out_channels // g, nf)
        out = torch.einsum("goj,wgj->wgo", weight, white).reshape(windows.shape[0], -1)
    out = out + layer.bias
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
               zip(x.shape[2:], layer.padding, layer.dilation, layer.kernel_size, layer.stride, strict=True)]
    return out.view(n, *spatial, out_channels).permute(0, 4, 1, 2, 3), mean.reshape(-1), deconv


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equals_unfold_centre_gram_formula(name: str) -> None:
    """One training step against the formula: with the layer's own Newton–Schulz, forward, gradients and the
    statistics to 1e-12; with the exact inverse square root (eigh) and enough iterations to converge, to 1e-10."""
    torch.manual_seed(0)
    x = _volume(3, CONFIGS[name][0], (7, 9, 8)).requires_grad_()
    for n_iter, isqrt, tol in ((5, _newton_schulz, 1e-12), (60, _eigh_isqrt, 1e-10)):
        layer = _layer(CONFIGS[name], n_iter=n_iter, momentum=1.0)
        y = layer(x)
        expected, mean, deconv = _formula(x, layer, isqrt)
        assert y.shape == expected.shape
        assert (y - expected).abs().max() <= tol * expected.abs().max()
        # momentum=1: the running statistics are this batch's
        assert (layer.running_mean - mean).abs().max() <= tol * mean.abs().max()
        assert (layer.running_deconv - deconv).abs().max() <= tol * deconv.abs().max()
        if n_iter == 5:
            grad = torch.randn(y.shape, dtype=torch.float64)
            got = torch.autograd.grad(y, [x, layer.weight, layer.bias], grad)
            want = torch.autograd.grad(expected, [x, layer.weight, layer.bias], grad)
            for a, b in zip(got, want, strict=True):
                assert (a - b).abs().max() <= 1e-12 * b.abs().max()


def test_fuse_gives_the_eval_conv3d() -> None:
    """After training steps, eval equals ``fuse()``'s nn.Conv3d (weight (out, in/groups, kd, kh, kw), bias), for a
    dense and a grouped layer; the layer's own state_dict has the Conv3d weight layout too."""
    for groups in (1, 2):
        torch.manual_seed(0)
        layer = FastDeconv3d(4, 6, 3, stride=2, padding=1, groups=groups, block=2, dtype=torch.float64)
        nf = 27 * 2
        assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == {
            "weight": (6, 4 // groups, 3, 3, 3), "bias": (6,), "running_mean": (nf,) if groups == 1 else (27 * 4,),
            "running_deconv": (nf, nf) if groups == 1 else (2, nf, nf)}
        opt = torch.optim.SGD(layer.parameters(), lr=0.05)
        for step in range(3):
            opt.zero_grad()
            layer(_volume(3, 4, (6, 8, 8), seed=step)).square().mean().backward()
            opt.step()
        layer.eval()
        conv = layer.fuse()
        assert type(conv) is nn.Conv3d
        assert (conv.kernel_size, conv.stride, conv.padding, conv.groups) == ((3,) * 3, (2,) * 3, (1,) * 3, groups)
        x = _volume(2, 4, (5, 9, 7), seed=7)
        with torch.no_grad():
            expected, got = layer(x), conv(x)
        assert (expected - got).abs().max() <= 1e-9 * expected.abs().max()
        # A real fold: the trained whitening changes the output against the bare weights.
        plain = F.conv3d(x, layer.weight, layer.bias, 2, 1, 1, groups)
        assert (plain - got).abs().max() > 1e-3 * expected.abs().max()


def test_rejects_what_conv3d_would_not_take() -> None:
    layer = FastDeconv3d(4, 4, (3, 5, 5))
    with pytest.raises(ValueError, match=r"expected a 5-D input \(N, C, D, H, W\)"):
        layer(torch.randn(2, 4, 9, 9))
    with pytest.raises(ValueError, match="a volume of 2x9x9 voxels is smaller than the kernel's span of 3x5x5"):
        layer(torch.randn(2, 4, 2, 9, 9))
    with pytest.raises(ValueError, match="input has 3 channels but the layer was built for 4"):
        layer(torch.randn(2, 3, 4, 9, 9))
    with pytest.raises(ValueError, match=r"FastDeconv3d.*in-plane stride must be square, \(sd, s, s\)"):
        FastDeconv3d(4, 4, 3, stride=(1, 2, 1))
    assert "depth_sampling_stride=3" in repr(FastDeconv3d(4, 4, 3, stride=(1, 2, 2)))
    with pytest.raises(ValueError, match="FastDeconv3d.*kernel_size must be an int or a 3-tuple"):
        FastDeconv3d(4, 4, (3, 3))
    with pytest.raises(ValueError, match="FastDeconv3d.*padding must be an int or a 3-tuple"):
        FastDeconv3d(4, 4, 3, padding="same")


def _bn_net() -> nn.Sequential:
    """Conv3d + BatchNorm3d pairs (a strided one, a grouped one, a temporal (3, 1, 1) one) and a classifier."""
    return nn.Sequential(
        nn.Conv3d(2, 6, 3, padding=1, bias=False), nn.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 6, 3, stride=2, padding=1, groups=2), nn.BatchNorm3d(6), nn.ReLU(),
        nn.Conv3d(6, 8, (3, 1, 1), padding=(1, 0, 0)), nn.BatchNorm3d(8), nn.ReLU(),
        nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(8, 3),
    ).double()


def test_deconvolve_replaces_conv3d_and_batchnorm3d_exactly_with_calibration() -> None:
    """deconvolve() turns each Conv3d into a FastDeconv3d carrying its geometry and drops the BatchNorm3d after it;
    with ``calibrate``, the converted network's eval output is the trained BatchNorm network's (float64, 1e-9)."""
    torch.manual_seed(0)
    model = _bn_net().train()
    with torch.no_grad():  # running statistics from a few train-mode batches, as a trained network has them
        for seed in range(4):
            model(_volume(4, 2, (6, 10, 10), seed=seed))
    model.eval()
    held_out = _volume(3, 2, (6, 10, 10), seed=50)
    with torch.no_grad():
        expected = model(held_out)
    converted = deconvolve(copy.deepcopy(model), block=3, calibrate=[_volume(4, 2, (6, 10, 10), seed=s)
                                                                     for s in range(10, 13)])
    assert [type(m).__name__ for m in converted][:9] == [
        "FastDeconv3d", "Identity", "ReLU", "FastDeconv3d", "Identity", "ReLU", "FastDeconv3d", "Identity", "ReLU"]
    layer = converted[3]
    assert (layer.kernel_size, layer.stride, layer.padding, layer.groups) == ((3,) * 3, (2,) * 3, (1,) * 3, 2)
    assert not (layer.running_deconv == torch.eye(layer.num_features, dtype=torch.float64)).all()
    with torch.no_grad():
        got = converted.eval()(held_out)
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()
    stem_only = deconvolve(_bn_net(), which="stem")
    assert [type(m).__name__ for m in stem_only][:4] == ["FastDeconv3d", "Identity", "ReLU", "Conv3d"]


def test_checkpointed_step_equals_plain_step() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(FastDeconv3d(3, 4, 3, padding=1, block=3), nn.ReLU(), FastDeconv3d(4, 3, 1)).double()
    assert_checkpointed_step_is_plain(plain, _volume(2, 3, (5, 6, 6)))


# -- a small 3-D network: trained, folded, exported ----------------------------------------------------------------


class VolumeNet(nn.Module):
    """A (2+1)-D-style clip classifier: a 3x3x3 stem, a (1, 3, 3) spatial conv downsampling space only (stride
    (1, 2, 2)) and a (3, 1, 1) temporal conv, with a 1x1x1 projection shortcut, global average pool, Delinear
    head."""

    def __init__(self, channels: int = 1, width: int = 8, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = FastDeconv3d(channels, width, 3, padding=1)
        self.spatial = FastDeconv3d(width, 2 * width, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.temporal = FastDeconv3d(2 * width, 2 * width, (3, 1, 1), padding=(1, 0, 0))
        self.shortcut = FastDeconv3d(width, 2 * width, 1, stride=(1, 2, 2))
        self.head = Delinear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.temporal(F.relu(self.spatial(x))) + self.shortcut(x))
        return self.head(x.mean((2, 3, 4)))


def _clips(count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded synthetic task: 8-frame 12x12 clips of a bright square moving in one of four directions, in noise."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (count,), generator=g)
    clips = 0.3 * torch.randn(count, 1, 8, 12, 12, generator=g)
    moves = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]])
    for i, label in enumerate(labels.tolist()):
        y, x = 4, 4
        for t in range(8):
            clips[i, 0, t, y:y + 4, x:x + 4] += 1.0
            y, x = (y + int(moves[label, 0])) % 9, (x + int(moves[label, 1])) % 9
    return clips, labels


def test_volume_net_trains_folds_and_exports_verified_onnx(tmp_path: Path) -> None:
    import onnx

    from ndeconv.convert import export_onnx, model_input_size

    x, y = _clips(96)
    torch.manual_seed(0)
    model = VolumeNet()
    assert model_input_size(model) == (1, 16, 16, 16)
    train_lowers_the_loss(model, x, y, steps=8)
    by_ndeconv = assert_folds_alike(model, x[:8], nn.Conv3d)
    assert by_ndeconv.fold_report.summary().startswith("folded: 4 FastDeconv3d -> Conv3d")

    # ONNX through the library's export: folded, dynamic batch, verified by onnxruntime against the unfolded model;
    # its metadata says NCDHW and carries no image preprocessing.
    result = export_onnx(model, tmp_path / "volume.onnx", input_size=(1, 8, 12, 12), verify=True)
    assert result.verification.max_rel <= 1e-4
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert meta["input_layout"] == "NCDHW" and meta["input_size"] == "[1, 8, 12, 12]"
    assert "mean" not in meta and "resize" not in meta and "volume" in meta["preprocess"]
    with pytest.raises(NdeconvError, match=r"does not fit VolumeNet: it takes \(1, D, H, W\)"):
        export_onnx(model, tmp_path / "bad.onnx", input_size=(1, 12, 12))


def test_export_metadata_of_a_multichannel_volume_model() -> None:
    """A 3-D model's metadata reads its channels from C of (C, D, H, W), not from D, and drops the image keys
    its cfg's per-channel mean/std would fill."""
    from ndeconv.convert.export import onnx_metadata

    model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3))
    model.pretrained_cfg = {"mean": (0.5, 0.4), "std": (0.2, 0.3), "num_classes": 3}
    meta = onnx_metadata(model, (2, 8, 12, 12), opset=18)
    assert meta["input_layout"] == "NCDHW" and meta["num_classes"] == "3"
    assert meta["preprocess"].startswith("float32 2x8x12x12 volume (2 channels")
    assert "mean" not in meta and "std" not in meta


def test_batchnorm_pass_fuses_1d_and_3d_pairs() -> None:
    """fold(fuse_batchnorm=True) fuses a BatchNorm3d into the Conv3d before it (a 3-D hybrid: deconvolution stem,
    BatchNorm elsewhere) and a BatchNorm1d into its Conv1d, not one after a Linear; outputs unchanged."""
    from ndeconv.convert import fold_with_report
    from ndeconv.convert.fold import FoldWarning

    torch.manual_seed(0)
    hybrid = deconvolve(_bn_net(), which="stem", block=2).train()
    one_d = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                          nn.Linear(4, 3), nn.BatchNorm1d(3)).double().train()
    for model, x, fused, kept in ((hybrid, _volume(4, 2, (6, 10, 10)), {"4": "3", "7": "6"}, []),
                                  (one_d, _volume(4, 2, (1, 1, 12)).flatten(2), {"1": "0"}, ["6"])):
        with torch.no_grad():  # trained-looking running statistics
            for _ in range(3):
                model(x)
        model.eval()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, report = fold_with_report(model, example_input=x, fuse_batchnorm=True)
        assert report.bn_fused == fused and report.bn_kept == kept
        # The BatchNorm after the Linear is named as kept.
        assert [str(w.message) for w in caught if issubclass(w.category, FoldWarning)] == (
            [] if not kept else ["1 BatchNorm(s) do not directly follow a conv and stay as per-channel affine layers "
                                 "(e.g. 6)"])
        assert report.check_rel is not None and report.check_rel <= 1e-9
