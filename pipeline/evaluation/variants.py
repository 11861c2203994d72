"""How much each trick is worth, judged honestly: every variant is scored only on images that none
of its members trained on.

  out-of-fold (all non-holdout images): each fold's model on its own validation fold, summed —
      single model, + TTA, best+last epoch ensemble, SWA (+ TTA) when trained, the seed ensemble
      (all train.seeds of the fold) when there are several, round-2 (pseudo-label) fold model;
  holdout (images in no fold): each fold model alone (mean over folds), the k-fold ensemble,
      + TTA, the k-fold x seed ensemble, the round-2 k-fold ensemble, and the final ensemble the
      submission uses (`infer`: folds x seeds x checkpoints, TTA).
Single-model rows use the first seed of train.seeds.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import cv2
import pandas as pd
import torch

from pipeline.data.dataset import fold_tables
from pipeline.data.masks import read_image
from pipeline.evaluation.metrics import ConfusionMatrix, scores
from pipeline.inference.ensemble import Ensemble, ImageFiles, fold_weights, load_member, member_paths
from pipeline.models.checkpoint import member_dir


def score(ensemble: Ensemble, table: pd.DataFrame, num_classes: int, image_size: Optional[int],
          batch_size: int = 8) -> tuple[ConfusionMatrix, float]:
    """Confusion matrix of the ensemble on the mask-cache rows of `table`, and images/s.
    Masks are read as their predictions arrive (sizes come from the index): memory stays one batch."""
    images, masks = table["image"].tolist(), table["mask"].tolist()
    sizes = list(zip(table["height"].astype(int), table["width"].astype(int)))
    data = ImageFiles(lambda i: read_image(images[i], sizes[i]), len(images), image_size)
    cm = ConfusionMatrix(num_classes)
    start = time.perf_counter()
    for i, pred in ensemble.predict(data, sizes, batch_size):
        cm.update(torch.from_numpy(pred), torch.from_numpy(cv2.imread(masks[i], cv2.IMREAD_UNCHANGED)))
    return cm, len(images) / max(time.perf_counter() - start, 1e-9)


def evaluate_variants(infer, folds: list[int], seeds: list[int], image_size: Optional[int], classes: list[str],
                      models_dir: str | Path, masks_dir: str | Path, split_dir: str | Path, device: torch.device,
                      models_round2: str | Path | None = None) -> pd.DataFrame:
    """One row per variant: variant, judged_on, images, mIoU, pixel_acc, mean_acc, images_per_s, IoU/<class>."""
    n_cls = len(classes)
    cache: dict[Path, torch.nn.Module] = {}
    round2 = Path(models_round2) if models_round2 else None
    has_round2 = round2 is not None and all((member_dir(round2, k, s) / "best.pt").exists() for k in folds for s in seeds)

    def model(k: int, ckpt: str = "best", folder: str | Path = models_dir, seed: int = seeds[0]) -> torch.nn.Module:
        path = member_paths(folder, [k], [seed], [ckpt])[0]
        if path not in cache:
            cache[path] = load_member(path, device, infer.batch_size)[0]
        return cache[path]

    def ens(members, views=("identity",), scales=(1.0,)) -> Ensemble:
        return Ensemble(members, list(views), list(scales), device, infer.amp)

    rows = []

    def add(name: str, judged_on: str, cm: ConfusionMatrix, images: int, rate: float) -> None:
        s = scores(cm.numpy(), classes)
        rows.append({"variant": name, "judged_on": judged_on, "images": images, "mIoU": s["mIoU"],
                     "pixel_acc": s["pixel_acc"], "mean_acc": s["mean_acc"], "images_per_s": rate,
                     **{f"IoU/{c}": v for c, v in s["IoU"].items()}})

    tables = {k: fold_tables(masks_dir, split_dir, k) for k in folds}
    oof = {"fold model": lambda k: ens([(model(k), 1.0)]),
           "fold model + TTA": lambda k: ens([(model(k), 1.0)], infer.tta, infer.scales)}
    if "last" in infer.checkpoints or len(infer.checkpoints) > 1:
        oof["fold model, best + last epochs"] = lambda k: ens([(model(k, c), 1.0) for c in ("best", "last")])
    if all((member_dir(models_dir, k, seeds[0]) / "swa.pt").exists() for k in folds):
        oof["fold model, SWA"] = lambda k: ens([(model(k, "swa"), 1.0)])
        oof["fold model, SWA + TTA"] = lambda k: ens([(model(k, "swa"), 1.0)], infer.tta, infer.scales)
    if len(seeds) > 1:
        oof[f"fold model, seed ensemble ({len(seeds)} seeds)"] = lambda k: ens([(model(k, seed=s), 1.0) for s in seeds])
    if has_round2:
        oof["round 2 fold model (pseudo-labels)"] = lambda k: ens([(model(k, "best", round2), 1.0)])
    for name, make in oof.items():
        cm, n, seconds = ConfusionMatrix(n_cls), 0, 0.0
        for k in folds:
            val = tables[k][1]
            c, rate = score(make(k), val, n_cls, image_size, infer.batch_size)
            cm.merge(c)
            n += len(val)
            seconds += len(val) / rate
        add(name, "out-of-fold", cm, n, n / seconds)

    held = holdout_table(masks_dir, split_dir)
    if held.empty:
        return pd.DataFrame(rows)
    per_fold = [score(ens([(model(k), 1.0)]), held, n_cls, image_size, infer.batch_size) for k in folds]
    mean = {"variant": "fold model (mean over folds)", "judged_on": "holdout", "images": len(held),
            **{m: sum(scores(c.numpy(), classes)[m] for c, _ in per_fold) / len(folds)
               for m in ("mIoU", "pixel_acc", "mean_acc")},
            "images_per_s": sum(r for _, r in per_fold) / len(folds)}
    rows.append(mean)
    kfold = [(model(k), 1.0) for k in folds]
    add("k-fold ensemble", "holdout", *_scored(ens(kfold), held, n_cls, image_size, infer.batch_size))
    add("k-fold ensemble + TTA", "holdout",
        *_scored(ens(kfold, infer.tta, infer.scales), held, n_cls, image_size, infer.batch_size))
    if len(seeds) > 1:
        add(f"k-fold x seed ensemble ({len(seeds)} seeds)", "holdout",
            *_scored(ens([(model(k, seed=s), 1.0) for k in folds for s in seeds]), held, n_cls, image_size,
                     infer.batch_size))
    if has_round2:
        r2 = [(model(k, "best", round2), 1.0) for k in folds]
        add("round 2 k-fold ensemble (pseudo-labels)", "holdout", *_scored(ens(r2), held, n_cls, image_size, infer.batch_size))
    final_dir = round2 if infer.round == 2 and has_round2 else Path(models_dir)
    add(f"final ensemble (infer params, round {2 if final_dir == round2 else 1})", "holdout",
        *_scored(final_ensemble(infer, folds, seeds, final_dir, device, lambda k, s, c: model(k, c, final_dir, s)),
                 held, n_cls, image_size, infer.batch_size))
    return pd.DataFrame(rows)


def holdout_table(masks_dir: str | Path, split_dir: str | Path) -> pd.DataFrame:
    """The mask-cache rows of the holdout images (in no fold: no model trained on them)."""
    index = pd.read_csv(Path(masks_dir) / "index.csv")
    held = index.merge(pd.read_csv(Path(split_dir) / "folds.csv")[["key", "holdout"]], on="key")
    return held[held.holdout].reset_index(drop=True)


def _scored(e: Ensemble, table: pd.DataFrame, n_cls: int, image_size: Optional[int], batch: int):
    cm, rate = score(e, table, n_cls, image_size, batch)
    return cm, len(table), rate


def final_ensemble(infer, folds: list[int], seeds: list[int], models_dir: str | Path, device: torch.device,
                   model=None) -> Ensemble:
    """The ensemble the submission and `predict` use: folds x seeds x infer.checkpoints, fold-weighted,
    with TTA. `models_dir` is round 1's or round 2's models folder (see `models_for_round`)."""
    get = model or (lambda k, s, c: load_member(member_dir(models_dir, k, s) / f"{c}.pt", device, infer.batch_size)[0])
    members = [(get(k, s, c), w) for (k, s, c), w in _final_keys(infer, folds, seeds, models_dir)]
    return Ensemble(members, infer.tta, infer.scales, device, infer.amp)


def final_members(infer, folds: list[int], seeds: list[int], models_dir: str | Path) -> list[tuple[Path, float]]:
    """(checkpoint file, weight) of every member of the final ensemble."""
    return [(member_dir(models_dir, k, s) / f"{c}.pt", w) for (k, s, c), w in _final_keys(infer, folds, seeds, models_dir)]


def _final_keys(infer, folds: list[int], seeds: list[int], models_dir: str | Path) -> list[tuple[tuple, float]]:
    """((fold, seed, checkpoint), weight) of the final ensemble; fails early, naming missing checkpoints."""
    weights = fold_weights(folds, infer.fold_weights)
    member_paths(models_dir, folds, seeds, infer.checkpoints)
    return [((k, s, c), w) for k, w in zip(folds, weights) for s in seeds for c in infer.checkpoints]


def models_for_round(infer, paths) -> str:
    return paths.models_round2 if infer.round == 2 else paths.models


def variants_metrics(table: pd.DataFrame) -> dict:
    """The table as DVC/MLflow metrics: {"holdout/k_fold_ensemble_TTA": {mIoU, pixel_acc, images,
    images_per_s, IoU: {class: iou}}} — keys are valid MLflow names and read well in `dvc exp show`."""
    iou_cols = [c for c in table.columns if c.startswith("IoU/")]
    return {_slug(f"{r['judged_on']}/{r['variant']}"): {
        "mIoU": r["mIoU"], "pixel_acc": r["pixel_acc"], "images": int(r["images"]),
        "images_per_s": round(r["images_per_s"], 1),
        "IoU": {c[4:]: r[c] for c in iou_cols if isinstance(r.get(c), float) and r[c] == r[c]}}
        for r in table.to_dict("records")}


def _slug(text: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9]+", "_", part).strip("_") for part in text.split("/"))
