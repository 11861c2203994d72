"""Stage split: assign folds (and the holdout) per image; report balance against random KFold."""
from pipeline import cli
from pipeline.config import load_params
from pipeline.data.coco import dataset_from_params
from pipeline.data.folds import Links, balance_report, make_folds, near_pairs, plot_balance, split_summary
from pipeline.data.near_dups import read_pairs
from pipeline.data.sources import copies_by_name
from pipeline.io import atomic_dir, identical_files
from pipeline.evaluation.headline import write_metrics
from pipeline.tracking import stage_run
from pipeline.workspace import SplitFiles, Workspace

PARAMS = ("data", "split", "paths")


def main() -> None:
    p = load_params().only(*PARAMS)
    s = p.split
    with stage_run("split", p) as run:
        ds = dataset_from_params(p.data, corrections=False)   # folds stay put when labels are fixed
        pairs = read_pairs(p.paths.near_dups)      # crops, resizes, flips, letterboxes (stage near_dups)
        links = Links(identical=identical_files(ds.images.path),     # the same photo under two names
                      named=copies_by_name(ds.images.file_name),        # Roboflow's <stem>_<ext>.rf.<hash> copies
                      near=near_pairs(ds.images.key, pairs))            # pairs whose pixels agree
        folds = make_folds(ds, s, p.data.val_json, links.joining(s.copies_by_name, s.joins_near_dups))
        table, balance = balance_report(ds, folds, s)
        summary = split_summary(folds, balance, links, pairs, s.joins_near_dups)
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
    cli.run(main)
