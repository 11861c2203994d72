"""Out-of-fold probabilities: each fold's members of the final ensemble (every seed and
infer.checkpoints, with infer's TTA and scales) predict the fold's own validation images, which none
of them trained on. Kept small, for the label audit and for fitting blend weights across experiments:

  <oof>/index.csv        key, fold, height, width (the OOF resolution), probs, mask (files below)
  <oof>/probs/<n>.npy    (C, h, w) uint8 = round(255 * probability), h and w at most oof.max_side
  <oof>/masks/<n>.png    the truth at the same resolution (centre-aligned nearest; 255 = ignored)
  <oof>/classes.json     the mask cache's classes.json (class names, max_side)
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pandas as pd

from pipeline.data.masks import read_classes, target_size
from pipeline.io import atomic_dir, read_index, write_image
from pipeline.workspace import INDEX, Workspace

if TYPE_CHECKING:
    import torch

    from pipeline.config import Infer, ParamsView
    from pipeline.models.checkpoint import ModelSet


def read_oof(oof_dir: str | Path) -> pd.DataFrame:
    """The out-of-fold index (the layout above) with whole file paths; imports no torch (the audit reads it)."""
    return read_index(oof_dir, ("probs", "mask"))


def predict_oof(models: "ModelSet", infer: "Infer", p: "ParamsView", device: "torch.device",
                load=None) -> Iterator[tuple[dict, "torch.Tensor", np.ndarray]]:
    """Each fold's members of `models` (with infer's TTA and scales) on that fold's validation images, at
    most oof.max_side px: yields (row: key, fold, height, width; (C, h, w) float32 probabilities; (h, w)
    uint8 truth, centre-aligned nearest; 255 = ignored). p: params with train, oof and paths; load: as
    Ensemble.from_files takes it."""
    from pipeline.data.dataset import fold_tables
    from pipeline.evaluation.scoring import ImageConfusions, predict_rows
    from pipeline.inference.ensemble import Ensemble

    ws, max_side = Workspace(p.paths), p.oof.max_side
    cache = read_classes(ws.masks)
    for k in models.folds:
        val = fold_tables(ws.masks, ws.split, k)[1]
        ens = Ensemble.from_files([(f, 1.0) for f in models.only(folds=[k]).files()], infer, device, load=load)
        ens.spec.check(f"oof, fold {k}", eval_size=p.train.eval_size, max_side=cache.get("max_side"), classes=cache["classes"])
        small = [target_size(h, w, max_side) for h, w in zip(val.height.astype(int), val.width.astype(int))]
        truths = ImageConfusions(val, len(cache["classes"]))
        for i, (prob,) in predict_rows([ens], val, infer.batch_size, small):
            yield {"key": val.key[i], "fold": k, "height": small[i][0], "width": small[i][1]}, prob, truths.truth(i, small[i])


def write_oof(models: "ModelSet", p: "ParamsView", device: "torch.device") -> dict:
    """Write paths.oof (atomically) from the final ensemble's `models` (predict_oof, with p.infer);
    return the OOF scores at that resolution. p: params with infer, train, oof and paths."""
    from pipeline.evaluation.metrics import ConfusionMatrix, Metric, scores   # torch: not for read_oof's readers

    ws = Workspace(p.paths)
    classes = read_classes(ws.masks)["classes"]
    cm, rows = ConfusionMatrix(len(classes)), []
    with atomic_dir(ws.oof) as tmp:
        (tmp / "probs").mkdir()
        (tmp / "masks").mkdir()
        shutil.copy(ws.classes_json, tmp / ws.classes_json.name)
        for row, prob, truth in predict_oof(models, p.infer, p, device):
            n = len(rows)
            np.save(tmp / f"probs/{n}.npy", quantise(prob))
            write_image(tmp / f"masks/{n}.png", truth)
            cm.merge(Metric().count(prob.argmax(0).cpu().numpy(), truth, len(classes)))
            rows.append({**row, "probs": f"probs/{n}.npy", "mask": f"masks/{n}.png"})
        pd.DataFrame(rows).to_csv(tmp / INDEX, index=False)
    return scores(cm.numpy(), classes)


def quantise(p: "torch.Tensor") -> np.ndarray:
    return (p.clamp(0, 1) * 255).round().byte().cpu().numpy()
