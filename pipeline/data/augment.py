"""Augmentations by name (params `train.augment`), built with albumentations.

Pixels an augmentation invents (cutout holes, grid-mask cells, the border an affine warp exposes)
are labelled IGNORE_INDEX, so the model is never taught that a black square is an object.
"""
from __future__ import annotations

from typing import Callable

import albumentations as A
from albumentations.pytorch import ToTensorV2

from pipeline.data.coco import IGNORE_INDEX

AUGMENTATIONS: dict[str, Callable[[], A.BasicTransform]] = {
    "hflip": lambda: A.HorizontalFlip(p=0.5),
    "vflip": lambda: A.VerticalFlip(p=0.5),
    "rotate90": lambda: A.RandomRotate90(p=0.5),
    "scale_rotate": lambda: A.Affine(scale=(0.75, 1.25), rotate=(-20, 20), translate_percent=(-0.05, 0.05),
                                     fill=0, fill_mask=IGNORE_INDEX, p=0.5),
    "color": lambda: A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    "cutout": lambda: A.CoarseDropout(num_holes_range=(1, 6), hole_height_range=(0.05, 0.15),
                                      hole_width_range=(0.05, 0.15), fill=0, fill_mask=IGNORE_INDEX, p=0.5),
    "gridmask": lambda: A.GridDropout(ratio=0.3, fill=0, fill_mask=IGNORE_INDEX, p=0.3),
}


def build_transform(names: list[str], size: int, seed: int = 0) -> A.Compose:
    """Resize to (size, size), the named augmentations in order, ImageNet normalisation, to tensor.

    Output: image (3, size, size) float32, mask (size, size) uint8 (resized nearest).
    """
    unknown = sorted(set(names) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; available: {', '.join(sorted(AUGMENTATIONS))}")
    return A.Compose([A.Resize(size, size), *[AUGMENTATIONS[n]() for n in names], A.Normalize(), ToTensorV2()],
                     seed=seed)
