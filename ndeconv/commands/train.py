"""``ndeconv train``: the paper's training runs (deconvolution or BatchNorm) on real data; see ndeconv.training."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Literal

from ..errors import UsageError

__all__ = ["register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "train a zoo model with network deconvolution or its BatchNorm baseline"


def str2bool(value: str) -> bool:
    """The reference's ``--deconv True``/``--deconv false`` style of boolean flags."""
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "t", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def deconv_form(value: str) -> bool | Literal["stem"]:
    """``--deconv``: a boolean as ``str2bool``, or ``stem`` for the hybrid (a deconvolution stem, BatchNorm
    elsewhere: DeconvSettings(deconv="stem"))."""
    if str(value).strip().lower() == "stem":
        return "stem"
    try:
        return str2bool(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected true, false or stem, got {value!r}") from None


def add_setting(group: argparse._ArgumentGroup, *flags: str, dest: str, default: object, help: str,
                **kwargs: object) -> None:
    """A training setting's flag (``ndeconv train`` and ``train-seg``). Every default is None in argparse, so the
    settings the user typed are known (a resumed run refuses those that would change it); the real defaults live
    in the config dataclass and are shown in the help."""
    group.add_argument(*flags, dest=dest, default=None, help=f"{help} (default: {default})", **kwargs)


def _add(group: argparse._ArgumentGroup, flag: str, dest: str, default: object, help: str, **kwargs: object) -> None:
    add_setting(group, flag, dest=dest, default=default, help=help, **kwargs)


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..dataset_specs import DATASETS
    from ..training.config import TrainConfig

    d = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help=HELP,
        description="Train a zoo model as the paper's authors did (their main.py settings and defaults). With no "
        "arguments: ResNet-18 with network deconvolution on Fashion-MNIST for 20 epochs. Runs under "
        "`torchrun --nproc_per_node N -m ndeconv.cli train ...` data-parallel.",
    )
    model = p.add_argument_group("model")
    _add(model, "--arch", "arch", d.arch, "zoo architecture: resnet18 or resnet18_deconv, vgg16, ...", metavar="NAME")
    _add(model, "--deconv", "deconv", d.deconv, "true: network deconvolution; false: the BatchNorm baseline; "
         "stem: the hybrid (a deconvolution stem, BatchNorm elsewhere)", type=deconv_form, metavar="BOOL|stem")
    _add(model, "--block", "block", d.block, "deconvolution block size (channels whitened together)", type=int)
    _add(model, "--block-fc", "block_fc", "512 with --deconv true, 0 with false",
         "block of the Delinear head (0: a plain Linear)", type=int)
    _add(model, "--deconv-iter", "deconv_iter", d.deconv_iter, "Newton-Schulz iterations", type=int)
    _add(model, "--eps", "eps", d.eps, "covariance regulariser", type=float)
    _add(model, "--stride", "stride", d.stride, "sampling stride of the deconvolution statistics", type=int)
    _add(model, "--bias", "bias", d.bias, "bias in FastDeconv", type=str2bool, metavar="BOOL")
    _add(model, "--freeze", "freeze", d.freeze, "freeze the whitening updates (reference's --freeze)",
         type=str2bool, nargs="?", const=True, metavar="BOOL")
    _add(model, "--delinear", "delinear", d.delinear, "Delinear head (false: ChannelDeconv + Linear)",
         type=str2bool, metavar="BOOL")
    _add(model, "--drop-rate", "drop_rate", d.drop_rate, "dropout before the classifier", type=float)
    _add(model, "--initial-checkpoint", "initial_checkpoint", "none", "start from these weights (timm's train.py "
         "flag): a run directory or a weights file with its config.json, e.g. `ndeconv convert-bn`'s output, of the "
         "same --arch and form", metavar="PATH")

    data = p.add_argument_group("data")
    _add(data, "--dataset", "dataset", d.dataset, f"one of {', '.join(DATASETS)}")
    _add(data, "--data-dir", "data_dir", "/usr/share/datasets/fashion-mnist for fashion_mnist",
         "folder with the dataset's files", metavar="DIR")
    _add(data, "--img-size", "img_size", "the model's input size: 32, 28 for mlp/simple_*, 224 for ImageNet topologies",
         "image size (imagefolder; IDX images are zero-padded to it)", type=int)
    _add(data, "--num-classes", "num_classes", "the dataset's", "number of classes", type=int)
    _add(data, "--train-subset", "train_subset", "all", "train on the first N images only", type=int, metavar="N")
    _add(data, "--test-subset", "test_subset", "all", "evaluate on the first N test images only", type=int,
         metavar="N")
    _add(data, "--num-workers", "num_workers", d.num_workers, "data loading processes (image folders)", type=int)

    optim = p.add_argument_group("optimisation")
    _add(optim, "--optimizer", "optimizer", d.optimizer, "SGD, Adam or AdamW", choices=("SGD", "Adam", "AdamW"))
    _add(optim, "--lr", "lr", d.lr, "learning rate", type=float)
    _add(optim, "--momentum", "momentum", d.momentum, "SGD momentum", type=float)
    _add(optim, "--wd", "wd", "1e-3, 1e-4 for ImageNet topologies (main_imagenet.py)", "weight decay", type=float)
    _add(optim, "--lr-scheduler", "lr_scheduler", d.lr_scheduler,
         "cosine (stepped every iteration), multistep or step (main_imagenet.py's StepLR)",
         choices=("cosine", "multistep", "step"))
    _add(optim, "--scheduler-step-size", "scheduler_step_size", d.scheduler_step_size,
         "step: epochs between LR drops (by --multistep-gamma)", type=int)
    _add(optim, "--milestone", "milestone", d.milestone, "multistep: first milestone as a fraction of the epochs",
         type=float)
    _add(optim, "--multistep-gamma", "multistep_gamma", d.multistep_gamma, "multistep: LR factor", type=float)
    _add(optim, "--batch-size", "batch_size", "128, 256 for ImageNet topologies", "batch size per process", type=int)
    _add(optim, "--epochs", "epochs", "20, 90 for ImageNet topologies", "training epochs", type=int)
    _add(optim, "--max-steps", "max_steps", "none", "stop after N optimizer steps (quick runs)", type=int,
         metavar="N")
    _add(optim, "--seed", "seed", d.seed, "random seed", type=int)
    _add(optim, "--amp", "amp", "off", "mixed precision: bf16 (CPU or CUDA) or fp16 (CUDA, with a GradScaler); bare "
         "--amp picks fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16/AMX) and float32 on other CPUs, "
         "where bf16 is emulated and many times slower", nargs="?", const="auto", choices=("auto", "bf16", "fp16"))

    _add(optim, "--channels-last", "channels_last", d.channels_last, "model and batches in channels-last memory "
         "format (the same training, faster convolutions on some hardware)", type=str2bool, nargs="?", const=True,
         metavar="BOOL")

    run = p.add_argument_group("run")
    _add(run, "--device", "device", d.device, "cpu, cuda, cuda:N or auto")
    _add(run, "--sync-deconv", "sync_deconv", d.sync_deconv,
         "average whitening statistics across ranks (the SyncBatchNorm of deconvolution)",
         type=str2bool, nargs="?", const=True, metavar="BOOL")
    _add(run, "--fast", "fast", d.fast, "fast mode: recompute each whitening matrix every K training steps and reuse "
         "it in between (1: exact; see ndeconv.set_fast_mode for the cost)", type=int, metavar="K")
    _add(run, "--bf16-whitening", "bf16_whitening", d.bf16_whitening, "under --amp bf16 on CPU, the whitening's "
         "patch Gram matrix, its backward and the fold W·D as bf16 products (see ndeconv.set_bf16_whitening)",
         type=str2bool, nargs="?", const=True, metavar="BOOL")
    _add(run, "--keep-freed-memory", "keep_freed_memory", d.keep_freed_memory,
         "let glibc's malloc reuse freed memory instead of mapping it afresh every step (same results, "
         "10-40%% faster steps on CPU; see ndeconv.keep_freed_memory)", type=str2bool, metavar="BOOL")
    _add(run, "--checkpoint-every", "checkpoint_every", d.checkpoint_every,
         "save a resumable checkpoint every N steps (and at every epoch end)", type=int, metavar="N")
    _add(run, "--log-every", "log_every", d.log_every, "log line every N steps when not on a terminal (and at the "
         "first steps, 1, 2, 5 and 10)", type=int)
    _add(run, "--curve-rows", "curve_rows", d.curve_rows, "about N rows per epoch of training loss/top-1 in "
         "steps.jsonl (the batch curve of curves.png)", type=int, metavar="N")
    run.add_argument("--out", metavar="RUN_DIR", default=None,
                     help="run directory (default: runs/<arch>-<nd|bn>-<dataset>-<timestamp>)")
    run.add_argument("--resume", metavar="RUN_DIR", default=None,
                     help="continue a killed run from its last checkpoint, with its own settings")
    run.add_argument("--force", action="store_true", help="start over in an existing --out directory")
    # ``deconvolve`` is no flag: the run takes it from its --initial-checkpoint.
    p.set_defaults(func=_run, _train_fields=tuple(f.name for f in fields(TrainConfig) if f.name != "deconvolve"))


def _run(args: argparse.Namespace) -> int:
    from ..training import TrainConfig, train

    given = {name: getattr(args, name) for name in args._train_fields if getattr(args, name, None) is not None}
    if args.resume and args.force:
        raise UsageError("--force starts a run over and --resume continues it: pass one of them")
    if args.amp == "auto":
        given["amp"] = "auto"
    cfg = TrainConfig.from_dict(given)
    train(cfg, out=args.out, resume=args.resume, force=args.force, given=frozenset(given))
    return 0
