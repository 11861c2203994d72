"""The leaderboard: every DVC experiment (and the workspace) on one line — its name, the params
that differ between the rows, CV mIoU, the holdout mIoU of what it submits (the final ensemble, or
the fitted blend when it blends other experiments), the best holdout variant, and training time —
read from `dvc exp show --json`, sorted best first.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
from typing import Any, Iterator, Optional

from pipeline.config import flatten

IGNORED_PARAMS = ("paths.",)   # where outputs go is not a recipe
COLUMNS = ["experiment", "cv_mIoU", "holdout_mIoU", "best_holdout", "train_min", "params"]


def dvc_experiments(cwd: Optional[str] = None) -> list[dict]:
    """`dvc exp show --json` (workspace, commits and their experiments), as DVC prints it."""
    out = subprocess.run(["dvc", "exp", "show", "--json"], capture_output=True, text=True, cwd=cwd)
    if out.returncode != 0:
        raise RuntimeError(f"dvc exp show failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


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


def row(name: str, data: dict) -> dict[str, Any]:
    params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data") or {})
    metrics = data.get("metrics") or {}
    cv = _metric(metrics, "metrics/cv.json").get("cv", {})
    variants = _metric(metrics, "metrics/ensemble.json").get("ensemble", {})
    final = next((v for k, v in variants.items() if k.startswith("holdout/final_ensemble")), {})
    holdout = {k.split("/", 1)[1]: v["mIoU"] for k, v in variants.items() if k.startswith("holdout/") and "mIoU" in v}
    blend = _metric(metrics, "metrics/blend.json").get("blend", {})
    if blend.get("experiments", 1) > 1:   # the submission is the blend of experiments (stage blend)
        final = {"mIoU": blend["mIoU"]}
        holdout[f"blend_of_{blend['experiments']}_experiments"] = blend["mIoU"]
    best = max(holdout, key=holdout.get) if holdout else None
    train_s = sum(m.get("data", {}).get("val", {}).get("train_s", 0.0) for path, m in metrics.items()
                  if "/train/" in path.replace("\\", "/") and isinstance(m, dict))
    return {"experiment": name, "cv_mIoU": cv.get("mIoU"), "holdout_mIoU": final.get("mIoU"),
            "best_holdout": f"{holdout[best]:.4f} {best}" if best else None,
            "train_min": round(train_s / 60, 1) if train_s else None, "_params": params}


def leaderboard(tree: list[dict], sort: str = "cv_mIoU") -> list[dict]:
    """Rows sorted by `sort` (best first; rows without it last), params reduced to those that differ."""
    rows = [row(n, d) for n, d in _entries(tree)]
    keys = sorted({k for r in rows for k in r["_params"]})
    differ = [k for k in keys if not k.startswith(IGNORED_PARAMS)
              and len({json.dumps(r["_params"].get(k), sort_keys=True) for r in rows}) > 1]
    for r in rows:
        p = r.pop("_params")
        r["params"] = " ".join(f"{k}={_short(p.get(k))}" for k in differ)
    return sorted(rows, key=lambda r: (r[sort] is None, -(r[sort] or 0.0)))


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
