"""Every model in the registry: builds offline, full-resolution logits, gradients reach encoder and head."""
from __future__ import annotations


import pytest
import torch

from pipeline.config import ConfigError
from pipeline.models.factory import CLASSIC, MIN_SIZE, MODELS, backbone, build_model, check_input_size, encoder_of
from pipeline.training.optim import param_groups

pytestmark = pytest.mark.quick   # `make test-quick`: config, data, metrics, the model zoo in about a minute

ENCODER = {"segformer": "mit_b0", "dpt": "tu-vit_tiny_patch16_224"}  # the rest: resnet18 (classics: VGG16)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward_full_resolution(name):
    torch.manual_seed(0)
    size = max(64, MIN_SIZE.get(name, 32))
    model = build_model(name, ENCODER.get(name, "resnet18"), None, 5)
    # not square: any multiple of 32 works. The classics are VGG16-sized (fc6 alone has 100M weights):
    # one image takes every path two do (their batch norms see a spatial map), in 30 % less time
    batch = 1 if name in CLASSIC else 2
    x = torch.randn(batch, 3, size, size + 32)
    # oneDNN's weight gradient of fc6 (7x7, 512 -> 4096) on a 2x3 map takes ~10 s on one thread, its
    # reference kernel 3 s: the gradient is the same, so the classics use the latter here
    with torch.backends.mkldnn.flags(enabled=name not in CLASSIC):
        logits = model(x)
        assert logits.shape == (batch, 5, size, size + 32) and torch.isfinite(logits).all()
        logits.square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not dead, f"{name}: {len(dead)} trainable tensors never get a gradient: {dead[:5]}"
    enc = {id(p) for p in encoder_of(model).parameters()}
    grads = [(id(p) in enc, p.grad is not None and p.grad.abs().sum() > 0) for p in model.parameters()]
    assert any(g for e, g in grads if e) and any(g for e, g in grads if not e)   # both halves learn
    groups = param_groups(model, encoder_of(model), 1e-3, 1e-4, 1e-4)           # the invariant holds
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,encoder", [("unet", "efficientnet-b0"), ("pspnet", "efficientnet-b0"),
                                          ("deeplabv3plus", "efficientnet-b0"), ("dpt", "tu-vit_tiny_patch16_224")])
def test_encoders_keep_no_dead_parameters(name, encoder):
    """Classifier leftovers (EfficientNet's head conv, a ViT's head) are dropped at build time, the
    model's output unchanged by it; and PSPNet trains its whole dilated encoder."""
    model = build_model(name, encoder, None, 3)
    model(torch.randn(2, 3, 64, 64)).float().sum().backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_pspnet_pools_stride_8_features_of_the_whole_encoder():
    model = build_model("pspnet", "resnet18", None, 3)
    feats = model.encoder(torch.randn(1, 3, 64, 64))
    assert len(feats) == 6 and feats[-1].shape[-2:] == (8, 8)        # 5 stages, output stride 8
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in model.parameters()) > 11_000_000   # layer3/4 included


def test_backbone_says_what_a_model_is_built_on():
    assert {n: backbone(n, "resnet18") for n in sorted(CLASSIC)} == {
        "deconvnet": "vgg16_bn", "deeplabv1": "vgg16", "deeplabv2": "vgg16", "fcn16s": "vgg16", "fcn32s": "vgg16",
        "fcn8s": "vgg16"}
    assert backbone("unet", "efficientnet-b0") == "efficientnet-b0"


def test_incompatible_pair_is_a_clear_error():
    with pytest.raises(ConfigError, match="model 'dpt' cannot be built with encoder 'resnet34'.*tu-"):
        build_model("dpt", "resnet34", None, 3)
    with pytest.raises(ConfigError, match="Wrong encoder name `resnet999`"):
        build_model("unet", "resnet999", None, 3)
    with pytest.raises(ConfigError, match="unknown model 'unet3'; available: deconvnet, "):
        build_model("unet3", "resnet18", None, 3)


def test_input_size_rules():
    check_input_size("unet", 64)
    for name, size in (("unet", 100), ("pan", 64)):
        with pytest.raises(ConfigError, match="multiple of 32"):
            check_input_size(name, size)
