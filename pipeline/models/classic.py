"""The classic architectures from the team notes, which no library ships: FCN-32s/16s/8s,
DeconvNet, DeepLab v1 (LargeFOV) and v2 (ASPP), all on torchvision's VGG16.

Every model takes (N, 3, H, W) float32 with H, W divisible by 32 and returns (N, C, H, W) logits.
Each has an `encoder` attribute (the VGG part), so the optimizer can give it its own learning rate
exactly as for smp models. `pretrained=True` loads torchvision's ImageNet weights (a download:
online users only); the default builds them randomly initialised, offline.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_BN_Weights, VGG16_Weights, vgg16, vgg16_bn
from torchvision.models.vgg import cfgs, make_layers


def _vgg(pretrained: bool, bn: bool = False) -> nn.Sequential:
    """VGG16's convolutional part. Randomly initialised, it is built alone, as torchvision
    initialises it: building the whole VGG16 would draw its 124M classifier weights only to drop them."""
    if pretrained:
        return (vgg16_bn(weights=VGG16_BN_Weights.IMAGENET1K_V1) if bn else vgg16(weights=VGG16_Weights.IMAGENET1K_V1)).features
    features = make_layers(cfgs["D"], batch_norm=bn)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    return features


class _VGGStages(nn.Module):
    """VGG16 conv blocks returning pool3 (1/8), pool4 (1/16) and pool5 (1/32) features."""

    def __init__(self, pretrained: bool):
        super().__init__()
        f = _vgg(pretrained)
        self.to_pool3, self.to_pool4, self.to_pool5 = f[:17], f[17:24], f[24:31]

    def forward(self, x):
        p3 = self.to_pool3(x)
        p4 = self.to_pool4(p3)
        return p3, p4, self.to_pool5(p4)


def _fc_head(num_classes: int, width: int) -> nn.Sequential:
    """VGG's fully connected layers as convolutions (fc6 7x7, fc7 1x1) and the class scorer."""
    return nn.Sequential(
        nn.Conv2d(512, width, 7, padding=3), nn.ReLU(inplace=True), nn.Dropout2d(),
        nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Dropout2d(),
        nn.Conv2d(width, num_classes, 1),
    )


class FCN(nn.Module):
    """FCN (Long et al. 2015). skips=0: FCN-32s; 1: FCN-16s (+pool4); 2: FCN-8s (+pool4, +pool3).

    Upsampling is learnable transposed convolution; the skip scorers start at zero, as in the
    paper, so FCN-16s/8s begin as FCN-32s and learn what the finer features add.
    """

    def __init__(self, num_classes: int, skips: int, pretrained: bool = False, width: int = 4096):
        super().__init__()
        self.skips = skips
        self.encoder = _VGGStages(pretrained)
        self.head = _fc_head(num_classes, width)
        n = num_classes
        if skips == 0:
            self.up_final = nn.ConvTranspose2d(n, n, 64, stride=32, padding=16, bias=False)
        else:
            self.up_pool5 = nn.ConvTranspose2d(n, n, 4, stride=2, padding=1, bias=False)
            self.score_pool4 = nn.Conv2d(512, n, 1)
            nn.init.zeros_(self.score_pool4.weight)
            nn.init.zeros_(self.score_pool4.bias)
        if skips == 1:
            self.up_final = nn.ConvTranspose2d(n, n, 32, stride=16, padding=8, bias=False)
        if skips == 2:
            self.up_fused = nn.ConvTranspose2d(n, n, 4, stride=2, padding=1, bias=False)
            self.score_pool3 = nn.Conv2d(256, n, 1)
            nn.init.zeros_(self.score_pool3.weight)
            nn.init.zeros_(self.score_pool3.bias)
            self.up_final = nn.ConvTranspose2d(n, n, 16, stride=8, padding=4, bias=False)

    def forward(self, x):
        p3, p4, p5 = self.encoder(x)
        score = self.head(p5)
        if self.skips >= 1:
            score = self.up_pool5(score) + self.score_pool4(p4)
        if self.skips == 2:
            score = self.up_fused(score) + self.score_pool3(p3)
        return self.up_final(score)


def _deconv_block(cin: int, cout: int, n: int) -> nn.Sequential:
    layers = []
    for i in range(n):
        layers += [nn.ConvTranspose2d(cin if i == 0 else cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class DeconvNet(nn.Module):
    """DeconvNet (Noh et al. 2015): VGG16-BN encoder with max-pooling indices, fc6/fc7 as 7x7/1x1
    convolutions, and a mirrored decoder of unpooling + transposed convolutions with BN."""

    def __init__(self, num_classes: int, pretrained: bool = False, width: int = 4096):
        super().__init__()
        f = _vgg(pretrained, bn=True)
        # vgg16_bn.features: blocks end with MaxPool at indices 6, 13, 23, 33, 43.
        bounds = [(0, 6), (7, 13), (14, 23), (24, 33), (34, 43)]
        self.encoder = nn.ModuleList(nn.Sequential(*f[a:b]) for a, b in bounds)
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.fc = nn.Sequential(
            nn.Conv2d(512, width, 7, padding=3), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.ConvTranspose2d(width, 512, 7, padding=3), nn.BatchNorm2d(512), nn.ReLU(inplace=True),
        )
        self.decoder = nn.ModuleList([
            _deconv_block(512, 512, 3), _deconv_block(512, 256, 3), _deconv_block(256, 128, 3),
            _deconv_block(128, 64, 2), _deconv_block(64, 64, 2),
        ])
        self.score = nn.Conv2d(64, num_classes, 1)

    def forward(self, x):
        indices, sizes = [], []
        for block in self.encoder:
            x = block(x)
            sizes.append(x.shape)
            x, idx = self.pool(x)
            indices.append(idx)
        x = self.fc(x)
        for block, idx, size in zip(self.decoder, reversed(indices), reversed(sizes)):
            x = block(self.unpool(x, idx, output_size=size))
        return self.score(x)


class _DilatedVGG(nn.Module):
    """DeepLab's VGG16: 3x3/stride-2 pools to 1/8, then pool4/pool5 with stride 1 and conv5
    dilated by 2, so the output stride stays 8 while the receptive field keeps growing."""

    def __init__(self, pretrained: bool):
        super().__init__()
        f = list(_vgg(pretrained))
        pool = lambda s: nn.MaxPool2d(3, s, 1)  # noqa: E731
        conv5 = f[24:30]
        for m in conv5:
            if isinstance(m, nn.Conv2d):
                m.dilation, m.padding = (2, 2), (2, 2)
        self.body = nn.Sequential(*f[0:4], pool(2), *f[5:9], pool(2), *f[10:16], pool(2),
                                  *f[17:23], pool(1), *conv5, pool(1))

    def forward(self, x):
        return self.body(x)


def _fov_branch(rate: int, num_classes: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(512, width, 3, padding=rate, dilation=rate), nn.ReLU(inplace=True), nn.Dropout2d(),
        nn.Conv2d(width, width, 1), nn.ReLU(inplace=True), nn.Dropout2d(),
        nn.Conv2d(width, num_classes, 1),
    )


class DeepLabV1(nn.Module):
    """DeepLab v1 LargeFOV: dilated VGG16 + 3x3 average pool, fc6 dilated by 12, bilinear x8."""

    def __init__(self, num_classes: int, pretrained: bool = False, width: int = 1024):
        super().__init__()
        self.encoder = _DilatedVGG(pretrained)
        self.avg = nn.AvgPool2d(3, 1, 1)
        self.head = _fov_branch(12, num_classes, width)

    def forward(self, x):
        out = self.head(self.avg(self.encoder(x)))
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)


class DeepLabV2(nn.Module):
    """DeepLab v2 on VGG16: ASPP branches with rates 6/12/18/24, their class scores summed."""

    def __init__(self, num_classes: int, pretrained: bool = False, width: int = 1024, rates=(6, 12, 18, 24)):
        super().__init__()
        self.encoder = _DilatedVGG(pretrained)
        self.aspp = nn.ModuleList(_fov_branch(r, num_classes, width) for r in rates)

    def forward(self, x):
        f = self.encoder(x)
        out = torch.stack([branch(f) for branch in self.aspp]).sum(0)
        return F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
