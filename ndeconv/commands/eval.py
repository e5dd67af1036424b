"""``ndeconv eval``: test-set top-1, top-5 and loss of a zoo model, a run directory or a weights file; for a
segmentation model (a ``train-seg`` run, a converted checkpoint) val-split pixel accuracy and mean IoU."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "evaluate a model on a dataset's test split (top-1, top-5, loss)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from .train import deconv_form

    p = subparsers.add_parser(
        "eval",
        help=HELP,
        description="Evaluate MODEL (a zoo name with its pretrained tag, e.g. resnet18_deconv.fashion_mnist, an "
        "hf-hub:/local-dir: name, or a run directory of `ndeconv train`) or --checkpoint FILE (safetensors, or a "
        "torch checkpoint read weights-only) on the test split of --dataset. MODEL may also be an .onnx file (from "
        "`ndeconv export`): it runs through onnxruntime, with the dataset, normalisation and label names its "
        "metadata_props record. A segmentation model (a run directory of `ndeconv train-seg`, or --checkpoint FILE "
        "of one, e.g. from `ndeconv convert-reference`, with --arch fcn_resnet50d ... when no config.json is beside "
        "it) is scored on the val split of --dataset cityscapes|voc: pixel accuracy, mean and per-class IoU.",
    )
    p.add_argument("model", nargs="?", metavar="MODEL[.TAG]",
                   help="zoo name with tag, timm name, run directory, or an .onnx file (run by onnxruntime)")
    p.add_argument("--checkpoint", metavar="FILE", help="weights file (a run's model.safetensors, the authors' .pth)")
    p.add_argument("--dataset", help="dataset (default: the one the weights were trained on, when recorded); "
                   "cityscapes or voc for a segmentation model")
    p.add_argument("--data-dir", metavar="DIR", help="folder with the dataset's files")
    p.add_argument("--img-size", type=int, help="image size for imagefolder (default: the run's, else 32)")
    p.add_argument("--class-map", metavar="FILE",
                   help="imagefolder: timm's class map, one class folder name per line in class-index order (a "
                   "shipped weights folder has class_map.txt; default: the model's label names, else train/)")
    p.add_argument("--base-size", type=int, metavar="N",
                   help="segmentation: val images resized to N on the shorter side (default: the run's, else 520)")
    p.add_argument("--test-subset", type=int, metavar="N",
                   help="evaluate on the first N test images only (segmentation: val images)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="batch size (default: 256; a segmentation model sees one image at a time, as train-seg "
                   "evaluates)")
    p.add_argument("--num-workers", type=int, default=0, help="data loading processes (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    arch = p.add_argument_group("describing a --checkpoint without a config.json beside it")
    arch.add_argument("--arch", help="zoo architecture (resnet18 or resnet18_deconv, ...)")
    arch.add_argument("--deconv", type=deconv_form, metavar="BOOL|stem",
                      help="deconvolution (true), BatchNorm (false) or the hybrid (stem)")
    arch.add_argument("--block", type=int, help="deconvolution block size")
    arch.add_argument("--block-fc", type=int, help="Delinear block (0: Linear head)")
    arch.add_argument("--deconv-iter", type=int, help="Newton-Schulz iterations")
    arch.add_argument("--num-classes", type=int, help="classes of the head (default: read from the weights)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..datasets import get_spec, read_class_map
    from ..errors import UsageError
    from ..loading import load_eval_model
    from ..training.dist import _pick_device
    from ..training.evaluate import evaluate_on_dataset, recorded_crop_pct, recorded_img_size
    from ..training.seg_data import SEG_DATASETS
    from ..training.segmentation import is_segmentation_model

    if args.model is not None and args.model.lower().endswith(".onnx"):
        return _run_onnx(args)
    device = _pick_device(args.device, 0)
    model_args = {k: v for k, v in dict(
        deconv=args.deconv, block=args.block, block_fc=args.block_fc, deconv_iter=args.deconv_iter,
        num_classes=args.num_classes,
    ).items() if v is not None}
    dataset = args.dataset
    if dataset is not None and dataset not in SEG_DATASETS:
        get_spec(dataset)  # an unknown dataset fails before any model is built
    class_map = read_class_map(args.class_map) if args.class_map is not None else None  # so does a bad class map
    model, info = load_eval_model(args.model, args.checkpoint, args.arch, model_args)
    name = args.model or args.checkpoint
    if is_segmentation_model(model):
        return _run_segmentation(args, model, info, name, device)
    dataset = dataset or info.get("dataset")
    if dataset in SEG_DATASETS:
        raise UsageError(f"{name} is a classifier and {dataset} a segmentation dataset; evaluate it on a "
                         "classification dataset (fashion_mnist, mnist, cifar10, cifar100, imagefolder), or "
                         "name a segmentation model (a train-seg run directory, --checkpoint FILE --arch "
                         "fcn_resnet50d ...)")
    if args.base_size is not None:
        raise UsageError("--base-size sizes a segmentation model's images; for a classifier drop it (use --img-size)")
    if not dataset:
        if args.checkpoint is not None:
            # A weights file alone records no data: timm's train.py checkpoints (model_best.pth.tar) included.
            raise UsageError(f"{args.checkpoint} does not say what data it was trained on; pass --dataset "
                             "(fashion_mnist, mnist, cifar10, cifar100), or for a timm train.py checkpoint "
                             "--dataset imagefolder --data-dir DIR, the folder train.py read (and --class-map FILE "
                             "if it used one)")
        raise UsageError("which data? pass --dataset (fashion_mnist, mnist, cifar10, cifar100, imagefolder)")
    if class_map is not None and get_spec(dataset).kind != "imagefolder":
        raise UsageError(f"--class-map orders an image folder's classes; {dataset} has its own order: drop it or "
                         "pass --dataset imagefolder")
    class_names = class_map or info.get("label_names")
    result = evaluate_on_dataset(model, dataset, args.data_dir, args.batch_size, device, args.test_subset,
                                 args.num_workers, recorded_img_size(info, args.img_size), class_names,
                                 recorded_crop_pct(info))
    if args.json:
        print(json.dumps({"model": name, "dataset": dataset, **result.to_dict()}))
    else:
        print(f"{name} on {dataset} test ({result.count} images): top-1 {result.top1:.2f}%  "
              f"top-5 {result.top5:.2f}%  loss {result.loss:.4f}")
    return 0


def _run_segmentation(args: argparse.Namespace, model, info: dict, name: str, device) -> int:  # noqa: ANN001
    """A segmentation model on the val split of cityscapes or voc (``evaluate_segmentation``)."""
    from ..errors import UsageError
    from ..training.seg_data import SEG_DATASETS
    from ..training.segmentation import CONFIG_KEY, evaluate_segmentation

    config = info.get("config") or {}
    dataset = args.dataset or info.get("dataset")
    if dataset is None:
        raise UsageError(f"{name} is a segmentation model: pass --dataset {' or '.join(SEG_DATASETS)}")
    if dataset not in SEG_DATASETS:
        raise UsageError(f"{name} is a segmentation model and {dataset} a classification dataset; pass --dataset "
                         f"{' or '.join(SEG_DATASETS)} (the folder of its val split as --data-dir)")
    for flag, value in (("--class-map", args.class_map), ("--img-size", args.img_size)):
        if value is not None:
            raise UsageError(f"{flag} is for classifiers; a segmentation model's images are sized by --base-size: "
                             f"drop {flag}")
    base_size = args.base_size
    if base_size is None:
        recorded = (config.get("input") or {}).get("base_size") or (config.get(CONFIG_KEY) or {}).get("base_size")
        base_size = int(recorded) if recorded else 520
    label_names = info.get("label_names") if config.get("dataset") in (None, dataset) else None
    result = evaluate_segmentation(model, dataset, args.data_dir, base_size, device=device, limit=args.test_subset,
                                   workers=args.num_workers, label_names=label_names)
    if args.json:
        print(json.dumps({"model": name, **result.to_dict()}))
        return 0

    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.2f}%"

    print(f"{name} on {dataset} val ({result.count} images, base size {result.base_size}, {result.num_classes} "
          f"classes): pixel acc {pct(result.pixel_acc)}  mIoU {pct(result.miou)}")
    return 0


def _run_onnx(args: argparse.Namespace) -> int:
    """``ndeconv eval FILE.onnx``: the file through onnxruntime (``evaluate_onnx``)."""
    from ..datasets import get_spec, read_class_map
    from ..errors import UsageError
    from ..training.evaluate import evaluate_onnx

    torch_only = [flag for flag, value in (
        ("--checkpoint", args.checkpoint), ("--arch", args.arch), ("--deconv", args.deconv), ("--block", args.block),
        ("--block-fc", args.block_fc), ("--deconv-iter", args.deconv_iter), ("--num-classes", args.num_classes),
        ("--img-size", args.img_size), ("--base-size", args.base_size),
    ) if value is not None]
    if torch_only:
        raise UsageError(f"{args.model} is an ONNX file, which fixes its own model and input size: drop "
                         f"{', '.join(torch_only)}")
    if args.device not in ("auto", "cpu"):
        raise UsageError(f"--device {args.device}: an ONNX file runs on onnxruntime's CPU provider; drop --device")
    if args.dataset is not None:
        get_spec(args.dataset)  # an unknown dataset fails before the file is loaded
    class_map = read_class_map(args.class_map) if args.class_map is not None else None
    result, metadata = evaluate_onnx(args.model, args.dataset, args.data_dir, args.batch_size, args.test_subset,
                                     class_map, args.num_workers)
    dataset = args.dataset or metadata.get("dataset")
    recorded = metadata.get("test_top1")
    if args.json:
        print(json.dumps({"model": args.model, "dataset": dataset, "runtime": "onnxruntime", **result.to_dict(),
                          "recorded_top1": float(recorded) if recorded else None}))
        return 0
    print(f"{args.model} (onnxruntime) on {dataset} test ({result.count} images): top-1 {result.top1:.2f}%  "
          f"top-5 {result.top5:.2f}%  loss {result.loss:.4f}")
    if recorded:
        print(f"recorded top-1 of {metadata.get('model', 'the weights')} (its card, PyTorch, all test images): "
              f"{float(recorded):.2f}%")
    return 0
