"""Fitting the post-processing out of fold: the rules (rules.py) fitted on the out-of-fold
probabilities of the final ensemble's members (predicted in memory at oof.max_side, as paths.oof keeps
them; after the CRF when it is on), their
out-of-fold rows for the variant table (optimistic there: the holdout judges them, see judge.py),
and what each refinement costs per image."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pandas as pd

from pipeline.data.masks import read_image
from pipeline.evaluation.metrics import Metric
from pipeline.evaluation.choice import decide
from pipeline.evaluation.rules import confusions, fit_rules
from pipeline.evaluation.variants import Variant
from pipeline.inference.postprocess import Crf, Refiner, crf_of, crf_refine
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import ParamsView


@dataclass
class Fitted:
    """What fitting found: what the submission applies (`refiner`: the fitted rules and the CRF in
    force), the CRF settings judged; the out-of-fold rows for the variant table, each (Variant,
    (N, C, C) per-image confusions, images/s, extra seconds per image); the rules kept, one row each
    (`log`); with choose, the evidence of the CRF and rules choices (choice.decide's rows)."""
    refiner: Refiner
    settings: Crf
    rows: list[tuple[Variant, np.ndarray, float, float]] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)
    evidence: list[dict] = field(default_factory=list)


def fitted_refiner(p: "ParamsView", classes: list[str], metric: Metric, oof: list[tuple[dict, np.ndarray, np.ndarray]],
                   choose: bool = False) -> Fitted:
    """Fit the post-processing rules on out-of-fold probabilities `oof` of the final ensemble's members
    ((row with key, height, width; (C, h, w) uint8 probabilities, as paths.oof keeps them; (h, w) truth);
    after the CRF when it is on) and score them out of fold. The rules are fitted on those images, so
    their out-of-fold gain is optimistic: the holdout judges them. CRF on and rules kept: params say
    (infer.crf.enabled, infer.postprocess), or with `choose` the paired out-of-fold evidence does."""
    settings = crf_of(p.infer.crf)
    crf = settings if p.infer.crf.enabled else None
    if not oof:
        return Fitted(Refiner(None, crf), settings)
    rows, evidence = [], []
    cache = pd.read_csv(Workspace(p.paths).mask_index).set_index("key")
    keys = [r["key"] for r, _, _ in oof]
    probs = [q.astype(np.float32) / 255.0 for _, q, _ in oof]
    truths = [t for _, _, t in oof]
    photos = [cv2.resize(read_image(cache.image[k], (int(cache.height[k]), int(cache.width[k]))), (r["width"], r["height"]),
                         interpolation=cv2.INTER_AREA) for k, (r, _, _) in zip(keys, oof)]
    n = len(classes)
    where = f"out-of-fold, at most {max(max(r['height'], r['width']) for r, _, _ in oof)} px"
    base = np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(probs, truths)])
    rows.append((Variant("oof_members", "final ensemble's members per fold", where), base, 0.0, 0.0))
    start = time.perf_counter()
    crf_probs = [crf_refine(q, im, settings) for q, im in zip(probs, photos)]
    cost = (time.perf_counter() - start) / max(len(probs), 1)
    with_crf = np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(crf_probs, truths)])
    rows.append((Variant("oof_members_crf", "final ensemble's members per fold + CRF", where), with_crf, 0.0, cost))
    draws, seed = p.metric.bootstrap, p.metric.seed
    if choose:
        kept, found = decide("crf", ("off", base), [("on", with_crf)], metric, draws, seed)
        crf, evidence = (settings if kept == "on" else None), evidence + found
    used, used_per = (crf_probs, with_crf) if crf else (probs, base)
    rules, log = fit_rules(used, truths, classes, metric)
    apply_rules = p.infer.postprocess
    if rules.active:
        fitted = confusions(used, truths, rules, metric, n)
        rows.append((Variant("oof_members" + ("_crf" if crf else "") + "_postprocess", "final ensemble's members per fold"
                             + (" + CRF" if crf else "") + " + postprocess (fitted here: optimistic)", where),
                     fitted, 0.0, 0.0))
        if choose:
            kept, found = decide("rules", ("off", used_per), [("on", fitted)], metric, draws, seed)
            apply_rules, evidence = kept == "on", evidence + found
    elif choose:
        apply_rules = False
        evidence.append({"choice": "rules", "option": "off", "vs": None, "oof_metric": metric.value(used_per),
                         "diff": None, "low": None, "high": None, "taken": True, "note": "no rule gained out of fold"})
    return Fitted(Refiner(rules if apply_rules else None, crf), settings, rows, log, evidence)


def refine_cost(refine: Refiner, held: pd.DataFrame, n_cls: int) -> float:
    """Seconds per image that `refine` adds (timed on uniform probabilities at each holdout image's size)."""
    sizes = list(zip(held["height"].astype(int), held["width"].astype(int)))[:4]
    start = time.perf_counter()
    for i, (h, w) in enumerate(sizes):
        refine(np.full((n_cls, h, w), 1.0 / n_cls, np.float32), lambda i=i: read_image(held["image"][i], sizes[i]))
    return (time.perf_counter() - start) / max(len(sizes), 1)
