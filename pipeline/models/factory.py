"""Models by name: segmentation-models-pytorch's architectures and the classic ones.

`MODELS` maps the `model` value in params.yaml to a builder `(encoder, encoder_weights, classes)`.
smp models take any compatible smp/timm encoder (`resnet34`, `efficientnet-b0`, `vgg16`, `mit_b0`,
`tu-hrnet_w18`, ...); the classics are VGG16-based and ignore `encoder` (vgg16 is implied).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import segmentation_models_pytorch as smp
from torch import nn

from pipeline.config import ConfigError
from pipeline.models import classic


def _smp(arch: str, encoder: str, weights: Optional[str], classes: int, **kw) -> nn.Module:
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, classes=classes, **kw)


def _classic(cls: Callable[..., nn.Module], encoder: str, weights: Optional[str], classes: int, **kw) -> nn.Module:
    return cls(classes, pretrained=weights == "imagenet", **kw)  # imagenet: the online option; default None


MODELS: dict[str, Callable[[str, Optional[str], int], nn.Module]] = {
    **{arch: partial(_smp, arch) for arch in (
        "unet", "unetplusplus", "fpn", "pspnet", "deeplabv3", "deeplabv3plus", "linknet", "manet", "pan",
        "upernet", "segformer")},
    "dpt": partial(_smp, "dpt", dynamic_img_size=True),  # ViT encoders at any size, not just 224
    "fcn32s": partial(_classic, classic.FCN, skips=0),
    "fcn16s": partial(_classic, classic.FCN, skips=1),
    "fcn8s": partial(_classic, classic.FCN, skips=2),
    "deconvnet": partial(_classic, classic.DeconvNet),
    "deeplabv1": partial(_classic, classic.DeepLabV1),
    "deeplabv2": partial(_classic, classic.DeepLabV2),
}
CLASSIC = {"fcn32s", "fcn16s", "fcn8s", "deconvnet", "deeplabv1", "deeplabv2"}
# Smallest input side a model accepts (PAN's feature pyramid pools down to 1/256 of the input).
MIN_SIZE = {"pan": 128}


def check_input_size(name: str, size: int) -> None:
    """Input sides must be divisible by 32 and at least the model's minimum."""
    if size % 32 or size < MIN_SIZE.get(name, 32):
        raise ConfigError(f"train.image_size {size}: {name} needs a multiple of 32, at least {MIN_SIZE.get(name, 32)}")


def build_model(name: str, encoder: str, encoder_weights: Optional[str], num_classes: int) -> nn.Module:
    """Build `name` with `encoder`; unknown names and incompatible pairs raise ConfigError."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](encoder, encoder_weights, num_classes)
    except ConfigError:
        raise
    except Exception as e:  # smp/timm raise KeyError, ValueError, RuntimeError... for bad pairs
        raise ConfigError(f"model {name!r} cannot be built with encoder {encoder!r} "
                          f"(weights {encoder_weights!r}): {type(e).__name__}: {e}") from None


def encoder_of(model: nn.Module) -> nn.Module:
    """The backbone part that gets `train.encoder_lr` (smp models and classics both name it so)."""
    return model.encoder
