"""``ndeconv train-seg``: the authors' segmentation training (FCN / DeepLabV3 on Cityscapes or VOC, with network
deconvolution or BatchNorm); see ndeconv.training.segmentation."""

from __future__ import annotations

import argparse
from dataclasses import fields

from .train import add_setting as _add
from .train import str2bool

__all__ = ["register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "train FCN / DeepLabV3 segmentation with network deconvolution or BatchNorm (the authors' set)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..training.seg_config import SegTrainConfig

    d = SegTrainConfig()
    p = subparsers.add_parser(
        "train-seg",
        help=HELP,
        description="Train a segmentation model as the authors' Segmentation/train.py does (their flags and "
        "defaults): SGD with the poly LR schedule, cross-entropy ignoring 255, mean IoU on the val split after each "
        "epoch. Cityscapes-layout folders (leftImg8bit/, gtFine/ labelIds mapped to the 19 trainIds) or VOC-layout "
        "ones (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/).",
    )
    model = p.add_argument_group("model")
    _add(model, "--model", dest="model", default=d.model, metavar="NAME",
         help="fcn_resnet50, fcn_resnet101, deeplabv3_resnet50, deeplabv3_resnet101 (with or without _deconv; the "
         "authors' fcn_resnet50d ... too)")
    _add(model, "--deconv", dest="deconv", default="true for *_deconv and the authors' *d names, else false",
         help="network deconvolution (false: the BatchNorm baseline)", type=str2bool, metavar="BOOL")
    _add(model, "--aux-loss", dest="aux_loss", default=d.aux_loss, type=str2bool, nargs="?", const=True,
         metavar="BOOL", help="auxiliary FCN head on layer3 (loss out + 0.5 aux, its lr x10)")
    _add(model, "--block", "--num-groups", dest="block", default=d.block, type=int,
         help="deconvolution block size (channels whitened together)")
    _add(model, "--deconv-iter", dest="deconv_iter", default=d.deconv_iter, type=int,
         help="Newton-Schulz iterations")
    _add(model, "--eps", dest="eps", default=d.eps, type=float, help="covariance regulariser")
    _add(model, "--bias", dest="bias", default=d.bias, type=str2bool, metavar="BOOL", help="bias in FastDeconv")
    _add(model, "--stride", dest="stride", default=d.stride, type=int,
         help="sampling stride of the deconvolution statistics")
    _add(model, "--num-classes", dest="num_classes", default="the dataset's: 19 cityscapes, 21 voc", type=int,
         help="classes (labels at or above it are ignored)")

    data = p.add_argument_group("data")
    _add(data, "--dataset", dest="dataset", default=d.dataset, choices=("cityscapes", "voc"),
         help="dataset layout")
    _add(data, "--data-dir", dest="data_dir", default="required", metavar="DIR", help="the dataset's folder")
    _add(data, "--base-size", dest="base_size", default=d.base_size, type=int,
         help="images resized around it (0.5x to 2x in training; to it for evaluation)")
    _add(data, "--crop-size", dest="crop_size", default=d.crop_size, type=int, help="training crop")
    _add(data, "--val-subset", dest="val_subset", default="all", type=int, metavar="N",
         help="evaluate on the first N val images only")
    _add(data, "-j", "--workers", dest="workers", default=d.workers, type=int, help="data loading processes")

    opt = p.add_argument_group("optimisation")
    _add(opt, "-b", "--batch-size", dest="batch_size", default=d.batch_size, type=int, help="batch size")
    _add(opt, "--epochs", dest="epochs", default=d.epochs, type=int, help="epochs")
    _add(opt, "--lr", dest="lr", default=d.lr, type=float, help="initial learning rate (poly schedule, power 0.9)")
    _add(opt, "--momentum", dest="momentum", default=d.momentum, type=float, help="SGD momentum")
    _add(opt, "--wd", "--weight-decay", dest="wd", default=d.wd, type=float, help="weight decay")
    _add(opt, "--max-steps", dest="max_steps", default="all", type=int, metavar="N",
         help="stop after N steps (evaluated; a resumed run may raise it)")
    _add(opt, "--seed", dest="seed", default=d.seed, type=int, help="seed of the weights, batches and crops")

    run = p.add_argument_group("run")
    run.add_argument("--out", default=None, metavar="DIR", help="the new run directory")
    run.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    run.add_argument("--force", action="store_true", help="start over in an existing run directory of train-seg")
    _add(run, "--device", dest="device", default=d.device, help="cpu, cuda, cuda:N or auto")
    _add(run, "--checkpoint-every", dest="checkpoint_every", default=d.checkpoint_every, type=int, metavar="N",
         help="checkpoint every N steps (0: only at epoch ends)")
    _add(run, "--log-every", dest="log_every", default=d.log_every, type=int, metavar="N", help="log every N steps")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..training.segmentation import SegTrainConfig, train_segmentation

    names = {f.name for f in fields(SegTrainConfig)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    cfg = SegTrainConfig(**given)
    train_segmentation(cfg, out=args.out, resume=args.resume, force=args.force, given=frozenset(given))
    return 0
