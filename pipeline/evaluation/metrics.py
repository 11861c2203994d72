"""Segmentation scores from one dataset-level confusion matrix (never averaged per batch).

mIoU averages IoU over classes present in the truth *or* the prediction (a class absent from both
has no defined IoU and is excluded, as in the competition's scoring). Pixels whose truth is
IGNORE_INDEX (255) are not counted.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np
import torch

from pipeline.labels import IGNORE_INDEX

if TYPE_CHECKING:
    from pipeline.config import MetricSection


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


class Metric:
    """The score a team optimises: what the leaderboard computes (params `metric`).

    kind  dataset:   mIoU of the confusion summed over every image (later competition editions);
          per_image: the mean over images of each image's own mIoU (classes in neither its truth nor
                     its prediction left out), as one edition scored.
    size  None (native): class maps counted at the mask cache's resolution; 256: the prediction and the
          truth are both resized nearest-neighbour to size x size first, as the submission's
          PredictionString is scored.
    Everything is kept as per-image confusions (N, C, C), so either kind, a bootstrap over images and a
    paired comparison all come from the same counts."""

    def __init__(self, kind: str = "dataset", size: Optional[int] = None):
        if kind not in ("dataset", "per_image"):
            raise ValueError(f"metric kind {kind!r}: dataset | per_image")
        self.kind, self.size = kind, size

    @classmethod
    def of(cls, section: "MetricSection") -> "Metric":
        """From params' metric section (size 'native' -> None)."""
        return cls(section.kind, None if section.size == "native" else int(section.size))

    @property
    def name(self) -> str:
        return ("mIoU" if self.kind == "dataset" else "per-image mIoU") + (f" @{self.size}" if self.size else "")

    def count(self, pred, truth, num_classes: int) -> torch.Tensor:
        """(C, C) int64 confusion of one image's class map against its truth (at self.size when set)."""
        pred, truth = np.asarray(pred), np.asarray(truth)
        if self.size:
            pred = cv2.resize(pred.astype(np.uint8), (self.size, self.size), interpolation=cv2.INTER_NEAREST)
            truth = cv2.resize(truth.astype(np.uint8), (self.size, self.size), interpolation=cv2.INTER_NEAREST)
        keep = truth != IGNORE_INDEX   # numpy's bincount: ~3x torch's for one small map (post-processing search)
        idx = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
        return torch.from_numpy(np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes))

    def value(self, per_image: np.ndarray) -> float:
        """The metric of (N, C, C) per-image confusions."""
        return float(self.values(np.ones((1, len(per_image))), per_image)[0])

    def values(self, counts: np.ndarray, per_image: np.ndarray) -> np.ndarray:
        """The metric of B weighted resamples: counts (B, N) times each image -> (B,) (bootstrap's core)."""
        m = np.asarray(per_image, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.float64)
        if self.kind == "dataset":
            return batch_miou((counts @ m.reshape(len(m), -1)).reshape(len(counts), *m.shape[1:]))
        per = np.nanmean(image_ious(m), axis=1) if len(m) else np.zeros(0)   # all-NaN only for all-ignored images
        ok = ~np.isnan(per)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (counts[:, ok] @ per[ok]) / counts[:, ok].sum(1)


def batch_miou(mats: np.ndarray) -> np.ndarray:
    """(B, C, C) confusions -> (B,) mIoU (classes with no union left out; 0 where none has one)."""
    tp = np.diagonal(mats, axis1=1, axis2=2)
    union = mats.sum(2) + mats.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    valid = (~np.isnan(iou)).any(1)
    out = np.zeros(len(mats))
    out[valid] = np.nanmean(iou[valid], axis=1)
    return out
