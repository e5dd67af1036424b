"""Write tests/fixtures/reference_extra/: the layouts of the authors' ImageNet and segmentation models, as their own
scripts build them, for the zoo's layout tests (the format of tests/fixtures/reference/reference_cifar_models.json).

    git -C /work/.mirror/yechengxi+deconvolution/repo archive HEAD | tar -x -C /tmp/authors
    python scripts/reference_layouts.py /tmp/authors

It runs the authors' code, unmodified (their files are imported from the extracted copy, never copied here), and
records its outputs only. Their code targets an old torchvision: the one module it imports that no longer exists,
``torchvision.models.utils``, is supplied from outside (``torch.hub.load_state_dict_from_url``, which it was).

The flags are the scripts' own: ``main_imagenet.py``'s argparse defaults, read from its parser, and
``Segmentation/train.py``'s, read from its ``parse_args()``; the layer factories (``partial(FastDeconv, ...)``,
``partial(Delinear, ...)``) are made from them the way each script's ``main`` makes them. Every model is built on
the meta device (layout only: nothing is allocated).

Cases (``<authors' name>/<form>``):

- ``resnet18d/nd`` ... ``densenet121d/nd``: ``main_imagenet.py -a resnet18d --deconv True`` (defaults: --block 64,
  --block-fc 64, --delinear True, --deconv-iter 5, --eps 1e-5, --bias True, --stride 3), 1000 classes.
- ``resnet18d/bn`` ...: the ``deconv=False`` baseline of each. The ResNets' and DenseNet's: the paper's BatchNorm
  baseline, ``main_imagenet.py -a resnet18`` (``-a densenet121`` ...), torchvision's model, built by the script
  through ``torchvision.models``. VGG's: ``main_imagenet.py -a vgg11d --deconv False --block-fc 0`` (``vgg16d``),
  the authors' own builder without deconvolution, which has no BatchNorm (torchvision's ``vgg11``/``vgg16``).
- ``vgg11_bn/bn``, ``vgg16_bn/bn``: ``main_imagenet.py -a vgg11_bn`` (``-a vgg16_bn``), torchvision's BatchNorm VGG.
- ``fcn_resnet50d/nd`` ...: ``Segmentation/train.py --model fcn_resnet50d --deconv True`` (its defaults: --block 64,
  --deconv-iter 5, --eps 1e-5, --bias True, --stride 3, no --aux-loss), ``num_classes=21`` as its Cityscapes
  table and the builders' default; ``.../nd_aux`` the same with ``--aux-loss``; ``.../bn`` and ``.../bn_aux``
  with ``--deconv False`` (the authors' ``resnetd`` backbone without deconvolution and torchvision's heads).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import types
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference_extra"
# main_imagenet.py -a NAME (deconvolution form) -> -a NAME of its deconv=False baseline: torchvision's model, or for
# VGG the authors' own builder with --deconv False --block-fc 0 (no BatchNorm: their make_layers' batch_norm=False).
IMAGENET = {
    "resnet18d": "resnet18", "resnet34d": "resnet34", "resnet50d": "resnet50", "resnet101d": "resnet101",
    "vgg11d": "vgg11d", "vgg16d": "vgg16d", "densenet121d": "densenet121",
}
# main_imagenet.py -a NAME of torchvision's models beyond those baselines, recorded as NAME/bn.
TORCHVISION_EXTRA = ("vgg11_bn", "vgg16_bn")
SEGMENTATION = ("fcn_resnet50d", "fcn_resnet101d", "deeplabv3_resnet50d", "deeplabv3_resnet101d")


def _shim_old_torchvision() -> None:
    shim = types.ModuleType("torchvision.models.utils")
    shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules["torchvision.models.utils"] = shim


def _forget_models_package() -> None:
    """Both scripts import a top-level package named ``models`` (two different ones)."""
    for name in [n for n in sys.modules if n == "models" or n.startswith("models.")]:
        del sys.modules[name]


def layout(model: nn.Module, fast_deconv: type, listed: tuple[type, ...]) -> dict[str, Any]:
    """params, state_dict shapes, listed module types and every FastDeconv's settings (as reference_cifar_models)."""
    return dict(
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        state_dict={k: list(v.shape) for k, v in model.state_dict().items()},
        modules={n: type(m).__name__ for n, m in model.named_modules() if type(m) in listed},
        deconv_settings={
            n: dict(block=m.block, kernel_size=list(m.kernel_size), stride=list(m.stride), groups=m.groups,
                    n_iter=m.n_iter, freeze=m.freeze, sampling_stride=m.sampling_stride,
                    dilation=list(m.dilation), padding=list(m.padding), bias=m.bias is not None)
            for n, m in model.named_modules() if isinstance(m, fast_deconv)
        },
    )


def _factories(args: argparse.Namespace, fast_deconv: type, delinear: type, channel_deconv: type) -> dict[str, Any]:
    """The layer factories main_imagenet.main() makes of its flags (deconv, delinear, channel_deconv)."""
    deconv = partial(fast_deconv, bias=args.bias, eps=args.eps, n_iter=args.deconv_iter, block=args.block,
                     sampling_stride=args.stride) if args.deconv else args.deconv
    head = None
    if args.block_fc > 0:
        head = partial(delinear, block=args.block_fc, eps=args.eps, n_iter=args.deconv_iter) if args.delinear else \
            partial(channel_deconv, block=args.block_fc, eps=args.eps, n_iter=args.deconv_iter,
                    sampling_stride=args.stride)
    return dict(deconv=deconv, delinear=head if args.delinear else None,
                channel_deconv=None if args.delinear else head)


def imagenet_layouts(repo: Path) -> dict[str, Any]:
    sys.path.insert(0, str(repo))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import main_imagenet  # the script itself: its parser holds the flag defaults
        import torchvision.models as tv_models
        from models.deconv import ChannelDeconv, Delinear, FastDeconv
        from models.densenet_imagenet import densenet121d
        from models.resnet_imagenet import resnet18d, resnet34d, resnet50d, resnet101d
        from models.vgg_imagenet import vgg11d, vgg16d

        args = main_imagenet.parser.parse_args(["DATA", "--deconv", "True"])
        plain_args = main_imagenet.parser.parse_args(["DATA", "--deconv", "False", "--block-fc", "0"])
        factories = _factories(args, FastDeconv, Delinear, ChannelDeconv)
        plain = _factories(plain_args, FastDeconv, Delinear, ChannelDeconv)
        # main_imagenet.py's calls (vgg11d's first argument is its `pretrained`, as the script passes it).
        builders = {
            "resnet18d": lambda f: resnet18d(**f), "resnet34d": lambda f: resnet34d(**f),
            "resnet50d": lambda f: resnet50d(**f), "resnet101d": lambda f: resnet101d(**f),
            "vgg11d": lambda f: vgg11d("VGG11d", **f), "vgg16d": lambda f: vgg16d("VGG16d", **f),
            "densenet121d": lambda f: densenet121d(**f),
        }
        listed = (FastDeconv, Delinear, ChannelDeconv, nn.Conv2d, nn.Linear, nn.BatchNorm2d)
        models: dict[str, Any] = {}
        for name, baseline in IMAGENET.items():
            with torch.device("meta"):
                models[f"{name}/nd"] = layout(builders[name](factories), FastDeconv, listed)
                model = builders[baseline](plain) if baseline in builders else tv_models.__dict__[baseline]()
                models[f"{name}/bn"] = layout(model, FastDeconv, listed)
        for name in TORCHVISION_EXTRA:
            with torch.device("meta"):
                models[f"{name}/bn"] = layout(tv_models.__dict__[name](), FastDeconv, listed)
        flags = {k: getattr(args, k) for k in ("block", "block_fc", "deconv_iter", "eps", "bias", "stride", "delinear")}
        return dict(models=models, flags=flags)
    finally:
        sys.path.remove(str(repo))
        _forget_models_package()


def segmentation_layouts(repo: Path) -> dict[str, Any]:
    folder = repo / "Segmentation"
    sys.path.insert(0, str(folder))
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            import models.segmentation as segmentation
            import train  # the script itself: parse_args() holds the flag defaults
        from models.segmentation.deconv import ChannelDeconv, Delinear, FastDeconv

        sys.argv = ["train.py", "--deconv", "True"]
        args = train.parse_args()
        # As Segmentation/train.py's main() turns the flags into the FastDeconv factory.
        deconv = partial(FastDeconv, bias=args.bias, eps=args.eps, n_iter=args.deconv_iter, block=args.block,
                         sampling_stride=args.stride)
        listed = (FastDeconv, Delinear, ChannelDeconv, nn.Conv2d, nn.Linear, nn.BatchNorm2d)
        models: dict[str, Any] = {}
        for name in SEGMENTATION:
            for form, factory in (("nd", deconv), ("bn", False)):
                for suffix, aux in (("", args.aux_loss), ("_aux", True)):
                    with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
                        # train.py: models.segmentation.__dict__[args.model](num_classes=num_classes, ...);
                        # num_classes is 21 for every dataset of its table (the builders' default too).
                        model = segmentation.__dict__[name](num_classes=21, aux_loss=aux, pretrained=args.pretrained,
                                                            deconv=factory,
                                                            pretrained_backbone=args.pretrained_backbone)
                    models[f"{name}/{form}{suffix}"] = layout(model, FastDeconv, listed)
        flags = {k: getattr(args, k) for k in ("block", "deconv_iter", "eps", "bias", "stride", "aux_loss")}
        return dict(models=models, flags=flags)
    finally:
        sys.argv = argv
        sys.path.remove(str(folder))
        _forget_models_package()
        sys.modules.pop("train", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="an extracted copy of yechengxi/deconvolution")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    opts = parser.parse_args()
    _shim_old_torchvision()
    imagenet = imagenet_layouts(opts.repo.resolve())
    seg = segmentation_layouts(opts.repo.resolve())
    opts.out.mkdir(parents=True, exist_ok=True)
    for file, data, about in (
        ("reference_imagenet_models.json", imagenet,
         "main_imagenet.py models, 1000 classes: <arch>/nd = -a <arch> --deconv True (flags: its defaults); "
         "<arch>/bn = its deconv=False baseline: -a <torchvision name> (resnet18, ..., densenet121), for vgg11d and "
         "vgg16d -a <arch> --deconv False --block-fc 0 (no BatchNorm); vgg11_bn/bn, vgg16_bn/bn = -a vgg11_bn, "
         "-a vgg16_bn (torchvision's)."),
        ("reference_segmentation_models.json", seg,
         "Segmentation/train.py models, num_classes=21: <model>/nd = --model <model> --deconv True (flags: its "
         "defaults, no --aux-loss); /nd_aux with --aux-loss; /bn, /bn_aux with --deconv False."),
    ):
        payload = dict(about=about, flags=data["flags"], models=data["models"])
        (opts.out / file).write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
        print(f"wrote {opts.out / file}: {len(data['models'])} models")


if __name__ == "__main__":
    main()
