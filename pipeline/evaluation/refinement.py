"""Fitting the post-processing out of fold: the rules (rules.py) fitted on the out-of-fold
probabilities of the final ensemble's members (paths.oof; after the CRF when infer.crf.enabled), their
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
from pipeline.evaluation.oof import read_oof
from pipeline.evaluation.rules import confusions, fit_rules
from pipeline.evaluation.variants import Variant
from pipeline.inference.postprocess import Crf, Refiner, crf_of, crf_refine
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import ParamsView


@dataclass
class Fitted:
    """What fitting found: what the submission applies (`refiner`: the fitted rules and the CRF in
    force), the CRF settings judged; the out-of-fold rows for the variant table, each (Variant, (N, C, C) per-image
    confusions, images/s, extra seconds per image); the rules kept, one row each (`log`)."""
    refiner: Refiner
    settings: Crf
    rows: list[tuple[Variant, np.ndarray, float, float]] = field(default_factory=list)
    log: list[dict] = field(default_factory=list)


def fitted_refiner(p: "ParamsView", classes: list[str], metric: Metric) -> Fitted:
    """Fit the post-processing rules on the out-of-fold probabilities of the final ensemble's members
    (paths.oof; after the CRF when infer.crf.enabled) and score them out of fold. The rules are fitted
    on those images, so their out-of-fold gain is optimistic: the holdout judges them."""
    settings = crf_of(p.infer.crf)
    crf = settings if p.infer.crf.enabled else None
    ws = Workspace(p.paths)
    if not ws.oof_index.exists():
        return Fitted(Refiner(None, crf), settings)
    rows = []
    index = read_oof(ws.oof)
    cache = pd.read_csv(ws.mask_index).set_index("key")
    probs = [np.load(f).astype(np.float32) / 255.0 for f in index.probs]
    truths = [cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in index["mask"]]
    photos = [cv2.resize(read_image(cache.image[k], (int(cache.height[k]), int(cache.width[k]))), (int(w), int(h)),
                         interpolation=cv2.INTER_AREA) for k, h, w in zip(index.key, index.height, index.width)]
    n, where = len(classes), f"out-of-fold, at most {max(index.height.max(), index.width.max())} px"
    base = np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(probs, truths)])
    rows.append((Variant("oof_members", "final ensemble's members per fold", where), base, 0.0, 0.0))
    start = time.perf_counter()
    crf_probs = [crf_refine(q, im, settings) for q, im in zip(probs, photos)]
    cost = (time.perf_counter() - start) / max(len(probs), 1)
    rows.append((Variant("oof_members_crf", "final ensemble's members per fold + CRF", where),
                 np.stack([metric.count(q.argmax(0), t, n).numpy() for q, t in zip(crf_probs, truths)]), 0.0, cost))
    used = crf_probs if crf else probs
    rules, log = fit_rules(used, truths, classes, metric)
    if rules.active:
        rows.append((Variant("oof_members" + ("_crf" if crf else "") + "_postprocess", "final ensemble's members per fold"
                             + (" + CRF" if crf else "") + " + postprocess (fitted here: optimistic)", where),
                     confusions(used, truths, rules, metric, n), 0.0, 0.0))
    return Fitted(Refiner(rules if p.infer.postprocess else None, crf), settings, rows, log)


def refine_cost(refine: Refiner, held: pd.DataFrame, n_cls: int) -> float:
    """Seconds per image that `refine` adds (timed on uniform probabilities at each holdout image's size)."""
    sizes = list(zip(held["height"].astype(int), held["width"].astype(int)))[:4]
    start = time.perf_counter()
    for i, (h, w) in enumerate(sizes):
        refine(np.full((n_cls, h, w), 1.0 / n_cls, np.float32), lambda i=i: read_image(held["image"][i], sizes[i]))
    return (time.perf_counter() - start) / max(len(sizes), 1)
