"""Segmentation scores from one dataset-level confusion matrix (never averaged per batch).

mIoU averages IoU over classes present in the truth *or* the prediction (a class absent from both
has no defined IoU and is excluded, as in the competition's scoring). Pixels whose truth is
IGNORE_INDEX (255) are not counted.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.data.coco import IGNORE_INDEX


class ConfusionMatrix:
    """Accumulates a (C, C) int64 matrix: rows = truth, columns = prediction."""

    def __init__(self, num_classes: int, device: str | torch.device = "cpu"):
        self.num_classes = num_classes
        self.mat = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: (...) int class maps of the same shape; target 255 is skipped."""
        keep = target != IGNORE_INDEX
        idx = target[keep].long() * self.num_classes + pred[keep].long()
        self.mat += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix | np.ndarray | torch.Tensor") -> "ConfusionMatrix":
        m = other.mat if isinstance(other, ConfusionMatrix) else torch.as_tensor(np.asarray(other))
        self.mat += m.to(self.mat.device, torch.int64)
        return self

    def numpy(self) -> np.ndarray:
        return self.mat.cpu().numpy()


def scores(mat: np.ndarray, class_names: list[str]) -> dict:
    """Confusion matrix -> {'mIoU', 'pixel_acc', 'mean_acc', 'fwIoU', 'IoU': {name: iou or None}, 'acc': {...}}."""
    mat = np.asarray(mat, dtype=np.float64)
    tp = np.diag(mat)
    truth = mat.sum(1)
    pred = mat.sum(0)
    union = truth + pred - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(truth > 0, tp / truth, np.nan)
    total = mat.sum()
    freq = truth / total if total else truth
    valid = ~np.isnan(iou)
    return {
        "mIoU": float(np.nanmean(iou)) if valid.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total else 0.0,
        "mean_acc": float(np.nanmean(acc)) if (~np.isnan(acc)).any() else 0.0,
        "fwIoU": float((freq[valid] * iou[valid]).sum()),
        "IoU": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, iou)},
        "acc": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, acc)},
    }


def flat_scores(s: dict, prefix: str) -> dict[str, float]:
    """scores() -> {'val/mIoU': .., 'val/IoU/Battery': ..} (classes without an IoU left out)."""
    out = {f"{prefix}/{k}": v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.update({f"{prefix}/IoU/{n}": v for n, v in s["IoU"].items() if v is not None})
    return out


def image_ious(per_image: np.ndarray) -> np.ndarray:
    """(N, C, C) per-image confusions -> (N, C) float64 IoU per image and class; NaN where the class is
    in neither the image's truth nor its prediction."""
    m = np.asarray(per_image, dtype=np.float64)
    tp = np.diagonal(m, axis1=1, axis2=2)
    union = m.sum(2) + m.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def worst_per_class(per_image: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """Up to k (image row, class, IoU): for each class (background aside), the image whose truth holds
    it and whose prediction gets it worst (ties: the one with more of it), the classes taken from the
    worst-scored over the fold first; each image shown once."""
    m = np.asarray(per_image)
    iou = image_ious(m)
    truth = m.sum(2)                                        # (N, C) true pixels per class
    fold = scores(m.sum(0), [str(c) for c in range(m.shape[1])])["IoU"]
    order = sorted((c for c in range(1, m.shape[1]) if truth[:, c].any()),
                   key=lambda c: fold[str(c)] if fold[str(c)] is not None else 1.0)
    out, used = [], set()
    for c in order:
        rows = [i for i in np.flatnonzero(truth[:, c] > 0) if i not in used]
        if not rows:
            continue
        i = min(rows, key=lambda r: (iou[r, c], -truth[r, c]))
        out.append((int(i), c, float(iou[i, c])))
        used.add(int(i))
        if len(out) == k:
            break
    return out
