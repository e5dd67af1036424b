"""``ndeconv convert-reference``: turn a checkpoint of the authors' ``main.py`` into a zoo safetensors file.

Writes OUT.safetensors and a config.json beside it (timm's Hub layout: name the output model.safetensors and the
folder loads with ``timm.create_model('local-dir:FOLDER', pretrained=True)``). The checkpoint is unpickled with
``weights_only=True`` only, so it can never run code.
"""

from __future__ import annotations

import argparse

__all__ = ["register"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "convert a checkpoint of the authors' main.py to a zoo safetensors file"


def _run(args: argparse.Namespace) -> int:
    from ndeconv.convert.reference import convert_reference

    converted = convert_reference(args.checkpoint, args.output, arch=args.arch, force=args.force)
    margs = converted.model_args
    form = (f"deconvolution form, block {margs['block']}, block_fc {margs['block_fc']}" if margs["deconv"]
            else f"BatchNorm form, block_fc {margs['block_fc']}")
    print(f"wrote {args.output} and config.json beside it: {converted.model_name} ({form}, "
          f"{margs['in_chans']} input channels, {margs['num_classes']} classes)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert-reference", help=HELP,
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by the reference main.py (.pth.tar)")
    parser.add_argument("--arch", metavar="NAME", default=None,
                        help="zoo name (resnet18_deconv) or the reference's --arch (resnet, preact, mobilev2, "
                             "pnasnetA, ...); default: the checkpoint's own 'arch' field")
    parser.add_argument("-o", "--output", metavar="OUT.safetensors", required=True,
                        help="output weights file; config.json is written beside it")
    parser.add_argument("--force", action="store_true",
                        help="overwrite OUT and the config.json this command wrote beside it")
    parser.set_defaults(func=_run, claims="output")  # ndeconv.cli claims the output file before it runs
