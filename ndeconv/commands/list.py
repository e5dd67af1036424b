"""``ndeconv list``: every zoo model, grouped (the paper's ten, main.py's other CIFAR models, the ImageNet topologies,
the segmentation builders), with its parameter count, the authors' names that resolve to it, its pretrained tags and
whether their weights are here."""

from __future__ import annotations

import argparse
import fnmatch
import json

__all__ = ["GROUPS", "authors_names", "register", "zoo_table"]

# The one line `ndeconv --help` lists (ndeconv.cli reads it without registering the command).
HELP = "list the zoo's models, parameters and pretrained weights"


# The zoo's groups, in the order `ndeconv list` prints them: (key, heading, classes the parameters are counted for).
GROUPS: tuple[tuple[str, str, int], ...] = (
    ("paper", "the paper's ten CIFAR models (main.py; ndeconv train trains them, weights ship for them)", 10),
    ("extra", "main.py's other CIFAR and MNIST models (no weights)", 10),
    ("imagenet", "the ImageNet topologies (main_imagenet.py; no weights)", 1000),
    ("segmentation", "the segmentation builders (Segmentation/train.py; not timm models, no weights)", 21),
)


def _group_models() -> dict[str, list[str]]:
    import ndeconv.zoo as zoo
    from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

    return {"paper": list(zoo.ZOO_MODELS), "extra": list(zoo.EXTRA_MODELS), "imagenet": list(zoo.IMAGENET_MODELS),
            "segmentation": sorted(SEGMENTATION_MODELS)}


def authors_names(name: str) -> list[str]:
    """The authors' names (main.py --arch, main_imagenet.py -a, Segmentation/train.py --model) that resolve to
    ``name``: REFERENCE_ARCHS read backwards."""
    from ndeconv.zoo import REFERENCE_ARCHS

    return [theirs for theirs, ours in REFERENCE_ARCHS.items() if ours == name]


def zoo_table(pattern: str = "*", deconv: bool = True, groups: tuple[str, ...] | None = None) -> list[dict]:
    """One row per zoo model: name, trainable parameters (3 channels; ``num_classes`` the group's: 10 for the CIFAR
    models, 1000 ImageNet, 21 segmentation), tags and their weights, ``group`` and ``authors_names``.

    The paper's ten come first with the keys and values they always had (``name``, ``params`` at 10 classes,
    ``tags``); the other keys and groups were added later, so a reader of the old JSON sees the same ten rows.
    ``timm``: whether ``timm.create_model`` builds it (not the segmentation builders, nor the two MNIST models without
    feature maps, ``ndeconv.zoo.NDECONV_ONLY_MODELS``: ``ndeconv.zoo.create_model`` builds every row's model)."""
    import torch

    from ndeconv.zoo import NDECONV_ONLY_MODELS, create_model, get_pretrained_cfg
    from ndeconv.zoo._pretrained import registered_tags, shipped_weights_path
    from ndeconv.zoo.deconv_segmentation import SEGMENTATION_MODELS

    members = _group_models()
    rows = []
    for group, _, num_classes in GROUPS:
        if groups is not None and group not in groups:
            continue
        for name in members[group]:
            if not fnmatch.fnmatch(name, pattern):
                continue
            with torch.device("meta"):  # count parameters without allocating them
                if group == "segmentation":
                    model = SEGMENTATION_MODELS[name](deconv=deconv, num_classes=num_classes, in_chans=3)
                else:
                    # The default model's channels (its registered cfg's): 3, or 1 for the MNIST models.
                    in_chans = int(get_pretrained_cfg(name).input_size[0])
                    model = create_model(name, deconv=deconv, num_classes=num_classes, in_chans=in_chans)
            params = sum(p.numel() for p in model.parameters() if p.requires_grad)
            tags = []
            # Every tag, also those whose weights are not trained yet (the segmentation builders are not in timm's
            # registry and have none).
            for tag in registered_tags(name) if group != "segmentation" else ():
                cfg = get_pretrained_cfg(f"{name}.{tag}")
                file = shipped_weights_path(name, tag)  # where this install keeps them (NDECONV_WEIGHTS or the clone)
                tags.append(dict(tag=tag, file=str(file), on_disk=file.is_file(), hf_hub_id=cfg.hf_hub_id))
            rows.append(dict(name=name, params=params, tags=tags, group=group, num_classes=num_classes,
                             authors_names=authors_names(name),
                             timm=group != "segmentation" and name not in NDECONV_ONLY_MODELS))
    return rows


def _run(args: argparse.Namespace) -> int:
    rows = zoo_table(args.pattern, deconv=not args.bn, groups=tuple(args.group) if args.group else None)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:  # the grouped table would print nothing at all
        print(f"no zoo model matches {args.pattern!r}; `ndeconv list` shows them all")
        return 0
    for group, heading, num_classes in GROUPS:
        group_rows = [row for row in rows if row["group"] == group]
        if not group_rows:
            continue
        if group_rows[0] is not rows[0]:
            print()
        print(f"# {heading}; parameters at {num_classes} classes")
        print(f"{'model':<28} {'params':>12}  {'authors name':<21} pretrained tags (weights on disk?)")
        # The segmentation heading says its builders are not timm's; in a timm group, a mark says which are not.
        marked = group != "segmentation" and not all(row["timm"] for row in group_rows)
        for row in group_rows:
            tags = ", ".join(f"{t['tag']} ({'yes' if t['on_disk'] else 'no'})" for t in row["tags"]) or "-"
            theirs = ", ".join(row["authors_names"]) or "-"
            name = row["name"] + ("*" if marked and not row["timm"] else "")
            print(f"{name:<28} {row['params']:>12,}  {theirs:<21} {tags}")
        if marked:
            print("* not a timm model (no feature maps for timm's model contract): build it with "
                  "ndeconv.zoo.create_model (timm's keywords), torch.hub or the ndeconv commands")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help=HELP,
                                   description=__doc__)
    parser.add_argument("pattern", nargs="?", default="*", help="shell pattern on model names (default: all)")
    parser.add_argument("--bn", action="store_true", help="count parameters of the BatchNorm baseline form")
    parser.add_argument("--group", action="append", choices=[g for g, _, _ in GROUPS],
                        help="list only this group (repeatable; default: all)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=_run)
