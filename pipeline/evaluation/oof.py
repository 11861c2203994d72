"""Out-of-fold probabilities: each fold's members of the final ensemble (every seed and
infer.checkpoints, with infer's TTA and scales) predict the fold's own validation images, which none
of them trained on. Kept small, for the label audit and for fitting blend weights across experiments:

  <oof>/index.csv        key, fold, height, width (the OOF resolution), probs, mask (files below)
  <oof>/probs/<n>.npy    (C, h, w) uint8 = round(255 * probability), h and w at most audit.max_side
  <oof>/masks/<n>.png    the truth at the same resolution (centre-aligned nearest; 255 = ignored)
  <oof>/classes.json     the mask cache's classes.json (class names, max_side)
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
import torch

from pipeline.data.dataset import fold_tables
from pipeline.data.masks import read_classes, read_image, target_size
from pipeline.evaluation.metrics import ConfusionMatrix, scores
from pipeline.inference.ensemble import Ensemble, ImageFiles, member_paths
from pipeline.io import atomic_dir


def write_oof(infer, folds: list[int], seeds: list[int], eval_size: Optional[int], models_dir: str | Path,
              masks_dir: str | Path, split_dir: str | Path, max_side: int, device: torch.device,
              out_dir: str | Path) -> dict:
    """Write <out_dir> (atomically); return the OOF scores of the per-fold ensembles at the OOF resolution."""
    classes_file = Path(masks_dir) / "classes.json"
    cache = read_classes(masks_dir)
    classes = cache["classes"]
    cm, rows = ConfusionMatrix(len(classes)), []
    with atomic_dir(out_dir) as tmp:
        (tmp / "probs").mkdir()
        (tmp / "masks").mkdir()
        shutil.copy(classes_file, tmp / "classes.json")
        for k in folds:
            val = fold_tables(masks_dir, split_dir, k)[1]
            paths = member_paths(models_dir, [k], seeds, infer.checkpoints)
            ens = Ensemble.from_files([(p, 1.0) for p in paths], infer, device)
            ens.spec.check(f"oof, fold {k}", eval_size=eval_size, max_side=cache.get("max_side"), classes=classes)
            cached = list(zip(val.height.astype(int), val.width.astype(int)))
            small = [target_size(h, w, max_side) for h, w in cached]
            data = ImageFiles(lambda i, v=val, c=cached: read_image(v["image"][i], c[i]), len(val), eval_size)
            for i, p in ens.predict_proba(data, small, infer.batch_size):
                n = len(rows)
                h, w = small[i]
                truth = cv2.resize(cv2.imread(val["mask"][i], cv2.IMREAD_UNCHANGED), (w, h),
                                   interpolation=cv2.INTER_NEAREST_EXACT)
                np.save(tmp / f"probs/{n}.npy", quantise(p))
                cv2.imwrite(str(tmp / f"masks/{n}.png"), truth)
                cm.update(p.argmax(0).cpu(), torch.from_numpy(truth))
                rows.append({"key": val.key[i], "fold": k, "height": h, "width": w, "probs": f"probs/{n}.npy",
                             "mask": f"masks/{n}.png"})
        pd.DataFrame(rows).to_csv(tmp / "index.csv", index=False)
    return scores(cm.numpy(), classes)


def quantise(p: torch.Tensor) -> np.ndarray:
    return (p.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
