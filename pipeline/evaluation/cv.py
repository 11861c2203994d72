"""Cross-validation score: the models' out-of-fold confusion matrices, summed, then scored once.

Each image outside the holdout is validated by its fold's models only (ones that never trained on
it), so for one seed the summed matrix is the dataset-level confusion of the out-of-fold predictions:
the honest estimate of how the recipe does on unseen images. With several seeds every image is
counted once per seed: the score of a typical single model (a seed ensemble is scored by the
ensemble stage).
"""
from __future__ import annotations

import numpy as np

from pipeline.data.coco import DataError
from pipeline.evaluation.metrics import scores
from pipeline.models.checkpoint import member_dir


def cv_scores(models_dir, folds: list[int], seeds: list[int], classes: list[str]) -> dict:
    mats = {}
    for k in folds:
        for s in seeds:
            f = member_dir(models_dir, k, s) / "val_confusion.npy"
            if not f.exists():
                raise DataError(f"{f} is missing: run the train@{k}-{s} stage first")
            mats[k, s] = np.load(f)
    total = np.sum(list(mats.values()), axis=0)
    out = scores(total, classes)
    out["folds"], out["seeds"] = list(folds), list(seeds)
    out["per_fold_mIoU"] = {str(k): scores(sum(mats[k, s] for s in seeds), classes)["mIoU"] for k in folds}
    out["per_seed_mIoU"] = {str(s): scores(sum(mats[k, s] for k in folds), classes)["mIoU"] for s in seeds}
    out["confusion"] = total.tolist()
    return out
