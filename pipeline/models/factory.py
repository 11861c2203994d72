"""Models by name: segmentation-models-pytorch's architectures and the classic ones.

`MODELS` maps the `model` value in params.yaml to a builder `(encoder, encoder_weights, classes)`.
smp models take any compatible smp/timm encoder (`resnet34`, `efficientnet-b0`, `vgg16`, `mit_b0`,
`tu-hrnet_w18`, ...); the classics are VGG16-based and ignore `encoder` (vgg16 is implied).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import segmentation_models_pytorch as smp
import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.models import classic


def _smp(arch: str, encoder: str, weights: Optional[str], classes: int, **kw) -> nn.Module:
    return smp.create_model(arch, encoder_name=encoder, encoder_weights=weights, classes=classes, **kw)


def _pspnet(encoder: str, weights: Optional[str], classes: int) -> nn.Module:
    """PSPNet as the paper builds it: pyramid pooling over the deepest features of a dilated encoder
    (all five stages, output stride 8), then 8x upsampling. smp's default (encoder_depth 3) pools
    stride-8 features of a truncated encoder and leaves the deeper stages without a gradient."""
    model = smp.create_model("pspnet", encoder_name=encoder, encoder_weights=weights, classes=classes,
                             encoder_depth=5, upsampling=8)
    model.encoder.make_dilated(output_stride=8)
    return model


def _classic(cls: Callable[..., nn.Module], encoder: str, weights: Optional[str], classes: int, **kw) -> nn.Module:
    return cls(classes, pretrained=weights == "imagenet", **kw)  # imagenet: the online option; default None


MODELS: dict[str, Callable[[str, Optional[str], int], nn.Module]] = {
    "unet": partial(_smp, "unet"),
    "unetplusplus": partial(_smp, "unetplusplus"),
    "fpn": partial(_smp, "fpn"),
    "pspnet": _pspnet,
    "deeplabv3": partial(_smp, "deeplabv3"),
    "deeplabv3plus": partial(_smp, "deeplabv3plus"),
    "linknet": partial(_smp, "linknet"),
    "manet": partial(_smp, "manet"),
    "pan": partial(_smp, "pan"),
    "upernet": partial(_smp, "upernet"),
    "segformer": partial(_smp, "segformer"),
    "dpt": partial(_smp, "dpt", dynamic_img_size=True),  # ViT encoders at any size, not just 224
    "fcn32s": partial(_classic, classic.FCN, skips=0),
    "fcn16s": partial(_classic, classic.FCN, skips=1),
    "fcn8s": partial(_classic, classic.FCN, skips=2),
    "deconvnet": partial(_classic, classic.DeconvNet),
    "deeplabv1": partial(_classic, classic.DeepLabV1),
    "deeplabv2": partial(_classic, classic.DeepLabV2),
}
# What the classics are built on, whatever `encoder` says (they are the papers' VGG16 networks).
CLASSIC_BACKBONE = {"fcn32s": "vgg16", "fcn16s": "vgg16", "fcn8s": "vgg16", "deconvnet": "vgg16_bn",
                    "deeplabv1": "vgg16", "deeplabv2": "vgg16"}
CLASSIC = set(CLASSIC_BACKBONE)


def backbone(name: str, encoder: str) -> str:
    """The backbone `name` really uses: `encoder` for smp models, VGG16 for the classics."""
    return CLASSIC_BACKBONE.get(name, encoder)
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
        model = MODELS[name](encoder, encoder_weights, num_classes)
    except ConfigError:
        raise
    except Exception as e:  # smp/timm raise KeyError, ValueError, RuntimeError... for bad pairs
        raise ConfigError(f"model {name!r} cannot be built with encoder {encoder!r} "
                          f"(weights {encoder_weights!r}): {type(e).__name__}: {e}") from None
    drop_unused(model, MIN_SIZE.get(name, 64))
    return model


def drop_unused(model: nn.Module, size: int = 64) -> list[str]:
    """Remove what the forward pass never uses, so every trainable parameter gets a gradient.

    Encoders keep parts of the classifier they came from (EfficientNet's head conv, a ViT's final
    norm and head): dead weight in memory and in the optimizer, and a crash under DDP. One dry
    pass (eval mode, a fixed input: no running statistics or random state touched) finds them;
    modules never called are replaced by nn.Identity, parameters called but without a gradient are
    frozen. Returns the dropped and frozen names. Which parameters would get a gradient is read
    from the autograd graph of the output, not computed: a backward pass through VGG16's fc6 alone
    takes ~10 s on one CPU thread."""
    called: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, _i, _o: called.add(id(mod))) for m in model.modules()]
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        reached = _graph_leaves(model(x).float().sum())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    dead = {n for n, p in model.named_parameters() if p.requires_grad and id(p) not in reached}
    changed = []
    for name, module in list(model.named_modules()):
        own = [f"{name}.{n}" if name else n for n, _ in module.named_parameters()]
        if name and own and id(module) not in called and set(own) <= dead:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
            changed.append(name)
            dead -= set(own)
    for n, p in model.named_parameters():
        if n in dead:
            p.requires_grad_(False)
            changed.append(n)
    return changed


def _graph_leaves(out: torch.Tensor) -> set[int]:
    """ids of the leaf tensors `out.backward()` would give a gradient: the AccumulateGrad nodes
    reachable from out's grad_fn (each node visited once)."""
    seen, stack, leaves = set(), [out.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


def encoder_of(model: nn.Module) -> nn.Module:
    """The backbone part that gets `train.encoder_lr` (smp models and classics both name it so)."""
    return model.encoder
