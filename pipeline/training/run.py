"""Train one fold: the stage train@<fold>-<seed> (and train_round2@...) calls `train_fold` and nothing else.

The run itself is one class, pipeline/training/trainer.py. Writes <models>/fold_<k>/seed_<s>/:
last.pt (the run state: everything resuming needs while training or averaging; the final weights
after), best.pt (weights of the best epoch by
validation metric, with that epoch's confusion matrix), val_confusion.npy (the out-of-fold result
the cv stage sums), reports/*.png; with train.swa_epochs > 0 also swa.pt and val_confusion_swa.npy,
with train.ema ema.pt and val_confusion_ema.npy. Every checkpoint carries its InputSpec.
"""
from __future__ import annotations

from pipeline.config import ParamsView
from pipeline.devices import pick_device
from pipeline.models.factory import backbone, check_input_size
from pipeline.training import distributed
from pipeline.training.fold import load_fold
from pipeline.training.trainer import Round2Trainer, Trainer

PARAMS = ("model", "encoder", "encoder_weights", "train", "metric", "paths")


def train_fold(fold: int, seed: int, p: ParamsView, run=None, round2: bool = False) -> dict:
    """Train, validate (every train.val_every epochs and the last), keep best/last, resume an
    interrupted run in the state it died in; return the best checkpoint's scores.
    Under torchrun every rank calls this (see pipeline/training/distributed.py); only rank 0 writes.

    A finished run with the same identity (recipe, data, training code) is reused, not retrained:
    adding a seed or a fold reruns every train stage in DVC's eyes, but only the new ones train.
    round2: fine-tune round 1's best model of this fold and seed for `pseudo.epochs` on its training
    images plus the fold's pseudo-labelled test images (validation unchanged), into paths.models_round2.
    """
    job = load_fold(fold, seed, p, round2)
    check_input_size(p.model, p.train.image_size)
    used = backbone(p.model, p.encoder)
    if run:
        run.set_tags({"pipeline.backbone": used})   # what the model is built on, not just what params say
    if used != p.encoder:
        print(f"note: {p.model} is built on {used}; encoder {p.encoder!r} is not used")
    job.dist, job.device = distributed.setup(pick_device(p.train.device))
    job.mlflow_run = run if job.dist.main else None
    try:
        return (Round2Trainer if round2 else Trainer)(job).fit()
    finally:
        distributed.teardown()
