"""Stage blend: this experiment's final ensemble with other experiments' (blend.experiments), weights
fitted on the out-of-fold predictions, judged on the holdout -> reports/blend (variants.csv, blend.json).
With other experiments, the submission uses the fitted blend."""
from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.devices import pick_device
from pipeline.evaluation.blend import blend_experiments, summary_line
from pipeline.io import atomic_dir, write_json
from pipeline.evaluation.headline import write_metrics
from pipeline.tracking import stage_run
from pipeline.workspace import BlendFiles, Workspace

PARAMS = ("infer", "train", "blend", "metric", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("blend", p) as run:
        table, summary = blend_experiments(p, pick_device(p.infer.device))
        ws = Workspace(p.paths)
        with atomic_dir(ws.blend.dir) as tmp:
            out = BlendFiles(tmp)
            table.to_csv(out.variants_csv, index=False)
            write_json(out.blend_json, summary)
        run.log_artifacts(ws.blend.dir, "blend")
        write_metrics(run, ws, "blend", {"blend": {
            "experiments": len(summary["experiments"]), "mIoU": summary["blend_mIoU"],
            "best_single_mIoU": summary["best_single_mIoU"], "gain_vs_best_single": summary["gain_vs_best_single"]}})
        print(summary_line(summary))


if __name__ == "__main__":
    entrypoint.run(main)
