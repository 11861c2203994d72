"""Stage submit: the final ensemble (with blend.experiments: the fitted blend of experiments) predicts
test.json's images -> submission.csv (+ a gallery), and is registered as an MLflow model."""
from pipeline import cli
from pipeline.config import load_params
from pipeline.evaluation.submit import submit
from pipeline.tracking import stage_run
from pipeline.workspace import Workspace

PARAMS = ("data", "infer", "train", "blend", "submit", "paths")
REGISTERED_MODEL = "segmentation-ensemble"


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("submit", p) as run:
        done = submit(p, Workspace(p.paths).submission)
        if done.gallery:
            run.log_artifact(done.gallery, "submission")
        run.log_metrics({"submit/images": done.images})
        run.log_model(done.model, "model", REGISTERED_MODEL)   # registered by the logger


if __name__ == "__main__":
    cli.run(main)
