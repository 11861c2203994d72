"""The headline: the few numbers a team compares experiments by, defined once.

Each stage measures much more than anyone compares across experiments (per-class IoU, per-variant
tables, per-fold counts). Everything goes to metrics/details/<stage>.json and the stage's own MLflow
run; only the numbers in HEADLINE go to metrics/<stage>.json, the file DVC reads as metrics, so
`dvc exp show` fits a screen. The pipeline's parent MLflow run carries parent_metrics(): CV with its
interval, per-class CV IoU, the submitted variant's holdout score with its interval, training minutes.

"What we submit" has one definition, submitted(): the submission's variant id and holdout score (the
ensemble stage's submitted variant, or the blend of experiments when the blend stage blends several).
The leaderboard, the report's cards, the parent run and the registered model all read it.
"""
from __future__ import annotations

import json
from typing import Any, Optional

# stage -> the keys of its metrics dict kept as DVC metrics ("a/b" = nested key b of a)
HEADLINE: dict[str, tuple[str, ...]] = {
    "masks": ("images", "resized", "skipped", "test_images"),
    "near_dups": ("images", "pairs", "joined_pairs", "clusters"),
    "eda": ("images", "annotations", "classes", "images_without_annotations"),
    "split": ("images", "holdout_images", "leaky_images"),
    "cv": ("mIoU", "pixel_acc", "mean_acc", "metric/name", "metric/value", "metric/ci95_low", "metric/ci95_high"),
    "ensemble": ("submitted", "choice", "train_min"),
    "oof": ("mIoU", "pixel_acc"),
    "pseudo": ("test_images", "left_out_in_labelled_pool"),
    "audit": ("images", "suspects", "noise/recall"),
    "blend": ("experiments", "mIoU", "best_single_mIoU", "gain_vs_best_single"),
}


def headline(stage: str, details: dict[str, Any]) -> dict[str, Any]:
    """{stage: {...}} -> the same nesting with only HEADLINE[stage]'s keys (missing ones skipped)."""
    inner, out = details.get(stage, {}), {}
    for key in HEADLINE[stage]:
        *parents, leaf = key.split("/")
        src, dst = inner, out
        for p in parents:
            src = src.get(p) if isinstance(src, dict) else None
            dst = dst.setdefault(p, {})
        if isinstance(src, dict) and leaf in src:
            dst[leaf] = src[leaf]
    return {stage: {k: v for k, v in out.items() if v != {}}}


def submitted(ensemble: dict[str, Any], blend: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What the submission is and its holdout score, from the headline metrics of stage ensemble
    ({"submitted": {id, variant, mIoU, metric, metric_name, ci95_low, ci95_high}}) and stage blend
    ({"experiments", "mIoU"}): {"id", "mIoU", "metric_name", "metric" (its value), "ci95": the metric's
    (low, high) or None}; {} when there is no submission yet."""
    blend = blend or {}
    if blend.get("experiments", 1) > 1:   # submit predicts with the fitted blend of experiments
        return {"id": f"blend_of_{blend['experiments']}_experiments", "mIoU": blend.get("mIoU"), "ci95": None,
                "metric_name": "mIoU", "metric": blend.get("mIoU")}
    s = ensemble.get("submitted") or {}
    if not s:
        return {}
    ci = (s["ci95_low"], s["ci95_high"]) if "ci95_low" in s else None
    return {"id": s["id"], "mIoU": s.get("mIoU"), "ci95": ci, "metric_name": s.get("metric_name", "mIoU"),
            "metric": s.get("metric", s.get("mIoU"))}


def cv_score(cv: dict[str, Any]) -> dict[str, Any]:
    """The out-of-fold score of stage cv's headline ({"mIoU", "metric": {name, value, ci95_*}}):
    {"name", "value", "ci95": (low, high) or None} in the params' metric, mIoU when it has none."""
    m = cv.get("metric") or {}
    if "value" in m:
        return {"name": m.get("name", "mIoU"), "value": m["value"], "ci95": (m["ci95_low"], m["ci95_high"])}
    return {"name": "mIoU", "value": cv.get("mIoU"), "ci95": None}


def parent_metrics(stage: str, details: dict[str, Any]) -> dict[str, float]:
    """The numbers a stage puts on the pipeline's parent run, each under one name."""
    inner = details.get(stage, {})
    if stage == "cv":
        s = cv_score(inner)
        out = {f"cv/{s['name']}": s["value"], "cv/pixel_acc": inner.get("pixel_acc"), "cv/mean_acc": inner.get("mean_acc")}
        if s["name"] != "mIoU":
            out["cv/mIoU"] = inner.get("mIoU")
        if s["ci95"]:
            out.update({f"cv/{s['name']}_ci95_low": s["ci95"][0], f"cv/{s['name']}_ci95_high": s["ci95"][1]})
        out.update({f"cv/IoU/{c}": v for c, v in (inner.get("IoU") or {}).items()})
        return out
    if stage == "submit":   # details = {"ensemble": headline, "blend": headline}: the submitted score
        s = submitted(details.get("ensemble", {}), details.get("blend"))
        out = {"holdout/mIoU": s.get("mIoU"), "train/minutes": details.get("ensemble", {}).get("train_min")}
        if s.get("metric_name", "mIoU") != "mIoU":
            out[f"holdout/{s['metric_name']}"] = s.get("metric")
        if s.get("ci95"):
            out.update({f"holdout/{s['metric_name']}_ci95_low": s["ci95"][0],
                        f"holdout/{s['metric_name']}_ci95_high": s["ci95"][1]})
        choice = details.get("ensemble", {}).get("choice") or {}   # infer.choose auto: chosen minus fixed recipe
        out.update({f"choice/{k}": v for k, v in choice.items() if k.startswith("holdout_vs_fixed")})
        return out
    raise KeyError(f"no parent metrics for stage {stage!r}")


def read_headline(ws: Any, stage: str) -> dict[str, Any]:
    """The headline a stage wrote to ws.metrics_json(stage) ({} before it ran); ws: a workspace.Workspace."""
    f = ws.metrics_json(stage)
    return json.loads(f.read_text()).get(stage, {}) if f.exists() else {}


def write_metrics(run: Any, ws: Any, stage: str, details: dict[str, Any]) -> None:
    """A stage's metrics: its headline to ws.metrics_json(stage) (DVC metrics), everything to
    ws.details_json(stage); run: the stage's tracking.StageRun, ws: its workspace.Workspace."""
    run.write_metrics(ws.metrics_json(stage), headline(stage, details), ws.details_json(stage), details)
