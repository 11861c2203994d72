"""Stage submit: the final ensemble (with blend.experiments: the fitted blend of experiments) predicts
test.json's images -> submission.csv (+ a gallery), and is registered as an MLflow model, tagged with
its experiment, commit and scores; `@champion` moves to it only if it beats the champion out of fold.
The submitted variant's holdout score goes on the pipeline's parent run."""
import os

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.evaluation.headline import cv_score, parent_metrics, read_headline, submitted
from pipeline.delivery import submit
from pipeline.tracking import experiment_label, git_sha, stage_run
from pipeline.workspace import Workspace

PARAMS = ("model", "encoder", "data", "infer", "train", "blend", "submit", "paths")
REGISTERED_MODEL = "segmentation-ensemble"


def main() -> None:
    p = load_params().only(*PARAMS)
    ws = Workspace(p.paths)
    head = {s: read_headline(ws, s) for s in ("cv", "ensemble", "blend")}
    with stage_run("submit", p) as run:
        done = submit(p, ws.submission)
        if done.gallery:
            run.log_artifact(done.gallery, "submission")
        run.log_metrics({"submit/images": done.images})
        run.log_metrics(parent_metrics("submit", head), parent=True)
        sub, cv = submitted(head["ensemble"], head["blend"]), cv_score(head["cv"])
        run.set_tags({"pipeline.submitted": sub.get("id", "none")}, parent=True)
        tags = {"experiment": experiment_label(os.environ.get("DVC_EXP_NAME"), {"model": p.model, "encoder": p.encoder}),
                "git.sha": git_sha() or "null", "submitted": sub.get("id", "none"),
                "holdout.mIoU": sub.get("mIoU"), "cv.mIoU": head["cv"].get("mIoU")}
        score = (cv["name"], cv["value"]) if cv["value"] is not None else None
        run.log_model(done.model, "model", REGISTERED_MODEL, tags, score)   # registered by the logger


if __name__ == "__main__":
    entrypoint.run(main)
