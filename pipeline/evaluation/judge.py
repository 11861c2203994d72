"""Judging the variants (variants.py) honestly: every variant is scored only on images that none of
its members trained on — out of fold (each fold's members on that fold's validation images, summed)
or on the holdout. The refinements (refinement.py: CRF, post-processing rules fitted out of fold) are
judged on the holdout with the final ensemble, each with its extra cost per image. Every row has the
chosen metric (params `metric`) and its 95 % bootstrap interval over images; every holdout row is
compared, paired on the same images, with what is submitted.
"""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from pipeline.data.dataset import fold_tables
from pipeline.evaluation import stats
from pipeline.evaluation.metrics import Metric, scores
from pipeline.evaluation.refinement import fitted_refiner, refine_cost
from pipeline.evaluation.scoring import holdout_table, score_images
from pipeline.evaluation.variants import HOLDOUT, OOF, Variant, variants
from pipeline.inference.ensemble import Ensemble, load_member
from pipeline.inference.postprocess import Refiner
from pipeline.models.checkpoint import InputSpec, ModelRef, ModelSet
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import ParamsView, Train


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


class Judge:
    """Scores ensembles of checkpoints on images none of their members saw (models load once)."""

    def __init__(self, p: "ParamsView", classes: list[str], device: torch.device):
        self.params, self.classes, self.device, self.metric = p, classes, device, Metric.of(p.metric)
        self.ws, self.models = Workspace(p.paths), {}

    def model(self, ref: ModelRef) -> tuple[torch.nn.Module, InputSpec]:
        f = ModelSet(Path(ref.dir), (ref.fold,), (ref.seed,), (ref.checkpoint,)).files()[0]   # an error names a missing one
        if f not in self.models:
            self.models[f] = load_member(f, self.device, self.params.infer.batch_size)
        return self.models[f]

    def ensemble(self, refs, tta: bool = False, weights=None) -> Ensemble:
        i, loaded = self.params.infer, [self.model(r) for r in refs]
        e = Ensemble([(m, w) for (m, _), w in zip(loaded, weights or [1.0] * len(refs))], i.tta if tta else ["identity"],
                     i.scales if tta else [1.0], self.device, i.amp,
                     spec=InputSpec.common([s for _, s in loaded], "variant members"))
        e.spec.check("ensemble", eval_size=self.params.train.eval_size, classes=self.classes)
        return e

    def run(self, e: Ensemble, tab: pd.DataFrame, refiners=None) -> tuple[dict[str, np.ndarray], float]:
        return score_images(e, tab, self.params.infer.batch_size, self.metric, refiners)

    def out_of_fold(self, v: Variant) -> tuple[np.ndarray, float]:
        per, seconds = [], 0.0
        for k in self.params.train.folds:
            val = fold_tables(self.ws.masks, self.ws.split, k)[1]
            c, rate = self.run(self.ensemble([r for r in v.members if r.fold == k], v.tta), val)
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
    fitted = fitted_refiner(p, classes, judge.metric)
    for row in fitted.rows:
        table.add(*row)
    table.fit_log, refiner, settings = fitted.log, fitted.refiner, fitted.settings
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
    t, classes, metric = judge.params.train, judge.classes, judge.metric
    per_fold = [judge.run(judge.ensemble([ModelRef(judge.ws.models(1), k, t.seeds[0])]), held) for k in t.folds]
    return {"id": "fold_mean", "variant": "fold model (mean over folds)", "judged_on": HOLDOUT, "images": len(held),
            **{m: sum(scores(c[""].sum(0), classes)[m] for c, _ in per_fold) / len(t.folds)
               for m in ("mIoU", "pixel_acc", "mean_acc")},
            "metric": sum(metric.value(c[""]) for c, _ in per_fold) / len(t.folds),
            "images_per_s": sum(r for _, r in per_fold) / len(t.folds)}


def final_rows(judge: Judge, held: pd.DataFrame, has_round2: bool, refiner: Refiner, with_crf: Refiner,
               table: VariantTable) -> None:
    """The final ensemble the submission uses (infer: folds x seeds x checkpoints, fold-weighted, TTA)
    on the holdout: plain, + CRF, + the refinements in force — predicted once, each refinement timed."""
    infer, t = judge.params.infer, judge.params.train
    rnd = 2 if infer.round == 2 and has_round2 else 1
    final = ModelSet.final(infer, t, judge.ws)
    final = replace(final, dir=judge.ws.models(rnd))
    base = f"final ensemble (infer params, round {rnd})"
    refiners = {"final": (base, None), "final_crf": (base + " + CRF", with_crf)}
    if refiner.rules is not None and refiner.rules.active:
        crf = refiner.crf is not None
        refiners["final_crf_postprocess" if crf else "final_postprocess"] = (
            base + (" + CRF" if crf else "") + " + postprocess (OOF-fitted rules)", refiner)
    refs = final.refs()
    weights = [w for _, w in final.weighted()]
    per, rate = judge.run(judge.ensemble(refs, True, weights), held, {i: r for i, (_, r) in refiners.items()})
    for i, (label, r) in refiners.items():   # each refinement's own cost per image, beside the shared prediction
        cost = refine_cost(r, held, len(judge.classes)) if r is not None else 0.0
        table.add(Variant(i, label, HOLDOUT), per[i], rate, cost)


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
