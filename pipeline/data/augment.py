"""Augmentations by name (params `train.augment`), built with albumentations.

Pixels an augmentation invents (cutout holes, grid-mask cells, the border an affine warp exposes)
are labelled IGNORE_INDEX, so the model is never taught that a black square is an object.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import albumentations as A
import cv2
from albumentations.pytorch import ToTensorV2

from pipeline.labels import IGNORE_INDEX, NORMALISE

if TYPE_CHECKING:
    from pipeline.config import Train

AUGMENTATIONS: dict[str, Callable[[], A.BasicTransform]] = {
    "hflip": lambda: A.HorizontalFlip(p=0.5),
    "vflip": lambda: A.VerticalFlip(p=0.5),
    "rotate90": lambda: A.RandomRotate90(p=0.5),
    "scale_rotate": lambda: A.Affine(scale=(0.75, 1.25), rotate=(-20, 20), translate_percent=(-0.05, 0.05),
                                     fill=0, fill_mask=IGNORE_INDEX, p=0.5),
    "color": lambda: A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    "brightness_contrast": lambda: A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
    "cutout": lambda: A.CoarseDropout(num_holes_range=(1, 6), hole_height_range=(0.05, 0.15),
                                      hole_width_range=(0.05, 0.15), fill=0, fill_mask=IGNORE_INDEX, p=0.5),
    "gridmask": lambda: A.GridDropout(ratio=0.3, fill=0, fill_mask=IGNORE_INDEX, p=0.3),
}

# Per-channel (mean, std) of RGB in [0, 1]: ImageNet's, what pretrained encoders expect (and
# albumentations' Normalize default). Checkpoints record it in their InputSpec.


def build_transform(names: list[str], size: Optional[int], seed: int = 0,
                    crop_scale: Optional[tuple[float, float]] = None) -> A.Compose:
    """The model's input from an (H, W, 3) uint8 image and its (H, W) uint8 mask, in one of three framings:
      size None        the whole image as it is (validated and predicted by sliding windows);
      crop_scale None  resized to (size, size): aspect lost, one view of the whole image;
      crop_scale       rescaled by a random factor in [low, high] (aspect kept; INTER_AREA when
                       shrinking), padded to at least size (mask IGNORE_INDEX), a random (size, size) crop.
    Then the named augmentations in order, ImageNet normalisation, to tensor.
    Output: image (3, h, w) float32, mask (h, w) uint8 (resized nearest).
    """
    unknown = sorted(set(names) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation(s) {unknown}; available: {', '.join(sorted(AUGMENTATIONS))}")
    if size is None:
        frame = []
    elif crop_scale is None:
        frame = [A.Resize(size, size)]
    else:
        lo, hi = crop_scale
        frame = [A.RandomScale((lo - 1, hi - 1), area_for_downscale="image", p=1.0),
                 A.RandomCrop(size, size, pad_if_needed=True, pad_position="random", border_mode=cv2.BORDER_CONSTANT,
                              fill=0, fill_mask=IGNORE_INDEX)]
    return A.Compose([*frame, *[AUGMENTATIONS[n]() for n in names], A.Normalize(*NORMALISE), ToTensorV2()], seed=seed)


def train_transform(t: "Train", seed: int) -> A.Compose:
    """Training input for `train` params: whole images resized, or random-scale crops (train.input)."""
    return build_transform(t.augment, t.image_size, seed, t.crop_scale if t.input == "crop" else None)
