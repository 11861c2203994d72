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
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from pipeline.config import Pseudo
from pipeline.data.masks import content_digest, prepare_image, read_classes, target_size
from pipeline.inference.ensemble import Ensemble, image_files
from pipeline.io import identical_files, write_image
from pipeline.labels import IGNORE_INDEX
from pipeline.models.checkpoint import ModelSet
from pipeline.workspace import INDEX, PseudoFiles, Workspace

if TYPE_CHECKING:
    from pipeline.config import ParamsView


def pseudo_label(teacher: Ensemble, images: pd.DataFrame, out_dir: Path, keep: Pseudo, batch_size: int = 8,
                 final_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write one fold's pseudo-labelled images into out_dir; return (index table, per-class report).
    Images are prepared as the teacher's checkpoints say (teacher.spec: size, max_side, classes);
    keep: the pseudo section (threshold, min_kept).

    The index records paths under `final_dir` (default out_dir): where the folder will live once an
    atomic write has renamed it."""
    final_dir = final_dir or out_dir
    image_size, max_side, n_classes = teacher.spec.eval_size, teacher.spec.max_side, len(teacher.spec.classes)
    threshold, min_kept = keep.threshold, keep.min_kept
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
            write_image(mask_file, label, cv2.IMWRITE_PNG_COMPRESSION, 1)
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
    index.to_csv(out_dir / INDEX, index=False)
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


def pseudo_label_folds(test: pd.DataFrame, p: "ParamsView", out: PseudoFiles, device: torch.device) -> tuple[pd.DataFrame, dict]:
    """Every fold's pseudo-labels from its own round-1 best models (its seed ensemble + infer's TTA)
    into out/fold_<k> (the folder that becomes paths.pseudo). Returns (per fold and class report,
    summary for the metrics file). p: params with infer, train, pseudo and paths."""
    ws = Workspace(p.paths)
    cache = read_classes(ws.masks)   # how training images were prepared: the teachers' spec must agree
    round1 = ModelSet(ws.models(1), tuple(p.train.folds), tuple(p.train.seeds))
    reports, summary = [], {}
    for k in p.train.folds:
        teacher = Ensemble.from_files([(f, 1.0) for f in round1.only(folds=[k]).files()], p.infer, device)
        teacher.spec.check(f"pseudo, fold {k}", eval_size=p.train.eval_size, max_side=cache.get("max_side"),
                           classes=cache["classes"])
        index, report = pseudo_label(teacher, test, out.fold(k), p.pseudo, p.infer.batch_size,
                                     final_dir=ws.pseudo_fold(k))
        reports.append(report.assign(fold=k, **{"class": cache["classes"]}))
        summary[f"fold_{k}"] = {"images": len(index),
                                "pixel_kept_fraction": float(index.kept_fraction.mean()) if len(index) else 0.0}
    return pd.concat(reports, ignore_index=True), summary
