"""Model names users may type: the zoo name, the same without ``_deconv``, or the authors' ``--arch`` value."""

from __future__ import annotations

import difflib

from ndeconv.errors import UsageError

# The authors' main.py ``--arch`` values -> zoo model names (their checkpoints record these).
REFERENCE_ARCHS: dict[str, str] = {
    "vgg16": "vgg16_deconv",
    "resnet": "resnet18_deconv",
    "preact": "preact_resnet18_deconv",
    "densenet121": "densenet121_deconv",
    "resnext": "resnext29_32x4d_deconv",
    "mobilev2": "mobilenetv2_deconv",
    "dpn": "dpn92_deconv",
    "senet": "senet18_deconv",
    "pnasnetA": "pnasnet_a_deconv",
    "efficient": "efficientnet_b0_deconv",
    # main.py's other CIFAR models (ndeconv.zoo.EXTRA_MODELS; --deconv False gives their BatchNorm form).
    "vgg11": "vgg11_deconv",
    "vgg13": "vgg13_deconv",
    "vgg19": "vgg19_deconv",
    "resnet34": "resnet34_deconv",
    "resnet50": "resnet50_deconv",
    "pnasnetB": "pnasnet_b_deconv",
    # main.py's MNIST models (models/simple.py; 28x28 gray input).
    "mlp": "mlp_deconv",
    "simple_v1": "simple_v1_deconv",
    "simple_v2": "simple_v2_deconv",
    # main_imagenet.py ``-a`` (deconvolution models; timm's resnet18d/resnet50d are ResNet-D, another network,
    # hence our own names).
    "resnet18d": "resnet18_imagenet_deconv",
    "resnet34d": "resnet34_imagenet_deconv",
    "resnet50d": "resnet50_imagenet_deconv",
    "resnet101d": "resnet101_imagenet_deconv",
    "vgg11d": "vgg11_imagenet_deconv",
    "vgg16d": "vgg16_imagenet_deconv",
    "densenet121d": "densenet121_imagenet_deconv",
    # Segmentation/train.py ``--model`` (not timm models: ndeconv.zoo.deconv_segmentation builds them).
    "fcn_resnet50d": "fcn_resnet50_deconv",
    "fcn_resnet101d": "fcn_resnet101_deconv",
    "deeplabv3_resnet50d": "deeplabv3_resnet50_deconv",
    "deeplabv3_resnet101d": "deeplabv3_resnet101_deconv",
}

# main_imagenet.py's baselines are torchvision's models (``-a resnet18``, ``-a vgg11``, ``-a vgg11_bn``, ...): in one
# of its checkpoints ``arch`` names the zoo model built with ``deconv=False`` (and, for ``vgg11_bn``/``vgg16_bn``,
# ``batch_norm=True``, which the converter reads off the state_dict). (In main.py's, ``resnet18``, ``densenet121``,
# ``vgg11`` and ``vgg16`` mean the CIFAR models: only a converter that knows the checkpoint's script uses this table.)
IMAGENET_BASELINE_ARCHS: dict[str, str] = {
    "resnet18": "resnet18_imagenet_deconv",
    "resnet34": "resnet34_imagenet_deconv",
    "resnet50": "resnet50_imagenet_deconv",
    "resnet101": "resnet101_imagenet_deconv",
    "vgg11": "vgg11_imagenet_deconv",
    "vgg16": "vgg16_imagenet_deconv",
    "vgg11_bn": "vgg11_imagenet_deconv",
    "vgg16_bn": "vgg16_imagenet_deconv",
    "densenet121": "densenet121_imagenet_deconv",
}
# Segmentation/train.py's ``--model`` names of its BatchNorm models (its copy of torchvision's): the same zoo models
# with ``deconv=False``.
SEGMENTATION_BASELINE_ARCHS: dict[str, str] = {
    "fcn_resnet50": "fcn_resnet50_deconv",
    "fcn_resnet101": "fcn_resnet101_deconv",
    "deeplabv3_resnet50": "deeplabv3_resnet50_deconv",
    "deeplabv3_resnet101": "deeplabv3_resnet101_deconv",
}


def resolve_model_name(name: str, zoo_models: list[str], what: str = "model") -> str:
    """``resnet18_deconv``, ``resnet18`` or the authors' ``resnet`` -> ``resnet18_deconv``; else a UsageError
    naming ``what`` (e.g. ``--arch``) and the choices. (Plain ``resnet18`` in timm is timm's own ResNet; only
    here, where a zoo model is meant, does the suffix become optional.)"""
    for candidate in (name, f"{name}_deconv"):
        if candidate in zoo_models:
            return candidate
    if name in REFERENCE_ARCHS:
        return REFERENCE_ARCHS[name]
    if name in SEGMENTATION_BASELINE_ARCHS.values():  # a segmentation model: its builder is not a timm model
        return name
    close = closest_names(name, [*zoo_models, *REFERENCE_ARCHS, *SEGMENTATION_BASELINE_ARCHS.values()])
    if close:  # a typo: the few names meant, not all 56
        guess = close[0] if len(close) == 1 else f"{', '.join(close[:-1])} or {close[-1]}"
        raise UsageError(f"unknown {what} {name!r}; did you mean {guess}? (`ndeconv list` lists every model)")
    bare = ", ".join(m.removesuffix("_deconv") for m in zoo_models)
    raise UsageError(f"unknown {what} {name!r}; choose one of: {bare} (the _deconv suffix is optional; the "
                     f"authors' --arch names {', '.join(REFERENCE_ARCHS)} work too)")


def closest_names(name: str, choices: list[str], n: int = 3) -> list[str]:
    """The zoo names closest to a mistyped ``name`` (difflib's ratio of at least 0.75), best first, at most
    ``n`` and only those nearly as close as the best. Names are compared with and without the ``_deconv`` suffix
    (the higher ratio counts), so ``resnt18`` finds ``resnet18_deconv`` although the suffix alone halves the
    ratio; an authors' name among ``choices`` (``resnet``) is given as the zoo name it stands for."""
    typed = name.lower()
    scores: dict[str, float] = {}
    for choice in choices:
        target = REFERENCE_ARCHS.get(choice, choice)
        low = choice.lower()
        ratio = max(difflib.SequenceMatcher(None, typed, low).ratio(),
                    difflib.SequenceMatcher(None, typed.removesuffix("_deconv"), low.removesuffix("_deconv")).ratio())
        # 0.75, not difflib's 0.6: a typo (resnt18, vgg23) scores 0.8 and more, while another model's name
        # (lenet5 against the authors' senet: 0.73) is no typo of ours and gets the full list instead.
        if ratio >= 0.75 and ratio > scores.get(target, 0.0):
            scores[target] = ratio
    if not scores:
        return []
    best = max(scores.values())
    # A clear winner alone: "resnt18" is resnet18, not also resnext29 (0.1: about one character of a short name).
    near = [c for c in scores if scores[c] >= best - 0.1]
    return sorted(near, key=lambda c: (-scores[c], c))[:n]
