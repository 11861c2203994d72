"""Stage cv: out-of-fold score over all trained folds, logged on the pipeline's parent MLflow run."""

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.masks import read_classes
from pipeline.evaluation.cv import cv_scores, summary_line, write_cv
from pipeline.evaluation.headline import parent_metrics, write_metrics
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
        write_cv(s, classes, ws)
        run.log_artifacts(ws.cv.dir, "cv")
        details = {"cv": {
            **{k: s[k] for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "per_fold_mIoU", "per_seed_mIoU")},
            "IoU": {k: v for k, v in s["IoU"].items() if v is not None}, **({"metric": s["metric"]} if "metric" in s else {})}}
        write_metrics(run, ws, "cv", details)
        run.log_metrics(parent_metrics("cv", details), parent=True)   # experiments compare side by side
        if "metric" in s:
            print(summary_line(s["metric"]))

if __name__ == "__main__":
    entrypoint.run(main)
