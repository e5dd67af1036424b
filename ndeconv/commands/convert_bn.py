"""``ndeconv convert-bn``: a trained BatchNorm network as the deconvolution network with the same eval function.

Every conv (``--which all``) or the first one (``--which stem``) becomes a FastDeconv whose running statistics are
calibrated on images of a dataset and whose weight and bias make it compute the conv and the BatchNorm after it
(``ndeconv.deconvolve(model, calibrate=batches)``); the eval outputs are then the BatchNorm network's up to
rounding, checked on held-out test images. Writes OUT.safetensors and a config.json beside it; the file loads as
any weights file (``--checkpoint OUT.safetensors``: eval, fold, export, train from it).
"""

from __future__ import annotations

import argparse

__all__ = ["register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "convert a trained BatchNorm network into deconvolution, exactly (transfer learning)"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert-bn", help=HELP,
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", metavar="MODEL_OR_CHECKPOINT",
                   help="the BatchNorm network: a run directory of `ndeconv train --deconv false`, a weights file "
                        "(safetensors, torch state_dict, timm or the authors' checkpoint), or a zoo name with a tag")
    p.add_argument("--arch", metavar="NAME", help="zoo architecture of a weights file without a config.json beside it")
    p.add_argument("--calibrate-data", metavar="DATASET",
                   help="dataset to calibrate on (fashion_mnist, mnist, cifar10, cifar100, imagefolder); default: the "
                        "one the model was trained on, when it says")
    p.add_argument("--data-dir", metavar="DIR", help="the dataset's folder (default: its standard location)")
    p.add_argument("--calibrate-split", choices=("train", "test"), default="train",
                   help="split the calibration images come from (default: train; the check uses test images)")
    p.add_argument("--calibrate-images", type=int, default=1024, metavar="N",
                   help="calibration images, a seeded random choice (default: 1024)")
    p.add_argument("--batch-size", type=int, default=128, metavar="B",
                   help="calibration batch size: the whitening statistics are averaged per batch, as a training "
                        "run's running averages are, so use the batch size you will fine-tune with (default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration images' choice (default: 0)")
    p.add_argument("--check-images", type=int, default=64, metavar="N",
                   help="held-out test images the converted outputs are compared on (0: no check; default: 64)")
    p.add_argument("--which", choices=("all", "stem"), default="all",
                   help="convert every conv (default) or only the first")
    p.add_argument("--block", type=int, default=64, help="FastDeconv's whitening block size (default: 64)")
    p.add_argument("--eps", type=float, default=1e-5, help="FastDeconv's eps (default: 1e-5)")
    p.add_argument("--n-iter", type=int, default=5, help="Newton-Schulz iterations (default: 5)")
    p.add_argument("--sampling-stride", type=int, default=3, help="FastDeconv's patch sampling stride (default: 3)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.safetensors",
                   help="converted weights; config.json is written beside it")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT and the config.json `ndeconv convert-bn` wrote beside it")
    p.set_defaults(func=_run, claims="output")  # ndeconv.cli claims the output file before the command runs


def _run(args: argparse.Namespace) -> int:
    from torch import nn

    from ndeconv.convert.batchnorm import (
        calibration_batches,
        check_converted_config_path,
        convert_batchnorm,
        converted_config,
        save_converted,
    )
    from ndeconv.errors import UsageError
    from ndeconv.io import check_output_path
    from ndeconv.layers._conv import plain_conv_type
    from ndeconv.loading import load_model
    from ndeconv.training.evaluate import recorded_img_size

    if not args.output.endswith(".safetensors"):
        raise UsageError(f"-o {args.output}: converted weights are written as safetensors; name the file "
                         "*.safetensors")
    if args.check_images < 0:
        raise UsageError(f"--check-images must be >= 0, got {args.check_images}")
    output = check_output_path(args.output, args.force)  # fail before any work
    check_converted_config_path(output, args.force)
    loaded = load_model(args.source, arch=args.arch)
    if loaded.folded:
        raise UsageError(f"{args.source} holds folded weights; convert the BatchNorm network they came from")
    dataset = args.calibrate_data or loaded.dataset
    if not dataset:
        raise UsageError(f"{args.source} does not say what it was trained on; pass --calibrate-data DATASET")
    model = loaded.model
    if not any(plain_conv_type(m) is not None for m in model.modules()):
        raise UsageError(f"{args.source} is already a deconvolution network (no plain convolution to convert); "
                         "convert-bn converts a BatchNorm network: give its BatchNorm form (e.g. a run of `ndeconv "
                         "train --deconv false`)")
    first = next(m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    data = dict(data_dir=args.data_dir, img_size=recorded_img_size({"config": loaded.config}),
                num_classes=int(getattr(model, "num_classes", 0)) or None, class_names=loaded.label_names)
    batches = calibration_batches(dataset, first.in_channels, split=args.calibrate_split, images=args.calibrate_images,
                                  batch_size=args.batch_size, seed=args.seed, **data)
    check = None
    if args.check_images:
        check = calibration_batches(dataset, first.in_channels, split="test", images=args.check_images,
                                    batch_size=args.check_images, seed=args.seed, **data)[0]
    recipe = dict(which=args.which, block=args.block, eps=args.eps, n_iter=args.n_iter,
                  sampling_stride=args.sampling_stride)
    model, report = convert_batchnorm(model, batches, check_batch=check, **recipe)
    calibration = dict(dataset=dataset, split=args.calibrate_split, images=report.calibration_images,
                       batch_size=args.batch_size, seed=args.seed)
    train = (loaded.config.get("train") or None) if loaded.config else None
    if train is None and loaded.dataset:
        train = {"dataset": loaded.dataset}
    config = converted_config(model, recipe, loaded.description, report, calibration, train, loaded.label_names)
    weights, config_path = save_converted(model, output, config, force=args.force)
    print(report.summary())
    print(f"wrote {weights} and {config_path}")
    return 0
