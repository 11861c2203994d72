"""Stage ensemble: score every variant (TTA, epoch/SWA/EMA/seed/k-fold ensembles, round 2, CRF and
post-processing fitted out of fold) on images none of its members saw -> reports/ensemble
(variants.csv, postprocess.json: what submit, predict and the MLflow model apply)."""
from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.masks import read_classes
from pipeline.devices import pick_device
from pipeline.evaluation.judge import (choice_lines, choice_metrics, evaluate_variants, submitted_variant,
                                      summary_lines, train_minutes, variants_metrics)
from pipeline.io import atomic_dir, write_json
from pipeline.evaluation.headline import write_metrics
from pipeline.tracking import stage_run
from pipeline.workspace import EnsembleFiles, Workspace

PARAMS = ("infer", "train", "metric", "oof", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("ensemble", p) as run:
        classes = read_classes(p.paths.masks)["classes"]
        judged = evaluate_variants(p, classes, pick_device(p.infer.device))
        table, refiner, fit_log, choice = judged.table, judged.refiner, judged.fit_log, judged.choice
        ws = Workspace(p.paths)
        with atomic_dir(ws.ensemble.dir) as tmp:
            out = EnsembleFiles(tmp)
            table.to_csv(out.variants_csv, index=False)
            write_json(out.postprocess_json, {**refiner.to_json(), "fitted": fit_log})
            write_json(out.choice_json, choice)
        run.log_artifacts(ws.ensemble.dir, "ensemble")
        submitted = submitted_variant(table, refiner, "chosen" if choice["mode"] == "auto" else "final")
        write_metrics(run, ws, "ensemble", {"ensemble": {"submitted": submitted, "choice": choice_metrics(choice),
                                                         "train_min": train_minutes(ws, p.train),
                                                         "variants": variants_metrics(table)}})
        for line in choice_lines(choice) + summary_lines(submitted, fit_log, table):
            print(line)


if __name__ == "__main__":
    entrypoint.run(main)
