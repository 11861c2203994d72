"""Stage train_round2@<fold>: fine-tune fold k's round-1 model on its training + pseudo-labelled images."""
import argparse

from pipeline import cli
from pipeline.config import load_params
from pipeline.tracking import stage_run
from pipeline.training.run import PARAMS, train_fold

PARAMS = PARAMS + ("pseudo",)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fold", type=int, required=True)
    fold = ap.parse_args().fold
    p = load_params().only(*PARAMS)
    with stage_run("train_round2", p, fold=fold) as run:
        train_fold(fold, p, run, round2=True)


if __name__ == "__main__":
    cli.run(main)
