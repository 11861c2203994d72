"""How much each trick is worth, judged honestly: every variant is scored only on images that none
of its members trained on.

  out-of-fold (all non-holdout images): each fold's model on its own validation fold, summed —
      single model, + TTA, best+last epoch ensemble, SWA / EMA (+ TTA) when trained, the seed ensemble
      (all train.seeds of the fold) when there are several, round-2 (pseudo-label) fold model;
  holdout (images in no fold): each fold model alone (mean over folds), the k-fold ensemble,
      + TTA, the k-fold x seed ensemble, the round-2 k-fold ensemble, and the final ensemble the
      submission uses (`infer`: folds x seeds x checkpoints, TTA).
  refinements: the out-of-fold probabilities of the final ensemble's members (paths.oof) + CRF, + the
      post-processing rules fitted on them (optimistic there), and the final ensemble + CRF, +
      postprocess on the holdout (the honest judge), each with its extra cost per image.
Single-model rows use the first seed of train.seeds. Every row has the chosen metric (params
`metric`) and its 95 % bootstrap interval over images.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import cv2
import numpy as np
import pandas as pd
import torch

from pipeline.data.dataset import fold_tables
from pipeline.data.masks import read_image
from pipeline.evaluation import stats
from pipeline.evaluation.audit import read_oof
from pipeline.evaluation.metrics import ConfusionMatrix, Metric, scores
from pipeline.inference.ensemble import Ensemble, ImageFiles, fold_weights, load_member, member_paths
from pipeline.evaluation.rules import confusions, fit_rules
from pipeline.inference.postprocess import Crf, Refiner, crf_of, crf_refine
from pipeline.models.checkpoint import member_dir


def score_images(ensemble: Ensemble, table: pd.DataFrame, num_classes: int, image_size: Optional[int],
                 batch_size: int = 8, metric: Optional[Metric] = None,
                 refiners: Optional[dict[str, Optional[Refiner]]] = None) -> tuple[dict[str, np.ndarray], float]:
    """({name: (N, C, C) per-image confusions}, images/s) of the ensemble on the mask-cache rows of
    `table`, one entry per refiner (None: the argmax; default {"": None}). The probabilities are
    computed once; masks are read as predictions arrive (memory stays one batch)."""
    metric, refiners = metric or Metric(), refiners if refiners is not None else {"": None}
    images, masks = table["image"].tolist(), table["mask"].tolist()
    sizes = list(zip(table["height"].astype(int), table["width"].astype(int)))
    data = ImageFiles(lambda i: read_image(images[i], sizes[i]), len(images), image_size)
    out = {name: np.zeros((len(table), num_classes, num_classes), np.int64) for name in refiners}
    start = time.perf_counter()
    for i, p in ensemble.predict_proba(data, sizes, batch_size):
        truth = cv2.imread(masks[i], cv2.IMREAD_UNCHANGED)
        prob = None
        for name, refine in refiners.items():
            if refine is None:
                pred = p.argmax(0).to(torch.uint8).cpu().numpy()
            else:
                prob = p.cpu().numpy() if prob is None else prob
                pred = refine(prob, lambda i=i: data.read(i))
            out[name][i] = metric.count(pred, truth, num_classes).numpy()
    return out, len(images) / max(time.perf_counter() - start, 1e-9)


def score(ensemble: Ensemble, table: pd.DataFrame, num_classes: int, image_size: Optional[int],
          batch_size: int = 8) -> tuple[ConfusionMatrix, float]:
    """Confusion matrix of the ensemble on the mask-cache rows of `table`, and images/s."""
    per, rate = score_images(ensemble, table, num_classes, image_size, batch_size)
    return ConfusionMatrix(num_classes).merge(per[""].sum(0)), rate


class VariantTable:
    """Rows of the variant table: dataset-level scores, the chosen metric and its 95 % interval over images."""

    def __init__(self, classes: list[str], metric: Metric, draws: int = stats.DRAWS, seed: int = 0):
        self.classes, self.metric, self.draws, self.seed, self.rows = classes, metric, draws, seed, []
        self.images: dict[str, np.ndarray] = {}   # "judged_on/variant" -> per-image confusions
        self.fit_log: list[dict] = []             # the post-processing rules kept, one row each

    def add(self, name: str, judged_on: str, per_image: np.ndarray, rate: float, seconds_per_image: float = 0.0) -> None:
        s = scores(per_image.sum(0), self.classes)
        lo, hi = stats.interval(self.metric, per_image, self.draws, self.seed)
        self.rows.append({"variant": name, "judged_on": judged_on, "images": len(per_image), "metric": self.metric.value(per_image),
                          "ci95_low": lo, "ci95_high": hi, "mIoU": s["mIoU"], "pixel_acc": s["pixel_acc"],
                          "mean_acc": s["mean_acc"], "images_per_s": rate, "extra_s_per_image": seconds_per_image,
                          **{f"IoU/{c}": v for c, v in s["IoU"].items()}})
        self.images[f"{judged_on}/{name}"] = per_image

    def frame(self) -> pd.DataFrame:
        out = pd.DataFrame(self.rows)
        out.attrs["metric"] = self.metric.name
        return out


def evaluate_variants(p, classes: list[str], device: torch.device) -> tuple[pd.DataFrame, Refiner, list[dict]]:
    """(one row per variant: variant, judged_on, images, metric, ci95_low/high, mIoU, pixel_acc, mean_acc,
    images_per_s, extra_s_per_image, IoU/<class>; the refiner the submission applies: the rules fitted
    on the out-of-fold probabilities (paths.oof) when infer.postprocess, and the CRF when infer.crf.enabled;
    the rules kept, one row each).
    `p`: params with infer, train, metric, paths."""
    infer, folds, seeds, image_size = p.infer, p.train.folds, p.train.seeds, p.train.eval_size
    models_dir, masks_dir, split_dir = p.paths.models, p.paths.masks, p.paths.split
    n_cls, metric = len(classes), Metric.of(p.metric)
    cache: dict[Path, torch.nn.Module] = {}
    round2 = Path(p.paths.models_round2)
    has_round2 = all((member_dir(round2, k, s) / "best.pt").exists() for k in folds for s in seeds)

    def model(k: int, ckpt: str = "best", folder: str | Path = models_dir, seed: int = seeds[0]) -> torch.nn.Module:
        path = member_paths(folder, [k], [seed], [ckpt])[0]
        if path not in cache:
            cache[path] = load_member(path, device, infer.batch_size)[0]
        return cache[path]

    def ens(members, views=("identity",), scales=(1.0,)) -> Ensemble:
        return Ensemble(members, list(views), list(scales), device, infer.amp)

    table = VariantTable(classes, metric, p.metric.bootstrap, p.metric.seed)

    def run(e: Ensemble, tab: pd.DataFrame, refiners=None):
        return score_images(e, tab, n_cls, image_size, infer.batch_size, metric, refiners)

    tables = {k: fold_tables(masks_dir, split_dir, k) for k in folds}
    oof = {"fold model": lambda k: ens([(model(k), 1.0)]),
           "fold model + TTA": lambda k: ens([(model(k), 1.0)], infer.tta, infer.scales)}
    if "last" in infer.checkpoints or len(infer.checkpoints) > 1:
        oof["fold model, best + last epochs"] = lambda k: ens([(model(k, c), 1.0) for c in ("best", "last")])
    for avg in ("swa", "ema"):
        if all((member_dir(models_dir, k, seeds[0]) / f"{avg}.pt").exists() for k in folds):
            oof[f"fold model, {avg.upper()}"] = lambda k, a=avg: ens([(model(k, a), 1.0)])
            oof[f"fold model, {avg.upper()} + TTA"] = lambda k, a=avg: ens([(model(k, a), 1.0)], infer.tta, infer.scales)
    if len(seeds) > 1:
        oof[f"fold model, seed ensemble ({len(seeds)} seeds)"] = lambda k: ens([(model(k, seed=s), 1.0) for s in seeds])
    if has_round2:
        oof["round 2 fold model (pseudo-labels)"] = lambda k: ens([(model(k, "best", round2), 1.0)])
    for name, make in oof.items():
        per, seconds = [], 0.0
        for k in folds:
            val = tables[k][1]
            c, rate = run(make(k), val)
            per.append(c[""])
            seconds += len(val) / rate
        n = sum(len(x) for x in per)
        table.add(name, "out-of-fold", np.concatenate(per), n / seconds)

    refiner, crf, settings = fitted_refiner(p, classes, metric, table)
    held = holdout_table(masks_dir, split_dir)
    if held.empty:
        return table.frame(), refiner, table.fit_log
    per_fold = [run(ens([(model(k), 1.0)]), held) for k in folds]
    table.rows.append({"variant": "fold model (mean over folds)", "judged_on": "holdout", "images": len(held),
                       **{m: sum(scores(c[""].sum(0), classes)[m] for c, _ in per_fold) / len(folds)
                          for m in ("mIoU", "pixel_acc", "mean_acc")},
                       "metric": sum(metric.value(c[""]) for c, _ in per_fold) / len(folds),
                       "images_per_s": sum(r for _, r in per_fold) / len(folds)})
    kfold = [(model(k), 1.0) for k in folds]
    table.add("k-fold ensemble", "holdout", *_first(run(ens(kfold), held)))
    table.add("k-fold ensemble + TTA", "holdout", *_first(run(ens(kfold, infer.tta, infer.scales), held)))
    if len(seeds) > 1:
        table.add(f"k-fold x seed ensemble ({len(seeds)} seeds)", "holdout",
                  *_first(run(ens([(model(k, seed=s), 1.0) for k in folds for s in seeds]), held)))
    if has_round2:
        r2 = [(model(k, "best", round2), 1.0) for k in folds]
        table.add("round 2 k-fold ensemble (pseudo-labels)", "holdout", *_first(run(ens(r2), held)))
    final_dir = round2 if infer.round == 2 and has_round2 else Path(models_dir)
    final = f"final ensemble (infer params, round {2 if final_dir == round2 else 1})"
    refiners = {"": None, " + CRF": Refiner(crf=settings)}
    if refiner.rules is not None and refiner.rules.active:
        refiners[" + CRF + postprocess (OOF-fitted rules)" if crf else " + postprocess (OOF-fitted rules)"] = refiner
    timed = {}
    for name, r in refiners.items():   # each refinement's own cost per image, beside the shared prediction
        timed[name] = _refine_cost(r, held, image_size, n_cls) if r is not None else 0.0
    per, rate = run(final_ensemble(infer, folds, seeds, final_dir, device, lambda k, s, c: model(k, c, final_dir, s)),
                    held, refiners)
    for name in refiners:
        table.add(final + name, "holdout", per[name], rate, timed[name])
    return table.frame(), refiner, table.fit_log


def _first(result) -> tuple[np.ndarray, float]:
    per, rate = result
    return per[""], rate


def _refine_cost(refine: Refiner, held: pd.DataFrame, image_size, n_cls: int) -> float:
    """Seconds per image that `refine` adds (timed on uniform probabilities at each holdout image's size)."""
    sizes = list(zip(held["height"].astype(int), held["width"].astype(int)))[:4]
    start = time.perf_counter()
    for i, (h, w) in enumerate(sizes):
        refine(np.full((n_cls, h, w), 1.0 / n_cls, np.float32), lambda i=i: read_image(held["image"][i], sizes[i]))
    return (time.perf_counter() - start) / max(len(sizes), 1)


def fitted_refiner(p, classes: list[str], metric: Metric, table: VariantTable) -> tuple[Refiner, Optional[Crf], Crf]:
    """Fit the post-processing rules on the out-of-fold probabilities of the final ensemble's members
    (paths.oof; after the CRF when infer.crf.enabled) and add their out-of-fold rows to `table`. The
    rules are fitted on those images, so their out-of-fold gain is optimistic: the holdout judges them.
    Returns (what the submission applies, the CRF it applies or None, the CRF settings judged)."""
    settings = crf_of(p.infer.crf)
    crf = settings if p.infer.crf.enabled else None
    oof_dir = Path(p.paths.oof)
    if not (oof_dir / "index.csv").exists():
        return Refiner(None, crf), crf, settings
    index = read_oof(oof_dir)
    cache = pd.read_csv(Path(p.paths.masks) / "index.csv").set_index("key")
    probs = [np.load(f).astype(np.float32) / 255.0 for f in index.probs]
    truths = [cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in index["mask"]]
    photos = [cv2.resize(read_image(cache.image[k], (int(cache.height[k]), int(cache.width[k]))), (int(w), int(h)),
                         interpolation=cv2.INTER_AREA) for k, h, w in zip(index.key, index.height, index.width)]
    n, where = len(classes), f"out-of-fold, at most {max(index.height.max(), index.width.max())} px"
    base = np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(probs, truths)])
    table.add("final ensemble's members per fold", where, base, 0.0)
    start = time.perf_counter()
    crf_probs = [crf_refine(q, im, settings) for q, im in zip(probs, photos)]
    cost = (time.perf_counter() - start) / max(len(probs), 1)
    table.add("final ensemble's members per fold + CRF", where,
              np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(crf_probs, truths)]), 0.0, cost)
    used = crf_probs if crf else probs
    rules, log = fit_rules(used, truths, classes, metric)
    if rules.active:
        table.add("final ensemble's members per fold" + (" + CRF" if crf else "") + " + postprocess (fitted here: optimistic)",
                  where, confusions(used, truths, rules, metric, n), 0.0)
    table.fit_log = log
    return Refiner(rules if p.infer.postprocess else None, crf), crf, settings


def holdout_table(masks_dir: str | Path, split_dir: str | Path) -> pd.DataFrame:
    """The mask-cache rows of the holdout images (in no fold: no model trained on them)."""
    index = pd.read_csv(Path(masks_dir) / "index.csv")
    held = index.merge(pd.read_csv(Path(split_dir) / "folds.csv")[["key", "holdout"]], on="key")
    return held[held.holdout].reset_index(drop=True)


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


def submitted_variant(table: pd.DataFrame, refiner: Refiner) -> dict:
    """The holdout row of what submit applies (the final ensemble, + the refinements in force), as metrics."""
    held = table[(table.judged_on == "holdout") & table.variant.str.startswith("final ensemble")]
    if held.empty:
        return {}
    applied = (refiner.crf is not None, refiner.rules is not None and refiner.rules.active)
    for r in held.to_dict("records"):
        if ("CRF" in r["variant"], "postprocess" in r["variant"]) == applied:
            return {"variant": r["variant"], "metric": r["metric"], "ci95_low": r["ci95_low"], "ci95_high": r["ci95_high"],
                    "mIoU": r["mIoU"], "metric_name": table.attrs.get("metric", "mIoU")}
    return {}


def variants_metrics(table: pd.DataFrame) -> dict:
    """The table as DVC/MLflow metrics: {"holdout/k_fold_ensemble_TTA": {mIoU, pixel_acc, images,
    images_per_s, IoU: {class: iou}}} — keys are valid MLflow names and read well in `dvc exp show`."""
    iou_cols = [c for c in table.columns if c.startswith("IoU/")]
    return {_slug(f"{r['judged_on']}/{r['variant']}"): {
        "mIoU": r["mIoU"], "pixel_acc": r["pixel_acc"], "images": int(r["images"]),
        **{k: r[k] for k in ("metric", "ci95_low", "ci95_high") if isinstance(r.get(k), float) and r[k] == r[k]},
        "images_per_s": round(r["images_per_s"], 1),
        "IoU": {c[4:]: r[c] for c in iou_cols if isinstance(r.get(c), float) and r[c] == r[c]}}
        for r in table.to_dict("records")}


def _slug(text: str) -> str:
    return "/".join(re.sub(r"[^A-Za-z0-9]+", "_", part).strip("_") for part in text.split("/"))
