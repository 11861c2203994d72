"""Choosing the final ensemble's recipe out of fold, nnU-Net's rule (find_best_configuration picks
configurations, ensembles and post-processing by cross-validation, never by the test set).

The choices are made in order, each on the out-of-fold images (every fold's members on that fold's
validation images, which none of them trained on), each given the ones before:

    round        1, or 2 (fine-tuned on pseudo-labels) when trained
    checkpoints  best, then last / SWA / EMA alone and best + last, where every member has them
    tta          identity, then flips (identity + hflip), then d4
    scales       1.0, then infer.scales (or 0.75, 1.0, 1.25 when infer.scales is 1.0 alone)
    crf, rules   on the chosen members' out-of-fold probabilities (refinement.py)

A costlier or other option replaces the current one only when its paired 95 % bootstrap interval over
the out-of-fold images (same images, option minus current) lies above 0: the simpler one wins ties,
so noise never buys inference time. The holdout is read by nothing here; the judge compares the
chosen recipe with the fixed one (params) on it afterwards.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np

from pipeline.evaluation import stats
from pipeline.evaluation.metrics import Metric

FLIPS, D4 = ("identity", "hflip"), ("d4",)
WIDER_SCALES = (0.75, 1.0, 1.25)


@dataclass(frozen=True)
class Recipe:
    """What the final ensemble is made of: round, checkpoints of every fold x seed, TTA views, scales."""
    round: int = 1
    checkpoints: tuple[str, ...] = ("best",)
    tta: tuple[str, ...] = ("identity",)
    scales: tuple[float, ...] = (1.0,)

    @classmethod
    def of(cls, infer, has_round2: bool) -> "Recipe":
        """The recipe params fix (infer; round 2 only when it was trained)."""
        return cls(2 if infer.round == 2 and has_round2 else 1, tuple(infer.checkpoints), tuple(infer.tta),
                   tuple(infer.scales))

    def label(self) -> str:
        views = "no TTA" if self.tta == ("identity",) else "TTA " + "+".join(self.tta)
        scales = "" if self.scales == (1.0,) else ", scales " + "/".join(f"{s:g}" for s in self.scales)
        return f"round {self.round}, {'+'.join(self.checkpoints)}, {views}{scales}"

    def to_json(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def decide(choice: str, current: tuple[str, np.ndarray], candidates: list[tuple[str, np.ndarray]], metric: Metric,
           draws: int = stats.DRAWS, seed: int = 0) -> tuple[str, list[dict]]:
    """Walk `candidates` (name, (N, C, C) per-image confusions on the same images as current's), each
    replacing the current option only when its paired interval against it lies above 0. Returns the
    name kept and one evidence row per option: choice, option, vs, oof_metric, diff, low, high, taken."""
    name, per = current
    rows = [{"choice": choice, "option": name, "vs": None, "oof_metric": metric.value(per), "diff": None,
             "low": None, "high": None}]
    for other, other_per in candidates:
        d = stats.paired(metric, other_per, per, draws, seed)
        rows.append({"choice": choice, "option": other, "vs": name, "oof_metric": metric.value(other_per), **d})
        if d["low"] > 0:
            name, per = other, other_per
    for r in rows:
        r["taken"] = r["option"] == name
    return name, rows


def choose_recipe(score: Callable[[Recipe], np.ndarray], fixed: Recipe, has_round2: bool,
                  available: Callable[[int], list[str]], metric: Metric, draws: int = stats.DRAWS,
                  seed: int = 0) -> tuple[Recipe, list[dict]]:
    """The recipe the out-of-fold evidence supports, and the evidence (decide's rows, every choice).
    score(recipe): (N, C, C) per-image out-of-fold confusions of that recipe's members, same images
    for every recipe; available(round): the checkpoints every member of that round has."""
    recipe, evidence = Recipe(), []

    def step(choice: str, options: list[Recipe]) -> None:
        nonlocal recipe
        named = {o.label(): o for o in [recipe, *options]}
        kept, rows = decide(choice, (recipe.label(), score(recipe)), [(o.label(), score(o)) for o in options],
                            metric, draws, seed)
        recipe = named[kept]
        evidence.extend(rows)

    step("round", [replace(recipe, round=2)] if has_round2 else [])
    have = available(recipe.round)
    singles = [replace(recipe, checkpoints=(c,)) for c in ("last", "swa", "ema") if c in have]
    pair = [replace(recipe, checkpoints=("best", "last"))] if {"best", "last"} <= set(have) else []
    step("checkpoints", singles + pair)
    step("tta", [replace(recipe, tta=FLIPS), replace(recipe, tta=D4)])
    wider = fixed.scales if fixed.scales != (1.0,) else WIDER_SCALES
    step("scales", [replace(recipe, scales=tuple(wider))])
    return recipe, evidence
