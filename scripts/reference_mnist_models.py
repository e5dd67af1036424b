"""Write the authors' MNIST-sized models (``main.py --arch mlp``, ``simple_v1``, ``simple_v2``: ``models/simple.py``)
into tests/fixtures/reference_extra/ for tests/test_zoo_mnist.py:

- ``reference_mnist_models.json``: their layouts (the format of reference_cifar_models.json; ``modules`` lists the
  ChannelDeconv, Linear, BatchNorm1d, Conv2d and BatchNorm2d layers), as main.py builds them for MNIST-style data
  (``in_planes=1``, ``input_size=28``, ``num_outputs=10``): ``mlp/nd`` is ``--method 3`` (main.py's default:
  ChannelDeconv whitening), ``mlp/bn`` ``--method 2`` (BatchNorm1d), ``simple_v1/plain`` and ``simple_v2/bn``
  ``--method 1`` (the only methods their HEAD builds for these two: the others call ``DeConv2d``, which is gone).
- ``mlp_<form>_state_dict.safetensors`` + ``mlp_<form>_io.safetensors`` (form nd, bn): the MLP seeded
  (``torch.manual_seed(0)``), in float64, trained 3 SGD steps (lr 0.1) on correlated 28x28 images so the running
  statistics are not their initial values, its state_dict rounded to float16 (stored so) and loaded back; then
  ``eval.logits = model.eval()(eval.x)`` and ``train.logits = model.train()(train.x)`` under no_grad, in float64,
  from exactly those rounded weights.

    git -C /work/.mirror/yechengxi+deconvolution/repo archive HEAD | tar -x -C /tmp/authors
    python scripts/reference_mnist_models.py /tmp/authors

It runs the authors' code, unmodified (imported from the extracted copy, never copied here), and records its
outputs only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference_extra"
FILE = "reference_mnist_models.json"
STEPS, LR, BATCH = 3, 0.1, 16


def layout(model: nn.Module, listed: tuple[type, ...]) -> dict[str, Any]:
    return dict(
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        state_dict={k: list(v.shape) for k, v in model.state_dict().items()},
        modules={n: type(m).__name__ for n, m in model.named_modules() if type(m) in listed},
    )


def correlated_images(generator: torch.Generator, n: int) -> torch.Tensor:
    """Blurred noise with an offset: neighbouring pixels correlated, as real images are."""
    x = torch.rand(n, 1, 28, 28, generator=generator, dtype=torch.float64)
    kernel = torch.ones(1, 1, 3, 3, dtype=torch.float64) / 9
    return F.conv2d(x, kernel, padding=1) * 2 + 0.1


def trained_io(model: nn.Module, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    model = model.double()
    for _ in range(STEPS):
        model.train()
        x = correlated_images(g, BATCH)
        y = torch.randint(0, 10, (BATCH,), generator=g)
        loss = F.cross_entropy(model(x), y)
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
    io_tensors = {"eval.x": correlated_images(g, 8), "train.x": correlated_images(g, 8)}
    with torch.no_grad():
        io_tensors["eval.logits"] = model.eval()(io_tensors["eval.x"])
        io_tensors["train.logits"] = model.train()(io_tensors["train.x"])
    return state, io_tensors


def mnist_models(repo: Path, out: Path) -> dict[str, Any]:
    sys.path.insert(0, str(repo))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from models.deconv import ChannelDeconv
            from models.simple import MLP, SimpleCNN_v1, SimpleCNN_v2
        listed = (ChannelDeconv, nn.Linear, nn.BatchNorm1d, nn.Conv2d, nn.BatchNorm2d)
        # main.py's branches for MNIST data: args.in_planes=1, args.input_size=28, args.num_outputs=10.
        builders = {
            "mlp/nd": lambda: MLP(input_nodes=784, hidden_nodes=128, hidden_layers=3, method=3, num_outputs=10),
            "mlp/bn": lambda: MLP(input_nodes=784, hidden_nodes=128, hidden_layers=3, method=2, num_outputs=10),
            "simple_v1/plain": lambda: SimpleCNN_v1(channels_in=1, kernel_size=28, num_outputs=10, method=1),
            "simple_v2/bn": lambda: SimpleCNN_v2(channels_in=1, kernel_size=3, hidden_layers=10, hidden_channels=4,
                                                 num_outputs=10, method=1),
        }
        models = {}
        for case, build in builders.items():
            torch.manual_seed(0)
            with contextlib.redirect_stdout(io.StringIO()):
                model = build()
            models[case] = layout(model, listed)
            if case.startswith("mlp/"):
                form = case.split("/")[1]
                state, io_tensors = trained_io(model, seed=1)
                save_file(state, str(out / f"mlp_{form}_state_dict.safetensors"))
                save_file(io_tensors, str(out / f"mlp_{form}_io.safetensors"))
        return models
    finally:
        sys.path.remove(str(repo))
        for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
            del sys.modules[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="an extracted copy of yechengxi/deconvolution")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    opts = parser.parse_args()
    opts.out.mkdir(parents=True, exist_ok=True)
    models = mnist_models(opts.repo.resolve(), opts.out)
    about = ("main.py MNIST models (models/simple.py), in_planes=1, input_size=28, num_outputs=10: mlp/nd = --method "
             "3, mlp/bn = --method 2, simple_v1/plain and simple_v2/bn = --method 1.")
    (opts.out / FILE).write_text(json.dumps(dict(about=about, models=models), indent=1) + "\n")
    print(f"wrote {opts.out / FILE}: {len(models)} models, and the MLP's weights and logits")


if __name__ == "__main__":
    main()
