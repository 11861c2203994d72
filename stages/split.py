"""Stage split: assign folds (and the holdout) per image; report balance against random KFold."""
from pipeline import cli
from pipeline.config import load_params
from pipeline.data.coco import dataset_from_params
from pipeline.data.folds import balance_report, make_folds, near_pairs, plot_balance, split_summary
from pipeline.data.near_dups import read_pairs
from pipeline.io import atomic_dir, identical_files
from pipeline.tracking import stage_run
from pipeline.workspace import SplitFiles, Workspace

PARAMS = ("data", "split", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    s = p.split
    with stage_run("split", p) as run:
        ds = dataset_from_params(p.data, corrections=False)   # folds stay put when labels are fixed
        copies = identical_files(ds.images.path)   # the same photo under two names: kept together
        pairs = read_pairs(p.paths.near_dups)      # crops, resizes, re-encodes (stage near_dups)
        near = near_pairs(ds.images.key, pairs) if s.joins_near_dups else []
        folds = make_folds(ds, s, p.data.val_json, copies, near)
        table, balance = balance_report(ds, folds, s)
        ws = Workspace(p.paths)
        with atomic_dir(ws.split) as tmp:
            out = SplitFiles(tmp)
            folds.to_csv(out.folds_csv, index=False)
            table.to_csv(out.balance_csv, index=False)
            plot_balance(ds, folds, out.fold_balance_png)
        run.log_artifacts(ws.split, "split")
        run.write_metrics(ws.metrics_json("split"),
                          {"split": split_summary(folds, balance, copies, pairs, s.joins_near_dups)})


if __name__ == "__main__":
    cli.run(main)
