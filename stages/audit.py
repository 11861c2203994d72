"""Stage audit: rank the labels that confident out-of-fold predictions contradict -> reports/audit
(suspects.csv, images.csv, gallery.png, and the reviewer's review.csv and review_coco.json: see
corrections/README.md); with the demo's label_noise.csv, the recall of the known errors."""
from pathlib import Path

from pipeline import cli
from pipeline.config import load_params
from pipeline.data.coco import dataset_from_params
from pipeline.evaluation.audit import audit, plot_suspects, review_coco, review_sheet, summary_line
from pipeline.evaluation.oof import read_oof
from pipeline.io import atomic_dir, write_json
from pipeline.tracking import stage_run

PARAMS = ("data", "masks", "audit", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("audit", p) as run:
        ds = dataset_from_params(p.data, check_files=False)
        suspects, images, metrics = audit(p.paths.oof, ds, p.audit, p.masks, Path(p.data.root) / "label_noise.csv")
        out = Path(p.paths.reports) / "audit"
        with atomic_dir(out) as tmp:
            suspects.to_csv(tmp / "suspects.csv", index=False)
            images.to_csv(tmp / "images.csv", index=False)
            plot_suspects(suspects, p.paths.oof, ds, tmp / "gallery.png", p.audit.gallery)
            oof = read_oof(p.paths.oof)
            review_sheet(suspects, ds, dict(zip(oof.key, oof.width)), p.audit.top_k).to_csv(tmp / "review.csv", index=False)
            write_json(tmp / "review_coco.json", review_coco(suspects, p.paths.oof, ds, p.audit))
        run.log_artifacts(out, "audit")
        run.write_metrics(Path(p.paths.metrics) / "audit.json", {"audit": metrics})
        print(summary_line(metrics, out / "suspects.csv"))


if __name__ == "__main__":
    cli.run(main)
