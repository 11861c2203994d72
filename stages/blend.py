"""Stage blend: this experiment's final ensemble with other experiments' (blend.experiments), weights
fitted on the out-of-fold predictions, judged on the holdout -> reports/blend (variants.csv, blend.json).
With other experiments, the submission uses the fitted blend."""
import shutil
from pathlib import Path

from pipeline import cli
from pipeline.config import load_params
from pipeline.data.masks import read_classes
from pipeline.devices import pick_device
from pipeline.evaluation.blend import blend_members, check_compatible, fit_blend, load_experiment, this_experiment
from pipeline.evaluation.variants import holdout_table
from pipeline.io import atomic_dir, write_json
from pipeline.tracking import stage_run

PARAMS = ("infer", "train", "blend", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("blend", p) as run:
        copies = Path(p.paths.blend)
        shutil.rmtree(copies, ignore_errors=True)
        copies.mkdir(parents=True)
        exps = [this_experiment(p)] + [load_experiment(s, ".", copies) for s in p.blend.experiments]
        write_json(copies / "experiments.json", {e.name: str(e.root) for e in exps})   # what was copied where
        check_compatible(exps)
        classes = read_classes(p.paths.masks)["classes"]
        table, summary = fit_blend(exps, classes, p.blend.steps, holdout_table(p.paths.masks, p.paths.split),
                                   pick_device(p.infer.device))
        weights = [x["weight"] for x in summary["experiments"]]
        summary["members"] = [[str(f), w] for f, w in blend_members(exps, weights)]
        with atomic_dir(Path(p.paths.reports) / "blend") as out:
            table.to_csv(out / "variants.csv", index=False)
            write_json(out / "blend.json", summary)
        run.log_artifacts(Path(p.paths.reports) / "blend", "blend")
        run.write_metrics(Path(p.paths.metrics) / "blend.json", {"blend": {
            "experiments": len(exps), "mIoU": summary["blend_mIoU"], "best_single_mIoU": summary["best_single_mIoU"],
            "gain_vs_best_single": summary["gain_vs_best_single"]}}, parent=True)
        if len(exps) > 1:
            print(f"blend of {len(exps)} experiments ({summary['judged_on']}): mIoU {summary['blend_mIoU']:.4f} vs "
                  f"best single ({summary['best_single']}) {summary['best_single_mIoU']:.4f} "
                  f"({summary['gain_vs_best_single']:+.4f}); weights "
                  + ", ".join(f"{x['name']} {x['weight']:.2f}" for x in summary["experiments"]))
        else:
            print("blend: no other experiments (blend.experiments); the submission is this experiment's ensemble")


if __name__ == "__main__":
    cli.run(main)
