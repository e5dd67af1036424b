"""``ndeconv fold``: fold a deconvolution model into plain conv/linear weights: one safetensors file, its config
(what the weights are) in the file's metadata."""

from __future__ import annotations

import argparse

from ._model_args import add_model_source_arguments
from ._warnings import warnings_to_stderr
from .export import add_input_size_argument, input_size_for

__all__ = ["register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "fold the whitening into plain conv/linear weights for inference"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fold",
        help=HELP,
        description="Fold MODEL[.TAG] (or --checkpoint FILE --arch NAME) into a plain network: every FastDeconv "
        "becomes a Conv2d, every Delinear a Linear, every ChannelDeconv a 1x1 Conv2d (a Linear on pooled features), "
        "and each BatchNorm directly after a conv is fused into it (unless --keep-batchnorm). Writes one file, FILE: "
        "the weights (safetensors), with the folded config (architecture, model_args, the BatchNorms fused) in its "
        "safetensors metadata, and nothing else. Load it with ndeconv.convert.load_folded, or without fused "
        "BatchNorms with timm.create_model(NAME, folded=True, **model_args) (ndeconv.convert.read_folded_config "
        "reads them) and a strict load_state_dict. The folded outputs are checked against the unfolded model in "
        "eval mode.",
    )
    add_model_source_arguments(p)
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="folded weights (.safetensors), the one file written: the folded config is in its metadata")
    p.add_argument("--force", action="store_true", help="overwrite FILE")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip comparing the folded and unfolded outputs on a random batch")
    p.add_argument("--keep-batchnorm", dest="fuse_batchnorm", action="store_false",
                   help="leave BatchNorms as they are (the folded file then loads with timm.create_model(NAME, "
                        "folded=True) alone)")
    add_input_size_argument(p, "checked with")
    p.set_defaults(func=_run, claims="output")  # ndeconv.cli claims the output file before the command runs


def _run(args: argparse.Namespace) -> int:
    from ndeconv.convert import FoldWarning, fold_with_report, save_folded
    from ndeconv.errors import UsageError
    from ndeconv.io import check_output_path

    if not args.output.endswith(".safetensors"):
        raise UsageError(f"-o {args.output}: folded weights are written as safetensors; name the file *.safetensors")
    output = check_output_path(args.output, args.force)  # fail before any work
    from ._model_source import load_model_source  # torch and the loader: only when the command runs

    source = load_model_source(args)
    if source.folded:
        raise UsageError(f"{args.checkpoint} is already folded; nothing to do")
    example = _example_input(source.model, input_size_for(source.model, args.input_size))
    with warnings_to_stderr("fold", FoldWarning):
        # The command fuses BatchNorms by default, as it always has; the library's fold() asks for it explicitly.
        folded, report = fold_with_report(source.model, example_input=example, check=args.check,
                                          fuse_batchnorm=args.fuse_batchnorm)
    weights = save_folded(folded, output, report, source.description, force=args.force)
    print(report.summary())
    # Every file the command writes is named: this one (its folded config inside, in the safetensors metadata).
    print(f"wrote {weights} (folded weights; their config is in the file's safetensors metadata)")
    return 0


def _example_input(model, input_size: tuple[int, ...] | None):  # noqa: ANN001, ANN202 - nn.Module -> Tensor | None
    """A seeded random batch of 2 of ``input_size`` (as the library's default_example_input draws its own), or
    None for the library's default."""
    import torch

    if input_size is None:
        return None
    param = next(model.parameters())
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return x.to(device=param.device, dtype=param.dtype)

