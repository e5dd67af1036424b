"""The stem pictures: effective kernels are the rows of D, whitened images are D applied to each patch."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import ndeconv  # noqa: F401
from ndeconv import FastDeconv
from ndeconv.cli import main
from ndeconv.viz import effective_kernels, first_deconv, whiten_images, whitening_figure
from ndeconv.zoo._shipping import ship_weights

FASHION = Path("/usr/share/datasets/fashion-mnist")


def _trained_stem(channels: int = 1) -> FastDeconv:
    torch.manual_seed(0)
    layer = FastDeconv(channels, 8, 3, padding=1).double()
    x = F.avg_pool2d(torch.randn(16, channels, 18, 18, dtype=torch.float64), 3, 1)  # correlated pixels
    layer.train()
    for _ in range(3):
        layer(x)
    return layer.eval()


@pytest.mark.parametrize("channels", [1, 3])
def test_whitened_pixel_is_d_times_centred_patch(channels):
    layer = _trained_stem(channels)
    images = torch.rand(2, channels, 10, 10, dtype=torch.float64)
    got = whiten_images(layer, images).double()
    patches = F.unfold(images, 3, padding=1).transpose(1, 2)  # (N, L, C*9), channel-major
    whitened = (patches - layer.running_mean) @ layer.running_deconv.T
    centre = [c * 9 + 4 for c in range(channels)]
    expected = whitened[..., centre].transpose(1, 2).reshape(2, channels, 10, 10)
    torch.testing.assert_close(got, expected.float().double(), rtol=1e-5, atol=1e-5)
    assert effective_kernels(layer).shape == (channels * 9, channels, 3, 3)


def test_bn_model_has_no_stem_to_draw():
    with pytest.raises(ndeconv.errors.UsageError, match="no FastDeconv"):
        first_deconv(timm.create_model("pnasnet_a_deconv", deconv=False))


def test_figure_renders(tmp_path):
    model = torch.nn.Sequential(_trained_stem(1))
    fig = whitening_figure(model, torch.rand(3, 1, 12, 12))
    fig.savefig(tmp_path / "f.png")
    assert (tmp_path / "f.png").stat().st_size > 1000


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_cli_draws_a_shipped_folder(tmp_path, capsys):
    model = timm.create_model("pnasnet_a_deconv", in_chans=1)
    folder = ship_weights(model, "fashion_mnist", root=tmp_path)
    out = tmp_path / "filters.png"
    args = ["viz", f"local-dir:{folder}", "--dataset", "fashion_mnist", "-o", str(out), "--num-images", "3"]
    assert main(args) == 0
    assert out.stat().st_size > 1000
    assert main(args) == 2  # refuses to overwrite without --force
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    shutil.rmtree(folder)


@pytest.mark.parametrize("count", ["0", "33", "100000"])
def test_cli_refuses_image_counts_the_figure_cannot_show(tmp_path, capsys, count):
    capsys.readouterr()
    out = tmp_path / "filters.png"
    assert main(["viz", "resnet18_deconv.fashion_mnist", "--num-images", count, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--num-images must be between 1 and 32" in err and not out.exists()
