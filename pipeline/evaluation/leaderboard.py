"""The leaderboard: every DVC experiment (and the workspace) on one line — its name, the params
that differ between the rows, CV mIoU, the CV metric's 95 % bootstrap interval over images, the paired
difference from the top row on the same out-of-fold images (is it really behind?), the holdout mIoU
of what it submits with its interval and the submitted variant's id (headline.submitted: the final
ensemble as refined, or the fitted blend when it blends other experiments), and training minutes —
read from the headline metrics git holds for the workspace, HEAD and every DVC experiment ref (any
baseline, so a teammate's pulled experiment shows even after new commits), sorted best first.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pandas as pd

from pipeline.config import flatten
from pipeline.evaluation.headline import cv_score, submitted
from pipeline.workspace import Workspace

IGNORED_PARAMS = ("paths.",)   # where outputs go is not a recipe
COLUMNS = ["experiment", "cv_mIoU", "cv_ci95", "vs_top", "holdout_mIoU", "holdout_ci95", "submitted", "train_min", "params"]


HEADLINE_FILES = ("cv", "ensemble", "blend")   # the headline metrics the leaderboard reads


def _git(args: list[str], cwd: Optional[str]) -> Optional[str]:
    out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd)
    return out.stdout if out.returncode == 0 else None


def git_experiments(cwd: Optional[str] = None) -> list[dict]:
    """The tree `dvc exp show --json` prints, read from git alone (fast, and DVC may hold its lock, as it
    does while a stage runs): the workspace, HEAD, and every DVC experiment under refs/exps — of any
    baseline, unlike `dvc exp show` (one a teammate pushed, pulled after you committed) — with
    params.yaml and the headline metrics of each."""
    import yaml

    def data(read: Callable[[str], Optional[str]]) -> dict:
        text = read("params.yaml")
        params = yaml.safe_load(text) if text else {}
        folder = _workspace(flatten(params or {})).metrics_json
        metrics = {}
        for stage in HEADLINE_FILES:
            path = folder(stage).as_posix()
            text = read(path)
            if text:
                metrics[path] = {"data": json.loads(text)}
        return {"params": {"params.yaml": {"data": params or {}}}, "metrics": metrics}

    def at(rev: str) -> Callable[[str], Optional[str]]:
        return lambda path: _git(["show", f"{rev}:{path}"], cwd)

    def here(path: str) -> Optional[str]:
        f = Path(cwd or ".") / path
        return f.read_text() if f.exists() else None

    head = (_git(["rev-parse", "HEAD"], cwd) or "").strip()
    refs = (_git(["for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], cwd) or "").split("\n")
    exps = [{"revs": [{"rev": sha, "name": ref.rsplit("/", 1)[-1], "data": data(at(sha))}]}
            for ref, sha in (line.split() for line in refs if line.strip())
            if len(ref.split("/")) == 5]   # refs/exps/<sha[:2]>/<sha[2:]>/<name>; not DVC's exec/celery refs
    tree = [{"rev": "workspace", "data": data(here)}]
    if head:
        branch = (_git(["rev-parse", "--abbrev-ref", "HEAD"], cwd) or "HEAD").strip()
        tree.append({"rev": head, "name": branch if branch != "HEAD" else head[:7], "data": data(at(head)),
                     "experiments": exps})
    return tree


def experiment_curves(name: str, histories: Path, cwd: Optional[str] = None) -> Optional[pd.DataFrame]:
    """An experiment's validation mIoU by epoch, averaged over its round-1 models (the csv files under
    `histories`, Workspace.histories("train"), which git holds): for 'workspace', a commit or an
    experiment's name (refs/exps). None if it has none."""
    if name == "workspace":
        folder = Path(cwd or ".") / histories
        frames = [pd.read_csv(f) for f in sorted(folder.iterdir())] if folder.is_dir() else []
    else:
        ref = name
        for line in (_git(["for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"], cwd) or "").splitlines():
            if len(line.split()[0].split("/")) == 5 and line.split()[0].rsplit("/", 1)[-1] == name:
                ref = line.split()[1]
        listing = _git(["ls-tree", "-r", "--name-only", ref, f"{histories.as_posix()}/"], cwd) or ""
        frames = [pd.read_csv(io.StringIO(_git(["show", f"{ref}:{p}"], cwd) or ""))
                  for p in listing.split()]
    frames = [f for f in frames if "val/mIoU" in f and "epoch" in f]
    if not frames:
        return None
    return pd.concat(frames).dropna(subset=["val/mIoU"]).groupby("epoch", as_index=False)["val/mIoU"].mean()


def _entries(nodes: list[dict]) -> Iterator[tuple[str, dict]]:
    """(name, data) of every row in DVC's tree: the workspace, each commit, each experiment."""
    for node in nodes:
        data = node.get("data") or {}
        name = node.get("name") or (node.get("rev", "")[:7] if node.get("rev") != "workspace" else "workspace")
        if data.get("params") or data.get("metrics"):
            yield name, data
        for exp in node.get("experiments") or []:
            yield from _entries(exp.get("revs") or [])


def _metric(metrics: dict, file: str) -> dict:
    for path, content in metrics.items():
        if path.replace("\\", "/").endswith(file):
            return (content or {}).get("data") or {}
    return {}


def _workspace(params: dict) -> Workspace:
    """An experiment's layout from its flattened params (the folders DVC reports it used)."""
    return Workspace(SimpleNamespace(plots=params.get("paths.plots", "plots"),
                                     metrics=params.get("paths.metrics", "metrics")))


def _ci(ci: Optional[tuple[float, float]], name: str) -> Optional[str]:
    if not ci:
        return None
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]" + (f" {name}" if name != "mIoU" else "")


def row(name: str, data: dict) -> dict[str, Any]:
    params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
    metrics, ws = data.get("metrics") or {}, _workspace(params)
    head = {s: _metric(metrics, ws.metrics_json(s).as_posix()).get(s, {}) for s in HEADLINE_FILES}
    cv, sub = cv_score(head["cv"]), submitted(head["ensemble"], head["blend"])
    return {"experiment": name, "cv_mIoU": head["cv"].get("mIoU"), "cv_ci95": _ci(cv["ci95"], cv["name"]),
            "vs_top": None, "holdout_mIoU": sub.get("mIoU"), "holdout_ci95": _ci(sub.get("ci95"), sub.get("metric_name")),
            "submitted": sub.get("id"), "train_min": head["ensemble"].get("train_min"), "_params": params}


def leaderboard(tree: list[dict], sort: str = "cv_mIoU",
                images: Optional[Callable[[str, dict], Optional[tuple[np.ndarray, np.ndarray]]]] = None) -> list[dict]:
    """Rows sorted by `sort` (best first; rows without it last), params reduced to those that differ.
    images(name, flat params) -> (image keys, (N, C, C) per-image out-of-fold confusions) or None: with
    it, each row's vs_top is its paired bootstrap difference from the top row on the images both
    scored ("+0.004 [-0.003, +0.011]": an interval holding 0 means the two are not told apart)."""
    rows = [row(n, d) for n, d in _entries(tree)]
    rows = sorted(rows, key=lambda r: (r[sort] is None, -(r[sort] or 0.0)))
    if images is not None and rows:
        paired_with_top(rows, images)
    keys = sorted({k for r in rows for k in r["_params"]})
    differ = [k for k in keys if not k.startswith(IGNORED_PARAMS)
              and len({json.dumps(r["_params"].get(k), sort_keys=True) for r in rows}) > 1]
    for r in rows:
        p = r.pop("_params")
        r["params"] = " ".join(f"{k}={_short(p.get(k))}" for k in differ)
    return rows


def paired_with_top(rows: list[dict], images) -> None:
    """Fill vs_top: each row minus the first, by the top row's metric, on the out-of-fold images both
    hold (rows counted at another metric size, or with no image in common, stay empty)."""
    from pipeline.evaluation import stats
    from pipeline.evaluation.metrics import Metric

    def metric_of(p: dict) -> tuple[str, Any]:
        return p.get("metric.kind", "dataset"), p.get("metric.size", "native")

    top_params = rows[0]["_params"]
    top = images(rows[0]["experiment"], top_params) if rows[0]["cv_mIoU"] is not None else None
    if top is None:
        return
    kind, size = metric_of(top_params)
    metric = Metric(kind, None if size == "native" else int(size))
    seed, draws = int(top_params.get("metric.seed", 0)), int(top_params.get("metric.bootstrap", stats.DRAWS))
    where = {k: i for i, k in enumerate(top[0])}
    for r in rows[1:]:
        scored = r["cv_mIoU"] is not None and metric_of(r["_params"])[1] == size   # (opening a revision costs seconds)
        got = images(r["experiment"], r["_params"]) if scored else None
        if got is None:
            continue
        both = [(where[k], i) for i, k in enumerate(got[0]) if k in where]
        if len(both) < 2:
            continue
        a, b = got[1][[i for _, i in both]], top[1][[j for j, _ in both]]
        r["vs_top"] = stats.fmt_paired(stats.paired(metric, a, b, draws, seed))


def dvc_images(cwd: Optional[str] = None):
    """images() for leaderboard(): each row's stage-cv per-image confusions, from the workspace for
    'workspace' and from DVC's cache for a commit or an experiment (None where it has none)."""
    def read(name: str, params: dict) -> Optional[tuple[np.ndarray, np.ndarray]]:
        ws = _workspace(params)
        for rel in (str(ws.cv_image_confusions), str(ws.cv.old_image_confusions)):
            try:
                if name == "workspace":
                    f = np.load(Path(cwd or ".") / rel)
                else:
                    from dvc.api import DVCFileSystem

                    with DVCFileSystem(cwd or ".", rev=name).open(rel, "rb") as fh:
                        f = np.load(io.BytesIO(fh.read()))
                return np.asarray(f["keys"]), np.asarray(f["confusions"])
            except Exception:  # noqa: BLE001 - an older experiment without the file, an unknown revision
                continue
        return None
    return read


def _short(v: Any) -> str:
    if isinstance(v, (list, dict)):
        return json.dumps(v, separators=(",", ":"))
    return "null" if v is None else str(v)


def _cell(v: Any) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) and not isinstance(v, bool) else str(v)


def render(rows: list[dict], fmt: str = "text") -> str:
    """text (aligned columns for a terminal), md (a markdown table) or csv."""
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, COLUMNS)
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()
    cells = [COLUMNS] + [[_cell(r[c]) for c in COLUMNS] for r in rows]
    if fmt == "md":
        lines = ["| " + " | ".join(cells[0]) + " |", "|" + "---|" * len(COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells[1:]])
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in cells)
