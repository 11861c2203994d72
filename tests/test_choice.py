"""Choosing the final recipe out of fold, with constructed out-of-fold confusions as known answers:
a worse option is never taken, one better by less than its paired interval is not taken (the simpler
wins ties), one clearly better is; the choices chain (round, checkpoints, TTA, scales) and a
checkpoint that was not trained is not a candidate."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.evaluation.choice import D4, FLIPS, Recipe, choose_recipe, decide
from pipeline.evaluation.metrics import Metric

pytestmark = pytest.mark.quick

N = 120   # out-of-fold images


def images(correct: np.ndarray) -> np.ndarray:
    """(N, 2, 2) per-image confusions: 100 background pixels all right, 100 object pixels of which
    `correct[i]` (0..100) are found."""
    per = np.zeros((len(correct), 2, 2), np.int64)
    per[:, 0, 0] = 100
    per[:, 1, 1] = correct
    per[:, 1, 0] = 100 - correct
    return per


BASE = np.random.default_rng(0).integers(40, 80, N)
SWING = np.where(np.arange(N) % 2, 10, -9)   # +10 on odd images, -9 on even ones: +0.5 a pixel on average


def test_a_worse_option_is_not_taken():
    kept, rows = decide("round", ("round 1", images(BASE)), [("round 2", images(BASE - 5))], Metric())
    assert kept == "round 1" and rows[1]["diff"] < 0 and rows[1]["high"] < 0 and not rows[1]["taken"]
    assert rows[0]["taken"] and rows[0]["oof_metric"] > rows[1]["oof_metric"]


def test_better_by_less_than_its_interval_is_not_taken():
    noisy = BASE + SWING
    kept, rows = decide("tta", ("no TTA", images(BASE)), [("flips", images(noisy))], Metric())
    assert rows[1]["diff"] > 0 and rows[1]["low"] < 0 < rows[1]["high"]
    assert kept == "no TTA" and not rows[1]["taken"]


def test_clearly_better_is_taken_and_the_chain_compares_with_the_new_one():
    better, best = images(BASE + 8), images(BASE + 9)   # d4 only 1 pixel better than flips on every image
    kept, rows = decide("tta", ("none", images(BASE)), [("flips", better), ("d4", best)], Metric())
    assert kept == "d4" and rows[1]["taken"] is False and rows[2]["taken"] and rows[2]["vs"] == "flips"
    assert rows[2]["low"] > 0 and [r["taken"] for r in rows] == [False, False, True]


def test_choose_recipe_walks_every_choice():
    """Round 2 worse: round 1 stays; EMA clearly better: taken; flips clearly better, d4 level with
    flips: flips; wider scales worse: 1.0 stays; SWA was not trained: never tried."""
    def score(r: Recipe) -> np.ndarray:
        gain = {2: -6}.get(r.round, 0) + (7 if r.checkpoints == ("ema",) else 0) + (0 if r.checkpoints != ("last",) else -2)
        gain += {("identity",): 0, FLIPS: 5, D4: 5}[r.tta] + (-3 if r.scales != (1.0,) else 0)
        return images(np.clip(BASE + gain, 0, 100))

    tried = []
    recipe, evidence = choose_recipe(lambda r: tried.append(r) or score(r), Recipe(2, ("best",), FLIPS, (1.0,)), True,
                                     lambda rnd: ["best", "last", "ema"], Metric())
    assert recipe == Recipe(1, ("ema",), FLIPS, (1.0,))
    assert [r["choice"] for r in evidence if r["taken"]] == ["round", "checkpoints", "tta", "scales"]
    assert not any("swa" in r.checkpoints for r in tried)
    assert {r["option"] for r in evidence if r["choice"] == "checkpoints"} == {
        replace(Recipe(), checkpoints=c).label() for c in (("best",), ("last",), ("ema",), ("best", "last"))}


def test_without_round_2_round_2_is_not_a_candidate():
    recipe, evidence = choose_recipe(lambda r: images(BASE), Recipe(2), False, lambda rnd: ["best"], Metric())
    assert recipe == Recipe() and [r["option"] for r in evidence if r["choice"] == "round"] == [Recipe().label()]


def test_a_checkpoint_holding_the_same_weights_as_another_is_one_model(tmp_path):
    """best.pt and last.pt of a run whose best epoch was its last hold one model: the judge predicts it
    once (`last` and `best + last` are then `best`'s out-of-fold confusions); other weights stay apart."""
    import torch

    from pipeline.config import Params
    from pipeline.evaluation.judge import Judge
    from pipeline.models.checkpoint import InputSpec, ModelRef, save_checkpoint
    from pipeline.models.factory import build_model

    classes = ["Background", "a"]
    spec = InputSpec(tuple(classes), max_side=None, eval_size=64, window=None).to_dict()
    torch.manual_seed(0)
    model = build_model("unet", "resnet18", None, len(classes))
    out = tmp_path / "models/fold_0/seed_0"
    out.mkdir(parents=True)
    meta = dict(classes=classes, params={"model": "unet", "encoder": "resnet18"}, input_spec=spec)
    save_checkpoint(out / "best.pt", model=model.state_dict(), epoch=12, **meta)
    save_checkpoint(out / "last.pt", model=model.state_dict(), epoch=12, state="done", **meta)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    save_checkpoint(out / "ema.pt", model=model.state_dict(), epoch=12, **meta)
    raw = Params().model_dump()
    raw["paths"]["models"] = str(tmp_path / "models")
    judge = Judge(Params.model_validate(raw).only("paths", "infer", "metric", "train"), classes, torch.device("cpu"))
    best, last, ema = (ModelRef(tmp_path / "models", 0, 0, c) for c in ("best", "last", "ema"))
    assert judge.canonical(best) == best and judge.canonical(last) == best   # the first one seen stands for both
    assert judge.canonical(ema) == ema
