"""Cross-validation score: the folds' out-of-fold confusion matrices, summed, then scored once.

Each image outside the holdout is validated by exactly one fold's model (one that never trained
on it), so the summed matrix is the dataset-level confusion of the out-of-fold predictions: the
honest estimate of how the recipe does on unseen images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.data.coco import DataError
from pipeline.evaluation.metrics import scores


def cv_scores(models_dir: str | Path, folds: list[int], classes: list[str]) -> dict:
    mats = []
    for k in folds:
        f = Path(models_dir) / f"fold_{k}" / "val_confusion.npy"
        if not f.exists():
            raise DataError(f"{f} is missing: run the train@{k} stage first")
        mats.append(np.load(f))
    total = np.sum(mats, axis=0)
    s = scores(total, classes)
    s["folds"] = list(folds)
    s["per_fold_mIoU"] = {str(k): scores(m, classes)["mIoU"] for k, m in zip(folds, mats)}
    s["confusion"] = total.tolist()
    return s
