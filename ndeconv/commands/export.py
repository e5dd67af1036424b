"""``ndeconv export``: fold a model and write it as one verified ONNX file."""

from __future__ import annotations

import argparse

from ._model_args import add_model_source_arguments
from ._warnings import warnings_to_stderr

__all__ = ["add_input_size_argument", "input_size_for", "register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "fold a model and export it to ONNX (verified with onnxruntime)"


def register(subparsers: argparse._SubParsersAction) -> None:
    from ndeconv.onnx_defaults import (
        AUTO_CALIBRATION_METHODS,
        CALIBRATION_METHODS,
        DEFAULT_CALIBRATION_IMAGES,
        DEFAULT_CALIBRATION_METHOD,
        DEFAULT_OPSET,
        DEFAULT_SELECTION_IMAGES,
        REL_TOLERANCE,
    )

    p = subparsers.add_parser(
        "export",
        help=HELP,
        description="Fold MODEL[.TAG] (or --checkpoint FILE --arch NAME, or folded weights from `ndeconv fold`) and "
        "export it with torch's dynamo exporter to one self-contained .onnx file, batch axis dynamic unless "
        "--static-batch. --verify (default) runs onnx.checker (full check), checks the graph holds only plain "
        "inference ops, and compares onnxruntime with PyTorch on random inputs (and on Fashion-MNIST test images "
        f"for one-channel models when installed); it fails above {REL_TOLERANCE:g} relative difference. The file's "
        "metadata_props say how to feed it (input layout and size, resize, zero padding, scale, mean, std), its label "
        "names and where it came from; onnxruntime reads them as get_modelmeta().custom_metadata_map, and `ndeconv "
        "eval FILE.onnx` evaluates it with them.",
    )
    add_model_source_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="ONNX file to write (.onnx)")
    p.add_argument("--force", action="store_true", help="overwrite FILE")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default: {DEFAULT_OPSET})")
    p.add_argument("--static-batch", type=int, metavar="N", help="fix the batch size to N (default: dynamic)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="check the file with onnx.checker and onnxruntime (default: on)")
    add_input_size_argument(p, "traced and verified with")
    int8 = p.add_argument_group(
        "int8 (static quantization with onnxruntime)",
        "--int8 folds and exports in float32, calibrates the activation ranges on training images of "
        "--calibrate-data (never test images), quantizes to QDQ int8 and, with --verify, prints the int8 and "
        "float32 files' onnxruntime top-1 on the test split. The settings and those scores go into the file's "
        "metadata_props (quantization, int8_check).")
    int8.add_argument("--int8", action="store_true", help="write an int8 (QDQ) file instead of float32")
    int8.add_argument("--calibrate-data", metavar="DATASET",
                      help="dataset whose training split calibrates (fashion_mnist, mnist, cifar10, cifar100, "
                      "imagefolder)")
    int8.add_argument("--calibrate-images", type=int, metavar="N",
                      help=f"training images drawn for calibration (default: {DEFAULT_CALIBRATION_IMAGES})")
    int8.add_argument("--calibrate-method", choices=CALIBRATION_METHODS,
                      help=f"how activation ranges are set (default: {DEFAULT_CALIBRATION_METHOD}); auto quantizes "
                      f"with {' and '.join(AUTO_CALIBRATION_METHODS)} and keeps the file that agrees best with the "
                      "float32 one on held-out training images")
    int8.add_argument("--held-out-images", type=int, metavar="N",
                      help="training images after the calibration ones that --calibrate-method auto chooses on "
                      f"(default: {DEFAULT_SELECTION_IMAGES}, or as many as the training split has left)")
    int8.add_argument("--per-tensor", action="store_true",
                      help="one int8 scale per weight tensor (default: one per output channel)")
    int8.add_argument("--data-dir", metavar="DIR", help="folder with the dataset's files (default: its install path)")
    int8.add_argument("--verify-images", type=int, metavar="N",
                      help="score the first N test images only (default: all)")
    p.set_defaults(func=_run, claims="output")  # ndeconv.cli claims the output file before the command runs


def add_input_size_argument(parser: argparse.ArgumentParser, use: str) -> None:
    parser.add_argument("--input-size", type=int, nargs="+", metavar="N",
                        help=f"the example input (C H W; C L for a 1-D model, C D H W for a 3-D one) it is {use} "
                        "(default: the model's pretrained_cfg input size, else 32x32, the signal length or the "
                        "volume the topology takes)")


def input_size_for(model, values: list[int] | None,  # noqa: ANN001 - an nn.Module
                   square: bool = False) -> tuple[int, ...] | None:
    """``--input-size`` checked against ``model``: as many values as its input has axes (C H W; C L for a 1-D
    model, C D H W for a 3-D one), C its input channels, all positive, H = W with ``square`` (what the export's
    metadata can describe); None when not given (the library's default)."""
    from ndeconv.convert.fold import model_input_size
    from ndeconv.errors import NdeconvError, UsageError

    if values is None:
        return None
    given = " ".join(map(str, values))
    try:
        default = tuple(model_input_size(model))
    except NdeconvError:  # no conv and no recorded size: the values say it all
        default = tuple(values)
    layout = {2: "C L", 3: "C H W", 4: "C D H W"}.get(len(default), f"{len(default)} values")
    example = " ".join(map(str, default))
    if len(values) != len(default):
        raise UsageError(f"--input-size {given}: {type(model).__name__} takes {layout} ({len(default)} values), e.g. "
                         f"--input-size {example}")
    if any(v < 1 for v in values):
        raise UsageError(f"--input-size {given}: every size must be >= 1, e.g. --input-size {example}")
    if values[0] != default[0]:
        raise UsageError(f"--input-size {given}: {type(model).__name__} takes {default[0]} input channel(s), not "
                         f"{values[0]}; e.g. --input-size {example}")
    if square and len(values) == 3 and values[1] != values[2]:
        # export_onnx's metadata describes timm's centre crop of a square input only (a segmentation export's
        # spatial axes are dynamic, so the traced size is not a limit on what the file takes).
        raise UsageError(f"--input-size {given}: the export traces a square image (its metadata describes timm's "
                         f"centre crop of H x H); pass --input-size {values[0]} {values[1]} {values[1]} (a "
                         "segmentation model's file takes any H x W: its spatial axes stay dynamic)")
    return tuple(values)


def _run(args: argparse.Namespace) -> int:
    from ndeconv.convert import FoldWarning, export_onnx
    from ndeconv.convert.export import MAX_OPSET, MIN_OPSET, REL_TOLERANCE
    from ndeconv.errors import UsageError
    from ndeconv.io import check_output_path

    if not args.output.endswith(".onnx"):
        raise UsageError(f"-o {args.output}: name the ONNX file *.onnx")
    if args.static_batch is not None and args.static_batch < 1:
        raise UsageError(f"--static-batch must be >= 1, got {args.static_batch}")
    if not MIN_OPSET <= args.opset <= MAX_OPSET:
        raise UsageError(f"--opset {args.opset}: choose an ONNX opset from {MIN_OPSET} to {MAX_OPSET} (what the "
                         "installed torch exporter writes), such as 18 or 20")
    _check_int8_arguments(args)
    output = check_output_path(args.output, args.force)  # fail before any work
    from ._model_source import load_model_source  # torch and the loader: only when the command runs

    source = load_model_source(args)
    input_size = input_size_for(source.model, args.input_size, square=True)
    if args.int8:
        return _run_int8(args, source, output, input_size)
    with warnings_to_stderr("export", FoldWarning):
        # Verified before it replaces anything: a failed check leaves an existing file as it was.
        result = export_onnx(source.model, output, opset=args.opset, static_batch=args.static_batch,
                             input_size=input_size, force=True, verify=args.verify, config=_source_config(source),
                             source=source.description)
    batch = f"static batch {args.static_batch}" if args.static_batch else "dynamic batch"
    print(f"wrote {result.path} (opset {result.opset}, {batch}, input {'x'.join(map(str, result.input_size))})")
    meta = result.metadata
    print(f"metadata_props: {len(meta)} keys; preprocess: {meta['preprocess']}")
    verification = result.verification
    if verification is None:
        return 0
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(verification.ops.items()))
    print(f"onnx.checker (full): ok; ops: {ops}")
    for line in verification.lines():
        print(f"onnxruntime vs PyTorch, {line}")
    print(f"verified: max abs diff {verification.max_abs:.3g}, max rel diff {verification.max_rel:.3g} "
          f"<= {REL_TOLERANCE:g}")
    return 0


_INT8_ONLY = ("--calibrate-data", "--calibrate-images", "--calibrate-method", "--held-out-images", "--per-tensor",
              "--data-dir", "--verify-images")


def _check_int8_arguments(args: argparse.Namespace) -> None:
    """Bad int8 settings fail in one line before any model is loaded."""
    from ndeconv.dataset_specs import get_spec
    from ndeconv.errors import UsageError
    from ndeconv.onnx_defaults import (
        DEFAULT_CALIBRATION_IMAGES,
        DEFAULT_CALIBRATION_METHOD,
        DEFAULT_SELECTION_IMAGES,
        MIN_CALIBRATION_IMAGES,
    )

    given = [flag for flag in _INT8_ONLY if getattr(args, flag[2:].replace("-", "_")) not in (None, False)]
    if not args.int8:
        if given:
            raise UsageError(f"{given[0]} is an int8 setting: add --int8, or drop it")
        return
    if args.calibrate_data is None:
        raise UsageError("--int8 calibrates on training images: pass --calibrate-data DATASET, the data the model was "
                         "trained on (e.g. --calibrate-data fashion_mnist)")
    get_spec(args.calibrate_data)  # an unknown dataset, in one line
    if args.calibrate_images is not None and args.calibrate_images < MIN_CALIBRATION_IMAGES:
        raise UsageError(f"--calibrate-images {args.calibrate_images}: too few to set the activation ranges; use at "
                         f"least {MIN_CALIBRATION_IMAGES} (default {DEFAULT_CALIBRATION_IMAGES})")
    if args.held_out_images is not None and (args.calibrate_method or DEFAULT_CALIBRATION_METHOD) != "auto":
        raise UsageError("--held-out-images sets what --calibrate-method auto chooses on: add --calibrate-method auto, "
                         "or drop it")
    if args.held_out_images is not None and args.held_out_images < 1:
        raise UsageError(f"--held-out-images {args.held_out_images}: must be >= 1 (default {DEFAULT_SELECTION_IMAGES})")
    if args.verify_images is not None and args.verify_images < 1:
        raise UsageError(f"--verify-images {args.verify_images}: must be >= 1; leave it out to score every test image")
    if args.verify_images is not None and not args.verify:
        raise UsageError("--verify-images sets how many test images --verify scores: drop it or --no-verify")


def _run_int8(args: argparse.Namespace, source, output, input_size) -> int:  # noqa: ANN001
    from ndeconv.convert import FoldWarning
    from ndeconv.convert.quantize import DEFAULT_CALIBRATION_IMAGES, DEFAULT_CALIBRATION_METHOD, export_int8

    with warnings_to_stderr("export", FoldWarning):
        result = export_int8(
            source.model, output, calibrate_data=args.calibrate_data,
            calibrate_images=args.calibrate_images or DEFAULT_CALIBRATION_IMAGES,
            per_channel=not args.per_tensor, method=args.calibrate_method or DEFAULT_CALIBRATION_METHOD,
            selection_images=args.held_out_images, data_dir=args.data_dir,
            verify=args.verify, verify_images=args.verify_images, opset=args.opset, static_batch=args.static_batch,
            input_size=input_size, force=True, config=_source_config(source), source=source.description)
    settings, check = result.settings, result.check
    print(f"wrote {result.path} (int8 QDQ, opset {args.opset}, "
          f"{'static batch ' + str(args.static_batch) if args.static_batch else 'dynamic batch'})")
    print(f"quantization: weights {settings['weights']}; activations {settings['activations']}; calibrated by "
          f"{settings['calibration']} on {settings['calibration_images']} images of {settings['calibration_data']}")
    if "calibration_choice" in settings:
        choice = settings["calibration_choice"]
        print(f"calibration method auto: agreement with the float32 file on {choice['held_out_images']} held-out "
              "training images: " + ", ".join(f"{m} {s['agreement']:.2f}%" for m, s in choice["candidates"].items())
              + f"; kept {settings['calibration']}")
    print(f"onnx.checker (full): ok; {check.quantized_layers} of {check.weighted_layers} conv/linear layers hold int8 "
          "weights; ops: " + ", ".join(f"{op} x{n}" for op, n in sorted(check.ops.items())))
    if check.top1_int8 is not None:
        print(f"onnxruntime top-1 on {check.dataset} test ({check.images} images): float32 {check.top1_float32:.2f}%, "
              f"int8 {check.top1_int8:.2f}% ({check.top1_int8 - check.top1_float32:+.2f} points)")
    return 0


def _source_config(source) -> dict:  # noqa: ANN001 - a ModelSource
    """The config.json that describes the source's weights: a run directory's, the one beside a weights file, or
    the shipped folder's of a zoo name (none for an untrained model or weights from the Hub)."""
    from ndeconv.convert.export import weights_config

    described = source.description
    if described.get("weights") == "random init":
        return {}
    where = described.get("run") or described.get("checkpoint")
    if where is None:
        where = (getattr(source.model, "pretrained_cfg", None) or {}).get("file")
    return weights_config(where)

