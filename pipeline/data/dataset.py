"""Datasets over the mask cache (data/masks/index.csv) and a fold's rows of folds.csv."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from pipeline.data.coco import DataError
from pipeline.data.masks import read_image
from pipeline.data.mix import paste_classes
from pipeline.io import ignore_sigint
from pipeline.workspace import FOLDS_CSV, INDEX


def fold_tables(masks_dir: str | Path, split_dir: str | Path, fold: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of the mask index for one fold: train = not this fold and
    not holdout; validation = this fold. Validation and holdout images never reach training."""
    index = pd.read_csv(Path(masks_dir) / INDEX)
    folds = pd.read_csv(Path(split_dir) / FOLDS_CSV)[["key", "fold", "holdout"]]
    table = index.merge(folds, on="key", how="inner", validate="one_to_one")
    if len(table) != len(index):
        raise DataError(f"folds.csv and the mask index disagree on {len(index) - len(table)} images: rerun split")
    train = table[(table.fold != fold) & ~table.holdout].reset_index(drop=True)
    val = table[table.fold == fold].reset_index(drop=True)
    if train.empty or val.empty:
        raise DataError(f"fold {fold}: {len(train)} training and {len(val)} validation images; check split.n_folds")
    return train, val


def round2_table(train: pd.DataFrame, pseudo_index: Path, val_keys: set[str], holdout_keys: set[str]) -> pd.DataFrame:
    """Round-2 training rows: the fold's training rows plus its pseudo-labelled images."""
    extra = pd.read_csv(pseudo_index)
    if extra.empty:
        return train
    source = {k.split("/", 1)[1] for k in extra.key}
    if source & (val_keys | holdout_keys):
        raise DataError(f"pseudo-labels for validation/holdout images {sorted(source & (val_keys | holdout_keys))[:5]}")
    return pd.concat([train, extra[[c for c in extra.columns if c in train.columns]]], ignore_index=True)


class SegDataset(Dataset):
    """Items: image (3, S, S) float32 normalised, mask (S, S) int64, index.

    With `copy_paste` > 0, each item pastes, with that probability, the pixels of `paste_classes`
    from a random donor image (one of `donors`, rows containing those classes) onto itself.
    """

    def __init__(self, table: pd.DataFrame, transform, copy_paste: float = 0.0,
                 paste_classes: Optional[list[int]] = None, donors: Optional[list[int]] = None, seed: int = 0):
        self.images = table["image"].tolist()
        self.masks = table["mask"].tolist()
        self.transform = transform
        self.copy_paste = copy_paste
        self.classes = torch.tensor(paste_classes or [], dtype=torch.int64)
        self.donors = donors or []
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        mask = cv2.imread(self.masks[i], cv2.IMREAD_UNCHANGED)
        out = self.transform(image=read_image(self.images[i], mask.shape), mask=mask)
        return out["image"], out["mask"].long()

    def __getitem__(self, i: int):
        image, mask = self.load(i)
        if self.copy_paste and self.donors and len(self.classes) and self.rng.random() < self.copy_paste:
            donor_image, donor_mask = self.load(int(self.rng.choice(self.donors)))
            paste_classes(image, mask, donor_image, donor_mask, self.classes)
        return image, mask, i

    def reseed(self, seed: int) -> None:
        """Make this process's augmentations a function of `seed` (per worker and epoch)."""
        self.rng = np.random.default_rng(seed)
        self.transform.set_random_seed(seed)


def worker_init(worker_id: int) -> None:
    ignore_sigint()           # Ctrl-C: one line from the stage, not a traceback per worker
    torch.set_num_threads(1)  # the main process owns the cores for the model
    info = torch.utils.data.get_worker_info()
    info.dataset.reseed(int(info.seed % 2**32))


def full_masks(table: pd.DataFrame, idx: torch.Tensor) -> list[np.ndarray]:
    """The cached masks at their own resolution for the items `idx` of a batch."""
    return [cv2.imread(table["mask"].iloc[int(i)], cv2.IMREAD_UNCHANGED) for i in idx]
