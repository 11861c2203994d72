"""Cross-validation score: the models' out-of-fold confusion matrices, summed, then scored once.

Each image outside the holdout is validated by its fold's models only (ones that never trained on
it), so for one seed the summed matrix is the dataset-level confusion of the out-of-fold predictions:
the honest estimate of how the recipe does on unseen images. With several seeds every image is
counted once per seed: the score of a typical single model (a seed ensemble is scored by the
ensemble stage).

Beside mIoU: the chosen metric (params `metric`), its 95 % bootstrap interval over the out-of-fold
images, and the leaderboard's shake-up estimated from them (pipeline/evaluation/stats.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

from pipeline.data.coco import DataError
from pipeline.evaluation import stats
from pipeline.evaluation.metrics import Metric, scores
from pipeline.evaluation.plots import plot_confusion, plot_iou
from pipeline.io import atomic_dir, atomic_file
from pipeline.models.checkpoint import ModelSet
from pipeline.workspace import CvFiles, Workspace

if TYPE_CHECKING:
    from pipeline.config import MetricSection


def cv_scores(models: ModelSet, classes: list[str], metric_params: Optional["MetricSection"] = None) -> dict:
    """Scores of the summed out-of-fold confusion, and with `metric_params` (params' metric section)
    the chosen metric, its interval and the shake-up. out['image_confusions']: (N, C, C), every
    out-of-fold image of every seed (fold-major, then seed), out['image_keys'] their image keys."""
    mats, images, keys = {}, [], []
    folds, seeds = models.folds, models.seeds
    for k in folds:
        for s in seeds:
            f = models.member(k, s).val_confusion()
            if not f.exists():
                raise DataError(f"{f} is missing: run the train@{k}-{s} stage first")
            mats[k, s] = np.load(f)
            per = models.member(k, s).image_confusions
            if per.exists():
                with np.load(per) as z:
                    images.append(z["confusions"])
                    keys.append(z["keys"])
    total = np.sum(list(mats.values()), axis=0)
    out = scores(total, classes)
    out["folds"], out["seeds"] = list(folds), list(seeds)
    out["per_fold_mIoU"] = {str(k): scores(sum(mats[k, s] for s in seeds), classes)["mIoU"] for k in folds}
    out["per_seed_mIoU"] = {str(s): scores(sum(mats[k, s] for k in folds), classes)["mIoU"] for s in seeds}
    out["confusion"] = total.tolist()
    if metric_params is not None and len(images) == len(mats):
        m, per_image = Metric.of(metric_params), np.concatenate(images)
        out["image_confusions"], out["image_keys"] = per_image, np.concatenate(keys)
        draws, seed = metric_params.bootstrap, metric_params.seed
        out["metric"] = {"name": m.name, "value": m.value(per_image), "images": len(per_image),
                         **dict(zip(("ci95_low", "ci95_high"), stats.interval(m, per_image, draws, seed))),
                         "shakeup": stats.shakeup(m, per_image, metric_params.leaderboard_images, draws, seed)}
    return out


def write_cv(s: dict, classes: list[str], ws: Workspace) -> None:
    """Every out-of-fold image's confusion (the leaderboard's paired comparisons) and plots/cv
    (atomically): the summed confusion and the per-class IoU."""
    if "image_confusions" in s:
        with atomic_file(ws.cv_image_confusions) as tmp:
            np.savez(tmp, keys=s["image_keys"], confusions=s["image_confusions"])
    with atomic_dir(ws.cv.dir) as tmp:
        out = CvFiles(tmp)
        plot_confusion(s["confusion"], classes, out.confusion_png, "out-of-fold confusion, all folds and seeds")
        plot_iou(s["IoU"], out.iou_png, f"CV mIoU {s['mIoU']:.3f}")


def summary_line(m: dict) -> str:
    """The chosen metric with its interval and the public/private shake-up, in one line."""
    return (f"CV {m['name']} {m['value']:.4f} {stats.fmt_interval(m['ci95_low'], m['ci95_high'])} over {m['images']} "
            f"images; public vs private ({m['shakeup']['half']} images each) differ by < {m['shakeup']['p95_abs']:.4f} "
            "95 % of the time")
