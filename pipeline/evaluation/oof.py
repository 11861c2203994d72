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
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from pipeline.data.dataset import fold_tables
from pipeline.data.masks import read_classes, read_image, target_size
from pipeline.evaluation.metrics import ConfusionMatrix, scores
from pipeline.io import atomic_dir, read_index, write_image
from pipeline.workspace import INDEX, Workspace

if TYPE_CHECKING:
    import torch

    from pipeline.config import ParamsView
    from pipeline.models.checkpoint import ModelSet


def read_oof(oof_dir: str | Path) -> pd.DataFrame:
    """The out-of-fold index (the layout above) with whole file paths; imports no torch (the audit reads it)."""
    return read_index(oof_dir, ("probs", "mask"))


def write_oof(models: "ModelSet", p: "ParamsView", device: "torch.device") -> dict:
    """Write paths.oof (atomically) from the final ensemble's `models`, each fold's members on that
    fold's validation images, at most oof.max_side px; return the OOF scores at that resolution.
    p: params with infer, train, audit and paths."""
    import torch

    from pipeline.inference.ensemble import Ensemble, ImageFiles

    ws, infer, max_side = Workspace(p.paths), p.infer, p.oof.max_side
    cache = read_classes(ws.masks)
    classes = cache["classes"]
    cm, rows = ConfusionMatrix(len(classes)), []
    with atomic_dir(ws.oof) as tmp:
        (tmp / "probs").mkdir()
        (tmp / "masks").mkdir()
        shutil.copy(ws.classes_json, tmp / ws.classes_json.name)
        for k in models.folds:
            val = fold_tables(ws.masks, ws.split, k)[1]
            ens = Ensemble.from_files([(f, 1.0) for f in models.only(folds=[k]).files()], infer, device)
            ens.spec.check(f"oof, fold {k}", eval_size=p.train.eval_size, max_side=cache.get("max_side"), classes=classes)
            cached = list(zip(val.height.astype(int), val.width.astype(int)))
            small = [target_size(h, w, max_side) for h, w in cached]
            data = ImageFiles(lambda i, v=val, c=cached: read_image(v["image"][i], c[i]), len(val), ens.spec.eval_size)
            for i, prob in ens.predict_proba(data, small, infer.batch_size):
                n = len(rows)
                h, w = small[i]
                truth = cv2.resize(cv2.imread(val["mask"][i], cv2.IMREAD_UNCHANGED), (w, h),
                                   interpolation=cv2.INTER_NEAREST_EXACT)
                np.save(tmp / f"probs/{n}.npy", quantise(prob))
                write_image(tmp / f"masks/{n}.png", truth)
                cm.update(prob.argmax(0).cpu(), torch.from_numpy(truth))
                rows.append({"key": val.key[i], "fold": k, "height": h, "width": w, "probs": f"probs/{n}.npy",
                             "mask": f"masks/{n}.png"})
        pd.DataFrame(rows).to_csv(tmp / INDEX, index=False)
    return scores(cm.numpy(), classes)


def quantise(p: "torch.Tensor") -> np.ndarray:
    return (p.clamp(0, 1) * 255).round().byte().cpu().numpy()
