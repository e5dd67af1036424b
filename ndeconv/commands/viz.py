"""``ndeconv viz``: the first layer's effective deconvolution kernels and whitened test images, as one PNG."""

from __future__ import annotations

import argparse

__all__ = ["register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
# One column per image: more than this makes a figure too wide to read (and to draw: minutes for 100,000).
MAX_IMAGES = 32

HELP = "draw the first layer's deconvolution kernels and a few whitened test images"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "viz",
        help=HELP,
        description="Draw the running whitening matrix of a model's first FastDeconv as kernels (the paper's "
        "center-surround receptive fields) and a few test images before and after whitening, as one PNG.",
    )
    p.add_argument("model", metavar="MODEL[.TAG]", help="zoo name with tag (resnet18_deconv.fashion_mnist) or run dir")
    p.add_argument("-o", "--out", required=True, help="output PNG")
    p.add_argument("--dataset", help="dataset of the test images (default: the tag's or the run's)")
    p.add_argument("--data-dir", help="folder of the dataset's files")
    p.add_argument("--num-images", type=int, default=6,
                   help=f"test images to show, at most {MAX_IMAGES} (default: 6)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=_run, claims="out")  # ndeconv.cli claims the output file before the command runs


def _run(args: argparse.Namespace) -> int:
    from ..datasets import get_spec, load_split
    from ..errors import UsageError
    from ..io import atomic_write, check_output_path
    from ..loading import load_eval_model
    from ..training.data import Preprocess
    from ..training.evaluate import recorded_img_size
    from ..viz import whitening_figure

    out = check_output_path(args.out, args.force)
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise UsageError(f"--num-images must be between 1 and {MAX_IMAGES} (the figure shows them side by side, "
                         f"each column an image and its whitened form), got {args.num_images}")
    model, info = load_eval_model(args.model)
    dataset = args.dataset or info.get("dataset")
    if not dataset:
        raise UsageError(f"{args.model}: cannot tell which dataset it was trained on; pass --dataset")
    source = load_split(dataset, "test", args.data_dir, recorded_img_size(info))
    import torch

    spec = get_spec(dataset)
    # The whitening acts on what the model sees: the dataset's own normalisation.
    images = Preprocess(spec.mean, spec.std)(source.batch(torch.arange(min(args.num_images, len(source)))))
    fig = whitening_figure(model, images, title=args.model)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    print(f"wrote {out}")
    return 0
