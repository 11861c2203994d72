"""Test-time augmentation: each view is (augment, de-augment) on (N, C, H, W) tensors.

On CUDA, views with the same output shape go through the model in one batch (a GPU is faster on
bigger batches); on CPU each view is its own pass (measured: a CPU conv net is ~15% slower per
image at 8x the batch). Each prediction is mapped back to the original frame, turned into
probabilities, and averaged. `d4` expands to the 8
symmetries of the square. Scales (the "resize ensemble") resize the input to the nearest
multiple of 32 and the probabilities back.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

View = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]


def _rot(k: int) -> View:
    return (lambda x: torch.rot90(x, k, (2, 3))), (lambda y: torch.rot90(y, -k, (2, 3)))


def _flip(dims: tuple[int, ...]) -> View:
    return (lambda x: torch.flip(x, dims)), (lambda y: torch.flip(y, dims))


def _then(a: View, b: View) -> View:
    """a, then b; undone in reverse order."""
    return (lambda x: b[0](a[0](x))), (lambda y: a[1](b[1](y)))


_TRANSPOSE: View = ((lambda x: x.transpose(2, 3)), (lambda y: y.transpose(2, 3)))

TTA: dict[str, View] = {
    "identity": ((lambda x: x), (lambda y: y)),
    "hflip": _flip((3,)),
    "vflip": _flip((2,)),
    "rot90": _rot(1),
    "rot180": _rot(2),
    "rot270": _rot(3),
    "transpose": _TRANSPOSE,
    "antitranspose": _then(_TRANSPOSE, _rot(2)),  # the other diagonal
}
TTA_GROUPS: dict[str, list[str]] = {   # names that stand for several views
    "d4": ["identity", "rot90", "rot180", "rot270", "hflip", "vflip", "transpose", "antitranspose"],
}
D4 = TTA_GROUPS["d4"]


def expand(views: list[str]) -> list[str]:
    names = [v for name in views for v in TTA_GROUPS.get(name, [name])]
    unknown = sorted(set(names) - set(TTA))
    if unknown:
        raise ValueError(f"unknown TTA view(s) {unknown}; available: {', '.join(sorted([*TTA_GROUPS, *TTA]))}")
    return list(dict.fromkeys(names))


def scaled_side(s: int, scale: float) -> int:
    """The side an input of side s is resized to at `scale`: the nearest multiple of 32, at least 32."""
    return max(32, int(round(s * scale / 32)) * 32)


@torch.no_grad()
def tta_proba(model, x: torch.Tensor, views: list[str] = ("identity",), scales: list[float] = (1.0,),
              autocast=None) -> torch.Tensor:
    """(N, 3, H, W) normalised images -> (N, C, H, W) float32 mean softmax over views x scales."""
    names = expand(list(views))
    n, _, h, w = x.shape
    total, count = None, 0
    for scale in scales:
        xs = x if scale == 1.0 else F.interpolate(x, size=(scaled_side(h, scale), scaled_side(w, scale)), mode="bilinear",
                                                 align_corners=False)
        groups: dict[tuple, list[str]] = {}
        for name in names:
            key = tuple(TTA[name][0](xs[:1]).shape[-2:]) if x.is_cuda else (name,)
            groups.setdefault(key, []).append(name)
        for group in groups.values():
            batch = torch.cat([TTA[v][0](xs) for v in group])
            with autocast if autocast is not None else torch.autocast("cpu", enabled=False):
                logits = model(batch).float()
            for i, v in enumerate(group):
                y = TTA[v][1](logits[i * n:(i + 1) * n])
                if y.shape[-2:] != (h, w):
                    y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
                p = y.softmax(1)
                total = p if total is None else total + p
                count += 1
    return total / count
