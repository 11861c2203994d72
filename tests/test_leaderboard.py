"""The leaderboard reads DVC's experiment tree: known rows, the params that differ, order, formats."""
from __future__ import annotations

import csv
import io

import pytest

from pipeline.evaluation.leaderboard import leaderboard, render


def node(name, model, lr, cv, holdout, train_s, rev="abc1234def"):
    params = {"params.yaml": {"data": {"model": model, "train": {"lr": lr, "loss": {"ce": 1.0}},
                                       "paths": {"models": f"models-{name}"}}}}
    submitted = {"id": "final_postprocess", "mIoU": holdout, "metric": holdout, "metric_name": "mIoU",
                 "ci95_low": holdout - 0.05, "ci95_high": holdout + 0.05} if holdout else {}
    metrics = {"metrics/cv.json": {"data": {"cv": {"mIoU": cv}}},
               "metrics/ensemble.json": {"data": {"ensemble": {"submitted": submitted, "train_min": train_s / 30}}}}
    return {"rev": rev, "name": name, "data": {"params": params, "metrics": metrics}}


TREE = [
    {**node(None, "unet", 0.003, 0.30, 0.35, 60, rev="workspace"), "experiments": None},
    {**node("main", "unet", 0.003, 0.30, 0.35, 60), "experiments": [
        {"revs": [node("pspnet-try", "pspnet", 0.003, 0.41, 0.38, 30, rev="111")]},
        {"revs": [node("low-lr", "unet", 0.001, 0.25, None, 90, rev="222")]},
        {"revs": [{"rev": "333", "name": "queued", "data": {"params": {}, "metrics": {}}}]}]},
]


def test_rows_sorted_best_first_with_only_the_params_that_differ():
    rows = leaderboard(TREE)
    assert [r["experiment"] for r in rows] == ["pspnet-try", "workspace", "main", "low-lr"]
    top = rows[0]
    assert top["cv_mIoU"] == 0.41 and top["holdout_mIoU"] == 0.38 and top["train_min"] == 1.0
    assert top["submitted"] == "final_postprocess" and top["holdout_ci95"] == "[0.3300, 0.4300]"
    assert top["params"] == "model=pspnet train.lr=0.003"                        # paths.* and train.loss do not differ
    assert rows[-1]["holdout_mIoU"] is None and rows[-1]["params"] == "model=unet train.lr=0.001"
    assert [r["experiment"] for r in leaderboard(TREE, "holdout_mIoU")] == ["pspnet-try", "workspace", "main", "low-lr"]


def test_formats():
    rows = leaderboard(TREE)
    text = render(rows).splitlines()
    assert text[0].split() == ["experiment", "cv_mIoU", "cv_ci95", "vs_top", "holdout_mIoU", "holdout_ci95", "submitted",
                               "train_min", "params"]
    assert len(text) == 5 and "—" in text[-1] and max(map(len, text)) < 160
    md = render(rows, "md").splitlines()
    assert md[1] == "|---|---|---|---|---|---|---|---|---|" and md[2].startswith("| pspnet-try | 0.4100 | — | — | 0.3800 |")
    parsed = list(csv.DictReader(io.StringIO(render(rows, "csv"))))
    assert parsed[0]["experiment"] == "pspnet-try" and float(parsed[0]["cv_mIoU"]) == 0.41


def test_a_blended_experiment_is_ranked_by_its_blend():
    blended = node("fpn-unet", "fpn", 0.003, 0.33, 0.36, 30, rev="444")
    blended["data"]["metrics"]["metrics/blend.json"] = {"data": {"blend": {"experiments": 2, "mIoU": 0.42}}}
    alone = node("fpn", "fpn", 0.003, 0.33, 0.36, 30, rev="555")
    alone["data"]["metrics"]["metrics/blend.json"] = {"data": {"blend": {"experiments": 1, "mIoU": 0.36}}}
    tree = [{**node("main", "unet", 0.003, 0.30, 0.35, 60), "experiments": [{"revs": [blended]}, {"revs": [alone]}]}]
    rows = {r["experiment"]: r for r in leaderboard(tree, "holdout_mIoU")}
    assert rows["fpn-unet"]["holdout_mIoU"] == 0.42 and rows["fpn-unet"]["submitted"] == "blend_of_2_experiments"
    assert rows["fpn"]["holdout_mIoU"] == 0.36 and rows["fpn"]["submitted"] == "final_postprocess"


def test_intervals_and_paired_differences_from_the_top_row():
    """cv_ci95 from metrics/cv.json; vs_top on the out-of-fold images both rows scored: a row identical
    to the top is +0.0000 [+0.0000, +0.0000]; a row wrong on every image is clearly behind."""
    import numpy as np

    from pipeline.evaluation.metrics import Metric

    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 2, (8, 8)) for _ in range(30)]
    m = Metric()
    good = np.stack([m.count(t, t, 2).numpy() for t in truths])
    bad = np.stack([m.count(np.where(rng.random(t.shape) < 0.3, 1 - t, t), t, 2).numpy() for t in truths])
    keys = np.array([f"img{i}" for i in range(30)])
    tree = [{**node("main", "unet", 0.003, 0.30, 0.35, 60), "experiments": [
        {"revs": [node("same", "unet", 0.002, 0.30, 0.35, 60, rev="1")]},
        {"revs": [node("worse", "unet", 0.001, 0.20, 0.30, 60, rev="2")]}]}]
    tree[0]["data"]["metrics"]["metrics/cv.json"]["data"]["cv"]["metric"] = {
        "name": "mIoU", "value": 0.3, "ci95_low": 0.25, "ci95_high": 0.35}
    held = {"main": (keys, good), "same": (keys[::-1], good[::-1]), "worse": (keys[:20], bad[:20])}   # any order, a subset
    rows = {r["experiment"]: r for r in leaderboard(tree, images=lambda name, params: held.get(name))}
    assert rows["main"]["cv_ci95"] == "[0.2500, 0.3500]" and rows["main"]["vs_top"] is None
    assert rows["same"]["vs_top"] == "+0.0000 [+0.0000, +0.0000]"
    diff, low, high = (float(v.strip("[],")) for v in rows["worse"]["vs_top"].split())
    assert diff == pytest.approx(m.value(bad[:20]) - 1.0, abs=1e-4) and high < 0
    no_files = leaderboard(tree, images=lambda name, params: None)
    assert all(r["vs_top"] is None for r in no_files)
