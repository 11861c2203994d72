"""Stage audit: rank the labels that confident out-of-fold predictions contradict -> reports/audit
(suspects.csv, images.csv, gallery.png, and the reviewer's review.csv and review_coco.json: see
corrections/README.md); with the demo's label_noise.csv, the recall of the known errors."""
from pathlib import Path

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.corrections import dataset_from_params
from pipeline.evaluation.audit import audit, plot_suspects, review_coco, review_sheet, summary_line
from pipeline.evaluation.oof import read_oof
from pipeline.io import atomic_dir, write_json
from pipeline.evaluation.headline import write_metrics
from pipeline.tracking import stage_run
from pipeline.workspace import AuditFiles, DemoFiles, Workspace

PARAMS = ("data", "masks", "audit", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("audit", p) as run:
        ds = dataset_from_params(p.data, check_files=False)
        noise = DemoFiles(Path(p.data.root)).label_noise_csv   # the demo's known errors (absent elsewhere)
        suspects, images, metrics = audit(p.paths.oof, ds, p.audit, p.masks, noise)
        ws = Workspace(p.paths)
        with atomic_dir(ws.audit.dir) as tmp:
            out = AuditFiles(tmp)
            suspects.to_csv(out.suspects_csv, index=False)
            images.to_csv(out.images_csv, index=False)
            plot_suspects(suspects, p.paths.oof, ds, out.gallery_png, p.audit.gallery)
            oof = read_oof(p.paths.oof)
            review_sheet(suspects, ds, dict(zip(oof.key, oof.width)), p.audit.top_k).to_csv(out.review_csv, index=False)
            write_json(out.review_coco_json, review_coco(suspects, p.paths.oof, ds, p.audit))
        run.log_artifacts(ws.audit.dir, "audit")
        write_metrics(run, ws, "audit", {"audit": metrics})
        print(summary_line(metrics, ws.audit.suspects_csv))


if __name__ == "__main__":
    entrypoint.run(main)
