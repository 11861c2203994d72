"""Mixing samples: segmentation CutMix (per batch) and copy-paste of rare-class objects (per item)."""
from __future__ import annotations

import numpy as np
import torch


def cutmix(images: torch.Tensor, masks: torch.Tensor, rng: np.random.Generator, p: float,
           alpha: float = 1.0) -> bool:
    """In place, with probability p: paste one random box from a shuffled copy of the batch into
    every sample, image and mask alike. images (N, 3, H, W) float, masks (N, H, W) int64."""
    if len(images) < 2 or rng.random() >= p:
        return False
    n, _, h, w = images.shape
    lam = rng.beta(alpha, alpha)
    ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
    cy, cx = rng.integers(h), rng.integers(w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.as_tensor(rng.permutation(n), device=images.device)
    images[:, :, y0:y1, x0:x1] = images[perm, :, y0:y1, x0:x1].clone()
    masks[:, y0:y1, x0:x1] = masks[perm, y0:y1, x0:x1].clone()
    return True


def paste_classes(image: torch.Tensor, mask: torch.Tensor, donor_image: torch.Tensor, donor_mask: torch.Tensor,
                  classes: torch.Tensor) -> int:
    """In place: copy the donor's pixels of `classes` (image and label) onto the sample.

    image/donor_image (3, H, W) float, mask/donor_mask (H, W) int. Returns the pixels pasted.
    """
    m = torch.isin(donor_mask, classes)
    image[:, m] = donor_image[:, m]
    mask[m] = donor_mask[m]
    return int(m.sum())
