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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from pipeline.data.dataset import fold_tables
from pipeline.evaluation import stats
from pipeline.evaluation.choice import Recipe, choose_recipe
from pipeline.evaluation.metrics import Metric, scores
from pipeline.evaluation.refinement import fitted_refiner, refine_cost
from pipeline.evaluation.oof import predict_oof, quantise
from pipeline.evaluation.scoring import holdout_table, score_images
from pipeline.evaluation.variants import HOLDOUT, OOF, Variant, variants
from pipeline.inference.ensemble import Ensemble, load_member
from pipeline.inference.postprocess import Refiner
from pipeline.inference.tta import expand, scaled_side
from pipeline.models.checkpoint import InputSpec, ModelRef, ModelSet, content_digest
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import Infer, ParamsView, Train


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
    """Scores ensembles of checkpoints on images none of their members saw (models load once; an
    ensemble's out-of-fold confusions are computed once)."""

    def __init__(self, p: "ParamsView", classes: list[str], device: torch.device):
        self.params, self.classes, self.device, self.metric = p, classes, device, Metric.of(p.metric)
        self.ws, self.models, self.scored, self.probabilities = Workspace(p.paths), {}, {}, {}
        self.same: dict[tuple[int, str], ModelRef] = {}   # (fold, weights digest) -> the first ref holding them
        self.canon: dict[ModelRef, ModelRef] = {}

    def model(self, ref: ModelRef) -> tuple[torch.nn.Module, InputSpec]:
        return self.member(ModelSet(Path(ref.dir), (ref.fold,), (ref.seed,), (ref.checkpoint,)).files()[0])   # an error names a missing one

    def member(self, f: Path) -> tuple[torch.nn.Module, InputSpec]:
        """A checkpoint file's model, loaded once."""
        if f not in self.models:
            self.models[f] = load_member(f, self.device, self.params.infer.batch_size)
        return self.models[f]

    def ensemble(self, refs, views=("identity",), scales=(1.0,), weights=None) -> Ensemble:
        loaded = [self.model(r) for r in refs]
        e = Ensemble([(m, w) for (m, _), w in zip(loaded, weights or [1.0] * len(refs))], list(views), list(scales),
                     self.device, self.params.infer.amp, spec=InputSpec.common([s for _, s in loaded], "variant members"))
        e.spec.check("ensemble", eval_size=self.params.train.eval_size, classes=self.classes)
        return e

    def views(self, v: Variant) -> tuple[tuple[str, ...], tuple[float, ...]]:
        """A variant's TTA views and scales: infer's with tta, else the identity alone."""
        i = self.params.infer
        return (tuple(i.tta), tuple(i.scales)) if v.tta else (("identity",), (1.0,))

    def run(self, e: Ensemble, tab: pd.DataFrame, refiners=None) -> tuple[dict[str, np.ndarray], float]:
        return score_images(e, tab, self.params.infer.batch_size, self.metric, refiners)

    def out_of_fold(self, v: Variant) -> tuple[np.ndarray, float]:
        return self.oof_images(v.members, *self.views(v))

    def canonical(self, ref: ModelRef) -> ModelRef:
        """The first ref of its fold holding the same weights: best.pt and last.pt of a run whose best
        epoch was its last are one model, predicted once."""
        if ref not in self.canon:
            weights = content_digest(self.model(ref)[0].state_dict())
            self.canon[ref] = self.same.setdefault((ref.fold, weights), ref)
        return self.canon[ref]

    def oof_images(self, members, views, scales) -> tuple[np.ndarray, float]:
        """((N, C, C) per-image confusions over every fold's validation images, fold after fold; images/s).
        Members with the same weights count once (an equal-weight mean of one model twice is that model)."""
        members = tuple(dict.fromkeys(self.canonical(r) for r in members))
        key = (members, tuple(views), tuple(scales))
        if key not in self.scored:
            per, seconds = [], 0.0
            for k in self.params.train.folds:
                val = fold_tables(self.ws.masks, self.ws.split, k)[1]
                c, rate = self.run(self.ensemble([r for r in members if r.fold == k], views, scales), val)
                per.append(c[""])
                seconds += len(val) / rate
            self.scored[key] = np.concatenate(per), sum(len(x) for x in per) / seconds
        return self.scored[key]

    def holdout(self, v: Variant, held: pd.DataFrame) -> tuple[np.ndarray, float]:
        c, rate = self.run(self.ensemble(list(v.members), *self.views(v)), held)
        return c[""], rate

    def infer_of(self, recipe: Recipe) -> "Infer":
        """infer with the recipe's round, checkpoints, TTA views and scales."""
        return self.params.infer.model_copy(update=recipe.to_json())

    def models_of(self, recipe: Recipe) -> ModelSet:
        """The final ensemble's models for `recipe` (ModelSet.final of its infer)."""
        return ModelSet.final(self.infer_of(recipe), self.params.train, self.ws)

    def available(self, rnd: int) -> list[str]:
        """The checkpoints every member of round `rnd` has."""
        t = self.params.train
        return [c for c in ("best", "last", "swa", "ema")
                if ModelSet(self.ws.models(rnd), tuple(t.folds), tuple(t.seeds), (c,)).exists()]

    def recipe_oof(self, recipe: Recipe) -> np.ndarray:
        """(N, C, C) per-image out-of-fold confusions of the recipe's members. Scales that every input
        (train.eval_size) rounds back to its own size are the identity: scored once, as 1.0."""
        size, scales = self.params.train.eval_size, recipe.scales
        if size and all(scaled_side(size, s) == size for s in scales):
            scales = (1.0,)
        return self.oof_images(self.models_of(recipe).refs(), recipe.tta, scales)[0]

    def recipe_probabilities(self, recipe: Recipe) -> list[tuple[dict, np.ndarray, np.ndarray]]:
        """The recipe's out-of-fold probabilities as paths.oof keeps them (oof.max_side, uint8)."""
        if recipe not in self.probabilities:
            self.probabilities[recipe] = [(row, quantise(prob), truth) for row, prob, truth in
                                          predict_oof(self.models_of(recipe), self.infer_of(recipe), self.params,
                                                      self.device, self.member)]
        return self.probabilities[recipe]


@dataclass
class Judged:
    """What the ensemble stage found: the variant table; the refiner the submission applies; the
    post-processing rules kept; the choice (choice.json: mode, recipe, fixed, evidence, holdout)."""
    table: pd.DataFrame
    refiner: Refiner
    fit_log: list[dict]
    choice: dict


def evaluate_variants(p: "ParamsView", classes: list[str], device: torch.device) -> Judged:
    """Every variant judged (the table: id, variant (its label), judged_on, images, metric,
    ci95_low/high, mIoU, pixel_acc, mean_acc, images_per_s, extra_s_per_image, IoU/<class>), the final
    recipe chosen out of fold (infer.choose auto) or taken from params (fixed), the post-processing
    fitted on that recipe's out-of-fold probabilities, and on the holdout the chosen recipe beside the
    fixed one. `p`: params with infer, train, metric, oof, paths."""
    judge, t, infer = Judge(p, classes, device), p.train, p.infer
    has_round2 = ModelSet(judge.ws.models(2), tuple(t.folds), tuple(t.seeds)).exists()
    table = VariantTable(classes, judge.metric, p.metric.bootstrap, p.metric.seed)
    specs = variants(p, has_round2)
    for v in specs:
        if v.judged_on == OOF:
            table.add(v, *judge.out_of_fold(v))
    fixed = Recipe.of(infer, has_round2)
    auto = infer.choose == "auto"
    recipe, evidence = (choose_recipe(judge.recipe_oof, fixed, has_round2, judge.available, judge.metric,
                                      p.metric.bootstrap, p.metric.seed) if auto else (fixed, []))
    fitted = fitted_refiner(p, classes, judge.metric, judge.recipe_probabilities(recipe), choose=auto)
    for row in fitted.rows:
        table.add(*row)
    table.fit_log, refiner = fitted.log, fitted.refiner
    choice = {"mode": infer.choose, "recipe": recipe.to_json(), "label": recipe.label(),
              "crf": refiner.crf is not None, "rules": refiner.rules is not None and refiner.rules.active,
              "fixed": {**fixed.to_json(), "crf": infer.crf.enabled, "rules": infer.postprocess},
              "evidence": evidence + fitted.evidence}
    held = holdout_table(judge.ws)
    prefix = "chosen" if auto else "final"
    if held.empty:
        return Judged(table.frame(), refiner, table.fit_log, choice)
    table.rows.append(fold_mean_row(judge, held))
    for v in specs:
        if v.judged_on == HOLDOUT:
            table.add(v, *judge.holdout(v, held))
    with_crf = Refiner(crf=fitted.settings)
    final_rows(judge, held, recipe, refiner, with_crf, table, prefix,
               f"chosen ensemble ({recipe.label()})" if auto else f"final ensemble (infer params, round {recipe.round})")
    submitted = f"{HOLDOUT}/{submitted_id(refiner, prefix)}"
    if auto:   # the fixed recipe, as params would have submitted it, judged beside the choice
        fixed_refiner = fitted_refiner(p, classes, judge.metric, judge.recipe_probabilities(fixed)).refiner
        final_rows(judge, held, fixed, fixed_refiner, with_crf, table, "final",
                   f"final ensemble (infer params, round {fixed.round})")
        mine, theirs = table.images[submitted], table.images[f"{HOLDOUT}/{submitted_id(fixed_refiner, 'final')}"]
        choice["holdout"] = {"chosen": table.metric.value(mine), "fixed": table.metric.value(theirs),
                             **stats.paired(table.metric, mine, theirs, table.draws, table.seed)}
    table.compare_to(submitted)
    return Judged(table.frame(), refiner, table.fit_log, choice)


def fold_mean_row(judge: Judge, held: pd.DataFrame) -> dict:
    """Each fold model alone on the holdout, the mean over folds (no interval: a mean of models)."""
    t, classes, metric = judge.params.train, judge.classes, judge.metric
    per_fold = [judge.run(judge.ensemble([ModelRef(judge.ws.models(1), k, t.seeds[0])]), held) for k in t.folds]
    return {"id": "fold_mean", "variant": "fold model (mean over folds)", "judged_on": HOLDOUT, "images": len(held),
            **{m: sum(scores(c[""].sum(0), classes)[m] for c, _ in per_fold) / len(t.folds)
               for m in ("mIoU", "pixel_acc", "mean_acc")},
            "metric": sum(metric.value(c[""]) for c, _ in per_fold) / len(t.folds),
            "images_per_s": sum(r for _, r in per_fold) / len(t.folds)}


def final_rows(judge: Judge, held: pd.DataFrame, recipe: Recipe, refiner: Refiner, with_crf: Refiner,
               table: VariantTable, prefix: str, base: str) -> None:
    """The final ensemble of `recipe` (folds x seeds x checkpoints, fold-weighted, TTA) on the holdout:
    plain, + CRF, + the refinements in force (ids <prefix>, <prefix>_crf, ...) — predicted once, each
    refinement timed."""
    refiners = {prefix: (base, None), f"{prefix}_crf": (base + " + CRF", with_crf)}
    if refiner.rules is not None and refiner.rules.active:
        crf = refiner.crf is not None
        refiners[f"{prefix}_crf_postprocess" if crf else f"{prefix}_postprocess"] = (
            base + (" + CRF" if crf else "") + " + postprocess (OOF-fitted rules)", refiner)
    models = judge.models_of(recipe)
    refs, weights = models.refs(), [w for _, w in models.weighted()]
    per, rate = judge.run(judge.ensemble(refs, recipe.tta, recipe.scales, weights), held,
                          {i: r for i, (_, r) in refiners.items()})
    for i, (label, r) in refiners.items():   # each refinement's own cost per image, beside the shared prediction
        cost = refine_cost(r, held, len(judge.classes)) if r is not None else 0.0
        table.add(Variant(i, label, HOLDOUT), per[i], rate, cost)


def submitted_id(refiner: Refiner, prefix: str = "final") -> str:
    """The variant id of what submit applies: the final (or chosen) ensemble, + the refinements in force."""
    crf, rules = refiner.crf is not None, refiner.rules is not None and refiner.rules.active
    return prefix + ("_crf" if crf else "") + ("_postprocess" if rules else "")


def submitted_variant(table: pd.DataFrame, refiner: Refiner, prefix: str = "final") -> dict:
    """The holdout row of what submit applies, as metrics."""
    vid = submitted_id(refiner, prefix)
    row = table[(table.judged_on == HOLDOUT) & (table["id"] == vid)] if "id" in table else table.iloc[:0]
    if row.empty:
        return {}
    r = row.iloc[0]
    return {"id": vid, "variant": r["variant"], "metric": r["metric"], "ci95_low": r["ci95_low"],
            "ci95_high": r["ci95_high"], "mIoU": r["mIoU"], "metric_name": table.attrs.get("metric", "mIoU")}


def choice_metrics(choice: dict) -> dict:
    """The choice as DVC/MLflow metrics: mode, what was chosen, and on the holdout the chosen recipe minus
    the fixed one (paired interval; the chosen one's own score is the submitted variant's)."""
    out = {"auto": choice["mode"] == "auto", "round": choice["recipe"]["round"],
           "tta_views": len(expand(choice["recipe"]["tta"])), "crf": choice["crf"], "rules": choice["rules"]}
    if "holdout" in choice:
        h = choice["holdout"]
        out.update(holdout_vs_fixed=h["diff"], holdout_vs_fixed_low=h["low"], holdout_vs_fixed_high=h["high"])
    return out


def choice_lines(choice: dict) -> list[str]:
    """What the stage prints of the choice: the recipe and, on the holdout, chosen vs fixed."""
    if choice["mode"] != "auto":
        return [f"final ensemble (infer.choose fixed): {choice['label']}"]
    out = [f"chosen out of fold: {choice['label']}, CRF {'on' if choice['crf'] else 'off'}, "
           f"rules {'on' if choice['rules'] else 'off'} (evidence: reports/ensemble/choice.json)"]
    if "holdout" in choice:
        h = choice["holdout"]
        out.append(f"holdout, chosen vs fixed (params): {h['chosen']:.4f} vs {h['fixed']:.4f}, "
                   f"{h['diff']:+.4f} [{h['low']:+.4f}, {h['high']:+.4f}] (paired, same images)")
    return out


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
