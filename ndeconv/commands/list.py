"""``ndeconv list``: the zoo's models, their parameter counts, pretrained tags and whether the weights are here."""

from __future__ import annotations

import argparse
import fnmatch
import json

__all__ = ["register", "zoo_table"]


def zoo_table(pattern: str = "*", deconv: bool = True) -> list[dict]:
    """One row per zoo model: name, trainable parameters (10 classes, 3 channels), tags and their weights."""
    import timm
    import torch
    from timm.models import get_pretrained_cfg

    import ndeconv.zoo as zoo
    from ndeconv.zoo._pretrained import registered_tags, shipped_weights_path

    rows = []
    for name in zoo.ZOO_MODELS:
        if not fnmatch.fnmatch(name, pattern):
            continue
        with torch.device("meta"):  # count parameters without allocating them
            model = timm.create_model(name, deconv=deconv, num_classes=10, in_chans=3)
        params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        tags = []
        for tag in registered_tags(name):  # every tag, also those whose weights are not trained yet
            cfg = get_pretrained_cfg(f"{name}.{tag}")
            file = shipped_weights_path(name, tag)  # where this install keeps them (NDECONV_WEIGHTS or the clone)
            tags.append(dict(tag=tag, file=str(file), on_disk=file.is_file(), hf_hub_id=cfg.hf_hub_id))
        rows.append(dict(name=name, params=params, tags=tags))
    return rows


def _run(args: argparse.Namespace) -> int:
    rows = zoo_table(args.pattern, deconv=not args.bn)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<26} {'params':>12}  pretrained tags (weights on disk?)")
    for row in rows:
        tags = ", ".join(f"{t['tag']} ({'yes' if t['on_disk'] else 'no'})" for t in row["tags"]) or "-"
        print(f"{row['name']:<26} {row['params']:>12,}  {tags}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the zoo's models, parameters and pretrained weights",
                                   description=__doc__)
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern on model names (default: all)")
    parser.add_argument("--bn", action="store_true", help="count parameters of the BatchNorm baseline form")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_run)
