"""Stage train@<fold>: train one fold's model (DVC runs one per entry of train.folds)."""
from pipeline import cli
from pipeline.config import load_params
from pipeline.tracking import stage_run
from pipeline.training.run import PARAMS, train_fold


def main() -> None:
    fold = cli.fold_argument(__doc__)
    p = load_params().only(*PARAMS)
    with stage_run("train", p, fold=fold) as run:
        train_fold(fold, p, run)


if __name__ == "__main__":
    cli.run(main)
