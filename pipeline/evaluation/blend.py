"""Ensembles across experiments: this experiment's final ensemble and those of other experiments
(named DVC experiments, or other workspaces' folders), weighted by greedy hill-climbing on the
out-of-fold predictions (Caruana et al. 2004: start from the best single experiment, then add one
experiment's weight per step while the OOF mIoU improves) and judged on the holdout, which no member
of any experiment trained on and the fitting never saw.

Experiments can blend when they share the classes, the mask cache's max_side, the split (folds.csv:
same keys, folds and holdout; otherwise one experiment's members may have trained on another's
validation or holdout images), the input framing (train.eval_size) and infer's TTA views and scales
(so the blend is one ensemble: every member weighted, see `blend_members`).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import cv2
import numpy as np
import pandas as pd
import torch
import yaml

from pipeline.config import Params, parse_params
from pipeline.data.coco import DataError
from pipeline.data.masks import read_classes
from pipeline.evaluation.oof import read_oof
from pipeline.evaluation.metrics import Metric, scores
from pipeline.evaluation.scoring import ImageConfusions, holdout_table, predict_rows
from pipeline.inference.ensemble import Ensemble
from pipeline.inference.recipe import chosen_infer
from pipeline.io import write_json
from pipeline.models.checkpoint import ModelSet
from pipeline.workspace import Workspace

if TYPE_CHECKING:
    from pipeline.config import Infer, ParamsView

HERE = "this experiment"


@dataclass
class Experiment:
    name: str
    root: Path
    params: Params

    def path(self, p: str) -> Path:
        return self.root / p

    @property
    def ws(self) -> Workspace:
        return Workspace(self.params.paths, self.root)

    @property
    def infer(self) -> "Infer":
        """Its infer section as its final ensemble uses it (the recipe its ensemble stage chose, with choose auto)."""
        return chosen_infer(self.params.infer, self.ws)

    @property
    def members(self) -> list[tuple[Path, float]]:
        """(checkpoint, weight) of its final ensemble (folds x seeds x checkpoints, fold-weighted)."""
        return ModelSet.final(self.infer, self.params.train, self.ws).weighted()


def this_experiment(p: Params) -> Experiment:
    return Experiment(HERE, Path("."), p)


def load_experiment(spec: str, repo: str | Path, cache: str | Path) -> Experiment:
    """A workspace folder (with params.yaml), or a DVC experiment of `repo` whose outputs the blend
    needs (params, split, OOF probabilities, final checkpoints) are copied from DVC's cache to <cache>/<spec>."""
    folder = Path(spec)
    if (folder / "params.yaml").is_file():
        return Experiment(spec, folder, parse_params(yaml.safe_load((folder / "params.yaml").read_text()),
                                                     str(folder / "params.yaml")))
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(repo), rev=spec)
        raw = yaml.safe_load(fs.read_text("params.yaml"))
    except Exception as e:  # noqa: BLE001 - dvc/scmrepo raise several kinds for an unknown revision
        raise DataError(f"blend.experiments: {spec!r} is neither a folder with params.yaml nor a DVC experiment or "
                        f"revision of this repository (`dvc exp show` lists experiments): {e}") from None
    exp = Experiment(spec, Path(cache) / spec.replace("/", "_"), parse_params(raw, f"params.yaml of {spec}"))
    shutil.rmtree(exp.root, ignore_errors=True)
    p, here = exp.params.paths, Workspace(exp.params.paths)   # paths inside the experiment's repo
    choice = str(here.ensemble.choice_json)   # its chosen recipe (an experiment from before choose has none)
    (exp.root / choice).parent.mkdir(parents=True, exist_ok=True)
    try:
        fs.get_file(choice, str(exp.root / choice))
    except FileNotFoundError:
        pass
    final = ModelSet.final(exp.infer, exp.params.train, here)
    files = [str(here.folds_csv)] + [str(r.path) for r in final.refs()]
    try:
        fs.get(p.oof, str(exp.root / p.oof), recursive=True)
        for f in files:
            (exp.root / f).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f, str(exp.root / f))
    except FileNotFoundError as e:
        raise DataError(f"blend.experiments: experiment {spec!r} lacks {e.filename or e}: run its whole pipeline "
                        "(`dvc exp run`) before blending it") from None
    return exp


def check_compatible(exps: list[Experiment]) -> None:
    """Refuse, naming the experiment and the difference, what cannot be blended honestly (module docstring)."""
    base = exps[0]

    def facts(e: Experiment) -> dict:
        folds = pd.read_csv(e.ws.folds_csv)[["key", "fold", "holdout"]]
        return {"classes and max_side": read_classes(e.path(e.params.paths.oof)),
                "split (folds.csv)": folds.sort_values("key").reset_index(drop=True),
                "train.eval_size": e.params.train.eval_size,
                "infer TTA views and scales": (e.infer.tta, e.infer.scales)}

    ref = facts(base)
    for e in exps[1:]:
        for what, value in facts(e).items():
            same = value.equals(ref[what]) if isinstance(value, pd.DataFrame) else value == ref[what]
            if not same:
                raise DataError(f"blend.experiments: {e.name!r} differs from {base.name!r} in its {what}; "
                                "experiments blend only when these agree")


def load_oof(exps: list[Experiment]) -> tuple[list[list[np.ndarray]], list[np.ndarray]]:
    """(per experiment, per image: (C, h, w) uint8 probabilities; per image: truth), aligned by image key."""
    tables = [read_oof(e.path(e.params.paths.oof)).sort_values("key").reset_index(drop=True) for e in exps]
    for e, t in zip(exps[1:], tables[1:]):
        if t.key.tolist() != tables[0].key.tolist():
            raise DataError(f"blend.experiments: {e.name!r} has out-of-fold predictions for other images; rerun its oof stage")
    probs = [[np.load(f) for f in t.probs] for t in tables]
    truths = [cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in tables[0]["mask"]]
    return probs, truths


def oof_images(probs: list[list[np.ndarray]], truths: list[np.ndarray], weights: list[float], n_cls: int,
               metric: Optional[Metric] = None) -> np.ndarray:
    """(N, C, C) per-image confusions of the weighted mix of the experiments' OOF probabilities."""
    metric = metric or Metric()
    out = np.zeros((len(truths), n_cls, n_cls), np.int64)
    for i, truth in enumerate(truths):
        mix = sum(w * probs[e][i].astype(np.float32) for e, w in enumerate(weights) if w)
        out[i] = metric.count(mix.argmax(0), truth, n_cls).numpy()
    return out


def oof_confusion(probs: list[list[np.ndarray]], truths: list[np.ndarray], weights: list[float], n_cls: int) -> np.ndarray:
    return oof_images(probs, truths, weights, n_cls).sum(0)


def hill_climb(probs: list[list[np.ndarray]], truths: list[np.ndarray], classes: list[str],
               steps: int, metric: Optional[Metric] = None) -> tuple[list[float], list[dict]]:
    """Greedy forward selection with replacement, maximising `metric` (default dataset mIoU) out of
    fold: (weights summing to 1, one row per step taken)."""
    n, metric = len(probs), metric or Metric()

    def miou(counts: list[int]) -> float:
        return metric.value(oof_images(probs, truths, counts, len(classes), metric))

    singles = [miou([int(e == j) for j in range(n)]) for e in range(n)]
    counts = [int(e == int(np.argmax(singles))) for e in range(n)]
    best, history = max(singles), [{"step": 0, "added": int(np.argmax(singles)), "oof_mIoU": max(singles)}]
    for step in range(1, steps + 1):
        tried = [miou([c + (j == e) for j, c in enumerate(counts)]) for e in range(n)]
        e = int(np.argmax(tried))
        if tried[e] <= best:
            break
        counts[e] += 1
        best = tried[e]
        history.append({"step": step, "added": e, "oof_mIoU": best})
    return [c / sum(counts) for c in counts], history


def judge_on_holdout(exps: list[Experiment], variants: dict[str, list[float]], held: pd.DataFrame,
                     classes: list[str], device: torch.device, metric: Optional[Metric] = None) -> dict[str, np.ndarray]:
    """(N, C, C) per-image confusions on the holdout of every variant (weights over `exps`); each
    experiment's final ensemble predicts every image once, the variants mix its probabilities."""
    p = exps[0].params
    ens = [Ensemble.from_files(e.members, e.infer, device) for e in exps]
    counts = ImageConfusions(held, len(classes), metric, variants)
    for i, per_exp in predict_rows(ens, held, p.infer.batch_size):
        for name, weights in variants.items():
            mix = sum(w * q for w, q in zip(weights, per_exp) if w)
            counts.count(i, mix.argmax(0).cpu().numpy(), name)
    return counts.per_image


def blend_members(exps: list[Experiment], weights: list[float]) -> list[tuple[Path, float]]:
    """The blend as one ensemble: every member of experiment e weighted w_e x its share of e's ensemble."""
    out = []
    for e, w in zip(exps, weights):
        members = e.members
        total = sum(m for _, m in members)
        out += [(f, w * m / total) for f, m in members if w > 0]
    return out


LABELS = {"equal": "equal-weight blend", "fitted": "fitted blend (OOF hill-climbing)"}   # ids alone/<name>: "<name> alone"


def fit_blend(exps: list[Experiment], classes: list[str], steps: int, held: Optional[pd.DataFrame],
              device: torch.device, metric: Optional[Metric] = None) -> tuple[pd.DataFrame, dict]:
    """(variant table, summary): every experiment alone, the equal-weight blend and the fitted blend,
    each with its OOF mIoU and chosen metric and, when there is a holdout, its holdout scores."""
    probs, truths = load_oof(exps)
    n, metric = len(exps), metric or Metric()
    fitted, history = hill_climb(probs, truths, classes, steps, metric)
    variants = {f"alone/{e.name}": [float(j == i) for j in range(n)] for i, e in enumerate(exps)}
    if n > 1:
        variants["equal"] = [1.0 / n] * n
        variants["fitted"] = fitted
    held_cm = judge_on_holdout(exps, variants, held, classes, device, metric) if held is not None and len(held) else {}
    rows = []
    for name, w in variants.items():
        per = oof_images(probs, truths, w, len(classes), metric)
        oof = scores(per.sum(0), classes)
        row = {"id": name, "variant": LABELS.get(name, name.removeprefix("alone/") + " alone"), "weights": " ".join(f"{e.name}={x:.3f}" for e, x in zip(exps, w)),
               "oof_mIoU": oof["mIoU"], "oof_metric": metric.value(per), "oof_images": len(truths)}
        if name in held_cm:
            s = scores(held_cm[name].sum(0), classes)
            row.update({"holdout_mIoU": s["mIoU"], "holdout_metric": metric.value(held_cm[name]),
                        "holdout_pixel_acc": s["pixel_acc"], "holdout_images": len(held),
                        **{f"IoU/{c}": v for c, v in s["IoU"].items()}})
        rows.append(row)
    table = pd.DataFrame(rows)
    key = "holdout_mIoU" if "holdout_mIoU" in table else "oof_mIoU"
    singles = table[table["id"].str.startswith("alone/")]
    best_single = singles.loc[singles[key].idxmax()]
    table["vs_best_single"] = table[key] - best_single[key]   # > 0: the blend beat every experiment alone
    final = table.iloc[-1]
    summary = {"experiments": [{"name": e.name, "weight": w} for e, w in zip(exps, fitted)], "steps": history,
               "judged_on": "holdout" if key == "holdout_mIoU" else "out-of-fold",
               "best_single": best_single.variant, "best_single_mIoU": float(best_single[key]),
               "blend_mIoU": float(final[key]), "gain_vs_best_single": float(final[key] - best_single[key])}
    return table, summary


def blend_experiments(p: "ParamsView", device: torch.device) -> tuple[pd.DataFrame, dict]:
    """The stage's work for params `p` (infer, train, blend, paths): copy the other experiments into
    paths.blend (afresh), refuse what cannot blend, fit and judge; the summary lists the members."""
    ws = Workspace(p.paths)
    copies = ws.blend_copies
    shutil.rmtree(copies, ignore_errors=True)
    copies.mkdir(parents=True)
    exps = [this_experiment(p)] + [load_experiment(s, ".", copies) for s in p.blend.experiments]
    write_json(ws.blend_experiments_json, {e.name: str(e.root) for e in exps})   # what was copied where
    check_compatible(exps)
    table, summary = fit_blend(exps, read_classes(p.paths.masks)["classes"], p.blend.steps,
                               holdout_table(ws), device, Metric.of(p.metric))
    summary["members"] = [[str(f), w] for f, w in blend_members(exps, [x["weight"] for x in summary["experiments"]])]
    return table, summary


def summary_line(summary: dict) -> str:
    n = len(summary["experiments"])
    if n == 1:
        return "blend: no other experiments (blend.experiments); the submission is this experiment's ensemble"
    return (f"blend of {n} experiments ({summary['judged_on']}): mIoU {summary['blend_mIoU']:.4f} vs best single "
            f"({summary['best_single']}) {summary['best_single_mIoU']:.4f} ({summary['gain_vs_best_single']:+.4f}); "
            "weights " + ", ".join(f"{x['name']} {x['weight']:.2f}" for x in summary["experiments"]))


def submitted_members(p: "ParamsView") -> list[tuple[Path, float]]:
    """(checkpoint, weight) of what the submission uses: the fitted blend's members with
    blend.experiments (written by the blend stage), else this experiment's final ensemble.
    p: params as recipe.final_params gives them (infer as the ensemble stage chose it)."""
    if p.blend.experiments:
        return [(Path(f), w) for f, w in json.loads(Workspace(p.paths).blend.blend_json.read_text())["members"]]
    return ModelSet.final(p.infer, p.train, Workspace(p.paths)).weighted()
