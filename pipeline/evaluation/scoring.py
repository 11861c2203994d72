"""Scoring images: the one loop that reads images and their cached masks, predicts, and counts a
confusion per image. The variant table (judge.py), the cross-experiment blend (blend.py) and the
out-of-fold files (oof.py) all score through it; training validates through its own loader
(pipeline/training/trainer.py), which the variant table's `fold` row reproduces."""
from __future__ import annotations

import time
from typing import Iterator, Optional

import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from pipeline.data.masks import read_image
from pipeline.evaluation.metrics import ConfusionMatrix, Metric
from pipeline.inference.ensemble import Ensemble, ImageFiles, at_size
from pipeline.inference.postprocess import Refiner
from pipeline.workspace import Workspace


def predict_rows(ensembles: list[Ensemble], table: pd.DataFrame, batch_size: int = 8,
                 sizes: Optional[list[tuple[int, int]]] = None) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """Each mask-cache row of `table` read once, prepared as the ensembles' shared InputSpec says, and
    predicted by every ensemble: yields (row, [(C, H, W) float32 probabilities per ensemble]) at
    sizes[row] (default: the cached image's size), bilinear."""
    images = table["image"].tolist()
    cached = list(zip(table["height"].astype(int), table["width"].astype(int)))
    sizes = sizes or cached
    data = ImageFiles(lambda i: read_image(images[i], cached[i]), len(images), ensembles[0].spec.eval_size)
    for x, idx in DataLoader(data, batch_size if data.size else 1):
        probs = [e.proba(x) for e in ensembles]
        for j, i in enumerate(idx.tolist()):
            yield i, [at_size(p[j], sizes[i]) for p in probs]


class ImageConfusions:
    """Per-image confusions of named predictions against the cached truth of `table`'s rows:
    `per_image[name]` is (N, C, C) int64, counted as `metric` says (255 in the truth is ignored)."""

    def __init__(self, table: pd.DataFrame, num_classes: int, metric: Optional[Metric] = None, names=("",)):
        self.masks, self.num_classes, self.metric = table["mask"].tolist(), num_classes, metric or Metric()
        self.per_image = {name: np.zeros((len(table), num_classes, num_classes), np.int64) for name in names}

    def truth(self, i: int, size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """(H, W) uint8 cached mask of row i, at `size` (centre-aligned nearest) when given."""
        truth = cv2.imread(self.masks[i], cv2.IMREAD_UNCHANGED)
        if size is not None and truth.shape != tuple(size):
            truth = cv2.resize(truth, (size[1], size[0]), interpolation=cv2.INTER_NEAREST_EXACT)
        return truth

    def count(self, i: int, pred: np.ndarray, name: str = "", truth: Optional[np.ndarray] = None) -> None:
        """Count (H, W) class map `pred` of row i against its truth (read at pred's size unless given)."""
        truth = self.truth(i, pred.shape) if truth is None else truth
        self.per_image[name][i] = self.metric.count(pred, truth, self.num_classes).numpy()


def score_images(ensemble: Ensemble, table: pd.DataFrame, batch_size: int = 8, metric: Optional[Metric] = None,
                 refiners: Optional[dict[str, Optional[Refiner]]] = None) -> tuple[dict[str, np.ndarray], float]:
    """({name: (N, C, C) per-image confusions}, images/s) of the ensemble on the mask-cache rows of
    `table`, one entry per refiner (None: the argmax; default {"": None}). The probabilities are
    computed once; masks are read as predictions arrive (memory stays one batch)."""
    refiners = refiners if refiners is not None else {"": None}
    images, cached = table["image"].tolist(), list(zip(table["height"].astype(int), table["width"].astype(int)))
    counts = ImageConfusions(table, len(ensemble.spec.classes), metric, refiners)
    start = time.perf_counter()
    for i, (p,) in predict_rows([ensemble], table, batch_size):
        prob = None
        for name, refine in refiners.items():
            if refine is None:
                pred = p.argmax(0).to(torch.uint8).cpu().numpy()
            else:
                prob = p.cpu().numpy() if prob is None else prob
                pred = refine(prob, lambda i=i: read_image(images[i], cached[i]))
            counts.count(i, pred, name)
    return counts.per_image, len(images) / max(time.perf_counter() - start, 1e-9)


def score(ensemble: Ensemble, table: pd.DataFrame, batch_size: int = 8) -> tuple[ConfusionMatrix, float]:
    """Confusion matrix of the ensemble on the mask-cache rows of `table`, and images/s."""
    per, rate = score_images(ensemble, table, batch_size)
    return ConfusionMatrix(len(ensemble.spec.classes)).merge(per[""].sum(0)), rate


def holdout_table(ws: Workspace) -> pd.DataFrame:
    """The mask-cache rows of the holdout images (in no fold: no model trained on them)."""
    index = pd.read_csv(ws.mask_index)
    held = index.merge(pd.read_csv(ws.folds_csv)[["key", "holdout"]], on="key")
    return held[held.holdout].reset_index(drop=True)
