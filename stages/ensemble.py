"""Stage ensemble: score every variant (TTA, epoch/SWA/seed/k-fold ensembles, round 2) on images none of its members saw."""
from pathlib import Path

from pipeline import cli
from pipeline.config import load_params
from pipeline.data.masks import read_classes
from pipeline.evaluation.variants import evaluate_variants, variants_metrics
from pipeline.io import atomic_dir
from pipeline.tracking import stage_run
from pipeline.devices import pick_device

PARAMS = ("infer", "train", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("ensemble", p) as run:
        classes = read_classes(p.paths.masks)["classes"]
        table = evaluate_variants(p.infer, p.train.folds, p.train.seeds, p.train.eval_size, classes, p.paths.models,
                                  p.paths.masks, p.paths.split, pick_device(p.infer.device), p.paths.models_round2)
        with atomic_dir(Path(p.paths.reports) / "ensemble") as out:
            table.to_csv(out / "variants.csv", index=False)
        run.log_artifacts(Path(p.paths.reports) / "ensemble", "ensemble")
        variants = variants_metrics(table)
        run.write_metrics(Path(p.paths.metrics) / "ensemble.json", {"ensemble": variants})
        # Also on the parent run: two experiments' variant tables compare side by side in the MLflow UI.
        run.log_metrics({f"ensemble/{k}/mIoU": v["mIoU"] for k, v in variants.items()}, parent=True)


if __name__ == "__main__":
    cli.run(main)
