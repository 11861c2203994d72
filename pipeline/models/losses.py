"""Losses by name, combined as a weighted sum written in params (`loss: {ce: 1.0, dice: 0.5}`).

All take (N, C, H, W) float logits and (N, H, W) int64 targets, and ignore target pixels equal to
IGNORE_INDEX (255). Class weights (a (C,) tensor) apply to the losses that accept them.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

from pipeline.labels import IGNORE_INDEX


class BoundaryCE(nn.Module):
    """Cross-entropy where pixels within `width` px of a class boundary weigh `1 + weight`.

    A pixel is "near a boundary" when the labels in its (2*width+1)^2 neighbourhood are not all
    equal (max-pool of the label map differs from min-pool): thin structures and object edges,
    where most segmentation errors sit, count more.
    """

    def __init__(self, width: int = 3, weight: float = 2.0, class_weights: Optional[torch.Tensor] = None,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.width, self.weight, self.ignore_index = width, weight, ignore_index
        self.register_buffer("class_weights", class_weights if class_weights is not None else None)

    def boundary_weights(self, target: torch.Tensor) -> torch.Tensor:
        """(N, H, W) target -> (N, H, W) float weights, 1 inside regions, 1 + weight near edges."""
        t = target.float().unsqueeze(1)
        k = 2 * self.width + 1
        hi = F.max_pool2d(t, k, stride=1, padding=self.width)
        lo = -F.max_pool2d(-t, k, stride=1, padding=self.width)
        return 1.0 + self.weight * (hi != lo).squeeze(1).float()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_pixel = F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index,
                                    reduction="none")
        w = self.boundary_weights(target) * (target != self.ignore_index)
        return (per_pixel * w).sum() / w.sum().clamp_min(1.0)


def _ce(cw, **_):
    return nn.CrossEntropyLoss(weight=cw, ignore_index=IGNORE_INDEX)


def _cw_list(cw: Optional[torch.Tensor]):
    return cw.tolist() if cw is not None else None


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": _ce,
    "focal": lambda cw, **_: smp_losses.FocalLoss("multiclass", ignore_index=IGNORE_INDEX, class_weights=_cw_list(cw)),
    "dice": lambda cw, **_: smp_losses.DiceLoss("multiclass", ignore_index=IGNORE_INDEX, class_weights=_cw_list(cw)),
    "lovasz": lambda cw, **_: smp_losses.LovaszLoss("multiclass", ignore_index=IGNORE_INDEX),
    "jaccard": lambda cw, **_: smp_losses.JaccardLoss("multiclass", ignore_index=IGNORE_INDEX, class_weights=_cw_list(cw)),
    "tversky": lambda cw, **_: smp_losses.TverskyLoss("multiclass", ignore_index=IGNORE_INDEX, class_weights=_cw_list(cw)),
    "boundary_ce": lambda cw, width=3, weight=2.0, **_: BoundaryCE(width, weight, cw),
}
NO_CLASS_WEIGHTS = {"lovasz"}   # the losses above that take no class weights (tests/test_losses.py checks)


class WeightedSum(nn.Module):
    """sum_i w_i * loss_i(logits, target); `.last` keeps each term for logging."""

    def __init__(self, terms: dict[str, tuple[float, nn.Module]]):
        super().__init__()
        self.weights = {k: w for k, (w, _) in terms.items()}
        self.losses = nn.ModuleDict({k: m for k, (_, m) in terms.items()})
        self.last: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total, self.last = 0.0, {}
        for name, fn in self.losses.items():
            value = fn(logits.float(), target)
            self.last[name] = float(value.detach())
            total = total + self.weights[name] * value
        return total


def build_loss(weights: dict[str, float], class_weights: Optional[torch.Tensor] = None,
               boundary_width: int = 3, boundary_weight: float = 2.0) -> WeightedSum:
    """`{name: weight}` -> one module; unknown names list the valid ones."""
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; available: {', '.join(sorted(LOSSES))}")
    return WeightedSum({name: (w, LOSSES[name](class_weights, width=boundary_width, weight=boundary_weight))
                        for name, w in weights.items() if w > 0})


def class_weights_from_pixels(pixels: torch.Tensor, mode: str) -> Optional[torch.Tensor]:
    """(C,) pixel counts (training images only) -> (C,) weights with mean 1; absent classes get 0."""
    if mode == "none":
        return None
    freq = pixels.double() / pixels.sum().clamp_min(1)
    inv = torch.where(freq > 0, 1.0 / freq.clamp_min(1e-12), torch.zeros_like(freq))
    if mode == "sqrt_inverse":
        inv = inv.sqrt()
    w = inv / inv[inv > 0].mean()
    return w.float()
