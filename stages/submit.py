"""Stage submit: the final ensemble (with blend.experiments: the fitted blend of experiments) predicts
test.json's images -> submission.csv (+ a gallery), and is registered as an MLflow model."""
from pathlib import Path

from pipeline import cli
from pipeline.config import load_params
from pipeline.data.masks import read_classes
from pipeline.evaluation.reports import plot_test_gallery
from pipeline.evaluation.blend import submitted_members
from pipeline.inference.ensemble import Ensemble
from pipeline.data.coco import load_test_set
from pipeline.inference.served import export_ensemble_model
from pipeline.inference.submission import write_submission
from pipeline.tracking import stage_run
from pipeline.devices import pick_device

PARAMS = ("data", "infer", "train", "blend", "submit", "paths")
REGISTERED_MODEL = "segmentation-ensemble"


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("submit", p) as run:
        cache = read_classes(p.paths.masks)   # classes, and how training images were prepared (max_side)
        classes = cache["classes"]
        images = load_test_set(p.data)
        members = submitted_members(p)   # the final ensemble, or the fitted blend of experiments
        ens = Ensemble.from_files(members, p.infer, pick_device(p.infer.device))
        out = Path(p.paths.submission)
        out.mkdir(parents=True, exist_ok=True)
        kept = write_submission(ens, images, p.train.eval_size, out / "submission.csv", p.submit.size,
                                p.infer.batch_size, keep=p.submit.gallery, max_side=cache.get("max_side"))
        if kept:
            run.log_artifact(plot_test_gallery(images, kept, classes, out / "gallery.png"), "submission")
        run.log_metrics({"submit/images": len(images)})
        # The same ensemble as an MLflow model a user can take away (registered by the logger).
        model = export_ensemble_model(out / "model", members, p.infer, p.train.eval_size, cache.get("max_side"), classes)
        run.log_model(model, "model", REGISTERED_MODEL)


if __name__ == "__main__":
    cli.run(main)
