"""Stage split: assign folds (and the holdout) per image, keeping identical files, an exporter's named
copies and near-duplicates together; report balance against random KFold."""
from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.data.corrections import dataset_from_params
from pipeline.data.folds import plot_balance, split_dataset
from pipeline.data.near_dups import read_pairs
from pipeline.evaluation.headline import write_metrics
from pipeline.io import atomic_dir
from pipeline.tracking import stage_run
from pipeline.workspace import SplitFiles, Workspace

PARAMS = ("data", "split", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    with stage_run("split", p) as run:
        ds = dataset_from_params(p.data, corrections=False)   # folds stay put when labels are fixed
        folds, table, summary = split_dataset(ds, p.split, p.data.val_json, read_pairs(p.paths.near_dups))
        ws = Workspace(p.paths)
        with atomic_dir(ws.split) as tmp:
            out = SplitFiles(tmp)
            folds.to_csv(out.folds_csv, index=False)
            table.to_csv(out.balance_csv, index=False)
            plot_balance(ds, folds, out.fold_balance_png)
        run.log_artifacts(ws.split, "split")
        for line in summary["warnings"]:
            print(f"split: WARNING: {line}", flush=True)
        write_metrics(run, ws, "split", {"split": summary})


if __name__ == "__main__":
    entrypoint.run(main)
