"""One model to train (FoldJob): which fold, seed and round; its images; where it writes; how it
reports; and the fingerprint that decides whether a checkpoint may be resumed or reused."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from pipeline.code import import_closure
from pipeline.config import ConfigError, ParamsView
from pipeline.data.dataset import fold_tables, round2_table
from pipeline.data.masks import read_classes
from pipeline.models.checkpoint import InputSpec
from pipeline.training import distributed
from pipeline.workspace import Member, Workspace


@dataclass
class FoldJob:
    """One model being trained. Under torchrun every rank holds one; only rank 0 (`dist.main`) has an
    MLflow run and writes."""
    fold: int
    seed: int
    params: ParamsView
    round2: bool
    classes: list[str]
    train_table: pd.DataFrame   # mask-index rows it trains on (+ pseudo-labelled ones in round 2)
    val_table: pd.DataFrame     # its validation fold
    epochs: int
    inputs: list[Path]          # files whose content, with the code, fingerprints the run
    max_side: Optional[int] = None   # the mask cache's cap on the long side (classes.json)
    mlflow_run: Any = None      # the stage's MLflow child run (rank 0)
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _identity: Optional[dict[str, str]] = field(default=None, repr=False)

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.params.paths)

    @property
    def member(self) -> Member:
        """Its folder and files: <models or models_round2>/fold_<k>/seed_<s>/."""
        return self.workspace.member(self.fold, self.seed, 2 if self.round2 else 1)

    @property
    def out(self) -> Path:
        return self.member.dir

    @property
    def name(self) -> str:
        return f"fold {self.fold} seed {self.seed}"

    @property
    def stage(self) -> str:
        return "train_round2" if self.round2 else "train"

    def identity(self) -> dict[str, str]:
        """What a checkpoint must match to be resumed or reused: params, fold, seed, data and code
        (computed once: every checkpoint of the run carries it)."""
        if self._identity is None:
            self._identity = self._compute_identity()
        return self._identity

    def _compute_identity(self) -> dict[str, str]:
        return {**{k: str(v) for k, v in self.params.flat().items() if k not in ("train.folds", "train.seeds")},
                "fold": str(self.fold), "seed": str(self.seed), "data": fingerprint(*self.inputs),
                "round": "2" if self.round2 else "1"}

    def input_spec(self) -> dict:
        """How this run's inputs are made (InputSpec), as checkpoints store it."""
        t = self.params.train
        crop = t.input == "crop"
        return InputSpec(tuple(self.classes), self.max_side, t.eval_size, t.image_size if crop else None,
                         t.slide_overlap if crop else 0.0, crop and t.crop_infer == "whole").to_dict()

    def log(self, rows: list[dict]) -> None:
        """History rows as MLflow metrics, stepped by epoch."""
        for row in rows if self.mlflow_run else []:
            self.mlflow_run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=row.get("epoch"))

    def say(self, message: str) -> None:
        if self.dist.main:
            print(message, flush=True)


def load_fold(fold: int, seed: int, params: ParamsView, round2: bool) -> FoldJob:
    """The fold's images and the files that fingerprint it (round 2 adds its pseudo-labels and round 1's model)."""
    ws = Workspace(params.paths)   # class names and every image's content (digests), then the folds
    train_table, val_table = fold_tables(ws.masks, ws.split, fold)
    epochs, inputs = params.train.epochs, [ws.mask_index, ws.classes_json, ws.folds_csv]
    if round2:
        folds = pd.read_csv(ws.folds_csv)
        train_table = round2_table(train_table, ws.pseudo_index(fold), set(val_table.key),
                                   set(folds.key[folds.holdout]))
        epochs, inputs = params.pseudo.epochs, inputs + [ws.pseudo_index(fold), ws.member(fold, seed).checkpoint("best")]
    cache = read_classes(ws.masks)
    return FoldJob(fold, seed, params, round2, cache["classes"], train_table, val_table, epochs, inputs,
                   max_side=cache.get("max_side"))


def training_code() -> list[Path]:
    """The files of the training code: pipeline/training/run.py and everything it imports."""
    run = Path(__file__).with_name("run.py")
    return sorted({run} | import_closure(run))


def paste_class_ids(names: Optional[list[str]], classes: list[str], pixels: np.ndarray) -> list[int]:
    """Class ids to copy-paste: the named ones, or the rarest third of present classes by pixels."""
    if names is not None:
        missing = sorted(set(names) - set(classes[1:]))
        if missing:
            raise ConfigError(f"train.copy_paste_classes: unknown class(es) {missing}; classes are {classes[1:]}")
        return [classes.index(n) for n in names]
    present = [c for c in range(1, len(classes)) if pixels[c] > 0]
    return sorted(present, key=lambda c: pixels[c])[: max(1, len(present) // 3)]


def fingerprint(*files: Path) -> str:
    """What the run was trained on, and with which code: a checkpoint from other data or other
    training code is never resumed or reused. The index files name every image and mask with a
    digest of their content, so hashing them covers the pixels without rereading them. The code is
    the training entry's import closure: editing the report or the leaderboard retrains nothing."""
    h = hashlib.md5()
    for f in [*files, *training_code()]:
        h.update(Path(f).read_bytes())
    return h.hexdigest()
