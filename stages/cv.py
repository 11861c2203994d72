"""Stage cv: out-of-fold score over all trained folds, logged on the pipeline's parent MLflow run."""
from pathlib import Path

import numpy as np

from pipeline import cli
from pipeline.config import load_params
from pipeline.data.masks import read_classes
from pipeline.evaluation import stats
from pipeline.evaluation.cv import cv_scores
from pipeline.evaluation.metrics import flat_scores
from pipeline.evaluation.reports import plot_confusion, plot_iou
from pipeline.io import atomic_dir
from pipeline.models.checkpoint import ModelSet
from pipeline.tracking import stage_run
from pipeline.workspace import Workspace

PARAMS = ("train", "metric", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("cv", p) as run:
        classes = read_classes(p.paths.masks)["classes"]
        ws = Workspace(p.paths)
        s = cv_scores(ModelSet(ws.models(1), tuple(p.train.folds), tuple(p.train.seeds)), classes, p.metric)
        with atomic_dir(ws.cv_image_confusions.parent) as out:
            if "image_confusions" in s:   # every out-of-fold image: the leaderboard's paired comparisons
                np.savez(out / ws.cv_image_confusions.name, keys=s["image_keys"], confusions=s["image_confusions"])
            plot_confusion(s["confusion"], classes, out / "confusion.png", "out-of-fold confusion, all folds and seeds")
            plot_iou(s["IoU"], out / "iou.png", f"CV mIoU {s['mIoU']:.3f}")
        run.log_artifacts(Path(p.paths.plots) / "cv", "cv")
        run.log_metrics(flat_scores(s, "cv"), parent=True)  # on the parent: experiments compare side by side
        run.write_metrics(Path(p.paths.metrics) / "cv.json", {"cv": {
            **{k: s[k] for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "per_fold_mIoU", "per_seed_mIoU")},
            "IoU": {k: v for k, v in s["IoU"].items() if v is not None}, **({"metric": s["metric"]} if "metric" in s else {})}})
        if "metric" in s:
            m = s["metric"]
            run.log_metrics({"cv/metric": m["value"], "cv/metric_ci95_low": m["ci95_low"],
                             "cv/metric_ci95_high": m["ci95_high"],
                             "cv/shakeup_sd": m["shakeup"]["sd"]}, parent=True)
            print(f"CV {m['name']} {m['value']:.4f} {stats.fmt_interval(m['ci95_low'], m['ci95_high'])} over {m['images']} images; "
                  f"public vs private ({m['shakeup']['half']} images each) differ by < {m['shakeup']['p95_abs']:.4f} "
                  "95 % of the time")


if __name__ == "__main__":
    cli.run(main)
