"""Stage train_round2@<fold>: fine-tune fold k's round-1 model on its training + pseudo-labelled images."""
from pipeline import cli
from pipeline.config import load_params
from pipeline.tracking import stage_run
from pipeline.training.run import PARAMS, train_fold

PARAMS = PARAMS + ("pseudo",)


def main() -> None:
    fold = cli.fold_argument(__doc__)
    p = load_params().only(*PARAMS)
    with stage_run("train_round2", p, fold=fold) as run:
        train_fold(fold, p, run, round2=True)


if __name__ == "__main__":
    cli.run(main)
