"""Stage train_round2@<fold>-<seed>: fine-tune that round-1 model on its training + pseudo-labelled images."""
from contextlib import nullcontext

from pipeline import entrypoint
from pipeline.config import load_params
from pipeline.tracking import stage_run
from pipeline.training import distributed
from pipeline.training.run import PARAMS, train_fold

PARAMS = PARAMS + ("pseudo",)


def main() -> None:
    fold, seed = entrypoint.member_arguments(__doc__)
    p = load_params().only(*PARAMS)
    distributed.relaunch(p.train.devices, "stages.train_round2", p.train.device)  # runtime.devices > 1: this, under torchrun
    with stage_run("train_round2", p, fold=fold, seed=seed) if distributed.from_env().main else nullcontext() as run:
        train_fold(fold, seed, p, run, round2=True)


if __name__ == "__main__":
    entrypoint.run(main)
