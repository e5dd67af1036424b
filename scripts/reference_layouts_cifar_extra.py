"""Write tests/fixtures/reference_extra/reference_cifar_extra_models.json: the layouts of the authors' CIFAR models
beyond the paper's ten (``main.py --arch vgg11 vgg13 vgg19 resnet34 resnet50 pnasnetB``), as their ``main.py``
builds them, for tests/test_zoo_layout_extra.py (the format of tests/fixtures/reference/reference_cifar_models.json).

    git -C /work/.mirror/yechengxi+deconvolution/repo archive HEAD | tar -x -C /tmp/authors
    python scripts/reference_layouts_cifar_extra.py /tmp/authors

It runs the authors' code, unmodified (imported from the extracted copy, never copied here), and records its
outputs only. The flags are ``main.py``'s own: its ``arg_parser.parse_args()`` reads the command line of each
case, and the layer factories (``partial(FastDeconv, ...)``, ``partial(Delinear, ...)``) are made from them the way
``main.py`` makes them. Every model is built on the meta device (layout only: nothing is allocated), with
``num_classes=10`` (CIFAR-10's ``args.num_outputs``).

Cases (``<main.py --arch>/<form>``): ``/nd`` is ``--arch <arch> --deconv True --block-fc 512`` (the paper's
deconvolution setting, as reference_cifar_models.json), ``/bn`` is ``--arch <arch> --deconv False`` (its
``--block-fc 0`` default: a plain Linear head). main.py at the mirrored HEAD reaches ``PNASNetB`` through no import
(``models/__init__.py`` imports only vgg, densenet, resnet and deconv), so the builder is taken from
``models/pnasnet.py`` directly and called with the arguments main.py passes it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference_extra"
FILE = "reference_cifar_extra_models.json"
ARCHS = ("vgg11", "vgg13", "vgg19", "resnet34", "resnet50", "pnasnetB")
FORMS = {"nd": ["--deconv", "True", "--block-fc", "512"], "bn": ["--deconv", "False"]}


def layout(model: nn.Module, fast_deconv: type, listed: tuple[type, ...]) -> dict[str, Any]:
    """params, state_dict shapes, listed module types and every FastDeconv's settings (as reference_cifar_models)."""
    return dict(
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        state_dict={k: list(v.shape) for k, v in model.state_dict().items()},
        modules={n: type(m).__name__ for n, m in model.named_modules() if type(m) in listed},
        deconv_settings={
            n: dict(block=m.block, kernel_size=list(m.kernel_size), stride=list(m.stride), groups=m.groups,
                    n_iter=m.n_iter, freeze=m.freeze, sampling_stride=m.sampling_stride)
            for n, m in model.named_modules() if isinstance(m, fast_deconv)
        },
    )


def _factories(args: argparse.Namespace, fast_deconv: type, delinear: type, channel_deconv: type) -> dict[str, Any]:
    """main.py's lines after ``parse_args()``: the flags as the layer factories its constructors take."""
    deconv = (partial(fast_deconv, bias=args.bias, eps=args.eps, n_iter=args.deconv_iter, block=args.block,
                      sampling_stride=args.stride) if args.deconv else None)
    linear, channel = None, None
    if args.delinear:
        if args.block_fc > 0:
            linear = partial(delinear, block=args.block_fc, eps=args.eps, n_iter=args.deconv_iter)
    elif args.block_fc > 0:
        channel = partial(channel_deconv, block=args.block_fc, eps=args.eps, n_iter=args.deconv_iter,
                          sampling_stride=args.stride)
    return dict(deconv=deconv, delinear=linear, channel_deconv=channel)


def cifar_extra_layouts(repo: Path) -> dict[str, Any]:
    sys.path.insert(0, str(repo))
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import arg_parser  # main.py's parser: its defaults are the flags not on the command line
            from models.deconv import ChannelDeconv, Delinear, FastDeconv
            from models.pnasnet import PNASNetB
            from models.resnet import ResNet34, ResNet50
            from models.vgg import VGG

        # main.py's ``if args.arch == ...`` branches, each with the arguments it passes.
        builders: dict[str, Callable[..., nn.Module]] = {
            "vgg11": partial(VGG, "VGG11"), "vgg13": partial(VGG, "VGG13"), "vgg19": partial(VGG, "VGG19"),
            "resnet34": ResNet34, "resnet50": ResNet50, "pnasnetB": PNASNetB,
        }
        listed = (FastDeconv, Delinear, ChannelDeconv, nn.Conv2d, nn.Linear, nn.BatchNorm2d)
        models: dict[str, Any] = {}
        flags: dict[str, Any] = {}
        for arch in ARCHS:
            for form, extra in FORMS.items():
                sys.argv = ["main.py", "--arch", arch, *extra]
                args = arg_parser.parse_args()
                flags[form] = {k: getattr(args, k) for k in
                               ("deconv", "block", "block_fc", "deconv_iter", "eps", "bias", "stride", "delinear")}
                with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
                    model = builders[arch](num_classes=10, **_factories(args, FastDeconv, Delinear, ChannelDeconv))
                models[f"{arch}/{form}"] = layout(model, FastDeconv, listed)
        return dict(models=models, flags=flags)
    finally:
        sys.argv = argv
        sys.path.remove(str(repo))
        for name in [n for n in sys.modules if n in ("models", "arg_parser") or n.startswith("models.")]:
            del sys.modules[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="an extracted copy of yechengxi/deconvolution")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    opts = parser.parse_args()
    data = cifar_extra_layouts(opts.repo.resolve())
    about = ("main.py CIFAR models beyond the paper's ten, num_classes=10: <arch>/nd = --arch <arch> --deconv True "
             "--block-fc 512; <arch>/bn = --arch <arch> --deconv False (--block-fc 0). flags: as parsed.")
    opts.out.mkdir(parents=True, exist_ok=True)
    payload = dict(about=about, flags=data["flags"], models=data["models"])
    (opts.out / FILE).write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    print(f"wrote {opts.out / FILE}: {len(data['models'])} models")


if __name__ == "__main__":
    main()
