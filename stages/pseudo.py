"""Stage pseudo: each fold's round-1 models (+ TTA) pseudo-labels the test images for that fold."""
from pathlib import Path

import pandas as pd

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.coco import load_test_set
from pipeline.inference.pseudo import pseudo_label_folds, unlabelled
from pipeline.io import atomic_dir
from pipeline.evaluation.headline import write_metrics
from pipeline.tracking import stage_run
from pipeline.workspace import PseudoFiles, Workspace
from pipeline.devices import pick_device

PARAMS = ("data", "infer", "train", "pseudo", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("pseudo", p) as run:
        ws = Workspace(p.paths)
        test, left_out = unlabelled(load_test_set(p.data), ws.folds_csv, Path(p.data.root))
        with atomic_dir(ws.pseudo.dir) as tmp:
            out = PseudoFiles(tmp)
            report, summary = pseudo_label_folds(test, p, out, pick_device(p.infer.device))
            report.to_csv(out.report_csv, index=False)
            pd.Series(left_out, name="file_name").to_csv(out.left_out_csv, index=False)
        run.log_artifact(ws.pseudo.report_csv, "pseudo")
        write_metrics(run, ws, "pseudo", {"pseudo": {
            "test_images": len(test), "left_out_in_labelled_pool": len(left_out), **summary}})


if __name__ == "__main__":
    entrypoint.run(main)
