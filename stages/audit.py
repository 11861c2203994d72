"""Stage audit: rank the labels that confident out-of-fold predictions contradict -> reports/audit
(suspects.csv, images.csv, gallery.png); with the demo's label_noise.csv, the recall of the known errors."""
from pathlib import Path

import pandas as pd

from pipeline import cli
from pipeline.config import load_params
from pipeline.data.coco import dataset_from_params
from pipeline.data.masks import unknown_class_index
from pipeline.evaluation.audit import find_suspects, noise_recall, plot_suspects, read_oof
from pipeline.io import atomic_dir
from pipeline.tracking import stage_run

PARAMS = ("data", "masks", "audit", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("audit", p) as run:
        ds = dataset_from_params(p.data, check_files=False)
        unknown = unknown_class_index(ds.classes, p.masks.unknown_name)
        untrained = {unknown} if unknown is not None and p.masks.unknown != "keep" else set()
        suspects, images = find_suspects(p.paths.oof, ds, p.audit.min_confidence, p.audit.min_area, untrained)
        metrics = {"suspects": len(suspects), "images": len(images)}
        noise_file = Path(p.data.root) / "label_noise.csv"
        if noise_file.exists():   # the demo's answer key: annotations corrupted on purpose
            oof = read_oof(p.paths.oof)
            metrics["noise"] = noise_recall(suspects, pd.read_csv(noise_file), ds, dict(zip(oof.key, oof.width)),
                                            p.audit.top_k)
        out = Path(p.paths.reports) / "audit"
        with atomic_dir(out) as tmp:
            suspects.to_csv(tmp / "suspects.csv", index=False)
            images.to_csv(tmp / "images.csv", index=False)
            plot_suspects(suspects, p.paths.oof, ds, tmp / "gallery.png", p.audit.gallery)
        run.log_artifacts(out, "audit")
        run.write_metrics(Path(p.paths.metrics) / "audit.json", {"audit": metrics})
        line = f"label audit: {len(suspects)} suspects -> {out / 'suspects.csv'}"
        if "noise" in metrics and metrics["noise"]["injected"]:
            n = metrics["noise"]
            line += f"; top {n['k']} find {n['found']} of the {n['injected']} labels corrupted on purpose"
        print(line)


if __name__ == "__main__":
    cli.run(main)
