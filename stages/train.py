"""Stage train@<fold>: train one fold's model (DVC runs one per entry of train.folds)."""
import argparse

from pipeline import cli
from pipeline.config import load_params
from pipeline.tracking import stage_run
from pipeline.training.run import PARAMS, train_fold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fold", type=int, required=True)
    fold = ap.parse_args().fold
    p = load_params().only(*PARAMS)
    with stage_run("train", p, fold=fold) as run:
        train_fold(fold, p, run)


if __name__ == "__main__":
    cli.run(main)
