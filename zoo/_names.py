"""Model names users may type: the zoo name, the same without ``_deconv``, or the authors' ``--arch`` value."""

from __future__ import annotations

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
    bare = ", ".join(m.removesuffix("_deconv") for m in zoo_models)
    raise UsageError(f"unknown {what} {name!r}; choose one of: {bare} (the _deconv suffix is optional; the "
                     f"authors' --arch names {', '.join(REFERENCE_ARCHS)} work too)")
