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

import json
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np
import pandas as pd
import torch

from pipeline.data.dataset import fold_tables
from pipeline.data.masks import read_image
from pipeline.evaluation import stats
from pipeline.evaluation.oof import read_oof
from pipeline.evaluation.metrics import ConfusionMatrix, Metric, scores
from pipeline.inference.ensemble import Ensemble, ImageFiles, load_member
from pipeline.evaluation.rules import confusions, fit_rules
from pipeline.inference.postprocess import Crf, Refiner, crf_of, crf_refine
from pipeline.models.checkpoint import InputSpec, ModelSet
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import Infer, ParamsView, Train


def score_images(ensemble: Ensemble, table: pd.DataFrame, batch_size: int = 8, metric: Optional[Metric] = None,
                 refiners: Optional[dict[str, Optional[Refiner]]] = None) -> tuple[dict[str, np.ndarray], float]:
    """({name: (N, C, C) per-image confusions}, images/s) of the ensemble on the mask-cache rows of
    `table`, one entry per refiner (None: the argmax; default {"": None}), images prepared as the
    ensemble's spec says. The probabilities are computed once; masks are read as predictions arrive
    (memory stays one batch)."""
    metric, refiners = metric or Metric(), refiners if refiners is not None else {"": None}
    images, masks = table["image"].tolist(), table["mask"].tolist()
    sizes = list(zip(table["height"].astype(int), table["width"].astype(int)))
    num_classes = len(ensemble.spec.classes)
    data = ImageFiles(lambda i: read_image(images[i], sizes[i]), len(images), ensemble.spec.eval_size)
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


def score(ensemble: Ensemble, table: pd.DataFrame, batch_size: int = 8) -> tuple[ConfusionMatrix, float]:
    """Confusion matrix of the ensemble on the mask-cache rows of `table`, and images/s."""
    per, rate = score_images(ensemble, table, batch_size)
    return ConfusionMatrix(len(ensemble.spec.classes)).merge(per[""].sum(0)), rate


OOF, HOLDOUT = "out-of-fold", "holdout"
ModelRef = tuple[Path, int, int, str]   # (models folder, fold, seed, checkpoint)


@dataclass(frozen=True)
class Variant:
    """One row of the variant table. `id` names its metrics (`<judged_on>/<id>` in metrics/details/ensemble.json
    and MLflow: stable, never parsed from the label); `label` is what a person reads. Judged out of
    fold (each fold's members on that fold's validation images, summed) or on the holdout (all
    members at once); `tta`: infer's views and scales, else the identity alone."""
    id: str
    label: str
    judged_on: str
    members: tuple[ModelRef, ...] = ()
    tta: bool = False


class VariantTable:
    """Rows of the variant table: dataset-level scores, the chosen metric and its 95 % interval over images."""

    def __init__(self, classes: list[str], metric: Metric, draws: int = stats.DRAWS, seed: int = 0):
        self.classes, self.metric, self.draws, self.seed, self.rows = classes, metric, draws, seed, []
        self.images: dict[str, np.ndarray] = {}   # "judged_on/id" -> per-image confusions
        self.fit_log: list[dict] = []             # the post-processing rules kept, one row each

    def add(self, v: Variant, per_image: np.ndarray, rate: float, seconds_per_image: float = 0.0) -> None:
        s = scores(per_image.sum(0), self.classes)
        lo, hi = stats.interval(self.metric, per_image, self.draws, self.seed)
        self.rows.append({"id": v.id, "variant": v.label, "judged_on": v.judged_on, "images": len(per_image),
                          "metric": self.metric.value(per_image), "ci95_low": lo, "ci95_high": hi, "mIoU": s["mIoU"],
                          "pixel_acc": s["pixel_acc"], "mean_acc": s["mean_acc"], "images_per_s": rate,
                          "extra_s_per_image": seconds_per_image, **{f"IoU/{c}": v for c, v in s["IoU"].items()}})
        self.images[f"{v.judged_on}/{v.id}"] = per_image

    def compare_to(self, key: str) -> None:
        """Every other holdout row against `key` ("holdout/<id>", the submitted variant) on the same
        images: vs_submitted = this row's metric minus the submission's, with its paired 95 % interval."""
        if key not in self.images:
            return
        for r in self.rows:
            own = f"{r['judged_on']}/{r['id']}"
            if r["judged_on"] == HOLDOUT and own in self.images and own != key:
                d = stats.paired(self.metric, self.images[own], self.images[key], self.draws, self.seed)
                r.update(vs_submitted=d["diff"], vs_submitted_low=d["low"], vs_submitted_high=d["high"])

    def frame(self) -> pd.DataFrame:
        out = pd.DataFrame(self.rows)
        out.attrs["metric"] = self.metric.name
        return out


def variants(p: "ParamsView", has_round2: bool) -> list[Variant]:
    """The tricks judged, as specs: out of fold, then on the holdout (params infer, train, paths)."""
    ws, t, infer = Workspace(p.paths), p.train, p.infer
    r1, r2, s0 = ws.models(1), ws.models(2), t.seeds[0]

    def models(folder: Path = r1, ckpt: str = "best", seeds: tuple = (s0,)) -> tuple[ModelRef, ...]:
        return tuple((folder, k, s, ckpt) for k in t.folds for s in seeds)

    out = [Variant("fold", "fold model", OOF, models()), Variant("fold_tta", "fold model + TTA", OOF, models(), True)]
    if "last" in infer.checkpoints or len(infer.checkpoints) > 1:
        out.append(Variant("fold_best_last", "fold model, best + last epochs", OOF, models() + models(ckpt="last")))
    for avg in ("swa", "ema"):
        if ModelSet(r1, tuple(t.folds), (s0,), (avg,)).exists():
            out += [Variant(f"fold_{avg}", f"fold model, {avg.upper()}", OOF, models(ckpt=avg)),
                    Variant(f"fold_{avg}_tta", f"fold model, {avg.upper()} + TTA", OOF, models(ckpt=avg), True)]
    n = len(t.seeds)
    if n > 1:
        out.append(Variant("fold_seeds", f"fold model, seed ensemble ({n} seeds)", OOF, models(seeds=tuple(t.seeds))))
    if has_round2:
        out.append(Variant("fold_round2", "round 2 fold model (pseudo-labels)", OOF, models(r2)))
    out += [Variant("kfold", "k-fold ensemble", HOLDOUT, models()),
            Variant("kfold_tta", "k-fold ensemble + TTA", HOLDOUT, models(), True)]
    if n > 1:
        out.append(Variant("kfold_seeds", f"k-fold x seed ensemble ({n} seeds)", HOLDOUT, models(seeds=tuple(t.seeds))))
    if has_round2:
        out.append(Variant("kfold_round2", "round 2 k-fold ensemble (pseudo-labels)", HOLDOUT, models(r2)))
    return out


class Judge:
    """Scores ensembles of checkpoints on images none of their members saw (models load once)."""

    def __init__(self, p: "ParamsView", classes: list[str], device: torch.device):
        self.p, self.classes, self.device, self.metric = p, classes, device, Metric.of(p.metric)
        self.ws, self.models = Workspace(p.paths), {}

    def model(self, ref: ModelRef) -> tuple[torch.nn.Module, InputSpec]:
        folder, k, s, c = ref
        f = ModelSet(Path(folder), (k,), (s,), (c,)).files()[0]
        if f not in self.models:
            self.models[f] = load_member(f, self.device, self.p.infer.batch_size)
        return self.models[f]

    def ensemble(self, refs, tta: bool = False, weights=None) -> Ensemble:
        i, loaded = self.p.infer, [self.model(r) for r in refs]
        e = Ensemble([(m, w) for (m, _), w in zip(loaded, weights or [1.0] * len(refs))], i.tta if tta else ["identity"],
                     i.scales if tta else [1.0], self.device, i.amp)
        e.spec = InputSpec.common([s for _, s in loaded], "variant members")
        e.spec.check("ensemble", eval_size=self.p.train.eval_size, classes=self.classes)
        return e

    def run(self, e: Ensemble, tab: pd.DataFrame, refiners=None) -> tuple[dict[str, np.ndarray], float]:
        return score_images(e, tab, self.p.infer.batch_size, self.metric, refiners)

    def out_of_fold(self, v: Variant) -> tuple[np.ndarray, float]:
        per, seconds = [], 0.0
        for k in self.p.train.folds:
            val = fold_tables(self.ws.masks, self.ws.split, k)[1]
            c, rate = self.run(self.ensemble([r for r in v.members if r[1] == k], v.tta), val)
            per.append(c[""])
            seconds += len(val) / rate
        return np.concatenate(per), sum(len(x) for x in per) / seconds

    def holdout(self, v: Variant, held: pd.DataFrame) -> tuple[np.ndarray, float]:
        c, rate = self.run(self.ensemble(list(v.members), v.tta), held)
        return c[""], rate


def evaluate_variants(p: "ParamsView", classes: list[str], device: torch.device) -> tuple[pd.DataFrame, Refiner, list[dict]]:
    """(one row per variant: id, variant (its label), judged_on, images, metric, ci95_low/high, mIoU,
    pixel_acc, mean_acc, images_per_s, extra_s_per_image, IoU/<class>; the refiner the submission
    applies: the rules fitted on the out-of-fold probabilities (paths.oof) when infer.postprocess, and
    the CRF when infer.crf.enabled; the rules kept, one row each). `p`: params with infer, train, metric, paths."""
    judge, t = Judge(p, classes, device), p.train
    has_round2 = ModelSet(judge.ws.models(2), tuple(t.folds), tuple(t.seeds)).exists()
    table = VariantTable(classes, judge.metric, p.metric.bootstrap, p.metric.seed)
    specs = variants(p, has_round2)
    for v in specs:
        if v.judged_on == OOF:
            table.add(v, *judge.out_of_fold(v))
    refiner, crf, settings = fitted_refiner(p, classes, judge.metric, table)
    held = holdout_table(judge.ws)
    if held.empty:
        return table.frame(), refiner, table.fit_log
    table.rows.append(fold_mean_row(judge, held))
    for v in specs:
        if v.judged_on == HOLDOUT:
            table.add(v, *judge.holdout(v, held))
    final_rows(judge, held, has_round2, refiner, Refiner(crf=settings), table)
    table.compare_to(f"{HOLDOUT}/{submitted_id(refiner)}")
    return table.frame(), refiner, table.fit_log


def fold_mean_row(judge: Judge, held: pd.DataFrame) -> dict:
    """Each fold model alone on the holdout, the mean over folds (no interval: a mean of models)."""
    t, classes, metric = judge.p.train, judge.classes, judge.metric
    per_fold = [judge.run(judge.ensemble([(judge.ws.models(1), k, t.seeds[0], "best")]), held) for k in t.folds]
    return {"id": "fold_mean", "variant": "fold model (mean over folds)", "judged_on": HOLDOUT, "images": len(held),
            **{m: sum(scores(c[""].sum(0), classes)[m] for c, _ in per_fold) / len(t.folds)
               for m in ("mIoU", "pixel_acc", "mean_acc")},
            "metric": sum(metric.value(c[""]) for c, _ in per_fold) / len(t.folds),
            "images_per_s": sum(r for _, r in per_fold) / len(t.folds)}


def final_rows(judge: Judge, held: pd.DataFrame, has_round2: bool, refiner: Refiner, with_crf: Refiner,
               table: VariantTable) -> None:
    """The final ensemble the submission uses (infer: folds x seeds x checkpoints, fold-weighted, TTA)
    on the holdout: plain, + CRF, + the refinements in force — predicted once, each refinement timed."""
    infer, t = judge.p.infer, judge.p.train
    rnd = 2 if infer.round == 2 and has_round2 else 1
    final = ModelSet.final(infer, t, judge.ws)
    final = replace(final, dir=judge.ws.models(rnd))
    base = f"final ensemble (infer params, round {rnd})"
    refiners = {"final": (base, None), "final_crf": (base + " + CRF", with_crf)}
    if refiner.rules is not None and refiner.rules.active:
        crf = refiner.crf is not None
        refiners["final_crf_postprocess" if crf else "final_postprocess"] = (
            base + (" + CRF" if crf else "") + " + postprocess (OOF-fitted rules)", refiner)
    refs = [(final.dir, k, s, c) for k, s, c in final.keys()]
    weights = [w for _, w in final.weighted()]
    per, rate = judge.run(judge.ensemble(refs, True, weights), held, {i: r for i, (_, r) in refiners.items()})
    for i, (label, r) in refiners.items():   # each refinement's own cost per image, beside the shared prediction
        cost = _refine_cost(r, held, len(judge.classes)) if r is not None else 0.0
        table.add(Variant(i, label, HOLDOUT), per[i], rate, cost)


def _refine_cost(refine: Refiner, held: pd.DataFrame, n_cls: int) -> float:
    """Seconds per image that `refine` adds (timed on uniform probabilities at each holdout image's size)."""
    sizes = list(zip(held["height"].astype(int), held["width"].astype(int)))[:4]
    start = time.perf_counter()
    for i, (h, w) in enumerate(sizes):
        refine(np.full((n_cls, h, w), 1.0 / n_cls, np.float32), lambda i=i: read_image(held["image"][i], sizes[i]))
    return (time.perf_counter() - start) / max(len(sizes), 1)


def fitted_refiner(p: "ParamsView", classes: list[str], metric: Metric, table: VariantTable) -> tuple[Refiner, Optional[Crf], Crf]:
    """Fit the post-processing rules on the out-of-fold probabilities of the final ensemble's members
    (paths.oof; after the CRF when infer.crf.enabled) and add their out-of-fold rows to `table`. The
    rules are fitted on those images, so their out-of-fold gain is optimistic: the holdout judges them.
    Returns (what the submission applies, the CRF it applies or None, the CRF settings judged)."""
    settings = crf_of(p.infer.crf)
    crf = settings if p.infer.crf.enabled else None
    ws = Workspace(p.paths)
    if not ws.oof_index.exists():
        return Refiner(None, crf), crf, settings
    index = read_oof(ws.oof)
    cache = pd.read_csv(ws.mask_index).set_index("key")
    probs = [np.load(f).astype(np.float32) / 255.0 for f in index.probs]
    truths = [cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in index["mask"]]
    photos = [cv2.resize(read_image(cache.image[k], (int(cache.height[k]), int(cache.width[k]))), (int(w), int(h)),
                         interpolation=cv2.INTER_AREA) for k, h, w in zip(index.key, index.height, index.width)]
    n, where = len(classes), f"out-of-fold, at most {max(index.height.max(), index.width.max())} px"
    base = np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(probs, truths)])
    table.add(Variant("oof_members", "final ensemble's members per fold", where), base, 0.0)
    start = time.perf_counter()
    crf_probs = [crf_refine(q, im, settings) for q, im in zip(probs, photos)]
    cost = (time.perf_counter() - start) / max(len(probs), 1)
    table.add(Variant("oof_members_crf", "final ensemble's members per fold + CRF", where),
              np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(crf_probs, truths)]), 0.0, cost)
    used = crf_probs if crf else probs
    rules, log = fit_rules(used, truths, classes, metric)
    if rules.active:
        table.add(Variant("oof_members" + ("_crf" if crf else "") + "_postprocess", "final ensemble's members per fold"
                          + (" + CRF" if crf else "") + " + postprocess (fitted here: optimistic)", where),
                  confusions(used, truths, rules, metric, n), 0.0)
    table.fit_log = log
    return Refiner(rules if p.infer.postprocess else None, crf), crf, settings


def holdout_table(ws: Workspace) -> pd.DataFrame:
    """The mask-cache rows of the holdout images (in no fold: no model trained on them)."""
    index = pd.read_csv(ws.mask_index)
    held = index.merge(pd.read_csv(ws.folds_csv)[["key", "holdout"]], on="key")
    return held[held.holdout].reset_index(drop=True)


def final_ensemble(infer: "Infer", models: ModelSet, device: torch.device) -> Ensemble:
    """The ensemble the submission and `predict` use: `models` (ModelSet.final: folds x seeds x
    infer.checkpoints of infer.round, fold-weighted) with infer's TTA."""
    return Ensemble.from_files(models.weighted(), infer, device)


def submitted_id(refiner: Refiner) -> str:
    """The variant id of what submit applies: the final ensemble, + the refinements in force."""
    crf, rules = refiner.crf is not None, refiner.rules is not None and refiner.rules.active
    return "final" + ("_crf" if crf else "") + ("_postprocess" if rules else "")


def submitted_variant(table: pd.DataFrame, refiner: Refiner) -> dict:
    """The holdout row of what submit applies, as metrics."""
    vid = submitted_id(refiner)
    row = table[(table.judged_on == HOLDOUT) & (table["id"] == vid)] if "id" in table else table.iloc[:0]
    if row.empty:
        return {}
    r = row.iloc[0]
    return {"id": vid, "variant": r["variant"], "metric": r["metric"], "ci95_low": r["ci95_low"],
            "ci95_high": r["ci95_high"], "mIoU": r["mIoU"], "metric_name": table.attrs.get("metric", "mIoU")}


def summary_lines(submitted: dict, fit_log: list[dict], table: pd.DataFrame) -> list[str]:
    """What the stage prints: the submitted variant's holdout score, each post-processing rule kept,
    and the holdout row that beats the submission by more than chance (paired interval above 0)."""
    out = [f"submitted ({submitted['variant']}): holdout {submitted['metric_name']} {submitted['metric']:.4f} "
           f"[{submitted['ci95_low']:.4f}, {submitted['ci95_high']:.4f}]"] if submitted else []
    out += [f"post-processing rule kept (out of fold): {r['rule']} ({r['gain']:+.4f})" for r in fit_log[1:]]
    better = table[table["vs_submitted_low"] > 0] if "vs_submitted_low" in table else table.iloc[:0]
    if len(better):
        b = better.sort_values("vs_submitted", ascending=False).iloc[0]
        out.append(f"note: on the holdout, {b['variant']} beats the submission by {b['vs_submitted']:+.4f} "
                   f"[{b['vs_submitted_low']:+.4f}, {b['vs_submitted_high']:+.4f}] (paired, same images); picking it "
                   "by this holdout makes its holdout score optimistic (every row: the variant table)")
    return out


def train_minutes(ws: Workspace, train: "Train") -> float:
    """Wall-clock minutes of training behind the ensemble: every member of both rounds, from their
    metrics details (a member not trained yet counts 0)."""
    total = 0.0
    for tag in ("train", "train_round2"):
        for fold in train.folds:
            for seed in train.seeds:
                f = ws.member_metrics(tag, fold, seed)
                total += json.loads(f.read_text()).get("val", {}).get("train_s", 0.0) if f.exists() else 0.0
    return round(total / 60, 1)


def variants_metrics(table: pd.DataFrame) -> dict:
    """The table as DVC/MLflow metrics: {"holdout/kfold_tta": {mIoU, pixel_acc, images, images_per_s,
    IoU: {class: iou}}} — `<judged_on>/<id>`: valid MLflow names, stable, never parsed from labels."""
    iou_cols = [c for c in table.columns if c.startswith("IoU/")]
    return {_slug(r["judged_on"]) + "/" + r["id"]: {
        "mIoU": r["mIoU"], "pixel_acc": r["pixel_acc"], "images": int(r["images"]),
        **{k: r[k] for k in ("metric", "ci95_low", "ci95_high") if isinstance(r.get(k), float) and r[k] == r[k]},
        "images_per_s": round(r["images_per_s"], 1),
        "IoU": {c[4:]: r[c] for c in iou_cols if isinstance(r.get(c), float) and r[c] == r[c]}}
        for r in table.to_dict("records")}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_")
