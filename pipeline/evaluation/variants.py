"""The tricks the ensemble stage judges, as specs (`Variant`): which trained models, judged on which
images, with or without TTA. Judging them is judge.py; fitting the post-processing is refinement.py.

  out-of-fold (all non-holdout images): each fold's model on its own validation fold, summed —
      single model, + TTA, best+last epoch ensemble, SWA / EMA (+ TTA) when trained, the seed ensemble
      (all train.seeds of the fold) when there are several, round-2 (pseudo-label) fold model;
  holdout (images in no fold): each fold model alone (mean over folds), the k-fold ensemble,
      + TTA, the k-fold x seed ensemble, the round-2 k-fold ensemble, and the final ensemble the
      submission uses (`infer`: folds x seeds x checkpoints, TTA).
Single-model rows use the first seed of train.seeds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.models.checkpoint import ModelRef, ModelSet
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import ParamsView


OOF, HOLDOUT = "out-of-fold", "holdout"


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


def variants(p: "ParamsView", has_round2: bool) -> list[Variant]:
    """The tricks judged, as specs: out of fold, then on the holdout (params infer, train, paths)."""
    ws, t, infer = Workspace(p.paths), p.train, p.infer
    r1, r2, s0 = ws.models(1), ws.models(2), t.seeds[0]

    def models(folder: Path = r1, ckpt: str = "best", seeds: tuple = (s0,)) -> tuple[ModelRef, ...]:
        return tuple(ModelRef(folder, k, s, ckpt) for k in t.folds for s in seeds)

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
