"""Pseudo-labels for the unlabelled test images, one set per fold.

Fold k's pseudo-labels come from fold k's own round-1 models (all its seeds, + TTA) — never from an
ensemble of all folds, which has seen fold k's validation images — so fold k's round-2 validation
score stays out-of-fold. Pixels whose top probability is below the threshold become 255 (ignored by every
loss); images keeping too few pixels are dropped. Test images are never validation or holdout
images: any test image whose file_name is also in the labelled pool, or whose file is a byte-identical
copy of a labelled image, is left out and reported.

Per fold: <out>/fold_<k>/masks/*.png, images/*.npy and index.csv (the mask-cache columns: image,
mask, height, width, digest, px_<c>), so round-2 training reads them exactly like the mask cache.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.labels import IGNORE_INDEX
from pipeline.data.masks import content_digest, prepare_image, target_size
from pipeline.inference.ensemble import Ensemble, image_files, member_paths
from pipeline.io import identical_files


def pseudo_label(teacher: Ensemble, images: pd.DataFrame, out_dir: Path, image_size: Optional[int], n_classes: int,
                 threshold: float, min_kept: float, batch_size: int = 8,
                 final_dir: Path | None = None, max_side: int | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write one fold's pseudo-labelled images into out_dir; return (index table, per-class report).

    The index records paths under `final_dir` (default out_dir): where the folder will live once an
    atomic write has renamed it."""
    final_dir = final_dir or out_dir
    data = image_files(images, image_size, max_side)   # as validation images are prepared
    rows, predicted, kept = [], np.zeros(n_classes, np.int64), np.zeros(n_classes, np.int64)
    for x, idx in DataLoader(data, batch_size):
        probs = teacher.proba(x)
        for p, i in zip(probs, idx.tolist()):
            h, w = target_size(int(images.height[i]), int(images.width[i]), max_side)   # the mask cache's size
            if p.shape[-2:] != (h, w):
                p = F.interpolate(p[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            conf, label = p.max(0)
            label = label.to(torch.uint8).numpy()
            confident = (conf >= threshold).numpy()
            predicted += np.bincount(label.ravel(), minlength=n_classes)[:n_classes]
            kept += np.bincount(label[confident].ravel(), minlength=n_classes)[:n_classes]
            frac = float(confident.mean())
            if frac < min_kept:
                continue
            label[~confident] = IGNORE_INDEX
            name = images.image_id[i]   # the whole file name: 0001.jpg and 0001.png must not share a mask
            mask_file, image_file = out_dir / "masks" / f"{name}.png", out_dir / "images" / f"{name}.npy"
            mask_file.parent.mkdir(parents=True, exist_ok=True)
            image_file.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(mask_file), label, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            img = prepare_image(images.path[i], int(images.height[i]), int(images.width[i]), max_side)
            np.save(image_file, img)
            counts = np.bincount(label.ravel(), minlength=256)
            rows.append({"key": f"pseudo/{images.image_id[i]}", "image": str(final_dir / image_file.relative_to(out_dir)),
                         "mask": str(final_dir / mask_file.relative_to(out_dir)),
                         "height": h, "width": w, "kept_fraction": frac, "digest": content_digest(label, img),
                         **{f"px_{c}": int(counts[c]) for c in range(n_classes)}, f"px_{IGNORE_INDEX}": int(counts[255])})
    report = pd.DataFrame({"class_idx": range(n_classes), "predicted_pixels": predicted, "kept_pixels": kept,
                           "kept_fraction": np.where(predicted > 0, kept / np.maximum(predicted, 1), np.nan)})
    cols = ["key", "image", "mask", "height", "width", "kept_fraction", "digest"] + [f"px_{c}" for c in range(n_classes)] + \
        [f"px_{IGNORE_INDEX}"]
    index = pd.DataFrame(rows, columns=cols)
    out_dir.mkdir(parents=True, exist_ok=True)
    index.to_csv(out_dir / "index.csv", index=False)
    return index, report


def unlabelled(test: pd.DataFrame, folds_csv: Path, image_root: Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Test images not in the labelled pool — the same file (key: path under data.root), and, with
    `image_root` (data.root), by content: a byte-identical copy under another name is left out too.
    Returns (kept test rows, the names of those left out)."""
    pool = pd.read_csv(folds_csv)["key"]
    clash = test.key.isin(set(pool))
    if image_root is not None:
        n = len(test)
        for same in identical_files([*test.path, *(Path(image_root) / k for k in pool)]):
            if max(same) >= n:   # a test image identical to a labelled one
                clash |= test.index.isin([i for i in same if i < n])
    return test[~clash].reset_index(drop=True), sorted(test.image_id[clash])


def pseudo_label_folds(test: pd.DataFrame, folds: list[int], seeds: list[int], models_dir: Path, out: Path,
                       final_root: Path, infer, threshold: float, min_kept: float, image_size: Optional[int],
                       classes: list[str], device: torch.device, max_side: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Every fold's pseudo-labels from its own round-1 best models (its seed ensemble + infer's TTA)
    into out/fold_<k>. Returns (per fold and class report, summary for the metrics file)."""
    reports, summary = [], {}
    for k in folds:
        teacher = Ensemble.from_files([(path, 1.0) for path in member_paths(models_dir, [k], seeds, ["best"])],
                                      infer, device)
        teacher.spec.check(f"pseudo, fold {k}", eval_size=image_size, max_side=max_side, classes=classes)
        index, report = pseudo_label(teacher, test, out / f"fold_{k}", image_size, len(classes), threshold, min_kept,
                                     infer.batch_size, final_dir=Path(final_root) / f"fold_{k}", max_side=max_side)
        reports.append(report.assign(fold=k, **{"class": classes}))
        summary[f"fold_{k}"] = {"images": len(index),
                                "pixel_kept_fraction": float(index.kept_fraction.mean()) if len(index) else 0.0}
    return pd.concat(reports, ignore_index=True), summary
