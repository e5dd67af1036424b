"""Write tests/fixtures/reference_extra/reference_logits.{json,safetensors}: the outputs of the authors' ImageNet and
segmentation models (``main_imagenet.py -a resnet18d ...``, ``Segmentation/train.py --model fcn_resnet50d ...``) for
tests/test_convert_reference_logits.py, which converts checkpoints of those scripts and must reproduce them.

Each model is built as its script builds it (the flags' defaults, as scripts/reference_layouts.py), in float64,
and given ``tests/reference_weights.py``'s seeded state (every tensor from its key: the tests rebuild the same
values, so no weights are stored). Recorded: ``<case>/eval.<output>`` = ``model.eval()(seeded_input(case/eval))``
and then ``<case>/train.<output>`` = ``model.train()(seeded_input(case/train))``, both under no_grad (train mode:
batch statistics, the running buffers update after, as in training; the segmentation heads' dropout off, see
``_dropout_off``). A classifier's logits are stored whole; a
segmentation map (``out``, ``aux``) at the 2048 flat positions ``sampled_indices(case/<mode>.<output>)``.

    mkdir -p /tmp/authors && git -C /work/.mirror/yechengxi+deconvolution/repo archive HEAD | tar -x -C /tmp/authors
    python scripts/reference_logits.py /tmp/authors

It runs the authors' code, unmodified (imported from the extracted copy, never copied here), and records its
outputs only.
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
from safetensors.torch import save_file
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "reference_extra"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))
from reference_layouts import _forget_models_package, _shim_old_torchvision  # noqa: E402
from reference_weights import sampled_indices, seeded_input, seeded_state_dict  # noqa: E402

# case -> (input shape in eval, in train). 1000 classes (main_imagenet.py), 21 (Segmentation/train.py).
IMAGENET_CASES = {
    "resnet18d/nd": ((2, 3, 64, 64), (4, 3, 64, 64)),
    "resnet18d/bn": ((2, 3, 64, 64), (4, 3, 64, 64)),
    "resnet50d/nd": ((2, 3, 64, 64), (4, 3, 64, 64)),
    "densenet121d/nd": ((2, 3, 64, 64), (4, 3, 64, 64)),
}
SEGMENTATION_CASES = {
    "fcn_resnet50d/nd_aux": ((2, 3, 48, 48), (2, 3, 64, 64)),
    # Train mode at 96x96: the ASPP's 1x1 head whitens 256 features; fewer samples leave its covariance so ill
    # conditioned that float64 rounding alone reaches 1e-9.
    "deeplabv3_resnet50d/nd": ((2, 3, 48, 48), (2, 3, 96, 96)),
    "fcn_resnet50d/bn_aux": ((2, 3, 48, 48), (2, 3, 64, 64)),
}


def _dropout_off(model: nn.Module) -> None:
    """Train mode without the segmentation heads' dropout: its masks are drawn in memory order, and the authors'
    FastDeconv returns channels-last strides in train mode (ours: contiguous), so the same generator state gives
    other masks although the layers compute the same values."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()


def record(case: str, model: nn.Module, shapes: tuple[tuple[int, ...], tuple[int, ...]]) -> dict[str, torch.Tensor]:
    model = model.double()
    model.load_state_dict(seeded_state_dict({k: v.shape for k, v in model.state_dict().items()}))
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mode, shape in zip(("eval", "train"), shapes, strict=True):
            model.train(mode == "train")
            _dropout_off(model)
            out = model(seeded_input(f"{case}/{mode}", shape))
            outputs = out if isinstance(out, dict) else {"logits": out}
            for name, value in outputs.items():
                key = f"{case}/{mode}.{name}"
                tensors[key] = value.contiguous() if name == "logits" else \
                    value.reshape(-1)[sampled_indices(key, value.numel())].contiguous()
    return tensors


def imagenet_builders(repo: Path) -> dict[str, Callable[[], nn.Module]]:
    import main_imagenet
    import torchvision.models as tv_models
    from models.deconv import Delinear, FastDeconv
    from models.densenet_imagenet import densenet121d
    from models.resnet_imagenet import resnet18d, resnet50d

    args = main_imagenet.parser.parse_args(["DATA", "--deconv", "True"])
    deconv = partial(FastDeconv, bias=args.bias, eps=args.eps, n_iter=args.deconv_iter, block=args.block,
                     sampling_stride=args.stride)
    delinear = partial(Delinear, block=args.block_fc, eps=args.eps, n_iter=args.deconv_iter)
    factories = dict(deconv=deconv, delinear=delinear, channel_deconv=None)
    return {
        "resnet18d/nd": lambda: resnet18d(**factories),
        "resnet18d/bn": lambda: tv_models.resnet18(),
        "resnet50d/nd": lambda: resnet50d(**factories),
        "densenet121d/nd": lambda: densenet121d(**factories),
    }


def segmentation_builders(repo: Path) -> dict[str, Callable[[], nn.Module]]:
    import models.segmentation as segmentation
    import train
    from models.segmentation.deconv import FastDeconv

    argv = sys.argv
    sys.argv = ["train.py", "--deconv", "True"]
    try:
        args = train.parse_args()
    finally:
        sys.argv = argv
    deconv = partial(FastDeconv, bias=args.bias, eps=args.eps, n_iter=args.deconv_iter, block=args.block,
                     sampling_stride=args.stride)

    def build(name: str, factory: Any, aux: bool) -> nn.Module:
        return segmentation.__dict__[name](num_classes=21, aux_loss=aux, pretrained=False, deconv=factory,
                                           pretrained_backbone=False)

    return {
        "fcn_resnet50d/nd_aux": lambda: build("fcn_resnet50d", deconv, True),
        "deeplabv3_resnet50d/nd": lambda: build("deeplabv3_resnet50d", deconv, False),
        "fcn_resnet50d/bn_aux": lambda: build("fcn_resnet50d", False, True),
    }


def run(repo: Path, folder: Path, builders: Callable[[Path], dict], cases: dict) -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(folder))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            made = builders(repo)
            tensors: dict[str, torch.Tensor] = {}
            for case, shapes in cases.items():
                tensors.update(record(case, made[case](), shapes))
        return tensors
    finally:
        sys.path.remove(str(folder))
        _forget_models_package()
        sys.modules.pop("train", None)
        sys.modules.pop("main_imagenet", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("repo", type=Path, help="an extracted copy of yechengxi/deconvolution")
    parser.add_argument("-o", "--out", type=Path, default=OUT)
    opts = parser.parse_args()
    repo = opts.repo.resolve()
    _shim_old_torchvision()
    tensors = run(repo, repo, imagenet_builders, IMAGENET_CASES)
    tensors.update(run(repo, repo / "Segmentation", segmentation_builders, SEGMENTATION_CASES))
    cases = {case: dict(eval_input=list(shapes[0]), train_input=list(shapes[1]))
             for case, shapes in {**IMAGENET_CASES, **SEGMENTATION_CASES}.items()}
    about = ("Outputs of the authors' models with tests/reference_weights.py's seeded state, float64 "
             "(scripts/reference_logits.py): <case>/<eval|train>.<logits|out|aux>; segmentation maps at "
             "sampled_indices(key).")
    opts.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(opts.out / "reference_logits.safetensors"))
    (opts.out / "reference_logits.json").write_text(json.dumps(dict(about=about, cases=cases), indent=1) + "\n")
    print(f"wrote {opts.out / 'reference_logits.safetensors'}: {len(tensors)} tensors, {len(cases)} cases")


if __name__ == "__main__":
    main()
