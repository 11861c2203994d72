"""Stage train@<fold>-<seed>: train one model (DVC runs one per fold in train.folds and seed in train.seeds)."""
from contextlib import nullcontext

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.tracking import stage_run
from pipeline.training import distributed
from pipeline.training.run import PARAMS, train_fold


def main() -> None:
    fold, seed = entrypoint.member_arguments(__doc__)
    p = load_params().only(*PARAMS)
    distributed.relaunch(p.train.devices, "stages.train", p.train.device)  # runtime.devices > 1: this, under torchrun
    with stage_run("train", p, fold=fold, seed=seed) if distributed.from_env().main else nullcontext() as run:
        train_fold(fold, seed, p, run)


if __name__ == "__main__":
    entrypoint.run(main)
