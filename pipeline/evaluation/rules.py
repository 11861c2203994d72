"""Post-processing rules fitted out of fold (nnU-Net's rule): a candidate rule (pipeline/inference/
postprocess.py: a per-class logit bias, removal of small regions, hole filling) is kept only if it
raises the out-of-fold metric and lowers no class's IoU by more than TOLERANCE. Classes are visited in
order, biases first, then sizes, then holes: one greedy pass, each step keeping the best value of
its grid that passes.
"""
from __future__ import annotations

import numpy as np

from pipeline.evaluation.metrics import Metric, scores
from pipeline.inference.postprocess import Rules, decide, log_probs

BIASES = (-1.0, -0.5, 0.5, 1.0)                    # added to log P[c]
MIN_SIZES = (0.0005, 0.001, 0.002, 0.005, 0.01)    # fractions of the image
TOLERANCE = 0.002


def confusions(probs: list[np.ndarray], truths: list[np.ndarray], rules: Rules, metric: Metric, n_cls: int,
               logps: list[np.ndarray] | None = None) -> np.ndarray:
    """(N, C, C) per-image confusions of `rules` applied to every image (logps: the probabilities'
    log_probs, when already computed)."""
    logps = logps if logps is not None else [log_probs(p) for p in probs]
    return np.stack([metric.count(decide(lp, rules), t, n_cls).numpy() for lp, t in zip(logps, truths)])


def fit_rules(probs: list[np.ndarray], truths: list[np.ndarray], classes: list[str], metric: Metric,
              tolerance: float = TOLERANCE) -> tuple[Rules, list[dict]]:
    """Greedy search on out-of-fold (C, h, w) float probabilities and their truths: (rules, one row
    per rule kept: what, the metric before and after).

    A size or hole rule of class c is tried only on the images whose current map has c: the rules only
    ever turn pixels into c unless c's own minimum size removes them (tried once, from 0), so an image
    without c keeps its map and its confusion — the same answer as recomputing every image."""
    n = len(classes)
    rules, logps = Rules.none(n), [log_probs(p) for p in probs]
    preds = [decide(lp, rules) for lp in logps]
    per = np.stack([metric.count(pr, t, n).numpy() for pr, t in zip(preds, truths)])
    best, iou = metric.value(per), _ious(per, classes)
    kept = [{"rule": "none", "metric": best}]
    candidates = ([("bias", c, b) for c in range(n) for b in BIASES]
                  + [("min_size", c, s) for c in range(n) for s in MIN_SIZES]
                  + [("fill_holes", c, True) for c in range(1, n)])
    groups: dict[tuple[str, int], list] = {}
    for what, c, v in candidates:
        groups.setdefault((what, c), []).append(v)
    for (what, c), values in groups.items():
        if what != "bias" and not any((t == c).any() for t in truths) and not any((p.argmax(0) == c).any() for p in probs):
            continue
        touched = range(len(preds)) if what == "bias" else [i for i, pr in enumerate(preds) if (pr == c).any()]
        if not touched:
            continue
        trial = []
        fast = _bias_maps(logps, rules, c, values) if what == "bias" and not rules.shapes else None
        for v in values:
            r = rules.changed(c, **{what: v})
            maps = dict(enumerate(fast[v])) if fast else {i: decide(logps[i], r) for i in touched}
            trial_per = per.copy()
            for i, pr in maps.items():
                trial_per[i] = metric.count(pr, truths[i], n).numpy()
            value, ious = metric.value(trial_per), _ious(trial_per, classes)
            worst = max((iou[k] - ious[k] for k in iou if k in ious), default=0.0)
            if value > best + 1e-9 and worst <= tolerance:
                trial.append((value, v, r, ious, trial_per, maps))
        if trial:
            value, v, rules, iou, per, maps = max(trial, key=lambda x: x[0])
            for i, pr in maps.items():
                preds[i] = pr
            kept.append({"rule": f"{classes[c]}: {what} = {v}", "metric": value, "gain": value - best})
            best = value
    return rules, kept


def _bias_maps(logps: list[np.ndarray], rules: Rules, c: int, values) -> dict[float, list[np.ndarray]]:
    """{bias of class c: every image's map} under `rules` that hold biases only (decide is then an argmax):
    the best other class is found once per image, each value compared with it (argmax's tie rule kept:
    the lower class index wins)."""
    bias = np.asarray(rules.bias, dtype=np.float32)[:, None, None]
    out: dict[float, list[np.ndarray]] = {v: [] for v in values}
    for lp in logps:
        others = lp + bias
        others[c] = -np.inf
        arg = others.argmax(0)
        top = np.take_along_axis(others, arg[None], 0)[0]
        for v in values:
            x = lp[c] + np.float32(v)
            out[v].append(np.where((x > top) | ((x == top) & (c < arg)), c, arg).astype(np.uint8))
    return out


def _ious(per_image: np.ndarray, classes: list[str]) -> dict[str, float]:
    return {k: v for k, v in scores(per_image.sum(0), classes)["IoU"].items() if v is not None}
